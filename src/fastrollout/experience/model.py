"""Experience and EID: one sampled trajectory and its identity (Trinity's field names).

``Experience`` is compiled (``fastrollout._native.experience``, for construction speed). What
it builds with lives in leaf modules that import nothing compiled back: ``EID`` in ``eid``,
the field names and the array conversion rules (``FIELD_DTYPES``, ``as_array``) in
``fields``. This module gathers the model's names in one place."""
from .._native.experience import Experience
from .eid import EID
from .fields import ARRAY_FIELDS, FIELD_DTYPES, FIELDS, META_FIELDS, as_array, to_torch

__all__ = ["ARRAY_FIELDS", "EID", "FIELDS", "FIELD_DTYPES", "META_FIELDS", "Experience",
           "as_array", "to_torch"]
