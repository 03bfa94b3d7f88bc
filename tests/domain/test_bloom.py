"""BloomFilter: no false negatives (I8), a measured false-positive rate, sizing, parameters."""

from __future__ import annotations

import math
import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from anon_ticket.domain.bloom import BloomFilter

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)


def reference_positions(key: bytes, bits: int, hashes: int, seed: int) -> list[int]:
    """The documented scheme, written the slow and obvious way."""
    digest = xxhash.xxh3_128_intdigest(key, seed)
    h1 = digest & (2**64 - 1)
    h2 = (digest >> 64) | 1
    return [(h1 + i * h2) % bits for i in range(hashes)]


def reference_bytes(keys: list[bytes], bits: int, hashes: int, seed: int) -> bytes:
    array = bytearray(math.ceil(bits / 8))
    for key in keys:
        for pos in reference_positions(key, bits, hashes, seed):
            array[pos // 8] |= 1 << (pos % 8)
    return bytes(array)


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=0, max_size=40), max_size=300),
    seed=SEEDS,
    entries=st.integers(min_value=1, max_value=500),
    fp_rate=st.floats(min_value=1e-9, max_value=0.5),
)
def test_no_false_negatives(keys: list[bytes], seed: int, entries: int, fp_rate: float) -> None:
    # Sizes vary from generous to badly overfilled: a Bloom filter never forgets either way.
    bf = BloomFilter.for_capacity(entries, fp_rate, seed)
    for key in keys:
        bf.add(key)
    for key in keys:
        assert key in bf
        assert bytearray(key) in bf
        assert memoryview(key) in bf


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=0, max_size=16), max_size=50),
    seed=SEEDS,
    bits=st.integers(min_value=1, max_value=5000),
    hashes=st.integers(min_value=1, max_value=30),
)
def test_bits_follow_documented_double_hashing(keys: list[bytes], seed: int, bits: int,
                                               hashes: int) -> None:
    bf = BloomFilter(bits, hashes, seed)
    for key in keys:
        bf.add(key)
    expected = reference_bytes(keys, bits, hashes, seed)
    assert bf.to_bytes() == expected
    bulk = BloomFilter(bits, hashes, seed)
    bulk.add_many(iter(keys))  # vectorized; any iterable, consumed once
    assert bulk.to_bytes() == expected


def test_add_many_over_several_steps_matches_add() -> None:
    # Several bulk steps of 16k keys: the same bits and the same count as one add per key.
    rng = random.Random(11)
    keys = [rng.randbytes(8) for _ in range(40_000)]
    bulk, single = (BloomFilter.for_capacity(40_000, 1e-6, seed=2**64 - 1) for _ in range(2))
    bulk.add_many(keys)
    for key in keys:
        single.add(key)
    assert bulk.to_bytes() == single.to_bytes()
    assert len(bulk) == len(single) == 40_000


def test_add_many_counts_and_refuses_like_add() -> None:
    bf = BloomFilter.for_capacity(100, 1e-6, seed=3)
    bf.add_many([])
    assert len(bf) == 0
    bf.add(b"a")
    bf.add_many([b"a", b"b", b"c"])  # "a" was in before this step: not counted again
    assert len(bf) == 3
    with pytest.raises(TypeError):
        bf.add_many([b"d", "e"])  # type: ignore[list-item]


def test_measured_false_positive_rate() -> None:
    rng = random.Random(20240611)  # fixed: deterministic, but a broken hash still fails
    members, fp_rate = 20_000, 1e-3
    bf = BloomFilter.for_capacity(members, fp_rate, seed=rng.getrandbits(64))
    for _ in range(members):
        bf.add(b"m" + rng.randbytes(15))
    trials = 200_000
    # The prefix keeps non-members disjoint from members.
    false_positives = sum(b"n" + rng.randbytes(15) in bf for _ in range(trials))
    measured = false_positives / trials
    assert 0.5 * fp_rate <= measured <= 2 * fp_rate, measured
    assert bf.expected_fp_rate(members) == pytest.approx(fp_rate, rel=0.05)


