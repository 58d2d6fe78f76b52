"""Sinks: the memory sink, the stream sink's async reader, the durable log (round trip, torn
tails, corruption, a SIGKILLed writer, readers resuming across processes, the writer lock)."""
import asyncio
import concurrent.futures
import inspect
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastrollout import Experience
from fastrollout.errors import (
    ConfigError,
    LogCorruptError,
    LogLockedError,
    PayloadError,
    PipelineFullError,
    SinkClosedError,
)
from fastrollout.experience import ExperienceBatch
from fastrollout.operators import take
from fastrollout.sinks import (
    DurableLogReader,
    DurableLogSink,
    LogRecord,
    MemorySink,
    StreamSink,
    durable,
)
from fastrollout.sinks.durable import HEADER


def make_batch(batch_id, n=None):
    """A batch whose every experience says which batch it is (see ``check_batch``)."""
    n = 1 + batch_id % 5 if n is None else n
    return ExperienceBatch.from_experiences([
        Experience(tokens=np.arange(8 + 40 * (batch_id % 7), dtype=np.int32) + batch_id,
                   prompt_length=2, reward=float(batch_id), info={"batch": batch_id, "i": i},
                   logprobs=np.full(6 + 40 * (batch_id % 7), -0.5, np.float32))
        for i in range(n)])


def check_batch(batch_id, batch):
    assert len(batch) == 1 + batch_id % 5
    for i, exp in enumerate(batch):
        assert exp.info == {"batch": batch_id, "i": i} and exp.reward == float(batch_id)
        assert np.array_equal(exp.tokens, np.arange(8 + 40 * (batch_id % 7)) + batch_id)
        assert np.array_equal(exp.logprobs, np.full(6 + 40 * (batch_id % 7), -0.5))


def numbered(start, n):
    """``n`` experiences with rewards ``start, start+1, ...``."""
    return ExperienceBatch.from_experiences([
        Experience(tokens=np.arange(4, dtype=np.int32) + i, prompt_length=2, reward=float(i))
        for i in range(start, start + n)])


def rewards(batch):
    return batch.rewards.tolist()


# ---------------------------------------------------------------- memory sink

def test_memory_sink_takes_each_batch_once_and_joins_writes_under_one_id():
    sink = MemorySink()
    sink.write(1, [numbered(0, 3)])
    sink.write(None, [numbered(3, 2)])
    sink.write(None, [numbered(5, 1)])
    sink.write(2, [numbered(0, 0)])                    # empty: not kept
    assert sink.buffered == 6
    assert rewards(sink.take(None)) == [3.0, 4.0, 5.0]
    assert rewards(sink.take(1)) == [0.0, 1.0, 2.0]
    assert sink.take(1) is None and sink.take(2) is None and sink.buffered == 0


def test_memory_sink_bound_refuses_whole_batches_and_keeps_everything():
    sink = MemorySink(max_buffered_experiences=5)
    sink.write(1, [numbered(0, 4)])
    with pytest.raises(PipelineFullError, match=r"max_buffered_experiences=5.*nothing was"):
        sink.write(2, [numbered(0, 2)])
    assert sink.buffered == 4 and sink.take(2) is None
    assert len(sink.take(1)) == 4
    sink.write(2, [numbered(0, 2)])
    sink.close()
    with pytest.raises(SinkClosedError, match="batch 3"):
        sink.write(3, [numbered(0, 1)])
    assert len(sink.take(2)) == 2                    # still takeable after close


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_sink_bounds_are_checked(bad):
    with pytest.raises(ConfigError, match="max_buffered_experiences"):
        MemorySink(max_buffered_experiences=bad)
    with pytest.raises(ConfigError, match="max_buffered_experiences"):
        StreamSink(max_buffered_experiences=bad)


# ---------------------------------------------------------------- stream sink

async def test_reads_cross_batch_boundaries_in_order():
    sink = StreamSink()
    reader = sink.reader()
    for start, n in ((0, 3), (3, 5), (8, 4)):
        sink.write(start, [numbered(start, n)])
    first = await reader.read(4)
    assert rewards(first) == [0.0, 1.0, 2.0, 3.0]
    assert [e.tokens.tolist() for e in first] == [[i, i + 1, i + 2, i + 3] for i in range(4)]
    assert rewards(await reader.read(6)) == [float(i) for i in range(4, 10)]
    assert rewards(await reader.read(2)) == [10.0, 11.0] and sink.buffered == 0


