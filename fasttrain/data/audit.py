"""Trust checks for a training stream: a full replay of its schedule, and a viewer for one global batch.

The audit treats the schedule as a black box: it asks for the window id (and the repeated flag) at every
position 0..S-1, in chunks, exactly as training does, and counts. It then checks that each repeated window
is seen exactly E times and each unique window exactly once, that no window is both, that the repeated
subset reported for evaluation is the one training sees, the realized repeated fraction, and the time
placement of every pass over the repeated subset. Memory: about 3 bytes per available window plus the
chunk; time: seconds per ten million positions.
"""
import sys

import numpy as np
from tqdm import tqdm

from .schedule import RepetitionSchedule


def _schedule_of(stream_or_schedule):
    if isinstance(stream_or_schedule, RepetitionSchedule):
        return stream_or_schedule
    return stream_or_schedule.schedule


def _count_dtype(repeat_count):
    for dtype in (np.uint8, np.uint16, np.uint32):
        if np.iinfo(dtype).max >= 2 * repeat_count:
            return dtype
    return np.uint64


def audit_schedule(stream_or_schedule, chunk=1 << 20, check_passes=None, progress=False):
    """Replay the whole schedule and verify it; returns a JSON-serializable dict with "ok" and "checks".

    check_passes: verify the schedule's own pass_index against the replay's chronological count. Free
    under even placement; under uniform placement it costs O(f * S * E) and defaults to on only when that
    is below 5e7.
    """
    schedule = _schedule_of(stream_or_schedule)
    S, E, n_rep, n_unique = schedule.num_sequences, schedule.repeat_count, schedule.n_rep, schedule.n_unique
    A = schedule.num_available_windows
    if check_passes is None:
        check_passes = schedule.placement == "even" or n_rep * E * E <= 5e7

    counts = np.zeros(A, dtype=_count_dtype(E))
    flags = np.zeros(A, dtype=np.uint8)  # bit 0: seen as repeated, bit 1: seen as unique
    repeated_ids = schedule.repeated_window_ids()
    repeated_sorted = np.sort(repeated_ids)
    seen = np.zeros(n_rep, dtype=np.int64)  # exposures so far of each repeated window (sorted order)
    pass_first = np.full(E, S, dtype=np.int64) if n_rep else np.zeros(0, dtype=np.int64)
    pass_last = np.full(E, -1, dtype=np.int64) if n_rep else np.zeros(0, dtype=np.int64)
    pass_mismatches = 0
    outside_segment = 0
    repeated_positions = 0
    not_in_reported_subset = 0

    starts = range(0, S, chunk)
    if progress:
        starts = tqdm(starts, desc="audit", unit=" chunks", file=sys.stderr)
    for start in starts:
        positions = np.arange(start, min(start + chunk, S), dtype=np.int64)
        window_ids, repeated, passes = schedule.lookup(positions, with_pass=check_passes)
        ids, c = np.unique(window_ids, return_counts=True)
        counts[ids] += c.astype(counts.dtype)
        flags[window_ids[repeated]] |= 1
        flags[window_ids[~repeated]] |= 2
        if not repeated.any():
            continue
        rep_pos = positions[repeated]
        rep_ids = window_ids[repeated]
        repeated_positions += rep_pos.size
        r = np.searchsorted(repeated_sorted, rep_ids)
        r_clipped = np.minimum(r, max(n_rep - 1, 0))
        known = repeated_sorted[r_clipped] == rep_ids if n_rep else np.zeros(rep_ids.size, bool)
        not_in_reported_subset += int((~known).sum())
        r, rep_pos = r_clipped[known], rep_pos[known]
        # Chronological pass of each exposure: earlier exposures of the same window, before or in this chunk.
        order = np.argsort(r, kind="stable")
        r_sorted = r[order]
        group_start = np.flatnonzero(np.r_[True, r_sorted[1:] != r_sorted[:-1]])
        rank_sorted = np.arange(r_sorted.size) - np.repeat(group_start, np.diff(np.r_[group_start, r_sorted.size]))
        chrono = np.empty_like(r)
        chrono[order] = seen[r_sorted] + rank_sorted
        np.add.at(seen, r, 1)
        valid = chrono < E
        np.minimum.at(pass_first, chrono[valid], rep_pos[valid])
        np.maximum.at(pass_last, chrono[valid], rep_pos[valid])
        if check_passes:
            pass_mismatches += int((passes[repeated][known] != chrono).sum())
        if schedule.placement == "even":
            segment_start = (chrono * S) // E
            segment_end = ((chrono + 1) * S) // E
            outside_segment += int(((rep_pos < segment_start) | (rep_pos >= segment_end)).sum())

    # Tally the per-window counters in slices, so the final pass needs no window-sized temporaries.
    tally = dict(both=0, repeated_ok=0, seen_repeated=0, unique_ok=0, seen_unique=0, distinct=0, total=0)
    for start in range(0, A, chunk):
        c, fl = counts[start : start + chunk], flags[start : start + chunk]
        tally["both"] += int(np.count_nonzero(fl == 3))
        tally["repeated_ok"] += int(np.count_nonzero((fl == 1) & (c == E)))
        tally["seen_repeated"] += int(np.count_nonzero(fl & 1))
        tally["unique_ok"] += int(np.count_nonzero((fl == 2) & (c == 1)))
        tally["seen_unique"] += int(np.count_nonzero(fl & 2))
        tally["distinct"] += int(np.count_nonzero(c))
        tally["total"] += int(c.sum(dtype=np.int64))
    both, distinct_seen, total = tally["both"], tally["distinct"], tally["total"]
    subset_ok = (
        np.unique(repeated_ids).size == n_rep
        and bool(np.all(counts[repeated_ids] == E))
        and bool(np.all(flags[repeated_ids] == 1))
    )
    realized = repeated_positions / S

    checks = {
        "positions_replayed": total == S,
        "repeated_windows_seen_exactly_E_times": tally["repeated_ok"] == n_rep == tally["seen_repeated"],
        "unique_windows_seen_exactly_once": tally["unique_ok"] == n_unique == tally["seen_unique"],
        "repeated_and_unique_disjoint": both == 0,
        "no_other_windows": distinct_seen == n_rep + n_unique,
        "evaluation_subset_matches_training": subset_ok and not_in_reported_subset == 0,
        "realized_fraction_matches_counts": repeated_positions == E * n_rep,
    }
    if check_passes:
        checks["pass_index_is_chronological"] = pass_mismatches == 0
    if schedule.placement == "even":
        checks["pass_k_within_kth_segment"] = outside_segment == 0

    result = {
        "ok": all(checks.values()),
        "checks": checks,
        "schedule": schedule.summary(),
        "requested_fraction": schedule.repeated_fraction,
        "realized_fraction": realized,
        "fraction_error": realized - schedule.repeated_fraction,
        "positions": total,
        "repeated_positions": repeated_positions,
        "distinct_windows_seen": distinct_seen,
        "windows_seen_both_ways": both,
        "pass_index_mismatches": pass_mismatches if check_passes else None,
        "exposures_outside_their_segment": outside_segment if schedule.placement == "even" else None,
        "pass_position_range": [[int(a), int(b)] for a, b in zip(pass_first, pass_last)],
    }
    stream = stream_or_schedule if stream_or_schedule is not schedule else None
    dataset = getattr(stream, "dataset", None)
    if dataset is not None and hasattr(dataset, "manifest"):
        test = dataset.manifest["splits"].get("test")
        result["test_split"] = {
            "documents": test["documents"] if test else 0,
            "tokens": test["tokens"] if test else 0,
            "note": "held out in test.bin; the training stream reads only train.bin",
        }
    return result


