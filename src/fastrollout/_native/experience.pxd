# The contract of fastrollout._native.experience: Experience's fields as C slots, so other
# Cython modules (the packer) can read and fill them directly after `cimport`.

cdef class Experience:
    cdef public object tokens, prompt_length, reward, eid
    cdef public object logprobs, token_level_reward, advantages, returns, action_mask
    cdef public object chosen, rejected, teacher_logprobs
    cdef public object truncate_status, info, metrics, response_text, prompt_text
    cdef public object messages, tools, chosen_messages, rejected_messages

# Indexes into ARRAY_FIELDS (fastrollout.experience.fields), in its order.
cdef enum:
    F_TOKENS, F_LOGPROBS, F_TOKEN_LEVEL_REWARD, F_ADVANTAGES, F_RETURNS, F_ACTION_MASK,
    F_CHOSEN, F_REJECTED, F_TEACHER_LOGPROBS, N_ARRAY_FIELDS

# ``value`` is what Experience keeps for ARRAY_FIELDS[field] without conversion: an exact
# 1-D native-endian ndarray of a dtype that field keeps.
cdef bint kept_as_is(object value, int field) noexcept

# Field ``i`` of an EID (or of any object with its field names), in the dataclass's field
# order: batch, task, run, step, suffix.
cdef object eid_field(object eid, Py_ssize_t i)

# ``EID(batch, task, run, step, suffix)``, without the call of the dataclass's __init__.
cdef object make_eid(object batch, object task, object run, object step, object suffix)