async def test_a_waiting_read_wakes_on_the_write_that_completes_it():
    sink = StreamSink()
    read = asyncio.ensure_future(sink.reader().read(5))
    for _ in range(3):
        await asyncio.sleep(0)
    sink.write(1, [numbered(0, 3)])
    await asyncio.sleep(0)
    assert not read.done()
    sink.write(2, [numbered(3, 2)])
    await asyncio.sleep(0)                           # one loop turn: no poll interval
    assert read.done() and rewards(read.result()) == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_reads_are_served_in_call_order():
    sink = StreamSink()
    big = asyncio.ensure_future(sink.reader().read(5))
    small = asyncio.ensure_future(sink.reader().read(1))
    await asyncio.sleep(0)
    sink.write(1, [numbered(0, 2)])                    # enough for `small`, which waits its turn
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    sink.write(2, [numbered(2, 4)])
    assert rewards(await big) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rewards(await small) == [5.0]


async def test_a_cancelled_read_takes_nothing():
    sink = StreamSink()
    reader = sink.reader()
    first = asyncio.ensure_future(reader.read(5))
    second = asyncio.ensure_future(reader.read(2))
    await asyncio.sleep(0)
    first.cancel()
    sink.write(1, [numbered(0, 2)])
    assert rewards(await second) == [0.0, 1.0]
    # Woken, then cancelled before it ran: what it was woken for stays for the next read.
    woken = asyncio.ensure_future(reader.read(2))
    await asyncio.sleep(0)
    sink.write(2, [numbered(2, 2)])
    woken.cancel()
    with pytest.raises(asyncio.CancelledError):
        await woken
    assert first.cancelled() and sink.buffered == 2
    assert rewards(await reader.read(2)) == [2.0, 3.0]


async def test_close_hands_out_full_batches_then_the_rest_then_raises():
    sink = StreamSink()
    reader = sink.reader()
    sink.write(1, [numbered(0, 5)])
    waiting = asyncio.ensure_future(reader.read(8))
    behind = asyncio.ensure_future(reader.read(1))
    await asyncio.sleep(0)
    sink.close()
    assert rewards(await waiting) == [0.0, 1.0, 2.0, 3.0, 4.0]   # the rest, shorter
    with pytest.raises(SinkClosedError, match="every experience was read"):
        await behind
    with pytest.raises(SinkClosedError, match="batch 2"):
        sink.write(2, [numbered(0, 1)])

    sink = StreamSink()
    sink.write(1, [numbered(0, 5)])
    sink.close()
    reader = sink.reader()
    assert [len(await reader.read(2)) for _ in range(3)] == [2, 2, 1]
    with pytest.raises(SinkClosedError):
        await reader.read(2)


async def test_stream_sink_bound_refuses_and_waits_for_room():
    sink = StreamSink(max_buffered_experiences=4)
    reader = sink.reader()
    sink.write(1, [numbered(0, 3)])
    with pytest.raises(PipelineFullError, match="max_buffered_experiences=4"):
        sink.write(2, [numbered(3, 2)])
    assert sink.buffered == 3
    room = asyncio.ensure_future(sink.wait_for_room(2))
    await asyncio.sleep(0)
    assert not room.done()
    assert rewards(await reader.read(1)) == [0.0]
    await room
    sink.write(2, [numbered(3, 2)])
    assert rewards(await reader.read(4)) == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ConfigError, match="can never be met"):
        await reader.read(5)
    with pytest.raises(PipelineFullError, match="never fit"):
        await sink.wait_for_room(5)
    sink.write(3, [numbered(0, 4)])
    room = asyncio.ensure_future(sink.wait_for_room(1))
    await asyncio.sleep(0)
    sink.close()
    with pytest.raises(SinkClosedError):
        await room


@pytest.mark.parametrize("bad", [0, -2, 2.0, None, True])
async def test_read_sizes_are_checked(bad):
    with pytest.raises(ConfigError, match="batch_size"):
        await StreamSink().reader().read(bad)


# ---------------------------------------------------------------- durable log

def read_all(folder, **kw):
    with DurableLogReader(folder, **kw) as reader:
        return list(reader)


def test_durable_log_round_trip_across_segments(tmp_path):
    ids = [0, 7, "3/eval", None, 12, -4, np.int64(9)]
    with DurableLogSink(tmp_path, segment_bytes=3000) as sink:
        for i, batch_id in enumerate(ids):
            sink.write(batch_id, [make_batch(i)])
        sink.write(99, [make_batch(1, n=0)])             # empty: no record
        end = sink.end
    assert len(list(tmp_path.glob("*.frlog"))) > 2
    records = read_all(tmp_path)
    assert [r.batch_id for r in records] == [0, 7, "3/eval", None, 12, -4, 9]
    assert type(records[-1].batch_id) is int
    assert records[0].offset == 0 and records[-1].end == end
    assert all(a.end == b.offset for a, b in itertools.pairwise(records))
    for i, record in enumerate(records):
        check_batch(i, record.batch())
    assert [r.batch_id for r in read_all(tmp_path, start=records[3].offset)] == ids[3:6] + [9]