def format_audit_table(result):
    """A short human-readable report of audit_schedule's result."""
    s = result["schedule"]
    lines = [
        f"schedule: S={s['num_sequences']:,} sequences of {s['tokens_per_window'] or '?'} tokens, "
        f"f={s['repeated_fraction']}, E={s['repeat_count']}, placement={s['placement']}, seed={s['seed']}",
        f"windows: {s['n_repeated_windows']:,} repeated x {s['repeat_count']} + {s['n_unique_windows']:,} unique "
        f"= {s['windows_needed']:,} of {s['windows_available']:,} available",
        f"repeated fraction: requested {result['requested_fraction']:.6g}, realized {result['realized_fraction']:.6g} "
        f"({result['repeated_positions']:,} of {result['positions']:,} sequences)",
    ]
    ranges = result["pass_position_range"]
    if ranges:
        first, last = ranges[0], ranges[-1]
        lines.append(
            f"pass 1 of the repeated subset spans positions {first[0]:,}-{first[1]:,}; "
            f"pass {len(ranges)} spans {last[0]:,}-{last[1]:,}"
        )
    if "test_split" in result:
        t = result["test_split"]
        lines.append(f"test split: {t['documents']:,} documents, {t['tokens']:,} tokens ({t['note']})")
    width = max(len(name) for name in result["checks"])
    lines.append("")
    lines.append(f"{'check'.ljust(width)}  result")
    for name, ok in result["checks"].items():
        lines.append(f"{name.ljust(width)}  {'ok' if ok else 'FAILED'}")
    lines.append("")
    lines.append("AUDIT PASSED" if result["ok"] else "AUDIT FAILED")
    return "\n".join(lines)


