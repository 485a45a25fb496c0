"""Repetition schedules: exact counts, disjointness, placement, purity and scale."""
import time
import tracemalloc

import numpy as np
import pytest

from fasttrain.data.schedule import FeistelPermutation, RepetitionSchedule, ScheduleError


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_feistel_is_a_bijection_with_inverse(n):
    for key in (0, 1, 2**63 + 5):
        perm = FeistelPermutation(n, key)
        y = perm(np.arange(n))
        assert np.array_equal(np.sort(y), np.arange(n))
        assert np.array_equal(perm.inverse(y), np.arange(n))


def test_feistel_depends_on_key_and_rejects_out_of_range():
    a = FeistelPermutation(1000, 1)(np.arange(1000))
    b = FeistelPermutation(1000, 2)(np.arange(1000))
    assert not np.array_equal(a, b)
    with pytest.raises(IndexError):
        FeistelPermutation(10, 0)(np.array([10]))


def test_feistel_with_per_element_keys_and_sizes():
    # Many permutations at once (one per element): the path used by even placement's segments.
    sizes = np.array([7] * 7 + [9] * 9)
    keys = np.array([11] * 7 + [12] * 9, dtype=np.uint64)
    x = np.r_[np.arange(7), np.arange(9)]
    y = FeistelPermutation(sizes, keys, size_for=9)(x)
    assert sorted(y[:7]) == list(range(7)) and sorted(y[7:]) == list(range(9))


def brute_force(schedule):
    S = schedule.num_sequences
    ids, rep, passes = schedule.lookup(np.arange(S))
    return ids, rep, passes


CASES = [
    # (available, S, f, E, placement, seed)
    (5000, 3000, 0.0, 1, "uniform", 0),
    (5000, 3000, 0.0, 7, "even", 3),
    (5000, 3000, 0.1, 10, "uniform", 0),
    (5000, 3000, 0.1, 10, "even", 0),
    (5000, 3000, 0.5, 3, "uniform", 1),
    (5000, 3000, 0.5, 3, "even", 2),
    (4000, 4000, 0.9, 100, "uniform", 7),
    (4000, 4000, 0.9, 100, "even", 7),
    (1000, 999, 0.03, 2, "uniform", 123),
    (1000, 1000, 0.2, 200, "even", 9),
]


@pytest.mark.parametrize("A,S,f,E,placement,seed", CASES)
def test_exact_counts_and_disjointness(A, S, f, E, placement, seed):
    schedule = RepetitionSchedule(A, S, f, E, placement, seed)
    n_rep = int(np.floor(f * S / E + 0.5))
    assert schedule.n_rep == n_rep and schedule.n_unique == S - E * n_rep
    ids, rep, passes = brute_force(schedule)
    counts = np.bincount(ids, minlength=A)
    repeated = np.flatnonzero(counts == E) if f > 0 else np.zeros(0, int)
    once = np.flatnonzero(counts == 1)
    assert set(np.unique(counts)) <= {0, 1, E}
    if f > 0:
        assert repeated.size == n_rep
        assert np.array_equal(np.sort(schedule.repeated_window_ids()), repeated)
        # Every occurrence flagged repeated is a repeated window and vice versa: the sets are disjoint.
        assert set(ids[rep]) == set(repeated) and not set(ids[~rep]) & set(repeated)
    assert once.size == schedule.n_unique
    assert np.array_equal(np.sort(schedule.unique_window_ids()), once)
    assert np.array_equal(schedule.unique_window_ids(limit=5), schedule.unique_window_ids()[:5])
    assert rep.sum() == E * n_rep
    assert schedule.realized_fraction == pytest.approx(E * n_rep / S)
    assert abs(schedule.realized_fraction - f) <= E / (2 * S) + 1e-12
    assert np.all(passes[~rep] == -1)


@pytest.mark.parametrize("placement", ["uniform", "even"])
def test_pass_index_is_chronological(placement):
    schedule = RepetitionSchedule(3000, 2000, 0.3, 6, placement, seed=5)
    ids, rep, passes = brute_force(schedule)
    for k, window in enumerate(schedule.repeated_window_ids()):
        where = np.flatnonzero(ids == window)
        assert np.array_equal(passes[where], np.arange(6))
        assert np.array_equal(schedule.positions_of_repeated(k), where)