def test_a_record_in_more_pieces_than_one_pwritev_takes(tmp_path):
    # Every other row of a batch: each row of a column is a piece of its own, passed to the
    # kernel as is, and there are more pieces than one pwritev call accepts.
    n = 2 * durable._IOV_MAX + 4
    picked = take(numbered(0, n), np.arange(0, n, 2))
    with DurableLogSink(tmp_path) as sink:
        sink.write(1, [picked])
    [record] = read_all(tmp_path)
    back = record.batch()
    assert rewards(back) == list(map(float, range(0, n, 2)))
    assert [e.tokens.tolist() for e in back] == [list(range(i, i + 4)) for i in range(0, n, 2)]


def test_a_reader_sees_records_written_after_it_reached_the_end(tmp_path):
    with DurableLogSink(tmp_path, segment_bytes=2000) as sink, \
            DurableLogReader(tmp_path) as reader:
        assert list(reader) == []                    # before the first record
        sink.write(0, [make_batch(0)])
        assert [r.batch_id for r in reader] == [0]
        assert list(reader) == []
        for i in range(1, 6):                        # several segments
            sink.write(i, [make_batch(i)])
        assert [r.batch_id for r in reader] == [1, 2, 3, 4, 5]
        assert reader.position == sink.end


def test_writes_from_several_threads_make_whole_records(tmp_path):
    with DurableLogSink(tmp_path, segment_bytes=5000) as sink, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: sink.write(i, [make_batch(i)]), range(24)))
    records = read_all(tmp_path)
    assert sorted(r.batch_id for r in records) == list(range(24))
    for record in records:
        check_batch(record.batch_id, record.batch())


def test_an_empty_folder_is_read_as_an_empty_log(tmp_path):
    assert read_all(tmp_path) == []
    with DurableLogReader(tmp_path) as reader:
        assert list(reader) == []
        with DurableLogSink(tmp_path) as sink:
            sink.write(1, [make_batch(1)])
        assert [r.batch_id for r in reader] == [1]


def segment_files(folder):
    return sorted(Path(folder).glob("*.frlog"))


def write_log(folder, n, **kw):
    with DurableLogSink(folder, **kw) as sink:
        for i in range(n):
            sink.write(i, [make_batch(i)])
    return read_all(folder)


@pytest.mark.parametrize("tear", ["mid_payload", "mid_header", "zeros", "bad_crc"])
def test_a_torn_tail_is_ignored_by_readers_and_truncated_by_the_next_writer(tmp_path, tear):
    records = write_log(tmp_path, 3)
    last = segment_files(tmp_path)[-1]
    data = last.read_bytes()
    if tear == "mid_payload":
        last.write_bytes(data[:len(data) - 10])
    elif tear == "mid_header":
        last.write_bytes(data[:records[2].offset + 5])
    elif tear == "zeros":                          # a new record's space, never filled in
        last.write_bytes(data + bytes(HEADER + 100))
    else:                                          # the last record's bytes did not all land
        last.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    kept = 3 if tear == "zeros" else 2
    assert [r.batch_id for r in read_all(tmp_path)] == list(range(kept))
    with DurableLogSink(tmp_path) as sink:
        assert sink.end == records[kept - 1].end == last.stat().st_size
        sink.write(10, [make_batch(10)])
    records = read_all(tmp_path)
    assert [r.batch_id for r in records] == [*range(kept), 10]
    check_batch(10, records[-1].batch())


def test_corruption_before_the_tail_is_an_error_for_readers_and_writers(tmp_path):
    records = write_log(tmp_path, 3)
    path = segment_files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[records[1].offset + HEADER + 40] ^= 0x01      # in the body of the middle record
    path.write_bytes(bytes(data))
    message = f"{path} at offset {records[1].offset}: record body fails its checksum"
    with pytest.raises(LogCorruptError, match=message):
        read_all(tmp_path)
    with pytest.raises(LogCorruptError, match=message):   # not truncated as a torn tail
        DurableLogSink(tmp_path)
    assert path.stat().st_size == len(data)


def test_reading_from_an_offset_that_is_not_a_record_boundary(tmp_path):
    records = write_log(tmp_path, 2)
    with pytest.raises(LogCorruptError, match=f"offset {records[0].offset + 8}: record header "
                                              f"fails its checksum.*not a record boundary"):
        read_all(tmp_path, start=records[0].offset + 8)
    with pytest.raises(LogCorruptError, match="past the end"):
        DurableLogReader(tmp_path, start=records[-1].end + 1)


