"""Discrete noise on the 8-bit grid: the thresholds, the sampler against the exact pmf, and the
engine's closed forms in discrete mode."""

import hashlib

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import chi2, norm

from smoothcert.worker.smoothing import InputError, RunOptions, certify, noisy_copies, predict
from smoothcert.worker.smoothing.discrete import clip_k, grid_levels, thresholds
from smoothcert.worker.smoothing.grid_noise import GridNoise
from tests.support.classifiers import LinearNet, constant, wrap

SIGMAS = (0.12, 0.25, 0.5, 1.0)
DRAWS = 2_000_000
CHI2_FAILURE = 1e-6  # per σ, for a sampler that draws the exact law (the chi-square asymptotics)
Z = 5.5  # mean and variance checks: a correct sampler fails each with probability < 4e-8


def exact_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets j = −M … M and P(j) of the discretised Gaussian, tails lumped at ±M (50 digits)."""
    m = 255 * (clip_k(sigma) + 1)
    with mpmath.workdps(50):
        s = 255 * mpmath.mpf(sigma)
        cdf = [mpmath.ncdf((mpmath.mpf(i) + mpmath.mpf(0.5)) / s) for i in range(-m, m)]
        probs = np.diff([mpmath.mpf(0), *cdf, mpmath.mpf(1)])
    return np.arange(-m, m + 1), np.array([float(p) for p in probs])


@pytest.mark.parametrize("sigma", SIGMAS)
def test_thresholds_equal_a_100_digit_computation_and_are_symmetric(sigma):
    table = thresholds(sigma)
    m = 255 * (clip_k(sigma) + 1)
    with mpmath.workdps(100):
        s = 255 * mpmath.mpf(sigma)
        expected = [
            int(mpmath.nint(2**60 * mpmath.ncdf((mpmath.mpf(i) + mpmath.mpf(0.5)) / s)))
            for i in range(-m, m)
        ]
    assert table.values.tolist() == expected
    # T_{−1−i} = 2^60 − T_i: the drawn law is exactly symmetric, so its mean is exactly 0.
    assert (table.values[::-1] + table.values == 2**60).all()
    assert table.sha256 == hashlib.sha256(table.values.astype("<i8").tobytes()).hexdigest()
    assert 0 < table.total_variation < 1e-15


@pytest.mark.parametrize("sigma", SIGMAS)
def test_sampler_matches_the_exact_pmf(sigma):
    # Chi-square over DRAWS offsets, cells with an expected count below 5 pooled into the two
    # tails; a sampler that draws the exact law fails with probability CHI2_FAILURE.
    grid = GridNoise(thresholds(sigma), torch.device("cpu"))
    drawn = grid.offsets((DRAWS,), torch.Generator().manual_seed(2026)).numpy()
    offsets, pmf = exact_pmf(sigma)
    m = int(offsets[-1])
    counts = np.bincount(drawn + m, minlength=len(offsets))
    assert counts.sum() == DRAWS and len(counts) == len(offsets)
    expected = pmf * DRAWS
    keep = np.flatnonzero(expected >= 5)
    lo, hi = keep[0], keep[-1]
    observed = np.concatenate(([counts[:lo].sum()], counts[lo : hi + 1], [counts[hi + 1 :].sum()]))
    wanted = np.concatenate(
        ([expected[:lo].sum()], expected[lo : hi + 1], [expected[hi + 1 :].sum()])
    )
    stat = float((((observed - wanted) ** 2) / np.maximum(wanted, 1e-300))[wanted > 0].sum())
    cells = int((wanted > 0).sum())
    assert stat < chi2.isf(CHI2_FAILURE, cells - 1), (stat, cells)
    # mean 0 and the exact variance, within Z standard errors
    var = float((offsets.astype(float) ** 2 * pmf).sum())
    fourth = float((offsets.astype(float) ** 4 * pmf).sum())
    assert abs(drawn.mean()) < Z * np.sqrt(var / DRAWS)
    assert abs(drawn.astype(float).var() - var) < Z * np.sqrt((fourth - var**2) / DRAWS)
    # and the scale is σ on the grid: variance ≈ (255σ)² + 1/12 (Sheppard's correction)
    assert var == pytest.approx((255 * sigma) ** 2 + 1 / 12, rel=1e-6)


def test_table_lookup_equals_the_full_binary_search_in_the_crowded_tails():
    table = thresholds(0.25)
    grid = GridNoise(table, torch.device("cpu"))
    values = torch.from_numpy(table.values)
    top = (1 << 60) - 1
    u = torch.cat(
        [torch.arange(5000), top - torch.arange(5000), values, values - 1, values + 1]
    ).clamp(0, top)
    gen = torch.Generator().manual_seed(0)
    u = torch.cat([u, torch.randint(0, 1 << 60, (200_000,), generator=gen)])
    # the sampler's own lookup, fed these uniforms through a generator stand-in
    grid_u = grid.offsets_of(u)
    assert torch.equal(grid_u, torch.searchsorted(values, u, right=True) - table.offset)


def test_constant_classifier_reaches_the_radius_cap_in_discrete_mode():
    x = np.full((1, 8, 8), 128 / 255, dtype=np.float32)
    run = certify(
        constant(label=3),
        x,
        sigma=0.5,
        n0=100,
        n=100_000,
        alpha=0.001,
        options=RunOptions(seed=0),
        noise="discrete",
    )
    (cert,) = run.results
    assert cert.prediction == 3 and cert.n_a == 100_000
    assert cert.radius == cert.radius_cap == pytest.approx(0.5 * norm.ppf(0.001**1e-5), rel=1e-12)
    p = run.provenance
    table = thresholds(0.5)
    assert p["noise"] == "discrete" and p["noise_k"] == 3 and p["quantize"] is False
    assert p["thresholds_sha256"] == table.sha256
    assert p["alpha_effective"] == 0.001 + table.total_variation * 64 * 100_000
    assert 0.001 < p["alpha_effective"] < 0.001 + 1e-8


@pytest.mark.slow
def test_linear_classifier_on_the_grid_is_certified_within_its_true_distance():
    # f = class 1 where pixel 0 > (127 + ½)/255. On the grid, F(x + ε) votes 1 exactly when
    # k0 + j ≥ 128, so p_1 = Φ((k0 − 127.5)/(255σ)) = Φ(d/σ), d = x0 − 127.5/255 the true
    # distance: the best certificate is |d|. Each radius exceeds |d| with probability <= alpha
    # (+ alpha_effective's excess, < 1e-9); the lower check fails only if a vote falls 5 standard
    # deviations below its mean (< 3e-7 per input).
    sigma, n, alpha = 0.25, 100_000, 0.001
    levels = np.array([140, 153, 178, 200, 100, 60, 250])
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(len(levels), 1, 4, 4)).astype(np.float32)
    x[:, 0, 0, 0] = levels
    x /= 255
    w = torch.zeros(1, 4, 4, dtype=torch.float64)
    w[0, 0, 0] = 1.0
    model = wrap(LinearNet(w, -127.5 / 255), (1, 4, 4), 2)
    run = certify(
        model, x, sigma, n0=100, n=n, alpha=alpha, options=RunOptions(seed=9), noise="discrete"
    )
    z = norm.ppf(1 - alpha)
    for k0, cert in zip(levels, run.results):
        d = (k0 - 127.5) / 255
        p_a = norm.cdf(abs(d) / sigma)
        assert cert.prediction == (1 if d > 0 else 0)
        assert cert.radius <= abs(d)
        sd = np.sqrt(p_a * (1 - p_a) / n)
        assert cert.radius >= sigma * norm.ppf(p_a - (z + 5) * sd)


def _digits_like(count: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(count, 1, 8, 8)).astype(np.float32) / 255


def _noisy_net():
    torch.manual_seed(0)
    return wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval())


def test_same_seed_and_batch_size_give_identical_votes_and_another_seed_does_not():
    x, model = _digits_like(), _noisy_net()

    def votes(seed, batch):
        run = certify(
            model,
            x,
            sigma=0.5,
            n0=50,
            n=2_000,
            options=RunOptions(seed=seed, batch_size=batch),
            noise="discrete",
        )
        return [r.votes for r in run.results]

    assert votes(7, 333) == votes(7, 333)
    assert votes(7, 333) != votes(8, 333)


def test_noisy_copies_are_on_the_grid_clipped_and_reproducible():
    x = _digits_like(2)
    a = noisy_copies(x, (1, 8, 8), 1.0, 50, seed=3, noise="discrete")
    b = noisy_copies(x, (1, 8, 8), 1.0, 50, seed=3, noise="discrete")
    assert a.shape == (2, 50, 1, 8, 8) and a.dtype == np.float32
    assert np.array_equal(a, b)
    levels = a.astype(np.float64) * 255
    assert np.abs(levels - np.rint(levels)).max() < 1e-3
    assert a.min() >= -6.0 and a.max() <= 7.0  # K = 6: clipped to [−K, K + 1]
    assert a.min() < 0 and a.max() > 1  # σ = 1 does leave [0, 1]


def test_inputs_off_the_grid_are_refused_unless_quantized():
    model = constant()
    x = np.full((1, 8, 8), 0.5, dtype=np.float32)  # 127.5 / 255
    with pytest.raises(InputError, match="8-bit grid"):
        predict(model, x, 0.25, n=100, options=RunOptions(seed=0), noise="discrete")
    run = predict(
        model, x, 0.25, n=100, options=RunOptions(seed=0), noise="discrete", quantize=True
    )
    assert run.results[0].prediction == 3 and run.provenance["quantize"] is True
    near = np.full((1, 8, 8), 100 / 255 + 3e-7, dtype=np.float32)  # within 1e-4 of the grid
    predict(model, near, 0.25, n=100, options=RunOptions(seed=0), noise="discrete")
    assert grid_levels(near).max() == 100
    with pytest.raises(InputError, match="sigma"):
        predict(model, near, 5.0, n=100, options=RunOptions(seed=0), noise="discrete")


def test_gaussian_mode_records_its_noise():
    run = predict(constant(), np.full((1, 8, 8), 0.5, np.float32), 0.25, n=100)
    assert run.provenance["noise"] == "gaussian" and "alpha_effective" not in run.provenance


@pytest.mark.gpu
def test_cuda_draws_on_the_device_as_the_full_search_and_reproducibly():
    table = thresholds(0.5)
    device = torch.device("cuda")
    grid = GridNoise(table, device)
    u = torch.randint(
        0, 1 << 60, (1_000_000,), generator=torch.Generator(device).manual_seed(1), device=device
    )
    full = torch.searchsorted(torch.from_numpy(table.values).to(device), u, right=True)
    assert torch.equal(grid.offsets_of(u), full - table.offset)
    x = _digits_like()
    model = wrap(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval(), device="cuda"
    )

    def run():
        options = RunOptions(seed=4, batch_size=500)
        return certify(model, x, 0.5, 20, 2_000, options=options, noise="discrete")

    first, second = run(), run()
    assert [r.votes for r in first.results] == [r.votes for r in second.results]
    assert first.provenance["device"].startswith("cuda")
