"""TRXP interop both ways against Trinity-RFT 0.6.0's real Experience class.

``trinity/common/experience.py`` is loaded from the installed wheel; it imports only
torch, safetensors and ``trinity.common.dataclass_utils`` (omegaconf), all real: no stand-ins.
"""
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.bench_payload_guard import HOSTILE, trxp_with_info
from benchmarks.trinity_ref import trinity_module
from fastrollout import EID, Experience, ExperienceBatch, PayloadError
from fastrollout._native.plain_pickle import MAX_KEY_COST
from fastrollout.compat.trinity import decode_trxp, encode_trxp
from fastrollout.experience import decode_any, decode_experiences, encode_experiences
from fuzzing import mutated
from test_plain_pickle import decode_isolated

T = trinity_module("common/experience.py")


def trinity_experiences():
    single = T.Experience(eid=T.EID(batch=1, task=2, run=3, step=0, suffix="aaaaaa"),
                          tokens=torch.tensor([5, 6, 7, 8], dtype=torch.int32), prompt_length=2,
                          logprobs=torch.tensor([-0.5, -0.25]), reward=1.0,
                          info={"model_version": 4, "tags": ["x", 1]}, metrics={"acc": 1.0},
                          response_text="r", prompt_text="p", truncate_status=None)
    multi = T.Experience(eid=T.EID(batch="e/1", task="t", run=0, step=2, suffix="bbbbbb"),
                         tokens=torch.arange(6, dtype=torch.int64), prompt_length=1,
                         action_mask=torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool),
                         advantages=torch.ones(5), returns=torch.zeros(5, dtype=torch.float64),
                         token_level_reward=torch.full((5,), 0.5, dtype=torch.float16),
                         teacher_logprobs=torch.tensor([0.1] * 5, dtype=torch.bfloat16),
                         messages=[{"role": "user", "content": "hi"}], tools=[{"name": "f"}])
    dpo = T.Experience(tokens=torch.tensor([1, 2], dtype=torch.int32),
                       chosen=torch.tensor([3, 4], dtype=torch.int32),
                       rejected=torch.tensor([5], dtype=torch.int32),
                       chosen_messages=[{"role": "assistant", "content": "c"}],
                       rejected_messages=[{"role": "assistant", "content": "r"}])
    return [single, multi, dpo]


