"""TrainingStream: batches follow the schedule exactly, for any world size, micro-batch and resume point."""
import numpy as np
import pytest
import torch

from fasttrain.data.dataset import read_windows
from fasttrain.data.indexed import IndexedDataset, IndexedDatasetWriter
from fasttrain.data.sampler import TrainingStream, iter_stacked_batches
from fasttrain.data.schedule import ScheduleError

SEQ_LEN = 15  # windows of 16 tokens


@pytest.fixture(scope="module")
def flat_split(tmp_path_factory):
    """A train split whose token at flat offset t is t: a window's content names the window."""
    prefix = str(tmp_path_factory.mktemp("flat") / "train")
    rng = np.random.default_rng(0)
    total, offset = 40_000, 0
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        while offset < total:
            size = int(rng.integers(1, 300))
            writer.add_document(np.arange(offset, min(offset + size, total)))
            offset += size
    return IndexedDataset(prefix)


def window_of(rows):
    """Window id of each row (rows are aligned runs of consecutive offsets)."""
    rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
    assert np.all(np.diff(rows, axis=1) == 1)
    assert np.all(rows[:, 0] % (SEQ_LEN + 1) == 0)
    return rows[:, 0] // (SEQ_LEN + 1)


def make_stream(split, S=1536, f=0.25, E=8, placement="uniform", seed=0):
    return TrainingStream(split, SEQ_LEN, S, f, E, placement, seed)


def test_read_windows_cuts_consecutive_non_overlapping_windows(flat_split):
    ids = np.array([0, 5, 2, 2499])
    out = read_windows(flat_split, ids, SEQ_LEN)
    assert out.dtype == np.int32 and out.shape == (4, 16)
    assert np.array_equal(out, ids[:, None] * 16 + np.arange(16))
    into = np.zeros((4, 16), dtype=np.int64)
    read_windows(flat_split, ids, SEQ_LEN, out=into)
    assert np.array_equal(into, out)
    with pytest.raises(IndexError):
        read_windows(flat_split, [2500], SEQ_LEN)


@pytest.mark.parametrize("placement", ["uniform", "even"])
def test_whole_stream_has_exact_counts(flat_split, placement):
    stream = make_stream(flat_split, placement=placement)
    B = 64
    seen = np.concatenate([window_of(stream.batch(step, B)) for step in range(stream.num_steps(B))])
    counts = np.bincount(seen, minlength=2500)
    repeated = stream.schedule.repeated_window_ids()
    assert np.all(counts[repeated] == 8)
    assert np.sum(counts == 1) == stream.schedule.n_unique
    assert np.sum(counts > 0) == stream.schedule.n_unique + repeated.size
    assert repeated.size == round(0.25 * 1536 / 8)


