"""Experiences: the Experience/EID model, columnar batches and the zero-copy wire codec."""
from .batch import ArrayColumn, ExperienceBatch
from .codec import decode_experiences, encode_experiences
from .dispatch import decode_any, decode_payloads
from .model import EID, Experience, to_torch

__all__ = ["EID", "ArrayColumn", "Experience", "ExperienceBatch", "decode_any",
           "decode_experiences", "decode_payloads", "encode_experiences", "to_torch"]