def show_batch(stream, step, global_batch):
    """Which sequences and tokens make up global batch `step` (like Pythia's batch viewer)."""
    described = stream.describe_batch(step, global_batch)
    tokens = stream.read_positions(described["positions"]).numpy()
    dataset = getattr(stream, "dataset", None)
    decode = getattr(dataset, "decode", None)
    width = stream.seq_len + 1
    sequences = []
    for k in range(len(described["positions"])):
        window_id = int(described["window_ids"][k])
        ids = tokens[k].tolist()
        sequences.append(
            {
                "position": int(described["positions"][k]),
                "window_id": window_id,
                "token_offset": window_id * width,
                "is_repeated": bool(described["is_repeated"][k]),
                "pass_index": int(described["pass_index"][k]),
                "token_ids": ids,
                "text": decode(ids) if decode is not None else None,
            }
        )
    return {
        "step": int(step),
        "global_batch": int(global_batch),
        "seq_len": stream.seq_len,
        "repeated_in_batch": int(np.sum(described["is_repeated"])),
        "schedule": stream.schedule.summary(),
        "sequences": sequences,
    }


def format_batch_table(result, text_chars=60, token_count=8):
    """show_batch's result as a table: one line per sequence, text truncated."""
    repeat_count = result["schedule"]["repeat_count"]
    lines = [
        f"global batch {result['step']}: {result['global_batch']} sequences of {result['seq_len'] + 1} tokens, "
        f"{result['repeated_in_batch']} from the repeated subset",
        f"{'pos':>10} {'window':>10} {'rep':>3} {'pass':>11}  {'tokens':<{token_count * 6}} text",
    ]
    for seq in result["sequences"]:
        head = " ".join(str(t) for t in seq["token_ids"][:token_count])
        text = seq["text"]
        shown = "" if text is None else repr(text[:text_chars])[1:-1]
        pass_label = f"{seq['pass_index'] + 1}/{repeat_count}" if seq["is_repeated"] else "-"
        lines.append(
            f"{seq['position']:>10} {seq['window_id']:>10} {'yes' if seq['is_repeated'] else 'no':>3} "
            f"{pass_label:>11}  {head:<{token_count * 6}} {shown}"
        )
    return "\n".join(lines)
