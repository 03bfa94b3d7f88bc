"""A Bloom filter over bytes keys (pure; docs/architecture.md §4, I8).

Each key is hashed once with xxh3_128 under a 64-bit seed. The 128-bit digest is split into two
64-bit halves h1 (low) and h2 (high, forced odd), and the k probe positions are
`(h1 + i * h2) mod m` for i in 0..k-1 (Kirsch–Mitzenmacher double hashing). Bit `p` lives in
byte `p >> 3`, at bit `p & 7` (least significant first).

The filter answers "maybe present" or "certainly absent": an added key is always found (no false
negative); a key never added is found with probability about `expected_fp_rate(n)`.

`add` and `__contains__` sit on the HTTP hot path, so they are written for CPython speed: one C
call for the hash, state in locals, the probe position advanced by one addition and one
conditional subtraction instead of a multiplication and a modulo, and `__contains__` returns on
the first unset bit (a miss usually costs one probe). Keys must be bytes-like (bytes, bytearray,
memoryview); anything else raises `TypeError` (from xxhash), never a silent miss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import islice

import numpy as np
from xxhash import xxh3_128_digest, xxh3_128_intdigest

__all__ = ["BloomFilter"]

# Typed loosely on purpose: `__contains__` takes any object, and xxhash itself raises TypeError
# for anything that is not bytes-like (str included), so no check is needed on the hot path.
_xxh3_128: Callable[..., int] = xxh3_128_intdigest
_xxh3_128_bytes: Callable[..., bytes] = xxh3_128_digest
_BULK = 16_384  # keys a bulk step hashes at once: k * 16k positions, a few MB of scratch
_MASK64 = (1 << 64) - 1
_BIT = (1, 2, 4, 8, 16, 32, 64, 128)
_MAX_BITS = 1 << 48  # 32 TiB of filter
_MAX_HASHES = 1024
_LN2 = math.log(2.0)
_LN2_SQUARED = _LN2 * _LN2


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, not {value}")
    return value


def _check_capacity(entries: object, fp_rate: object) -> tuple[int, float]:
    n = _check_int("entries", entries, 1)
    if isinstance(fp_rate, bool) or not isinstance(fp_rate, int | float):
        raise ValueError(f"fp_rate must be a number, not {type(fp_rate).__name__}")
    p = float(fp_rate)
    if not 0.0 < p < 1.0:  # also refuses NaN
        raise ValueError(f"fp_rate must be strictly between 0 and 1, not {fp_rate!r}")
    return n, p


class BloomFilter:
    """A fixed-size Bloom filter of `bits` bits probed `hashes` times per key under `seed`.

    `len()` counts the `add()` calls that set at least one new bit. It is an approximate count of
    distinct keys: a repeated key is not counted again, but a new key whose bits all happen to be
    set already (a false positive at insertion time) is not counted either, so it can undercount
    by roughly the false-positive rate.
    """

    __slots__ = ("_array", "_count", "_k", "_m", "_rest", "_seed")

    def __init__(self, bits: int, hashes: int, seed: int) -> None:
        # Bounded so that `add_many`'s (k + 1) * m stays inside uint64.
        self._m: int = _check_int("bits", bits, 1, _MAX_BITS)
        self._k: int = _check_int("hashes", hashes, 1, _MAX_HASHES)
        self._seed: int = _check_int("seed", seed, 0, _MASK64)
        self._array = bytearray((self._m + 7) >> 3)
        self._rest = range(self._k - 1)  # the probes after the first one
        self._count = 0

    @staticmethod
    def optimal_bits(entries: int, fp_rate: float) -> int:
        """m = ceil(-n ln p / (ln 2)^2): the fewest bits that reach `fp_rate` at `entries` keys."""
        n, p = _check_capacity(entries, fp_rate)
        return max(1, math.ceil(-n * math.log(p) / _LN2_SQUARED))

    @classmethod
    def for_capacity(cls, entries: int, fp_rate: float, seed: int) -> BloomFilter:
        """A filter sized for `entries` keys at false-positive rate `fp_rate`.

        k = max(1, round(m / n * ln 2)). Raises ValueError unless entries >= 1 and
        0 < fp_rate < 1.
        """
        n, p = _check_capacity(entries, fp_rate)
        m = cls.optimal_bits(n, p)
        k = max(1, round(m / n * _LN2))
        return cls(m, k, seed)

    @property
    def bits(self) -> int:
        """m, the number of bits."""
        return self._m

    @property
    def hashes(self) -> int:
        """k, the number of probes per key."""
        return self._k

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def nbytes(self) -> int:
        """Size of the bit array in bytes, ceil(bits / 8)."""
        return len(self._array)

    def to_bytes(self) -> bytes:
        """A copy of the bit array (bit p is bit p & 7 of byte p >> 3)."""
        return bytes(self._array)

    def expected_fp_rate(self, n: int) -> float:
        """(1 - e^(-k n / m))^k: the false-positive rate expected after `n` distinct keys."""
        n = _check_int("n", n, 0)
        k = self._k
        return float((1.0 - math.exp(-k * n / self._m)) ** k)

    def add(self, key: bytes) -> None:
        """Set the key's k bits. Raises TypeError for a key that is not bytes-like."""
        digest = _xxh3_128(key, self._seed)
        m = self._m
        array = self._array
        bit = _BIT
        pos = (digest & _MASK64) % m
        step = ((digest >> 64) | 1) % m
        new = False
        for _ in range(self._k):
            index = pos >> 3
            mask = bit[pos & 7]
            if not array[index] & mask:
                array[index] |= mask
                new = True
            pos += step
            if pos >= m:
                pos -= m
        if new:
            self._count += 1

    def add_many(self, keys: Iterable[bytes]) -> None:
        """`add` every key, with the same bits, vectorized: how a filter is prewarmed.

        Keys are hashed one C call each; the probe positions and the bit setting run in numpy
        over steps of up to 16k keys (about 0.2 s for 1M keys at k = 20, where `add` takes
        2.4 s or more). `len()` grows by the keys of a step whose bits were not all set before
        that step, so a key repeated within one step counts twice (callers stream distinct ids).
        """
        array = np.frombuffer(self._array, dtype=np.uint8)  # a view: writes land in _array
        m = np.uint64(self._m)
        probes = np.arange(self._k, dtype=np.uint64)
        seed = self._seed
        it = iter(keys)
        while chunk := list(islice(it, _BULK)):
            # The digest's canonical bytes are big-endian: high 64 bits first, then low.
            halves = np.frombuffer(b"".join([_xxh3_128_bytes(key, seed) for key in chunk]),
                                   dtype=">u8").reshape(-1, 2)
            first = halves[:, 1] % m
            step = (halves[:, 0] | np.uint64(1)) % m
            # pos_i = (first + i * step) mod m; first, step < m <= 2^48 and i < k <= 1024,
            # so the sum stays below 2^59: no uint64 overflow.
            pos = (first[:, None] + probes[None, :] * step[:, None]) % m
            index = (pos >> np.uint64(3)).astype(np.intp)
            bit = (pos & np.uint64(7)).astype(np.uint8)
            was_set = (array[index] >> bit) & 1
            self._count += int(np.count_nonzero(~was_set.all(axis=1)))
            index, bit = index.ravel(), bit.ravel()
            for b in range(8):
                # One bit value per pass: repeated indices then write the same byte value, so
                # numpy's unbuffered fancy assignment loses nothing.
                at = index[bit == b]
                array[at] |= np.uint8(1 << b)

    def __contains__(self, key: object) -> bool:
        """True if the key may have been added; False means it certainly was not."""
        digest = _xxh3_128(key, self._seed)
        m = self._m
        array = self._array
        bit = _BIT
        pos = (digest & _MASK64) % m
        if not array[pos >> 3] & bit[pos & 7]:
            return False
        step = ((digest >> 64) | 1) % m
        for _ in self._rest:
            pos += step
            if pos >= m:
                pos -= m
            if not array[pos >> 3] & bit[pos & 7]:
                return False
        return True

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"BloomFilter(bits={self._m}, hashes={self._k}, nbytes={len(self._array)}, "
                f"added={self._count})")