def test_sizing_matches_the_formulas() -> None:
    for n, p in [(1, 0.5), (1, 1e-9), (1000, 0.01), (20_000, 1e-3), (1_000_000, 1e-6)]:
        formula = math.ceil(-n * math.log(p) / math.log(2) ** 2)
        bf = BloomFilter.for_capacity(n, p, seed=1)
        assert bf.bits <= formula
        assert bf.bits == BloomFilter.optimal_bits(n, p) == formula
        assert bf.hashes == max(1, round(formula / n * math.log(2)))
        assert bf.nbytes == math.ceil(bf.bits / 8)
        assert bf.seed == 1
    big = BloomFilter.for_capacity(1_000_000, 1e-6, seed=0)
    assert (big.bits, big.hashes) == (28_755_176, 20)
    assert big.nbytes == 3_594_397


def test_expected_fp_rate() -> None:
    bf = BloomFilter(1000, 5, seed=7)
    assert bf.expected_fp_rate(0) == 0.0
    assert bf.expected_fp_rate(100) == pytest.approx((1 - math.exp(-5 * 100 / 1000)) ** 5)
    assert bf.expected_fp_rate(100) < bf.expected_fp_rate(200) < 1.0
    with pytest.raises(ValueError):
        bf.expected_fp_rate(-1)


@pytest.mark.parametrize(("entries", "fp_rate"), [
    (0, 0.01), (-5, 0.01), (10, 0.0), (10, 1.0), (10, -0.1), (10, 1.5), (10, math.nan),
    (10, math.inf), (1.5, 0.01), (True, 0.01), ("10", 0.01), (10, "0.01"),
])
def test_bad_capacity_parameters(entries: object, fp_rate: object) -> None:
    with pytest.raises(ValueError):
        BloomFilter.for_capacity(entries, fp_rate, seed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BloomFilter.optimal_bits(entries, fp_rate)  # type: ignore[arg-type]


@pytest.mark.parametrize(("bits", "hashes", "seed"), [
    (0, 1, 0), (-1, 1, 0), (8, 0, 0), (8, -3, 0), (8, 1, -1), (8, 1, 2**64), (8.0, 1, 0),
    (8, 1, None), (2**48 + 1, 1, 0), (8, 1025, 0),
])
def test_bad_constructor_parameters(bits: object, hashes: object, seed: object) -> None:
    with pytest.raises(ValueError):
        BloomFilter(bits, hashes, seed)  # type: ignore[arg-type]


def test_seed_extremes_are_accepted() -> None:
    for seed in (0, 2**64 - 1):
        bf = BloomFilter(64, 3, seed)
        bf.add(b"x")
        assert b"x" in bf


def test_different_seeds_give_different_bit_patterns() -> None:
    keys = [i.to_bytes(8, "big") for i in range(1, 200)]
    patterns = set()
    for seed in (0, 1, 2, 2**63, 2**64 - 1):
        bf = BloomFilter.for_capacity(1000, 1e-4, seed)
        for key in keys:
            bf.add(key)
        assert all(key in bf for key in keys)
        patterns.add(bf.to_bytes())
    assert len(patterns) == 5


def test_len_counts_adds_that_set_a_new_bit() -> None:
    bf = BloomFilter.for_capacity(100, 1e-6, seed=3)
    assert len(bf) == 0
    bf.add(b"a")
    bf.add(b"a")
    assert len(bf) == 1
    bf.add(b"b")
    assert len(bf) == 2
    full = BloomFilter(1, 1, seed=3)
    full.add(b"a")
    full.add(b"b")  # its only bit is already set
    assert len(full) == 1


def test_empty_filter_contains_nothing() -> None:
    bf = BloomFilter.for_capacity(100, 0.01, seed=9)
    assert b"" not in bf
    assert b"anything" not in bf
    assert bf.to_bytes() == bytes(bf.nbytes)


def test_non_bytes_keys_are_refused_not_missed() -> None:
    # A str key would be a silent false negative for its bytes: it must fail loudly.
    bf = BloomFilter.for_capacity(100, 0.01, seed=9)
    for key in ("abc", 1, None):
        with pytest.raises(TypeError):
            bf.add(key)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            _ = key in bf


def test_no_false_negatives_at_scale_even_overfilled() -> None:
    rng = random.Random(7)
    bf = BloomFilter.for_capacity(5_000, 1e-3, seed=rng.getrandbits(64))
    keys = [rng.randbytes(8) for _ in range(50_000)]  # ten times the capacity
    for key in keys:
        bf.add(key)
    assert all(key in bf for key in keys)
    assert bf.expected_fp_rate(50_000) > 0.5
