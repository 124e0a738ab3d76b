"""Non-finite scores fail a run instead of voting; a batch_size beyond the device's memory is refused,
or lowered when the call asks for it."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from smoothcert.worker.smoothing import (
    BatchSizeError,
    InputError,
    RunOptions,
    certify,
    certify_at_radius,
    memory,
    predict,
)
from tests.support.classifiers import ConstantNet, constant, wrap

X = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)


class _NanAbove(ConstantNet):
    """Class 1, with NaN (or +inf) scores for a copy with a pixel above ``limit``; counts those copies."""

    def __init__(self, limit: float = 2.5, value: float = math.nan):
        super().__init__(label=1, num_classes=4)
        self.limit, self.value, self.bad = limit, value, 0

    def forward(self, x):
        over = (x > self.limit).flatten(1).any(dim=1, keepdim=True)
        self.bad += int(over.sum())
        return super().forward(x) + torch.where(over, self.value, 0.0)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_scores_on_some_noisy_copies_fail_certify(value):
    net = _NanAbove(value=value)
    with pytest.raises(
        InputError,
        match=r"^the model returned non-finite scores \(NaN or infinite\) for "
        r"(\d+) of 2200 noisy copies",
    ) as excinfo:
        certify(wrap(net, num_classes=4), X, sigma=1.0, n0=100, n=1000, options=RunOptions(seed=0))
    assert 0 < net.bad < 2200 and f"for {net.bad} of 2200" in str(excinfo.value)


def test_predict_and_the_test_at_a_radius_fail_the_same_way():
    with pytest.raises(InputError, match="non-finite scores"):
        predict(wrap(_NanAbove(), num_classes=4), X, sigma=1.0, n=1000, options=RunOptions(seed=0))
    with pytest.raises(InputError, match="non-finite scores"):
        certify_at_radius(
            wrap(_NanAbove(), num_classes=4),
            X,
            1.0,
            0.5,
            n0=100,
            n_max=1000,
            options=RunOptions(seed=0),
        )


def test_the_same_model_under_mild_noise_certifies():
    run = certify(
        wrap(_NanAbove(), num_classes=4), X, sigma=0.1, n0=100, n=1000, options=RunOptions(seed=0)
    )
    assert [r.prediction for r in run.results] == [1, 1]


PER_COPY = 4 * 64 + 4 * 10 + 9 * 10 + memory.COUNTING_BYTES  # constant(): 1x8x8 input, 10 scores


def test_the_cost_of_a_copy():
    assert memory.bytes_per_copy(constant()) == PER_COPY


def test_a_requested_batch_size_beyond_the_budget_is_lowered_to_a_power_of_two_that_fits():
    run = certify(
        constant(),
        X,
        sigma=0.25,
        n0=100,
        n=5000,
        options=RunOptions(
            batch_size=1_000_000, seed=3, memory_budget=1000 * PER_COPY, lower_batch_size=True
        ),
    )
    assert (
        run.provenance["batch_size"] == 512 and run.provenance["requested_batch_size"] == 1_000_000
    )
    same = certify(
        constant(), X, sigma=0.25, n0=100, n=5000, options=RunOptions(batch_size=512, seed=3)
    )
    assert [r.to_dict() | {"elapsed_s": 0} for r in run.results] == [
        r.to_dict() | {"elapsed_s": 0} for r in same.results
    ]


def test_a_batch_size_that_fits_and_the_default_stay_as_they_are():
    run = certify(
        constant(),
        X,
        sigma=0.25,
        n0=10,
        n=100,
        options=RunOptions(batch_size=777, seed=1, memory_budget=1000 * PER_COPY),
    )
    assert run.provenance["batch_size"] == 777
    run = certify(
        constant(), X, sigma=0.25, n0=10, n=100, options=RunOptions(seed=1, memory_budget=1)
    )
    assert run.provenance["batch_size"] == 10_000 and run.provenance["requested_batch_size"] is None
    run = certify(
        constant(),
        X,
        sigma=0.25,
        n0=10,
        n=100,
        options=RunOptions(batch_size=64, seed=1, memory_budget=1, lower_batch_size=True),
    )
    assert run.provenance["batch_size"] == 1


def test_a_batch_size_beyond_the_budget_is_refused_unless_lowering_is_asked_for():
    # 1000 copies fit; 1024 do not. The message names both and the three ways out.
    options = RunOptions(batch_size=1024, seed=3, memory_budget=1000 * PER_COPY)
    calls = [
        lambda o: certify(constant(), X, sigma=0.25, n0=10, n=100, options=o),
        lambda o: predict(constant(), X, sigma=0.25, n=100, options=o),
        lambda o: certify_at_radius(constant(), X, 0.25, 0.1, n0=10, n_max=100, options=o),
    ]
    for call in calls:
        with pytest.raises(BatchSizeError) as excinfo:
            call(options)
        assert isinstance(excinfo.value, InputError)
        assert (excinfo.value.requested, excinfo.value.fits) == (1024, 1000)
        assert str(excinfo.value) == (
            f"batch_size=1024 does not fit the memory budget ({1000 * PER_COPY:,} bytes hold at "
            "most 1000 noisy copies of this model): give a batch_size of at most 1000, leave it "
            "out to have one chosen that fits, or ask for it to be lowered to fit "
            "(lower_batch_size=True), which changes the noise stream"
        )
        lowered = call(replace(options, lower_batch_size=True)).provenance
        assert (lowered["batch_size"], lowered["requested_batch_size"]) == (512, 1024)
    exact = certify(constant(), X, 0.25, 10, 100, options=replace(options, batch_size=1000))
    assert exact.provenance["batch_size"] == exact.provenance["requested_batch_size"] == 1000


def test_the_refusal_survives_pickling():
    error = pickle.loads(pickle.dumps(BatchSizeError(1024, 1000, 123_456)))
    assert (error.requested, error.fits, error.budget) == (1024, 1000, 123_456)
    assert str(error).startswith("batch_size=1024 does not fit the memory budget (123,456 bytes")


def test_a_lowered_batch_gives_bit_identical_counts_at_the_same_seed_and_budget():
    runs = [
        certify(
            constant(),
            X,
            sigma=0.25,
            n0=10,
            n=3000,
            options=RunOptions(
                batch_size=10**6, seed=5, memory_budget=300 * PER_COPY, lower_batch_size=True
            ),
        )
        for _ in range(2)
    ]
    assert runs[0].provenance["batch_size"] == runs[1].provenance["batch_size"] == 256
    assert [r.n_a for r in runs[0].results] == [r.n_a for r in runs[1].results]


def test_fit_batch():
    assert [memory.fit_batch(10**6, 100, b) for b in (0, 99, 100, 399, 400, 1_000_000)] == [
        1,
        1,
        1,
        2,
        4,
        8192,
    ]
    assert [memory.fit_batch(777, 100, b) for b in (77_700, 77_699)] == [777, 512]


def test_a_gpus_default_batch_is_the_power_of_two_a_quarter_of_its_free_memory_holds():
    # 1000 bytes a copy; a quarter of 4 MB holds 1000 copies: 512. Capped at MAX_GPU_BATCH; at least 1.
    assert memory.batch_for_memory(1000, 4_000_000) == 512
    assert memory.batch_for_memory(1000, 1 << 50) == memory.MAX_GPU_BATCH
    assert memory.batch_for_memory(1000, 10) == 1
    assert memory.batch_for_memory(1000, 1 << 50, cap=64) == 64


@pytest.mark.gpu
def test_a_cuda_batch_follows_the_free_device_memory(demo_paths):
    import torch

    from smoothcert.models.loaders import load_model
    from smoothcert.worker.smoothing import default_batch_size

    model = load_model(demo_paths["safetensors"], device="cuda")
    free = memory.free_bytes(model.device)
    assert default_batch_size(
        model.info.input_shape, model.device, model
    ) == memory.batch_for_memory(memory.bytes_per_copy(model), free)
    assert torch.cuda.mem_get_info(model.device)[0] <= free


def test_host_memory_from_meminfo_within_the_cgroup_limit(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684092 kB\nMemAvailable:    2000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory.host_available_bytes(meminfo, cgroup) == 2_000_000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("5\n")
    assert memory.host_available_bytes(meminfo, cgroup) == 2_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{1 << 30}\n")
    (cgroup / "memory.current").write_text(f"{1 << 28}\n")
    assert memory.host_available_bytes(meminfo, cgroup) == (1 << 30) - (1 << 28)


def test_host_memory_without_meminfo_falls_back(tmp_path: Path):
    assert memory.host_available_bytes(tmp_path / "absent", tmp_path / "absent") > 0


def test_the_default_budget_is_a_share_of_what_is_free():
    cpu = torch.device("cpu")
    assert 0 < memory.default_budget(cpu) <= memory.free_bytes(cpu)
