# The contract of fastrollout._native.suffix: the EID suffix generator, for Cython modules
# that draw suffixes without a Python call (cimport this file).

# Six random lowercase hex digits (a new str): what new_suffix() returns.
cdef str next_suffix()