def assert_matches_trinity(ours, theirs):
    for name in ("tokens", "logprobs", "token_level_reward", "advantages", "returns",
                 "action_mask", "chosen", "rejected", "teacher_logprobs"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert np.array_equal(a, b.float().numpy() if b.dtype == torch.bfloat16
                                  else b.numpy()), name
    for name in ("reward", "prompt_length", "truncate_status", "info", "metrics",
                 "response_text", "prompt_text", "messages", "tools", "chosen_messages",
                 "rejected_messages"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.eid.to_dict() == theirs.eid.to_dict()


def test_decode_trinity_payload():
    theirs = trinity_experiences()
    payload = T.Experience.serialize_many(theirs)
    batch = decode_trxp(payload)
    assert len(batch) == 3
    for ours, t in zip(batch, theirs, strict=True):
        assert_matches_trinity(ours, t)
    # Trinity's quirk: a single-turn experience is written with its synthesized action mask.
    assert batch[0].action_mask.tolist() == [True, True]
    assert batch[1].tokens.dtype == np.int64 and batch[1].returns.dtype == np.float64
    assert len(decode_any(payload, index=0)) == 3


def test_decode_trxp_views_into_safetensors_section():
    payload = T.Experience.serialize_many([T.Experience(
        tokens=torch.arange(10, dtype=torch.int32), prompt_length=4,
        logprobs=torch.zeros(6)) for _ in range(3)])
    batch = decode_trxp(payload)
    whole = np.frombuffer(payload, np.uint8)
    for name, col in batch.columns.items():
        assert np.shares_memory(col.data, whole), name
    assert np.shares_memory(batch[2].tokens, whole)


def test_trinity_reads_our_payload():
    ours = [Experience(tokens=[1, 2, 3, 4], prompt_length=2, logprobs=[-1.0, -2.0], reward=0.5,
                       info={"k": [1, 2]}, metrics={"m": 2.0}, response_text="r",
                       eid=EID(batch=1, task=0, run=1, suffix="cccccc")),
            Experience(tokens=np.arange(5, dtype=np.int64), prompt_length=1,
                       action_mask=[1, 1, 0, 1], advantages=[1, 2, 3, 4],
                       messages=[{"role": "user", "content": "x"}])]
    theirs = T.Experience.deserialize_many(encode_trxp(ours))
    assert len(theirs) == 2
    # The quirk again: Trinity synthesizes an action mask for single-turn experiences.
    assert theirs[0].action_mask.tolist() == [True, True] and ours[0].action_mask is None
    ours[0].action_mask = np.ones(2, dtype=np.bool_)
    for a, b in zip(ours, theirs, strict=True):
        assert_matches_trinity(a, b)
    assert theirs[1].experience_type == "multi_turn"


def test_round_trip_through_trinity_both_ways():
    theirs = trinity_experiences()
    again = T.Experience.deserialize_many(encode_trxp(decode_trxp(
        T.Experience.serialize_many(theirs))))
    for a, b in zip(decode_trxp(T.Experience.serialize_many(again)), theirs, strict=True):
        assert_matches_trinity(a, b)


def _trxp(meta_obj, tensors=b"\x02\0\0\0\0\0\0\0{}"):
    meta = meta_obj if isinstance(meta_obj, bytes) else pickle.dumps(meta_obj, protocol=5)
    return b"TRXP\x01" + struct.pack("<QQ", len(meta), len(tensors)) + meta + tensors


class Boom:
    def __reduce__(self):
        return (print, ("executed!",))


@pytest.mark.parametrize("meta, match", [
    (Boom(), "REDUCE|STACK_GLOBAL"),
    ({"version": 1, "num_items": 0, "items": [], "x": Boom()}, "STACK_GLOBAL"),
    (pickle.dumps(Boom(), protocol=0), "GLOBAL|not allowed"),
    (pickle.dumps(Boom(), protocol=2), "GLOBAL"),
    (b"\x80\x05r\xff\xff\xff\x7f.", "memo index"),
    (b"\x80\x05]\x94.", "Expected `object`"),
    (b"\x80\x05]\x94h\x00a.", "cycle"),
    (b"\x80\x05X\xff\xff\xff\x00abc.", "claims"),
    (b"\x80\x05}\x94", "truncated"),
    (b"\x80\x05N.junk", "follow the STOP"),
    ({"version": 1, "num_items": 1, "items": [{"eid": {"run": "x"}}]}, r"items\[0\]\.eid\.run"),
    ({"version": 1, "num_items": 2, "items": []}, "num_items"),
])
def test_refuses_hostile_and_malformed_pickles(meta, match, capsys):
    with pytest.raises(PayloadError, match=f"payload 5: meta: .*({match})"):
        decode_trxp(_trxp(meta), index=5)
    assert "executed" not in capsys.readouterr().out


def _with_info(info):
    return {"version": 1, "num_items": 1, "items": [{"info": info}]}


def _cyclic():
    info = {"a": []}
    info["a"].append(info)
    return info


def _exponential():
    x = None
    for _ in range(40):  # 40 levels of [x, x]: 2**40 values once expanded
        x = [x, x]
    return {"x": x}


def _deep():
    x = None
    for _ in range(300):  # deeper than MAX_DEPTH, shallower than pickle's recursion limit
        x = [x]
    return {"x": x}


@pytest.mark.parametrize("info, match", [
    (_cyclic(), "cycle"), (_exponential(), "expand"), (_deep(), "deeper"),
])
def test_refuses_cycles_sharing_blowup_and_deep_nesting(info, match):
    with pytest.raises(PayloadError, match=f"payload 0: meta: .*{match}"):
        decode_trxp(_trxp(_with_info(info)), index=0)


def _tensors(n):
    """The safetensors section of a TRXP payload of ``n`` experiences."""
    payload = encode_trxp([Experience(tokens=[1, 2]) for _ in range(n)])
    return payload[21 + struct.unpack_from("<Q", payload, 5)[0]:]


def test_shared_references_within_budget_are_kept():
    tools = [{"name": "calc", "args": ["a", "b"]}]
    eid = {"batch": 1, "task": 0, "run": 0, "step": 0, "suffix": "s"}
    meta = {"version": 1, "num_items": 2, "items": [{"eid": eid, "tools": tools},
                                                    {"eid": eid, "tools": tools}]}
    batch = decode_trxp(_trxp(meta, _tensors(2)))
    assert batch[0].tools == batch[1].tools == tools


def test_a_hand_written_meta_pickle_decodes():
    assert decode_trxp(trxp_with_info(b"}(\x8c\x01kK\x01u"))[0].info == {"k": 1}


@pytest.mark.parametrize("name, refusal", [
    # EMPTY_TUPLE then 200,000 TUPLE1, used as a dict key (~200 KB). Hashing it while
    # unpickling, before any depth check, overflowed the C stack: SIGSEGV.
    ("deep tuple key (failure 1)", "data nested deeper than 200 levels"),
    # One list of 1,000 ints referenced 1,000,000 times through the memo. The sharing check
    # built every reference: MemoryError after 8.5 s and 3.7 GB.
    ("1M shared refs (failure 2)", "shared references expand the data past"),
    # 20,000 int keys k * (2**61 - 1), which all hash alike (~300 KB): accepted after 7-19 s.
    ("20k int keys (failure 3)", "integer outside the 64-bit range"),
    # ... and the same within 64 bits: two-int tuple keys solved for one hash.
    ("20k tuple keys, TRXP", "a dict or set has keys other than str costing over"),
])
def test_issue_11_metadata_is_refused_while_loading(name, refusal):
    assert decode_isolated(HOSTILE[name]()).startswith(
        f"UnsafePickleError payload 0: meta: {refusal}")


@pytest.mark.parametrize("plen, match", [
    (2**63, r"payload 3: meta: Expected `int` <= 9223372036854775807 - at "
            r"`\$\.items\[0\]\.prompt_length`"),
    (-2**63 - 1, "payload 3: meta: integer outside the 64-bit range"),
    (2**70, "payload 3: meta: integer outside the 64-bit range"),
])
def test_prompt_length_must_fit_int64(plen, match):
    # Issue 11, failure 4: OverflowError instead of PayloadError.
    eid = {"batch": 1, "task": 0, "run": 0, "step": 0, "suffix": "s"}
    meta = {"version": 1, "num_items": 1, "items": [{"eid": eid, "prompt_length": plen}]}
    with pytest.raises(PayloadError, match=match):
        decode_trxp(_trxp(meta, _tensors(1)), index=3)


def test_a_trinity_batch_encodes_and_joins_like_any_batch():
    # Issue 11, failure 6: decode_trxp's items were private structs, so FRXP could not
    # encode them ("header.items[0]: Expected array, got object" on decoding).
    theirs = trinity_experiences()
    batch = decode_trxp(T.Experience.serialize_many(theirs))
    for ours, t in zip(decode_experiences(encode_experiences(batch)), theirs, strict=True):
        assert_matches_trinity(ours, t)
    native = decode_experiences(encode_experiences([Experience(tokens=[9], info={"n": 1})]))
    joined = decode_experiences(encode_experiences(ExperienceBatch.concat([batch, native])))
    for ours, t in zip(joined, theirs, strict=False):  # joined has one more
        assert_matches_trinity(ours, t)
    assert joined[3].tokens.tolist() == [9] and joined[3].info == {"n": 1}


def test_a_mutable_payload_is_copied():
    # Issue 11, failure 5, for TRXP: the batch viewed the caller's bytearray.
    theirs = trinity_experiences()
    backing = bytearray(T.Experience.serialize_many(theirs))
    batch = decode_trxp(backing)
    backing[:] = bytes(len(backing))
    for ours, t in zip(batch, theirs, strict=True):
        assert_matches_trinity(ours, t)
    backing.clear()


def _nested_info(levels):
    info = {}
    for _ in range(levels - 1):
        info = {"a": info}
    return info


@pytest.mark.parametrize("info, refusal", [
    (_nested_info(197), None), (_nested_info(198), "nested deeper"),
    ({"k": dict.fromkeys(range(MAX_KEY_COST), 0)}, None),
    ({"k": dict.fromkeys(range(MAX_KEY_COST + 1), 0)}, "keys other than str"),
    ({"t": {(1, "x" * 40): 0}}, None),
    ({1: 0}, r"Expected `str`, got `int`"),   # info's own keys are str, as WireItem says
])
def test_both_formats_accept_the_same_metadata(info, refusal):
    # A TRXP batch goes on as FRXP: the two decoders bound nesting and keys alike.
    exps = [Experience(tokens=[1, 2], info=info)]
    for payload in (encode_trxp(exps), encode_experiences(exps)):
        if refusal is None:
            assert decode_any(payload)[0].info == info
        else:
            with pytest.raises(PayloadError, match=refusal):
                decode_any(payload)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.replace(b'"0:tokens"', b'"9:tokens"'), "outside"),
    (lambda h: h.replace(b'"I32"', b'"F99"'), "unsupported dtype"),
    (lambda h: h.replace(b'"shape":[4]', b'"shape":[400]'), "offsets do not match"),
])
def test_refuses_bad_tensor_headers(edit, match):
    payload = encode_trxp([Experience(tokens=[1, 2, 3, 4], logprobs=[0.5, 0.5],
                                      prompt_length=2)])
    meta_len = struct.unpack_from("<Q", payload, 5)[0]
    st_at = 21 + meta_len
    hlen = struct.unpack_from("<Q", payload, st_at)[0]
    head = edit(payload[st_at + 8:st_at + 8 + hlen])
    head += b" " * (hlen - len(head))
    bad = payload[:st_at + 8] + head[:hlen] + payload[st_at + 8 + hlen:]
    with pytest.raises(PayloadError, match=match):
        decode_trxp(bad, index=0)


