"""The compiled safetensors header parser behind ``decode_trxp`` (native/trxp_header.pyx).

Results are checked against a reference built from ``json.loads`` of the same bytes, and
hostile or random bytes must only ever give a result or ``PayloadHeaderError``.
"""
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from fastrollout import Experience, PayloadError
from fastrollout._native.trxp_header import PayloadHeaderError, parse_header
from fastrollout.compat.trinity import decode_trxp, encode_trxp

LIMIT = 2**56


def reference(header: bytes):
    """What ``parse_header`` must return for ``header``, computed with ``json.loads``."""
    fields: dict = {}
    dtypes: list = []
    for key, entry in json.loads(header, object_pairs_hook=list):
        if key == "__metadata__":
            continue
        entry = dict(entry)
        i_text, colon, name = key.partition(":")
        if not colon:
            i_text, name = key, ""
        item = min(int(i_text), LIMIT) if i_text.isdecimal() and i_text.isascii() else -1
        if entry["dtype"] not in dtypes:
            dtypes.append(entry["dtype"])
        shape = entry["shape"]
        row = [item, shape[0] if len(shape) == 1 else -1, *entry["data_offsets"],
               dtypes.index(entry["dtype"])]
        fields.setdefault(name, ([], key))[0].append(row)
    return fields, dtypes


def assert_matches_reference(header: bytes):
    fields, dtypes = parse_header(header)
    want_fields, want_dtypes = reference(header)
    assert dtypes == want_dtypes
    assert list(fields) == list(want_fields)
    for name, (rows, first_key) in fields.items():
        assert rows.dtype == np.int64 and rows.shape[0] == 5
        assert rows.T.tolist() == want_fields[name][0]
        assert first_key == want_fields[name][1]


def safetensors_header(arrays: dict, metadata=None) -> bytes:
    blob = save(arrays, metadata=metadata)
    (hlen,) = struct.unpack_from("<Q", blob)
    return blob[8:8 + hlen]


def test_reads_what_safetensors_writes():
    header = safetensors_header({
        "0:tokens": np.arange(5, dtype=np.int32), "1:tokens": np.arange(3, dtype=np.int32),
        "0:logprobs": np.zeros(4, np.float32), "1:action_mask": np.ones(3, np.bool_),
        "2:grid": np.zeros((2, 3), np.float64), "3:scalar": np.zeros((), np.int64),
    }, metadata={"format": "np", "note": "a\n\"é\""})
    assert_matches_reference(header)
    fields, dtypes = parse_header(header)
    rows, first_key = fields["tokens"]
    items, lengths, begins, ends, codes = rows
    assert sorted(items.tolist()) == [0, 1] and first_key in ("0:tokens", "1:tokens")
    assert sorted(lengths.tolist()) == [3, 5] and (ends - begins == 4 * lengths).all()
    assert {dtypes[c] for c in codes} == {"I32"}
    assert fields["grid"][0][1].tolist() == [-1] and fields["scalar"][0][1].tolist() == [-1]


@pytest.mark.parametrize("header", [
    b"{}", b"  {\n}\t\r ", b'{"__metadata__":{}}',
    b'{ "__metadata__" : { "k" : "\\u00e9\\t\\\\" } , "0:x" : { "shape" : [ 2 ] ,'
    b' "data_offsets" : [ 0 , 8 ] , "dtype" : "F32" } }        ',
    b'{"x:tokens":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
    b'{"tokens":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
    b'{"007:a:b":{"dtype":"I32","shape":[],"data_offsets":[0,4]}}',
    b'{"99999999999999999999:t":{"dtype":"Q9","shape":[1,2],"data_offsets":[0,0]}}',
    b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},'
    b'"0:t":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}}',
    b'{"0:t":{"dtype":"I32","shape":[72057594037927935],"data_offsets":[0,0]}}',
])
def test_layouts_and_odd_keys_match_the_reference(header):
    assert_matches_reference(header)


@pytest.mark.parametrize("header, match", [
    (b"", "empty"),
    (b"   ", "expected '{' at byte 3"),
    (b"[]", "expected '{' at byte 0"),
    (b"{}{}", "data after the header object at byte 2"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}', "expected ',' or '}'"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},}', "expected a string"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4],}}', "expected a string"),
    (b'{"0:t" {"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', "expected ':'"),
    (b'{"0:t":{"dtype":"I32","shape":[1]}}', "without dtype, shape and data_offsets"),
    (b'{"0:t":{"dtype":"I32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
     "duplicate key in a tensor entry at byte 22"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4],"extra":1}}',
     "unexpected key"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4,8]}}', "two integers"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0]}}', "two integers"),
    (b'{"0:t":{"dtype":"I32","shape":[-1],"data_offsets":[0,4]}}', "non-negative integer"),
    (b'{"0:t":{"dtype":"I32","shape":[1.0],"data_offsets":[0,4]}}', "expected an integer"),
    (b'{"0:t":{"dtype":"I32","shape":[1e3],"data_offsets":[0,4]}}', "expected an integer"),
    (b'{"0:t":{"dtype":"I32","shape":[01],"data_offsets":[0,4]}}', "leading zero"),
    (b'{"0:t":{"dtype":"I32","shape":[72057594037927936],"data_offsets":[0,4]}}', "2\\*\\*56"),
    (b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,99999999999999999999999]}}',
     "2\\*\\*56"),
    (b'{"0:t":{"dtype":"I32","shape":"1","data_offsets":[0,4]}}', "expected '\\['"),
    (b'{"0:t":{"dtype":null,"shape":[1],"data_offsets":[0,4]}}', "expected a string"),
    (b'{"0:t":[]}', "expected '{'"),
    (b'{"0\\u003at":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', "escape"),
    (b'{"0:t":{"dtype":"I\\"32","shape":[1],"data_offsets":[0,4]}}', "escape"),
    (b'{"0:t\n":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', "control character"),
    (b'{"0:\xff":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}', "not UTF-8 at byte 2"),
    (b'{"0:t', "unterminated string"),
    (b'{"__metadata__":{"a":1}}', "expected a string"),
    (b'{"__metadata__":{"a":"\\x"}}', "bad escape"),
    (b'{"__metadata__":{"a":"\\u12g4"}}', "bad \\\\u escape"),
    (b'{"__metadata__":{"a":"\\u12', "unterminated string"),
    (b'{"__metadata__":{"a":"\xc3"}}', "not UTF-8"),
    (b'{"__metadata__":{},"__metadata__":{}}', "duplicate __metadata__ at byte 19"),
])
def test_refuses_malformed_headers(header, match):
    with pytest.raises(PayloadHeaderError, match=match):
        parse_header(header)


