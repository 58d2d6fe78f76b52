# The contract of fastrollout._native.experience: Experience's fields as C slots, so other
# Cython modules (codecs) can read and fill them directly after `cimport`.

cdef class Experience:
    cdef public object tokens, prompt_length, reward, eid
    cdef public object logprobs, token_level_reward, advantages, returns, action_mask
    cdef public object chosen, rejected, teacher_logprobs
    cdef public object truncate_status, info, metrics, response_text, prompt_text
    cdef public object messages, tools, chosen_messages, rejected_messages
