"""Exact repetition schedules: which training window sits at each position of the training stream.

A schedule over S sequence positions draws n_rep = round(f * S / E) repeated windows, each placed exactly
E times, and S - E * n_rep unique windows, each placed once (f = 1: n_rep = floor(S / E), so the whole
budget is E passes over the repeated windows and the S mod E < E sequences left over are unique), from the train split's windows. Nothing is
stored: every lookup evaluates keyed pseudo-random permutations (Feistel networks with cycle walking), so
the order is a pure function of (available windows, S, f, E, placement, seed), identical on every machine,
and any position can be looked up in O(1) time and memory, which makes resuming at any step free.

Placements:
    uniform  the S positions are one random permutation of the S slots (E copies of each repeated window
             plus the unique windows): repeats fall uniformly at random through training.
    even     training is cut into E equal segments; segment k holds one copy of every repeated window
             (pass k) plus its share of unique windows, shuffled within the segment.
"""
import math

import numpy as np

PLACEMENTS = ("uniform", "even")

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ROUNDS = 4

# Streams of randomness derived from the seed; each permutation gets its own key.
_PURPOSE_WINDOWS = 1
_PURPOSE_UNIFORM = 2
_PURPOSE_EVEN = 3


def _splitmix64_int(x):
    """splitmix64 finalizer on a Python int (exact 64-bit arithmetic, no numpy overflow)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_key(*parts):
    """A 64-bit key from integers (seed, purpose, ...), each part chained through splitmix64."""
    key = 0x2545F4914F6CDD1D
    for part in parts:
        key = _splitmix64_int(key ^ (int(part) & _MASK64))
    return key


def _mix(x):
    """splitmix64 finalizer on a uint64 array (wrap-around arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _round_function(right, key, modulus):
    """A keyed hash of `right`, reduced to [0, modulus): multiply-xorshift-multiply-xorshift."""
    h = right ^ key
    h *= _MIX1
    h ^= h >> np.uint64(32)
    h *= _MIX2
    h ^= h >> np.uint64(29)
    h %= modulus
    return h


class FeistelPermutation:
    """A keyed bijection of [0, n) evaluated elementwise on numpy arrays; nothing is stored.

    A Feistel network over mixed radix (FF1-style): x in [0, a*b) with a = ceil(sqrt(n)), b = ceil(n / a)
    is split into (L, R) = divmod(x, q), and each round maps it to R * p + (L + F(R)) mod p, swapping the
    radices (p, q) = (a, b) <-> (b, a). That is a bijection of [0, a*b) for any keyed function F, and
    a*b - n < a, so a value lands outside [0, n) with probability below 1/sqrt(n); such values go through
    the network again (cycle walking), which keeps it a bijection of [0, n) and almost never costs a
    second pass. A handful of numpy operations per round, so a batch of positions costs microseconds.

    `key` is an int, or a uint64 array with one key per element (many permutations evaluated at once,
    e.g. one per training segment); `n` may likewise be an array, with the radices taken from
    `size_for` (at least the largest n).
    """

    def __init__(self, n, key, size_for=None):
        self.n = n
        size = max(int(np.max(size_for if size_for is not None else n)), 1)
        a = math.isqrt(size - 1) + 1  # ceil(sqrt(size))
        b = -(-size // a)
        self.radices = (a, b)
        self.key = key
        self._keys = None if isinstance(key, np.ndarray) else self._round_keys(key)

    def _round_keys(self, key):
        if isinstance(key, np.ndarray):
            return [_mix(key ^ np.uint64(derive_key(r))) for r in range(_ROUNDS)]
        return [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def _network(self, x, keys, inverse):
        a, b = self.radices
        # Round r: x = L * q + R  ->  R * p + (L + F(R)) mod p, with (p, q) = (a, b) on even rounds and
        # (b, a) on odd ones (the output of a round is in the radix split of the next one).
        radices = [(a, b) if r % 2 == 0 else (b, a) for r in range(_ROUNDS)]
        order = range(_ROUNDS - 1, -1, -1) if inverse else range(_ROUNDS)
        for r in order:
            p, q = np.uint64(radices[r][0]), np.uint64(radices[r][1])
            if inverse:  # y = R * p + L'  ->  x = ((L' - F(R)) mod p) * q + R
                right, left = np.divmod(x, p)
                left += p
                left -= _round_function(right, keys[r], p)
                left %= p
                left *= q
                left += right
                x = left
            else:
                left, right = np.divmod(x, q)
                left += _round_function(right, keys[r], p)
                left %= p
                right *= p
                right += left
                x = right
        return x

    def _apply(self, values, inverse, block=1 << 18):
        values = np.asarray(values)
        flat = values.reshape(-1)
        n_flat = np.broadcast_to(self.n, values.shape).reshape(-1) if isinstance(self.n, np.ndarray) else None
        key_flat = np.broadcast_to(self.key, values.shape).reshape(-1) if isinstance(self.key, np.ndarray) else None
        if flat.size <= block:
            return self._apply_block(flat, n_flat, key_flat, inverse).reshape(values.shape)
        out = np.empty(flat.size, dtype=np.int64)
        # Blocks bound the temporaries (a dozen arrays per round) whatever the caller's batch size.
        for start in range(0, flat.size, block):
            stop = start + block
            out[start:stop] = self._apply_block(
                flat[start:stop],
                None if n_flat is None else n_flat[start:stop],
                None if key_flat is None else key_flat[start:stop],
                inverse,
            )
        return out.reshape(values.shape)

    def _apply_block(self, values, n, keys, inverse):
        x = values.astype(np.uint64)  # negative values wrap to huge ones and fail the range check
        limit = np.uint64(self.n) if n is None else n.astype(np.uint64)
        with np.errstate(over="ignore"):
            if x.size and (np.any(x >= limit) if n is not None else x.max() >= limit):
                raise IndexError(f"permutation input out of range [0, {self.n if n is None else 'n'})")
            round_keys = self._keys if keys is None else self._round_keys(keys)
            x = self._network(x, round_keys, inverse)
            outside = np.flatnonzero(x >= limit)
            while outside.size:  # cycle walking: rare, a < 1/sqrt(n) share of values
                sub_keys = self._keys if keys is None else self._round_keys(keys[outside])
                y = self._network(x[outside], sub_keys, inverse)
                x[outside] = y
                outside = outside[y >= (limit if n is None else limit[outside])]
        return x.astype(np.int64)

    def __call__(self, values):
        return self._apply(values, inverse=False)

    def inverse(self, values):
        return self._apply(values, inverse=True)


def _round_half_up(x):
    return int(math.floor(x + 0.5))


class ScheduleError(ValueError):
    """A repetition schedule that cannot be built as asked (bad parameters or too little data)."""


class RepetitionSchedule:
    """Position i in [0, S) -> (window_id, is_repeated, pass_index), computed on demand.

    Args:
        num_available_windows: windows of the train split (num_windows(train, seq_len)).
        num_sequences: S, sequences in the whole training run (steps * global batch).
        repeated_fraction: f in [0, 1], the share of the S sequences that come from the repeated subset.
        repeat_count: E, how many times each repeated window is seen (>= 2 when f > 0).
        placement: "uniform" (default) or "even" (see the module docstring).
        seed: selects the repeated/unique windows and the order.
        tokens_per_window: seq_len + 1, only used in messages and token counts.
    """

    def __init__(
        self,
        num_available_windows,
        num_sequences,
        repeated_fraction,
        repeat_count,
        placement="uniform",
        seed=0,
        tokens_per_window=None,
    ):
        f, E, S = repeated_fraction, repeat_count, num_sequences
        if isinstance(E, float) and E.is_integer():
            E = int(E)
        if not isinstance(E, (int, np.integer)) or isinstance(E, bool) or E < 1:
            raise ScheduleError(f"repeat_count must be an integer >= 1, got {repeat_count!r}")
        if not 0.0 <= float(f) <= 1.0:
            raise ScheduleError(f"repeated_fraction must be in [0, 1], got {f!r}")
        if f > 0 and E == 1:
            raise ScheduleError(
                "repeated_fraction > 0 with repeat_count = 1 repeats nothing; use repeat_count >= 2, "
                "or repeated_fraction = 0 for the unrepeated baseline"
            )
        if not isinstance(S, (int, np.integer)) or S < 1:
            raise ScheduleError(f"the number of training sequences must be a positive integer, got {S!r}")
        if placement not in PLACEMENTS:
            raise ScheduleError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.num_available_windows = int(num_available_windows)
        self.num_sequences = S = int(S)
        self.repeated_fraction = float(f)
        self.repeat_count = E = int(E)
        self.placement = placement
        self.seed = int(seed)
        self.tokens_per_window = tokens_per_window

        if f == 1.0:  # the whole budget: E passes (epochs) over floor(S / E) windows
            n_rep = S // E
        else:
            n_rep = _round_half_up(f * S / E) if f > 0 else 0
        if f > 0 and n_rep == 0:
            raise ScheduleError(
                f"round(f * S / E) = round({f} * {S} / {E}) = 0 repeated sequences; raise the repeated "
                "fraction or the number of steps, or lower repeat_count"
            )
        if E * n_rep > S:
            raise ScheduleError(
                f"{n_rep} repeated sequences x {E} repeats = {E * n_rep} exceeds the {S} training sequences; "
                "lower repeat_count or repeated_fraction"
            )
        self.n_rep = n_rep
        self.n_unique = S - E * n_rep
        needed = self.n_rep + self.n_unique
        if needed > self.num_available_windows:
            raise ScheduleError(self._too_small_message(needed))

        self._windows = FeistelPermutation(self.num_available_windows, derive_key(self.seed, _PURPOSE_WINDOWS))
        self._slots = FeistelPermutation(S, derive_key(self.seed, _PURPOSE_UNIFORM))
        self._even_base_key = derive_key(self.seed, _PURPOSE_EVEN)

    def _too_small_message(self, needed):
        if self.tokens_per_window:
            w = self.tokens_per_window
            return (
                f"the train split is too small for this schedule: it needs {needed * w:,} tokens "
                f"({needed:,} distinct windows of {w} tokens) but has {self.num_available_windows * w:,} "
                f"({self.num_available_windows:,} windows); lower steps, global batch or seq_len, or prepare "
                "more data"
            )
        return (
            f"the train split is too small for this schedule: it needs {needed:,} distinct windows but has "
            f"{self.num_available_windows:,}; lower steps or global batch, or prepare more data"
        )

    # ---- summary -------------------------------------------------------------------------------------
    @property
    def realized_fraction(self):
        """The share of training sequences (= tokens) that come from the repeated subset."""
        return self.repeat_count * self.n_rep / self.num_sequences

    @property
    def windows_needed(self):
        return self.n_rep + self.n_unique

    @property
    def tokens_needed(self):
        return self.windows_needed * (self.tokens_per_window or 0)

    def summary(self):
        return {
            "num_sequences": self.num_sequences,
            "repeated_fraction": self.repeated_fraction,
            "realized_fraction": self.realized_fraction,
            "repeat_count": self.repeat_count,
            "placement": self.placement,
            "seed": self.seed,
            "n_repeated_windows": self.n_rep,
            "n_unique_windows": self.n_unique,
            "windows_needed": self.windows_needed,
            "windows_available": self.num_available_windows,
            "tokens_per_window": self.tokens_per_window,
            "tokens_needed": self.tokens_needed,
        }

    # ---- which windows -------------------------------------------------------------------------------
    def repeated_window_ids(self):
        """The n_rep repeated windows (ids into the train split's windows), in repeated-index order."""
        return self._windows(np.arange(self.n_rep, dtype=np.int64))

    def unique_window_ids(self, limit=None):
        """The unique windows in unique-index order (the first `limit` of them)."""
        n = self.n_unique if limit is None else min(int(limit), self.n_unique)
        return self._windows(np.arange(self.n_rep, self.n_rep + n, dtype=np.int64))

    # ---- positions -> slots --------------------------------------------------------------------------
    def _check_positions(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_sequences):
            raise IndexError(f"positions must lie in [0, {self.num_sequences})")
        return positions

    def _segment_bounds(self, k):
        """Start of segment k (k may be an array) for even placement: floor(k * S / E)."""
        return (np.asarray(k, dtype=np.int64) * self.num_sequences) // self.repeat_count

    def _segments(self, positions):
        S, E = self.num_sequences, self.repeat_count
        return ((positions + 1) * E - 1) // S

    def _even_permutation(self, segments):
        starts = self._segment_bounds(segments)
        lengths = self._segment_bounds(segments + 1) - starts
        with np.errstate(over="ignore"):
            keys = _mix(np.uint64(self._even_base_key) ^ (segments.astype(np.uint64) * _GOLDEN))
        max_len = -(-self.num_sequences // self.repeat_count)
        return FeistelPermutation(lengths, keys, size_for=max_len), starts

    def _resolve(self, positions):
        """positions -> (repeated index r or -1, unique index u or -1, copy/pass label)."""
        E, n_rep = self.repeat_count, self.n_rep
        if self.placement == "uniform":
            slot = self._slots(positions)
            repeated = slot < E * n_rep
            r = np.where(repeated, slot % max(n_rep, 1), -1)
            copy = np.where(repeated, slot // max(n_rep, 1), -1)
            u = np.where(repeated, -1, slot - E * n_rep)
            return r, u, copy
        segments = self._segments(positions)
        perm, starts = self._even_permutation(segments)
        local = perm(positions - starts)
        repeated = local < n_rep
        r = np.where(repeated, local, -1)
        u = np.where(repeated, -1, starts - segments * n_rep + local - n_rep)
        return r, u, np.where(repeated, segments, -1)

    def window_ids(self, positions):
        """The window id at each position: the fast path used for training batches."""
        positions = self._check_positions(positions)
        E, n_rep = self.repeat_count, self.n_rep
        if self.placement == "uniform":
            slot = self._slots(positions)
            if n_rep == 0:
                return self._windows(slot)
            # Repeated slots [0, E * n_rep) -> their window's index (slot mod n_rep); the rest shift down to
            # the unique indices n_rep, n_rep + 1, ...
            index = np.where(slot < E * n_rep, slot % n_rep, slot - (E - 1) * n_rep)
            return self._windows(index)
        r, u, _ = self._resolve(positions)
        return self._windows(np.where(r >= 0, r, n_rep + u))

    def lookup(self, positions, with_pass=True):
        """positions -> (window_ids, is_repeated, pass_index).

        pass_index is chronological: 0 the first time a repeated window is seen, E-1 the last; -1 for
        unique windows. Under even placement it is the segment and costs nothing; under uniform placement
        it costs O(E) per repeated position (its other copies are located), so the training path uses
        window_ids(), and with_pass=False returns None for it.
        """
        positions = self._check_positions(positions)
        r, u, label = self._resolve(positions)
        repeated = r >= 0
        window_ids = self._windows(np.where(repeated, r, self.n_rep + u))
        if not with_pass:
            return window_ids, repeated, None
        passes = label.copy()
        if self.placement == "uniform" and repeated.any():
            passes[repeated] = self._chronological_pass(positions[repeated], r[repeated])
        return window_ids, repeated, passes

    def _chronological_pass(self, positions, r, chunk=1 << 20):
        """How many copies of repeated window r come before each position (uniform placement)."""
        E, n_rep = self.repeat_count, self.n_rep
        out = np.empty(positions.shape, dtype=np.int64)
        per_chunk = max(1, chunk // E)
        for s in range(0, positions.size, per_chunk):
            rr = r[s : s + per_chunk]
            slots = rr[:, None] + np.arange(E, dtype=np.int64)[None, :] * n_rep
            copy_positions = self._slots.inverse(slots)
            out[s : s + per_chunk] = (copy_positions < positions[s : s + per_chunk, None]).sum(axis=1)
        return out

    def positions_of_repeated(self, repeated_index):
        """The E positions (sorted) at which repeated window number `repeated_index` is seen."""
        r = int(repeated_index)
        if not 0 <= r < self.n_rep:
            raise IndexError(f"repeated index {r} out of range [0, {self.n_rep})")
        E = self.repeat_count
        if self.placement == "uniform":
            return np.sort(self._slots.inverse(r + np.arange(E, dtype=np.int64) * self.n_rep))
        segments = np.arange(E, dtype=np.int64)
        perm, starts = self._even_permutation(segments)
        return starts + perm.inverse(np.full(E, r, dtype=np.int64))

    def __repr__(self):
        return (
            f"RepetitionSchedule(S={self.num_sequences}, f={self.repeated_fraction}, E={self.repeat_count}, "
            f"placement={self.placement!r}, seed={self.seed}, n_rep={self.n_rep}, n_unique={self.n_unique})"
        )