def test_batches_are_int64_rows_of_the_schedule(flat_split):
    stream = make_stream(flat_split)
    batch = stream.batch(3, 32)
    assert batch.dtype == torch.int64 and batch.shape == (32, SEQ_LEN + 1)
    assert batch.is_pinned() == torch.cuda.is_available()
    positions = stream.global_batch_positions(3, 32)
    assert np.array_equal(positions, np.arange(96, 128))
    assert np.array_equal(window_of(batch), stream.schedule.window_ids(positions))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_same_global_order_for_any_world_size(flat_split, world_size):
    stream = make_stream(flat_split)
    B = 32
    for step in (0, 7, 47):
        reference = stream.batch(step, B)
        parts = [stream.batch(step, B, rank, world_size) for rank in range(world_size)]
        assert all(p.shape[0] == B // world_size for p in parts)
        assert torch.equal(torch.cat(parts), reference)  # each sequence read by exactly one rank
        # Micro-batches of a rank's share are consecutive slices: any split gives the same sequences.
        for micro in (1, 2, B // world_size):
            assert torch.equal(torch.cat(list(parts[0].split(micro))), parts[0])


def test_world_size_must_divide_global_batch(flat_split):
    stream = make_stream(flat_split)
    with pytest.raises(ValueError, match="not divisible"):
        stream.batch(0, 30, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        stream.batch(0, 32, rank=4, world_size=4)


def test_resume_from_any_step_is_stateless(flat_split):
    B = 32
    full = [make_stream(flat_split).batch(s, B) for s in range(48)]
    for start in (0, 1, 17, 47):
        resumed = make_stream(flat_split)  # a fresh process: no state but the step number
        got = list(resumed.iter_batches(start, 48 - start, B, prefetch=2))
        assert len(got) == 48 - start
        assert all(torch.equal(a, b) for a, b in zip(got, full[start:]))


def test_prefetch_matches_direct_reads_per_rank(flat_split):
    stream = make_stream(flat_split, placement="even")
    stream.lookup_block = 40  # lookups in blocks of 5 steps of 8 sequences: block edges inside the range
    for rank in range(2):
        direct = [stream.batch(s, 16, rank, 2) for s in range(10, 20)]
        for prefetch in (0, 1, 3):
            got = list(stream.iter_batches(10, 10, 16, rank=rank, world_size=2, prefetch=prefetch))
            assert all(torch.equal(a, b) for a, b in zip(got, direct))


def test_prefetch_stops_when_abandoned(flat_split):
    stream = make_stream(flat_split)
    batches = stream.iter_batches(0, 48, 32, prefetch=2)
    next(batches)
    batches.close()  # must not hang, and the thread must end
    import threading

    assert not [t for t in threading.enumerate() if t.name == "fasttrain-prefetch"]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_stacked_batches_are_each_streams_batches(flat_split, prefetch):
    # The trainer's reader: every run's batch of a step, stacked, the same whether read ahead in a thread or not.
    streams = [make_stream(flat_split, seed=0), make_stream(flat_split, f=0.5, E=4, placement="even", seed=1)]
    for stream in streams:
        stream.lookup_block = 40  # lookup blocks end inside the range
    got = list(iter_stacked_batches(streams, 3, 12, 16, rank=1, world_size=2, prefetch=prefetch))
    assert len(got) == 12
    for step, (tokens, repeated) in zip(range(3, 15), got):
        assert tokens.shape == (2, 8, SEQ_LEN + 1) and tokens.dtype == torch.int64
        for k, stream in enumerate(streams):
            assert torch.equal(tokens[k], stream.batch(step, 16, 1, 2))
            assert np.array_equal(repeated[k], stream.describe_batch(step, 16)["is_repeated"][8:])
    assert not torch.equal(got[0][0][0], got[0][0][1])


def test_steps_outside_the_schedule(flat_split):
    stream = make_stream(flat_split)
    with pytest.raises(IndexError, match="48 steps"):
        stream.batch(48, 32)
    with pytest.raises(IndexError):
        stream.iter_batches(40, 9, 32)  # refused when asked, before any batch is read
    assert list(stream.iter_batches(48, 0, 32)) == []  # resuming a finished run reads nothing


def test_describe_batch(flat_split):
    stream = make_stream(flat_split, placement="even")
    d = stream.describe_batch(5, 64)
    assert np.array_equal(d["window_ids"], window_of(stream.batch(5, 64)))
    assert np.all(d["pass_index"][d["is_repeated"]] == (5 * 64) * 8 // 1536)  # even: segment of the batch


def test_too_small_corpus(flat_split):
    # 2500 windows of 16 tokens; asking for 3000 unique sequences needs 48,000 tokens.
    with pytest.raises(ScheduleError, match=r"needs 48,000 tokens .* has 40,000"):
        TrainingStream(flat_split, SEQ_LEN, 3000, 0.0, 1)


def test_different_seeds_differ_and_same_seed_repeats(flat_split):
    a = make_stream(flat_split, seed=1).batch(0, 32)
    b = make_stream(flat_split, seed=1).batch(0, 32)
    c = make_stream(flat_split, seed=2).batch(0, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