def test_even_placement_puts_pass_k_in_kth_segment():
    S, E = 1003, 7  # segments of unequal length
    schedule = RepetitionSchedule(2000, S, 0.2, E, "even", seed=1)
    ids, rep, passes = brute_force(schedule)
    bounds = [(k * S) // E for k in range(E + 1)]
    repeated = set(schedule.repeated_window_ids().tolist())
    for k in range(E):
        seg = slice(bounds[k], bounds[k + 1])
        seg_ids = ids[seg][rep[seg]]
        assert sorted(seg_ids.tolist()) == sorted(repeated)  # each repeated window exactly once
        assert np.all(passes[seg][rep[seg]] == k)


def test_uniform_placement_spreads_repeats():
    schedule = RepetitionSchedule(100_000, 100_000, 0.1, 10, "uniform", seed=0)
    _, rep, _ = schedule.lookup(np.arange(100_000), with_pass=False)
    per_tenth = rep.reshape(10, -1).mean(axis=1)
    assert np.all(np.abs(per_tenth - 0.1) < 0.01)  # binomial sd is 0.003


def test_order_is_a_pure_function_of_its_inputs():
    args = (5000, 4096, 0.1, 8, "uniform", 42)
    a, b = RepetitionSchedule(*args), RepetitionSchedule(*args)
    full = a.lookup(np.arange(4096))
    # Any subset, in any order, from a fresh object: the same answers (no state, resumable anywhere).
    rng = np.random.default_rng(0)
    for _ in range(5):
        pos = rng.integers(0, 4096, size=100)
        got = b.lookup(pos)
        for x, y in zip(got, full):
            assert np.array_equal(x, y[pos])
        assert np.array_equal(b.window_ids(pos), full[0][pos])
    c = RepetitionSchedule(5000, 4096, 0.1, 8, "uniform", 43)
    assert not np.array_equal(c.window_ids(np.arange(4096)), full[0])


def test_repeated_subset_is_nested_across_repeat_counts():
    # Same seed and data: the windows chosen as repeated are a prefix of one fixed random order.
    small = RepetitionSchedule(10_000, 8000, 0.1, 100, "uniform", 3).repeated_window_ids()
    large = RepetitionSchedule(10_000, 8000, 0.1, 10, "uniform", 3).repeated_window_ids()
    assert np.array_equal(large[: small.size], small)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(repeated_fraction=-0.1), r"\[0, 1\]"),
        (dict(repeated_fraction=1.01), r"\[0, 1\]"),
        (dict(repeat_count=0), "integer >= 1"),
        (dict(repeat_count=2.5), "integer >= 1"),
        (dict(repeated_fraction=0.1, repeat_count=1), "repeats nothing"),
        (dict(repeated_fraction=0.001, repeat_count=100), "= 0 repeated sequences"),
        (dict(repeated_fraction=0.9, repeat_count=600), "exceeds"),
        (dict(placement="random"), "placement"),
        (dict(num_sequences=0), "positive"),
    ],
)
def test_invalid_parameters(kwargs, match):
    args = dict(num_available_windows=10_000, num_sequences=1000, repeated_fraction=0.1, repeat_count=10)
    args.update(kwargs)
    with pytest.raises(ScheduleError, match=match):
        RepetitionSchedule(**args)


def test_too_small_corpus_says_how_many_tokens():
    # S = 1000 sequences with f = 0.5, E = 10: 50 repeated + 500 unique = 550 distinct windows needed.
    with pytest.raises(ScheduleError, match=r"needs 1,127,500 tokens \(550 distinct windows of 2050 tokens\) "
                                            r"but has 1,025,000"):
        RepetitionSchedule(500, 1000, 0.5, 10, tokens_per_window=2050)
    RepetitionSchedule(550, 1000, 0.5, 10, tokens_per_window=2050)  # exactly enough


def test_out_of_range_positions():
    schedule = RepetitionSchedule(100, 50, 0.0, 1)
    with pytest.raises(IndexError):
        schedule.lookup(np.array([50]))
    with pytest.raises(IndexError):
        schedule.window_ids(np.array([-1]))


@pytest.mark.parametrize("placement", ["uniform", "even"])
def test_100b_token_schedule_is_instant_and_small(placement):
    seq_len = 2048
    S = 100_000_000_000 // seq_len  # 48,828,125 sequences
    t0 = time.perf_counter()
    tracemalloc.start()
    schedule = RepetitionSchedule(60_000_000, S, 0.1, 100, placement, seed=0, tokens_per_window=seq_len + 1)
    build_s = time.perf_counter() - t0
    batch = np.arange(512, dtype=np.int64) + 512 * 90_000
    t0 = time.perf_counter()
    ids = schedule.window_ids(batch)
    ids2, rep, passes = schedule.lookup(batch)
    lookup_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert build_s < 0.5 and lookup_s < 2.0
    assert peak < 50 * 2**20
    assert np.array_equal(ids, ids2) and ids.max() < 60_000_000
    assert 20 < rep.sum() < 90 and np.all((passes[rep] >= 0) & (passes[rep] < 100))
    assert schedule.n_rep == 48_828
