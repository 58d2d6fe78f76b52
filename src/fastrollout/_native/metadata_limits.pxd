# Bounds on the untrusted metadata of experience payloads, shared by the pickle loader
# (plain_pickle, TRXP) and the msgpack scanner (plain_msgpack, FRXP) so that whatever one
# format accepts, the other accepts once re-encoded.

cdef enum:
    # Containers nest at most this deep, the payload's own wrapping included (FRXP's header
    # array > items > item > info sits as deep as TRXP's meta dict > items > item > info).
    MAX_DEPTH = 200
    # The keys of one dict (or elements of one set) that are not str may cost this much in
    # all: 1 per value (a tuple counts its elements too) plus 1 per 8 bytes of str or bytes
    # inside. Their hashes can be chosen to collide (str hashes are randomized), so that
    # each insertion compares against every key before it: at this cap, such maps decode
    # within about 3x the time per byte of plain metadata (bench_payload_guard.py).
    MAX_KEY_COST = 32