def test_every_truncation_of_a_valid_header_is_refused():
    header = safetensors_header({"0:tokens": np.arange(5, dtype=np.int32),
                                 "0:logprobs": np.zeros(5, np.float32)}, {"a": "b"})
    end = len(header.rstrip())
    for cut in range(end):
        with pytest.raises(PayloadHeaderError):
            parse_header(header[:cut])


def test_caps_distinct_names_so_lookups_stay_linear():
    def header(keys, dtypes):
        return json.dumps({k: {"dtype": d, "shape": [0], "data_offsets": [0, 0]}
                           for k, d in zip(keys, dtypes, strict=True)}).encode()
    many = [f"f{k}" for k in range(65)]
    assert len(parse_header(header([f"0:{n}" for n in many[:64]], ["U8"] * 64))[0]) == 64
    with pytest.raises(PayloadHeaderError, match="more than 64 distinct tensor field names"):
        parse_header(header([f"0:{n}" for n in many], ["U8"] * 65))
    assert len(parse_header(header([f"{k}:t" for k in range(64)], many[:64]))[1]) == 64
    with pytest.raises(PayloadHeaderError, match="more than 64 distinct dtypes"):
        parse_header(header([f"{k}:t" for k in range(65)], many))


def test_accepts_any_contiguous_byte_buffer():
    header = b'{"0:t":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}'
    for buf in (bytearray(header), memoryview(b"xx" + header)[2:]):
        assert parse_header(buf)[0]["t"][0][:, 0].tolist() == [0, 1, 0, 4, 0]
    with pytest.raises(TypeError):
        parse_header(None)


def _payload_with_header(head: bytes) -> bytes:
    payload = encode_trxp([Experience(tokens=[1, 2]), Experience(tokens=[3])])
    meta_len = struct.unpack_from("<Q", payload, 5)[0]
    st_at = 21 + meta_len
    hlen = struct.unpack_from("<Q", payload, st_at)[0]
    tensors = struct.pack("<Q", len(head)) + head + payload[st_at + 8 + hlen:]
    return payload[:5] + struct.pack("<QQ", meta_len, len(tensors)) + payload[21:st_at] + tensors


@pytest.mark.parametrize("head, match", [
    (b'{"0:tokens":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},'
     b'"0:tokens":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}}',
     "payload 3: tokens: tensor keys name items outside 0..1 or one item twice"),
    (b'{"0:tokens":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},'
     b'"x:tokens":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}}',
     "payload 3: tokens: a tensor key does not start with an item number"),
    (b'{"0:tokens":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},'
     b'"1:tokens":{"dtype":"I32","shape":[1,1],"data_offsets":[8,12]}}',
     "payload 3: tokens: expected 1-D tensors"),
    (b'{"0:tokens":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},'
     b'"1:tokens":{"dtype":"I32","shape":[1],"data_offsets":[8,12]},'
     b'"7:teacher_probs":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}}',
     "payload 3: teacher_probs: tensor field unknown \\(item 7\\)"),
    (b'{"0:tokens":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}',
     "payload 3: tensors: bad safetensors header: expected ',' or '}' at byte 60"),
])
def test_decode_trxp_names_payload_and_field(head, match):
    good = _payload_with_header(b'{"0:tokens":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},'
                                b'"1:tokens":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}}')
    assert [e.tokens.tolist() for e in decode_trxp(good)] == [[1, 2], [3]]
    with pytest.raises(PayloadError, match=match):
        decode_trxp(_payload_with_header(head), index=3)


VALID = safetensors_header({"0:tokens": np.arange(3, dtype=np.int64),
                            "1:tokens": np.arange(2, dtype=np.int32),
                            "0:action_mask": np.ones(3, np.bool_)}, {"format": "pt"})


def _parse_or_refuse(header: bytes):
    try:
        parse_header(header)
    except PayloadHeaderError:
        return
    assert_matches_reference(header)  # whatever it accepts is JSON that means the same


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.binary(max_size=200))
def test_fuzz_random_bytes(header):
    _parse_or_refuse(header)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_headers(data):
    out = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(out) - 1))
        byte = data.draw(st.sampled_from(b'{}[],:" \\0123456789eu\xff') | st.integers(0, 255))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set":
            out[at] = byte
        elif action == "insert":
            out.insert(at, byte)
        else:
            del out[at]
    _parse_or_refuse(bytes(out[:data.draw(st.integers(0, len(out)))]))