def test_segments_that_do_not_meet_are_reported(tmp_path):
    records = write_log(tmp_path, 4, segment_bytes=1)  # a segment per record
    first, second = segment_files(tmp_path)[:2]
    first.write_bytes(first.read_bytes()[:-8])         # cut short, yet followed by a segment
    with pytest.raises(LogCorruptError, match=f"{second}: segment starts at offset"):
        DurableLogSink(tmp_path)
    with pytest.raises(LogCorruptError, match=f"{first} at offset 0: the record needs "
                                              f".*, and another segment follows"):
        read_all(tmp_path)
    third = segment_files(tmp_path)[2]
    moved = third.with_name(f"{records[2].offset + 8:020d}.frlog")
    third.rename(moved)                                # a gap after the second segment
    with pytest.raises(LogCorruptError, match=f"{moved}: segment starts at offset "
                                              f"{records[2].offset + 8}, the one before it "
                                              f"ends at {records[2].offset}"):
        read_all(tmp_path, start=records[1].offset)


def test_a_payload_error_names_the_file_and_offset():
    record = LogRecord(64, 128, 3, memoryview(b"FRXP-but-not-really"), "/logs/x.frlog")
    with pytest.raises(PayloadError, match=r"/logs/x\.frlog at offset 64: payload"):
        record.batch()


def test_a_second_writer_is_refused(tmp_path):
    with DurableLogSink(tmp_path):
        with pytest.raises(LogLockedError, match=f"pid {os.getpid()}"):
            DurableLogSink(tmp_path)
    with DurableLogSink(tmp_path) as sink:             # released on close
        sink.write(1, [make_batch(1)])


def test_a_failed_sync_closes_the_sink_and_names_where(tmp_path, monkeypatch):
    import fastrollout.sinks.durable as durable

    def fail(fd):
        raise OSError(5, "Input/output error")
    sink = DurableLogSink(tmp_path)
    sink.write(1, [make_batch(1)])
    end = sink.end
    monkeypatch.setattr(durable, "_sync", fail)
    with pytest.raises(OSError) as info:
        sink.write(2, [make_batch(2)])
    assert info.value.__notes__ == [f"writing batch 2 at offset {end} of "
                                    f"{segment_files(tmp_path)[-1]}; the sink is closed"]
    with pytest.raises(SinkClosedError, match="batch 3"):
        sink.write(3, [make_batch(3)])
    sink.close()


def test_bad_writer_and_reader_arguments(tmp_path):
    with pytest.raises(ConfigError, match="segment_bytes"):
        DurableLogSink(tmp_path, segment_bytes=0)
    with DurableLogSink(tmp_path) as sink:
        with pytest.raises(ConfigError, match="batch id must be an int, a str or None"):
            sink.write(1.5, [make_batch(1)])
        with pytest.raises(ConfigError, match="longer than 4096"):
            sink.write("x" * 5000, [make_batch(1)])
        sink.write(1, [make_batch(1)])
    for name in ("", ".hidden", "a/b", "x" * 65, 3):
        with pytest.raises(ConfigError, match=r"DurableLogReader\.name"):
            DurableLogReader(tmp_path, name)
    with pytest.raises(ConfigError, match=r"DurableLogReader\.start"):
        DurableLogReader(tmp_path, start=-1)
    with pytest.raises(FileNotFoundError, match="no such log folder"):
        DurableLogReader(tmp_path / "missing")
    with DurableLogReader(tmp_path) as reader:
        with pytest.raises(ConfigError, match="no name"):
            reader.ack(0)
    with DurableLogReader(tmp_path, "t") as reader:
        with pytest.raises(ConfigError, match="reader's position 0"):
            reader.ack(1)
    (tmp_path / "t.ack").write_text("twelve\n")
    with pytest.raises(LogCorruptError, match=r"t\.ack: expected an offset"):
        DurableLogReader(tmp_path, "t")


# ---------------------------------------------------------------- across processes

# The batch helpers, for the subprocesses (which thus need not import pytest).
HELPERS = "\n".join(["import numpy as np",
                     "from fastrollout import Experience",
                     "from fastrollout.experience import ExperienceBatch",
                     inspect.getsource(make_batch), inspect.getsource(check_batch)])

