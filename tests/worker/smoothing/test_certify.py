"""CERTIFY and PREDICT against classifiers whose smoothed probabilities are known in closed form."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothcert.worker.smoothing import (
    Canceled,
    InputError,
    RunOptions,
    certify,
    default_batch_size,
    predict,
)
from tests.support.classifiers import ConstantNet, constant, linear, wrap

X = np.full((1, 8, 8), 0.5, dtype=np.float32)


def test_constant_classifier_reaches_the_radius_cap_exactly():
    # p_A = 1, so n_a = n whatever the noise: no failure probability.
    run = certify(
        constant(label=3), X, sigma=0.5, n0=100, n=100_000, alpha=0.001, options=RunOptions(seed=0)
    )
    (cert,) = run.results
    assert cert.prediction == 3 and cert.n_a == 100_000 and not cert.abstained
    assert cert.radius == cert.radius_cap == pytest.approx(0.5 * norm.ppf(0.001**1e-5), rel=1e-12)
    assert cert.radius == pytest.approx(0.5 * 3.8115, abs=1e-4)


def _linear_inputs(distances, sigma_shape=(1, 8, 8)):
    w = torch.from_numpy(np.random.default_rng(3).normal(size=sigma_shape))
    unit = (w / w.norm()).numpy()
    xs = np.stack([0.5 + d * unit for d in distances]).astype(np.float32)
    return w, xs


@pytest.mark.slow
def test_linear_classifier_radius_never_exceeds_the_true_distance_and_is_close_to_it():
    # The boundary of f passes through x = 0.5·1; input i sits at signed distance d_i from it,
    # so p_A = Φ(|d_i|/σ) and the best possible certificate is |d_i| itself. Each certificate
    # exceeds |d_i| with probability <= alpha = 0.001 (8 inputs: <= 0.8% under a random seed).
    # The lower check fails only if the vote falls 5 standard deviations below its mean
    # (probability < 3e-7 per input).
    sigma, n, alpha = 0.25, 100_000, 0.001
    distances = [0.05, 0.1, 0.2, 0.3, 0.4, -0.1, -0.3, 0.6]
    w, xs = _linear_inputs(distances)
    b = -float((w.flatten().double() @ torch.full((64,), 0.5, dtype=torch.float64)))
    run = certify(
        linear(w, b), xs, sigma=sigma, n0=100, n=n, alpha=alpha, options=RunOptions(seed=11)
    )
    z = norm.ppf(1 - alpha)
    for d, cert in zip(distances, run.results):
        p_a = norm.cdf(abs(d) / sigma)
        assert cert.prediction == (1 if d > 0 else 0)
        assert cert.radius <= abs(d)
        sd = np.sqrt(p_a * (1 - p_a) / n)
        assert cert.radius >= sigma * norm.ppf(p_a - (z + 5) * sd)


def test_same_seed_and_batch_size_give_identical_results_and_another_seed_does_not():
    w, xs = _linear_inputs([0.02, 0.05, -0.03])
    model = linear(w, -float(w.flatten().double().sum() * 0.5))
    first = certify(
        model, xs, sigma=0.5, n0=50, n=5000, options=RunOptions(batch_size=777, seed=42)
    )
    again = certify(
        model, xs, sigma=0.5, n0=50, n=5000, options=RunOptions(batch_size=777, seed=42)
    )
    other = certify(
        model, xs, sigma=0.5, n0=50, n=5000, options=RunOptions(batch_size=777, seed=43)
    )
    strip = lambda run: [
        {k: v for k, v in r.to_dict().items() if k != "elapsed_s"} for r in run.results
    ]
    assert strip(first) == strip(again)
    assert [r.n_a for r in first.results] != [r.n_a for r in other.results]
    assert first.provenance["seed"] == 42 and first.provenance["batch_size"] == 777


def test_seed_is_drawn_and_recorded_when_not_given():
    run = certify(constant(), X, sigma=0.25, n0=10, n=100)
    seed = run.provenance["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**63


def test_global_random_state_is_neither_used_nor_changed():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    certify(constant(), X, sigma=0.25, n0=10, n=100, options=RunOptions(seed=1))
    assert torch.equal(before, torch.get_rng_state())


class _Recorder(ConstantNet):
    def __init__(self):
        super().__init__(label=1, num_classes=4)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return super().forward(x)


def test_batches_mix_inputs_and_stay_full_and_progress_reaches_the_total():
    net = _Recorder()
    model = wrap(net, num_classes=4)
    ticks = []
    xs = np.full((3, 1, 8, 8), 0.5, dtype=np.float32)
    run = certify(
        model,
        xs,
        sigma=0.25,
        n0=10,
        n=1000,
        options=RunOptions(
            batch_size=64, seed=0, progress=lambda done, total: ticks.append((done, total))
        ),
    )
    assert all(size == 64 for size in net.sizes[:-1]) and sum(net.sizes) == 3 * 1010
    assert ticks[-1] == (3030, 3030) and all(a[0] < b[0] for a, b in zip(ticks, ticks[1:]))
    assert [r.n_a for r in run.results] == [1000, 1000, 1000]


def test_cancel_check_stops_between_batches():
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Canceled):
        certify(
            constant(),
            X,
            sigma=0.25,
            n0=10,
            n=10_000,
            options=RunOptions(batch_size=100, should_cancel=should_cancel),
        )
    assert len(calls) == 3


def test_top2_bound_on_a_constant_classifier():
    run = certify(
        constant(label=2, num_classes=5),
        X,
        sigma=1.0,
        n0=20,
        n=1000,
        bound="top2",
        options=RunOptions(seed=0),
    )
    cert = run.results[0]
    assert cert.prediction == 2 and cert.radius == pytest.approx(cert.radius_cap)
    # each runner-up bound is 1 - (alpha/8)^(1/n); p_B <= 1 - p_A caps it lower here
    per_class, cap = 1 - (0.001 / 8) ** (1 / 1000), 1 - (0.001 / 2) ** (1 / 1000)
    assert cert.p_b_upper == pytest.approx(min(per_class, cap)) and cap < per_class
    assert run.provenance["bound"] == "top2"


def test_predict_unanimous_vote_and_minimum_n():
    run = predict(constant(label=7), X, sigma=0.25, n=11, alpha=0.001, options=RunOptions(seed=0))
    assert run.results[0].prediction == 7 and run.results[0].p_value == pytest.approx(2.0**-10)
    with pytest.raises(InputError, match="needs n >= 11"):
        predict(constant(), X, sigma=0.25, n=10, alpha=0.001)


def test_predict_abstains_on_a_coin_flip():
    # x on the boundary: p = ½ for both classes. Abstains unless the test rejects at alpha = 0.001,
    # which happens with probability <= 0.001 under a random seed.
    w, xs = _linear_inputs([0.0])
    model = linear(w, -float(w.flatten().double().sum() * 0.5))
    run = predict(model, xs, sigma=0.5, n=2000, alpha=0.001, options=RunOptions(seed=5))
    assert run.results[0].abstained and run.results[0].n_a + run.results[0].n_b == 2000


def test_result_dict_and_provenance_carry_the_contract_fields():
    run = certify(constant(), X, sigma=0.25, n0=10, n=100, options=RunOptions(seed=3)).to_dict()
    row = run["results"][0]
    assert set(row) == {
        "index",
        "prediction",
        "abstained",
        "radius",
        "p_a_lower",
        "n_a",
        "n",
        "radius_cap",
        "elapsed_s",
        "votes",
    }
    prov = run["provenance"]
    for key in (
        "sigma",
        "n0",
        "n",
        "alpha",
        "bound",
        "seed",
        "batch_size",
        "device",
        "runtime",
        "precision",
        "model_sha256",
        "versions",
        "elapsed_s",
    ):
        assert key in prov
    assert prov["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize(
    "x,kwargs,message",
    [
        (np.full((1, 8, 8), np.nan, dtype=np.float32), {}, "NaN"),
        (np.full((1, 8, 8), 1.5, dtype=np.float32), {}, r"\[0, 1\]"),
        (np.full((3, 8, 8), 0.5, dtype=np.float32), {}, "shape"),
        (np.zeros((0, 1, 8, 8), dtype=np.float32), {}, "shape"),
        (np.zeros((1, 8, 8), dtype=np.uint8), {}, "dtype"),
        (X, {"sigma": 0.0}, "sigma"),
        (X, {"sigma": float("inf")}, "sigma"),
        (X, {"n": 0}, "n must"),
        (X, {"n0": 0}, "n0 must"),
        (X, {"alpha": 1.0}, "alpha"),
        (X, {"alpha": 0}, "alpha"),
        (X, {"bound": "hoeffding"}, "bound"),
        (X, {"options": RunOptions(batch_size=0)}, "batch_size"),
        (X, {"options": RunOptions(seed=-1)}, "seed"),
    ],
)
def test_bad_input_is_refused_with_a_message(x, kwargs, message):
    params = {"sigma": 0.25, "n0": 10, "n": 100, **kwargs}
    with pytest.raises(InputError, match=message):
        certify(constant(), x, **params)


def test_default_batch_size_fits_the_input():
    cpu = torch.device("cpu")
    assert default_batch_size((1, 8, 8), cpu) == 10_000
    assert default_batch_size((3, 224, 224), cpu) == 26


@pytest.mark.gpu
def test_cuda_counts_on_the_device_and_is_reproducible():
    model = constant(label=1, device="cuda")
    w, xs = _linear_inputs([0.02, -0.05])
    lin = linear(w, -float(w.flatten().double().sum() * 0.5), device="cuda")
    a = certify(lin, xs, sigma=0.5, n0=50, n=20_000, options=RunOptions(batch_size=1000, seed=9))
    b = certify(lin, xs, sigma=0.5, n0=50, n=20_000, options=RunOptions(batch_size=1000, seed=9))
    assert [r.n_a for r in a.results] == [r.n_a for r in b.results]
    assert a.provenance["device"].startswith("cuda")
    assert (
        certify(model, X, sigma=0.5, n0=10, n=1000, options=RunOptions(seed=0)).results[0].n_a
        == 1000
    )
