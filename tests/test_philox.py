"""baffle.philox: the counter-based direction stream of docs/DIRECTIONS.md.

Oracles: the published Random123 known answers, a pure-Python Philox, and an independent numpy +
mpmath implementation of the specification (the textbook Box–Muller formula, rounded exactly), written
here and sharing no code with the package. Statistical checks use fixed seeds and stated tolerances.
"""
import hashlib
import os
import random
import subprocess
import sys

import mpmath
import numpy as np
import pytest
import torch

from baffle import philox
from baffle.perturbation import direction, directions, fill_direction
from baffle.perturbation import fill_rows as perturbation_fill_rows
from conftest import REPO

MASK = 0xFFFFFFFF
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85

# Random123 tests/kat_vectors (D. E. Shaw Research): rounds, counter[4], key[2] -> output[4].
KAT = [
    (7, [0, 0, 0, 0], [0, 0], [0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48]),
    (7, [MASK] * 4, [MASK] * 2, [0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662]),
    (7, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A]),
    (10, [0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    (10, [MASK] * 4, [MASK] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (10, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]

# (seed, k, index) -> float32 bit pattern of the Gaussian; checked below against the package, the numpy
# reference and mpmath. The last two sit within 64 float64 units of a float32 rounding midpoint, so the
# package's exact (decimal) path decides them.
GAUSSIAN_VECTORS = [
    (0, 0, 0, 0x3F7DBB33),                                   # 0.991137683
    (0, 0, 1, 0xBF6CB6B0),                                   # -0.92466259
    (0, 0, 2, 0xBF1E1B9F),                                   # -0.617608964
    (0, 0, 3, 0xBEF6D1B2),                                   # -0.482068598
    (123, 3, 70000, 0x3F5B8D66),                             # 0.857626319
    (123 + (1 << 32), 3, 70000, 0xBE8E281A),                 # -0.277649701
    (123, 3 + (1 << 32), 70000, 0xBE7027DB),                 # -0.234527037
    (20240601, 7, (1 << 34) + 5, 0xBF8802EE),                # -1.06258941
    ((1 << 64) - 1, (1 << 64) - 1, (1 << 62) - 1, 0xBEFFC29B),  # -0.499531597
    (77, 1, 2465631, 0x3E4D13B7),                            # 0.200270519 (exact path)
    (77, 1, 6774047, 0x3F9F31B8),                            # 1.2437048 (exact path)
]
RADEMACHER_VECTORS = [(0, 0, 0, 1.0), (0, 0, 1, -1.0), (0, 0, 2, -1.0), (0, 0, 3, -1.0), (123, 3, 70000, 1.0)]


# ------------------------------------------------------------------ independent references
def philox_py(counter, key, rounds=10):
    """Philox4x32-R in plain Python integers (Salmon et al. 2011, Random123's philox.h)."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = M0 * x0, M1 * x2
        x0, x1, x2, x3 = ((p1 >> 32) ^ x1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ x3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return [x0, x1, x2, x3]


def np_words(seed, k, index):
    """(N, 4) Philox words of the blocks holding the given indices, numpy uint64 arithmetic."""
    seed %= 1 << 64
    b = np.asarray(index, dtype=np.uint64) // np.uint64(4)
    m = np.uint64(MASK)
    x = [b & m, b >> np.uint64(32), np.full_like(b, k & MASK), np.full_like(b, k >> 32)]
    k0, k1 = seed & MASK, seed >> 32
    for _ in range(10):
        p0, p1 = x[0] * np.uint64(M0), x[2] * np.uint64(M1)  # < 2**64: no wrap
        x = [((p1 >> np.uint64(32)) ^ x[1] ^ np.uint64(k0)) & m, p1 & m,
             ((p0 >> np.uint64(32)) ^ x[3] ^ np.uint64(k1)) & m, p0 & m]
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return np.stack(x, axis=1)


def mp_gaussian(w_radius, w_angle, comp):
    """The exact real number of the specification (mpmath, 60 digits), rounded to the nearest float32."""
    with mpmath.workdps(60):
        rho = mpmath.sqrt(-2 * mpmath.log((mpmath.mpf(int(w_radius)) + 0.5) / 2**32))
        theta = 2 * mpmath.pi * (mpmath.mpf(int(w_angle)) + 0.5) / 2**32
        z = rho * (mpmath.cos(theta) if comp == 0 else mpmath.sin(theta))
        f = np.float32(float(z))
        cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
        return min(cands, key=lambda c: abs(mpmath.mpf(float(c)) - z))


def np_gaussian(seed, k, index):
    """float32 Gaussians of the specification: numpy float64 Box–Muller, mpmath where rounding is unsure."""
    index = np.asarray(index, dtype=np.uint64)
    w = np_words(seed, k, index)
    j = (index % np.uint64(4)).astype(np.int64)
    comp, rows = j % 2, np.arange(len(index))
    w_radius, w_angle = w[rows, j - comp], w[rows, j - comp + 1]
    rho = np.sqrt(-2.0 * np.log((w_radius.astype(np.float64) + 0.5) / 2.0**32))
    theta = 2.0 * np.pi * (w_angle.astype(np.float64) + 0.5) / 2.0**32
    trig = np.where(comp == 0, np.cos(theta), np.sin(theta))
    z = rho * trig
    delta = 4e-15 + 2e-15 / np.abs(trig)  # bound on numpy's relative error (θ is rounded: absolute 1e-15)
    out = z.astype(np.float32)
    unsure = (z * (1 - delta)).astype(np.float32) != (z * (1 + delta)).astype(np.float32)
    for i in np.nonzero(unsure)[0]:
        out[i] = mp_gaussian(w_radius[i], w_angle[i], comp[i])
    return out


def bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


# ------------------------------------------------------------------ Philox words
@pytest.mark.parametrize("rounds,counter,key,expected", KAT)
def test_random123_known_answers(rounds, counter, key, expected):
    assert philox.philox4x32(counter, key, rounds=rounds).tolist() == expected
    assert philox_py(counter, key, rounds) == expected


def test_words_match_the_pure_python_oracle():
    rng = random.Random(11)
    counters = [[rng.getrandbits(32) for _ in range(4)] for _ in range(300)]
    keys = [[rng.getrandbits(32) for _ in range(2)] for _ in range(300)]
    got = philox.philox4x32(torch.tensor(counters), torch.tensor(keys)).tolist()
    assert got == [philox_py(c, key) for c, key in zip(counters, keys)]
    one_key = philox.philox4x32(torch.tensor(counters), (keys[0][0], keys[0][1])).tolist()
    assert one_key == [philox_py(c, keys[0]) for c in counters]


def test_philox4x32_rejects_words_outside_uint32():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        philox.philox4x32([0, 0, 0, 1 << 32], [0, 0])
    with pytest.raises(ValueError, match="key"):
        philox.philox4x32([0, 0, 0, 0], [-1, 0])
    with pytest.raises(ValueError, match="4 words"):
        philox.philox4x32([0, 0, 0], [0, 0])


def test_stream_words_follow_the_documented_counter_layout():
    seed, k, index = 0x0123456789ABCDEF, (5 << 32) + 9, (3 << 34) + 41
    b = index // 4
    expected = philox_py([b & MASK, b >> 32, k & MASK, k >> 32], [seed & MASK, seed >> 32])
    assert np_words(seed, k, [index])[0].tolist() == expected
    got = philox.rademacher(seed, k, 4 * b, 4).tolist()
    assert got == [1.0 - 2.0 * (w >> 31) for w in expected]


# ------------------------------------------------------------------ Gaussians
@pytest.mark.parametrize("seed,k,index,pattern", GAUSSIAN_VECTORS)
def test_gaussian_vectors(seed, k, index, pattern):
    assert bits(philox.normal(seed, k, index, 1)) == [pattern]
    assert bits(np_gaussian(seed, k, [index])) == [pattern]
    w = np_words(seed, k, [index])[0]
    j = index % 4
    assert bits([mp_gaussian(w[j - j % 2], w[j - j % 2 + 1], j % 2)]) == [pattern]


@pytest.mark.parametrize("seed,k,index,value", RADEMACHER_VECTORS)
def test_rademacher_vectors(seed, k, index, value):
    assert philox.rademacher(seed, k, index, 1).tolist() == [value]
    word = np_words(seed, k, [index])[0, index % 4]
    assert value == 1.0 - 2.0 * int(word >> np.uint64(31))


def test_numpy_reference_reproduces_long_stretches():
    rng = np.random.default_rng(5)
    stretches = [(0, 0, 0, 20_000), (987654321, 41, 65_530, 10_001), ((1 << 63) + 7, 2, 1 << 40, 6_003)]
    for seed, k, start, count in stretches:
        index = np.arange(start, start + count, dtype=np.uint64)
        assert bits(philox.normal(seed, k, start, count)) == bits(np_gaussian(seed, k, index))
    scattered = rng.integers(0, 1 << 50, size=200, dtype=np.uint64)
    got = [philox.normal(99, 3, int(i), 1).item() for i in scattered]
    assert bits(got) == bits(np_gaussian(99, 3, scattered))


def test_numbers_near_a_rounding_midpoint_take_the_exact_path(monkeypatch):
    settled = []
    real = philox._settle
    monkeypatch.setattr(philox, "_settle", lambda z, near, a, x: settled.append(int(near.sum())) or real(z, near, a, x))
    for seed, k, index, pattern in GAUSSIAN_VECTORS[-2:]:
        assert bits(philox.normal(seed, k, index - 1, 3)[1:2]) == [pattern]
    assert settled == [1, 1]


def test_float64_stage_is_far_inside_the_ambiguity_margin():
    """The fast float64 values are within 8 float64 units of the exact real number (margin: 64)."""
    keys = philox._key_schedule(31337, 0, philox.ROUNDS)
    a, c = philox._stream_words(keys, 4, 1000, 256)
    z = philox._gaussian(a, c, torch.tensor([[np.pi * 2.0**-32], [-np.pi * 2.0**-32]], dtype=torch.float64))
    worst = 0.0
    with mpmath.workdps(40):
        for p in range(2):
            for j in range(0, 256, 4):
                rho = mpmath.sqrt(-2 * mpmath.log((mpmath.mpf(int(a[p, j])) + 0.5) / 2**32))
                theta = 2 * mpmath.pi * (mpmath.mpf(int(c[p, j]) & MASK) + 0.5) / 2**32
                for comp, exact in ((0, rho * mpmath.cos(theta)), (1, rho * mpmath.sin(theta))):
                    v = float(z[p, comp, j])
                    worst = max(worst, abs(float((mpmath.mpf(v) - exact) / np.spacing(abs(v)))))
    assert worst <= 8 < philox.AMBIGUITY_ULPS


def test_any_slice_equals_the_same_slice_of_a_longer_computation():
    long = philox.normal(2024, 5, 0, 140_000)
    rng = random.Random(3)
    spans = [(0, 1), (3, 2), (65_535, 3), (65_530, 70_000), (131_070, 8_930)]
    spans += [(s, rng.randrange(1, 5000)) for s in (rng.randrange(0, 130_000) for _ in range(8))]
    for start, count in spans:
        assert torch.equal(philox.normal(2024, 5, start, count), long[start : start + count]), (start, count)
    pieces = torch.cat([philox.normal(2024, 5, a, b - a) for a, b in [(0, 7), (7, 65_541), (65_541, 140_000)]])
    assert torch.equal(pieces, long)
    rad = philox.rademacher(2024, 5, 0, 70_000)
    assert torch.equal(philox.rademacher(2024, 5, 65_533, 4_467), rad[65_533:])


def test_block_size_does_not_change_a_bit(monkeypatch):
    small = philox.normal(2024, 5, 1000, 40_000)
    monkeypatch.setattr(philox, "_BLOCK", {})  # the CPU now takes the device block size (2**22 counters)
    assert torch.equal(philox.normal(2024, 5, 1000, 40_000), small)
    monkeypatch.setattr(philox, "_BLOCK", {"cpu": 3})
    assert torch.equal(philox.normal(2024, 5, 1001, 500), small[1:501])


def test_seed_and_k_use_all_64_bits():
    base = philox.normal(7, 3, 0, 64)
    for seed, k in [(7 + (1 << 32), 3), (7 + (1 << 63), 3), (7, 3 + (1 << 32)), (7, 3 + (1 << 63))]:
        assert (philox.normal(seed, k, 0, 64) != base).sum() > 60
    assert torch.equal(philox.normal(-1, 0, 0, 8), philox.normal((1 << 64) - 1, 0, 0, 8))


def test_gaussian_statistics():
    n = 1 << 18
    z = philox.normal(2718, 0, 0, n).double()
    assert abs(z.mean().item()) < 5 / n**0.5  # standard error 1/√n
    assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5  # standard error √(2/n)
    s, _ = z.sort()
    cdf = torch.special.ndtr(s)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = max((grid - cdf).max().item(), (cdf - grid + 1 / n).max().item())
    assert ks < 1.63 / n**0.5  # Kolmogorov–Smirnov at the 1% level
    assert abs((z.abs() > 3).double().mean().item() - 0.0026998) < 5 * (0.0027 / n) ** 0.5


def test_no_correlation_between_neighbouring_directions_or_indices():
    n = 1 << 15
    rows = torch.stack([philox.normal(161803, k, 0, n) for k in range(8)]).double()
    corr = torch.corrcoef(rows)
    off = corr - torch.eye(8, dtype=torch.float64)
    assert off.abs().max().item() < 5 / n**0.5
    z = rows[0]
    for lag in (1, 2, 3, 4):
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < 5 / n**0.5
        assert abs(torch.corrcoef(torch.stack([z[:-lag] ** 2, z[lag:] ** 2]))[0, 1].item()) < 5 / n**0.5


def test_rademacher_signs():
    n = 1 << 16
    r = philox.rademacher(5, 1, 0, n)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 5 / n**0.5
    assert abs(torch.corrcoef(torch.stack([r[:-1], r[1:]]))[0, 1].item()) < 5 / n**0.5


def test_fill_checks_its_arguments():
    out = torch.empty(4)
    for bad, error in [(dict(out=torch.empty(4, dtype=torch.float64)), ValueError),
                       (dict(out=torch.empty(8)[::2]), ValueError),
                       (dict(k=-1), ValueError), (dict(k=1 << 64), ValueError),
                       (dict(start=1 << 62), ValueError), (dict(seed=True), TypeError),
                       (dict(seed=1.0), TypeError), (dict(distribution="uniform"), ValueError)]:
        args = dict(out=out, seed=1, k=0, start=0, distribution="gaussian") | bad
        with pytest.raises(error):
            philox.fill(args.pop("out"), args.pop("seed"), args.pop("k"), args.pop("start"), **args)


# ------------------------------------------------------------------ same bits everywhere
_PROBE = """
import hashlib, sys, torch
from baffle import philox
torch.set_num_threads(int(sys.argv[1]))
z = philox.normal(123, 3, 65_000, 150_000)
r = philox.rademacher(123, 3, 11, 20_000)
w = philox.philox4x32(torch.arange(4000).view(1000, 4) * 1_000_003 % 2**32, (5, 6))
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(z.numpy().tobytes() + r.numpy().tobytes()
      + w.numpy().tobytes()).hexdigest())
"""


def _capabilities():
    have = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["default", "avx2", "avx512"], "AVX2": ["default", "avx2"]}.get(have, ["default"])


def test_same_bits_on_every_cpu_capability():
    torch.set_num_threads(1)
    z = philox.normal(123, 3, 65_000, 150_000)
    r = philox.rademacher(123, 3, 11, 20_000)
    w = philox.philox4x32(torch.arange(4000).view(1000, 4) * 1_000_003 % 2**32, (5, 6))
    here = hashlib.sha256(z.numpy().tobytes() + r.numpy().tobytes() + w.numpy().tobytes()).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    runs = {cap: subprocess.Popen([sys.executable, "-c", _PROBE, threads], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**env, "ATEN_CPU_CAPABILITY": cap})
            for cap, threads in zip(_capabilities(), ["1", "2", "1"])}
    for cap, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        used, digest = out.split()
        assert used.lower() == cap
        assert digest == here, f"different bits under ATEN_CPU_CAPABILITY={cap}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_bits():
    for seed, k, start, count in [(123, 3, 65_000, 300_000), ((1 << 64) - 1, 7, 1 << 40, 5000)]:
        cpu = philox.normal(seed, k, start, count)
        assert torch.equal(philox.normal(seed, k, start, count, device="cuda").cpu(), cpu)
        assert torch.equal(philox.rademacher(seed, k, start, count, device="cuda").cpu(),
                           philox.rademacher(seed, k, start, count))
    counters = torch.arange(4000).view(1000, 4) * 1_000_003 % 2**32
    assert torch.equal(philox.philox4x32(counters.cuda(), (5, 6)).cpu(), philox.philox4x32(counters, (5, 6)))
    for seed, k, index, pattern in GAUSSIAN_VECTORS:
        assert bits(philox.normal(seed, k, index, 1, device="cuda").cpu()) == [pattern]


# ------------------------------------------------------------------ perturbation.py keyword
def test_perturbation_stream_keyword_selects_philox_and_defaults_to_mt19937():
    n = 70_000
    assert torch.equal(direction(n, 9, 2, stream="philox"), philox.normal(9, 2, 0, n))
    assert torch.equal(direction(n, 9, 2, distribution="rademacher", stream="philox"), philox.rademacher(9, 2, 0, n))
    assert torch.equal(direction(n, 9, 2), direction(n, 9, 2, stream="mt19937"))
    assert not torch.equal(direction(n, 9, 2), direction(n, 9, 2, stream="philox"))
    for k, eps in directions(1000, 9, 3, stream="philox"):
        assert torch.equal(eps, philox.normal(9, k, 0, 1000))
    out = torch.empty(1000)
    assert fill_direction(out, 9, 1, stream="philox", generator=torch.Generator()) is out
    with pytest.raises(ValueError, match="stream"):
        direction(10, 9, 2, stream="pcg")
    with pytest.raises(ValueError, match="distribution"):
        direction(10, 9, 2, distribution="uniform", stream="philox")


def test_mt19937_stream_is_unchanged():
    """The default stream's first numbers, pinned (runs resuming on it must not see a change)."""
    assert bits(direction(4, 5, 1)) == [0x3C44A4A8, 0x3FCD89FC, 0x3FA3BAED, 0x3F606BE1]
    assert bits(direction(4, 5, 1, stream="mt19937")) == [0x3C44A4A8, 0x3FCD89FC, 0x3FA3BAED, 0x3F606BE1]


# ------------------------------------------------------------------ many directions at once
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_fill_rows_gives_each_row_the_bits_of_its_own_direction(distribution, monkeypatch):
    one = philox.normal if distribution == "gaussian" else philox.rademacher
    ks = [0, 7, (1 << 40) + 3, 7, 2]
    for start, m in [(0, 12), (3, 17), (5, 1), (1001, 3000)]:
        want = torch.stack([one(2**63 + 5, k, start, m) for k in ks])
        for block in ({"cpu": 1 << 14}, {"cpu": 3}, {"cpu": 1000}):  # rows grouped, one per pass, rows split
            monkeypatch.setattr(philox, "_BLOCK", block)
            got = philox.fill_rows(torch.empty(len(ks), m), 2**63 + 5, ks, start, distribution=distribution)
            assert torch.equal(got, want), (start, m, block)
    assert not torch.equal(want[0], want[1]) and torch.equal(want[1], want[3])


def test_fill_rows_checks_its_arguments():
    with pytest.raises(ValueError, match="2-D"):
        philox.fill_rows(torch.empty(4), 1, [0])
    with pytest.raises(ValueError, match="2 directions for 3 rows"):
        philox.fill_rows(torch.empty(3, 4), 1, [0, 1])
    with pytest.raises(ValueError, match="k must be in"):
        philox.fill_rows(torch.empty(1, 4), 1, [1 << 63])
    rows = torch.empty(3, 50)
    assert perturbation_fill_rows(rows, 4, [2, 0, 2], stream="mt19937") is rows
    assert torch.equal(rows, torch.stack([direction(50, 4, k) for k in (2, 0, 2)]))
    assert torch.equal(perturbation_fill_rows(torch.empty(2, 50), 4, [1, 3], stream="philox"),
                       torch.stack([philox.normal(4, k, 0, 50) for k in (1, 3)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_fill_rows_on_cuda_gives_the_cpu_bits():
    ks = list(range(40))
    cpu = philox.fill_rows(torch.empty(40, 30_011), 99, ks, 5)
    assert torch.equal(philox.fill_rows(torch.empty(40, 30_011, device="cuda"), 99, ks, 5).cpu(), cpu)
    host = perturbation_fill_rows(torch.empty(3, 70_000), 99, [0, 1, 2], stream="mt19937")
    assert torch.equal(perturbation_fill_rows(torch.empty(3, 70_000, device="cuda"), 99, [0, 1, 2],
                                              stream="mt19937").cpu(), host)  # drawn on the CPU, copied