# Appends batches first, first+1, ... and prints each id once its write has returned. With
# tear >= 0 it dies (SIGKILL) in the middle of writing batch ``tear``, after part of it.
WRITER = HELPERS + """
import os, random, signal, sys
from fastrollout.sinks import DurableLogSink
folder, first, tear = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pwritev = os.pwritev
def tearing_pwritev(fd, buffers, at):
    if batch_id == tear:
        data = b"".join(buffers)
        os.pwrite(fd, data[:random.Random(tear).randrange(1, len(data))], at)
        os.kill(os.getpid(), signal.SIGKILL)
    return pwritev(fd, buffers, at)
os.pwritev = tearing_pwritev
with DurableLogSink(folder, segment_bytes=20_000) as sink:
    for batch_id in range(first, first + 100_000):
        sink.write(batch_id, [make_batch(batch_id)])
        print(batch_id, flush=True)
"""

# Reads the log as reader ``name`` ("-": unnamed), checks every batch, acks after the
# first ``ack`` records (-1: never), stops after ``limit`` (-1: at the end); prints the ids.
READER = HELPERS + """
import json, sys
from fastrollout.sinks import DurableLogReader
folder, name, ack, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = []
with DurableLogReader(folder, None if name == "-" else name) as reader:
    for record in reader:
        check_batch(record.batch_id, record.batch())
        ids.append(record.batch_id)
        if len(ids) == ack:
            reader.ack(record.end)
        if len(ids) == limit:
            break
print(json.dumps(ids))
"""


def read_in_subprocess(folder, name="-", ack=-1, limit=-1):
    done = subprocess.run([sys.executable, "-c", READER, str(folder), name, str(ack),
                           str(limit)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def torn_bytes(folder):
    """Bytes after the last whole record: a torn tail."""
    with DurableLogReader(folder) as reader:
        list(reader)
        return os.fstat(reader._file.fileno()).st_size - (reader.position - reader._base)


@pytest.mark.timeout(240)
def test_a_sigkilled_writer_leaves_every_acknowledged_batch_readable(tmp_path):
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    log = tmp_path / "log"
    acked: list[int] = []
    last_of_round = []
    for round_ in range(4):
        # Even rounds: killed by us at a random moment; odd ones: mid-write, by itself.
        first, tears = round_ * 100_000, round_ % 2
        tear = first + rng.randrange(1, 8) if tears else -1
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(first),
                                  str(tear)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(0 if tears else rng.randrange(1, 12)):
                line = child.stdout.readline()
                assert line, child.stderr.read()
                acked.append(int(line))
            if round_ == 0:
                with pytest.raises(LogLockedError, match=f"pid {child.pid}"):
                    DurableLogSink(log)
            if not tears:
                time.sleep(rng.random() * 0.01)
                child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
            acked.extend(map(int, child.stdout.read().split()))   # printed before the kill
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        if tears:
            assert acked[-1] == tear - 1 and torn_bytes(log) > 0
        last_of_round.append(acked[-1])
    ids = read_in_subprocess(log)
    # Every acknowledged batch, in order; besides them at most the batch a writer was
    # killed right after writing (its id printed too late).
    assert ids == sorted(ids) and set(acked) <= set(ids)
    assert set(ids) - set(acked) <= {last + 1 for last in last_of_round}


def test_a_reader_resumes_from_its_acked_offset_in_another_process(tmp_path):
    with DurableLogSink(tmp_path, segment_bytes=3000) as sink:
        for i in range(5):
            sink.write(i, [make_batch(i)])
        # Read 3, ack after 2: the next process of that name starts at the third.
        assert read_in_subprocess(tmp_path, "trainer", ack=2, limit=3) == [0, 1, 2]
        assert read_in_subprocess(tmp_path, "trainer", ack=1, limit=1) == [2]
        sink.write(5, [make_batch(5)])
    with DurableLogReader(tmp_path, "trainer") as reader:
        assert [r.batch_id for r in reader] == [3, 4, 5]


def test_acks_are_per_name_and_only_what_is_acked_is_skipped(tmp_path):
    records = write_log(tmp_path, 4, segment_bytes=3000)
    with DurableLogReader(tmp_path, "a") as a:
        assert [r.batch_id for r in a.records()][:2] == [0, 1]
        a.ack(records[1].end)
    with DurableLogReader(tmp_path, "a") as a, DurableLogReader(tmp_path, "b") as b:
        assert [r.batch_id for r in a] == [2, 3]      # the rest, not acked
        assert [r.batch_id for r in b] == [0, 1, 2, 3]
        b.ack()                                        # everything read so far
        a.ack(0)                                       # back to the start
    assert [r.batch_id for r in read_all(tmp_path, name="a")] == [0, 1, 2, 3]
    assert read_all(tmp_path, name="b") == []
    assert not list(tmp_path.glob(".*.tmp"))