def test_refuses_fields_fastrollout_does_not_carry():
    routed = T.Experience(tokens=torch.tensor([1, 2, 3]), prompt_length=1,
                          routed_experts=torch.zeros((2, 1, 1), dtype=torch.uint8))
    with pytest.raises(PayloadError, match=r"payload 4: routed_experts: .*not supported"):
        decode_trxp(T.Experience.serialize_many([routed]), index=4)
    mm = T.Experience(tokens=torch.tensor([1, 2, 3]), prompt_length=1,
                      multi_modal_inputs={"pixels": torch.zeros(2)})
    with pytest.raises(PayloadError, match=r"items\[0\]\.multi_modal_inputs: not supported"):
        decode_trxp(T.Experience.serialize_many([mm]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_trinity_payloads(data):
    payload = mutated(data, T.Experience.serialize_many(trinity_experiences()))
    try:
        batch = decode_trxp(payload, index=2)
    except PayloadError as exc:
        assert str(exc).startswith("payload 2: ")
        return
    assert all(exp.tokens.ndim == 1 for exp in batch)


def _with_header(payload, edit_header=lambda h: h, edit_data=lambda d: d):
    """Rebuild a TRXP payload with its safetensors header and data section edited."""
    meta_len = struct.unpack_from("<Q", payload, 5)[0]
    st_at = 21 + meta_len
    hlen = struct.unpack_from("<Q", payload, st_at)[0]
    head = edit_header(json.loads(payload[st_at + 8:st_at + 8 + hlen]))
    head = json.dumps(head).encode()
    data = edit_data(bytearray(payload[st_at + 8 + hlen:]))
    tensors = struct.pack("<Q", len(head)) + head + bytes(data)
    return (payload[:5] + struct.pack("<QQ", meta_len, len(tensors)) + payload[21:st_at]
            + tensors)


def _masked(masks):
    return encode_trxp([Experience(tokens=[1, 2, 3], action_mask=m) for m in masks])


@pytest.mark.parametrize("apart", [False, True])
def test_refuses_boolean_bytes_other_than_0_and_1(apart):
    payload = _masked([[1, 0, 1], [0, 1, 1]])
    header = {}

    def edit_header(h):
        if apart:  # item 1's mask moved to the end, past bytes that are not booleans
            at = h["1:action_mask"]["data_offsets"][1]
            h["1:action_mask"]["data_offsets"] = [at + 2, at + 5]
        header.update(h)
        return h

    def relocate(data):
        return data + b"\x07\x07" + data[-3:] if apart else data

    good = _with_header(payload, edit_header, relocate)
    assert decode_trxp(good)[1].action_mask.tolist() == [False, True, True]
    assert decode_trxp(good)[0].action_mask.tolist() == [True, False, True]
    at = header["1:action_mask"]["data_offsets"][0] + 1
    bad = _with_header(payload, edit_header,
                       lambda d: (lambda r: r[:at] + b"\x02" + r[at + 1:])(relocate(d)))
    with pytest.raises(PayloadError, match="payload 1: action_mask: boolean values"):
        decode_trxp(bad, index=1)


def test_refuses_offsets_too_large_for_int64():
    payload = encode_trxp([Experience(tokens=[1, 2])])

    def edit(h):
        h["0:tokens"]["data_offsets"] = [2**63 + 5, 2**63 + 13]
        return h
    with pytest.raises(PayloadError, match="payload 0: tensors: bad safetensors header"):
        decode_trxp(_with_header(payload, edit), index=0)
