"""Noisy copies of inputs through the base classifier: the sampling half of randomized smoothing.

Noise is drawn on the model's device from a generator seeded per call (never the global one).
Gaussian noise is added in [0,1] pixel space and never clamped; discrete noise
(:mod:`.discrete`, :mod:`.grid_noise`) is added to the inputs' 8-bit grid levels in integers and
clipped there, then converted to float once. Samples of several inputs share a batch; votes are
counted on the device. Same seed, same batch size and same device give bit-identical votes. A
batch size larger than the device's memory allows (:mod:`.memory`) is refused, or lowered to what
fits when the call asks for it (:class:`~.options.RunOptions`); the provenance records the batch
size used and the one asked for. Scores that are NaN or infinite fail the run: they would all vote
for class 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from smoothcert.models import process_tuning
from smoothcert.models.base import BaseClassifier, bind_sigma
from smoothcert.models.pixels import PixelError, as_pixel_batch
from smoothcert.service.core.params import Noise, check_noise, draw_seed
from smoothcert.worker.smoothing import discrete, memory
from smoothcert.worker.smoothing.checks import BatchSizeError, InputError
from smoothcert.worker.smoothing.grid_noise import GridNoise
from smoothcert.worker.smoothing.options import CancelCheck, Progress, RunOptions
from smoothcert.worker.smoothing.provenance import software_versions

Inputs = npt.ArrayLike | torch.Tensor
"""One input (C, H, W) or a batch (N, C, H, W) of floats in [0, 1]."""
Counts = npt.NDArray[np.int64]
"""Votes (N, K): how many noisy copies of input i the base classifier labelled class c."""


class Canceled(RuntimeError):
    """The cancel check asked the run to stop; raised between batches."""


def default_batch_size(
    input_shape: Sequence[int], device: torch.device, model: BaseClassifier | None = None
) -> int:
    """A batch that keeps the noise buffer near 16 MB on a CPU, at most 10,000. On a GPU, given the
    ``model``, as many copies as a share of the device's free memory holds
    (:func:`memory.batch_for_memory` of :func:`memory.free_bytes`); without it, 160 MB of noise."""
    if device.type == "cuda" and model is not None:
        return memory.batch_for_memory(memory.bytes_per_copy(model), memory.free_bytes(device))
    per_sample = int(np.prod(input_shape))
    budget = 40_000_000 if device.type == "cuda" else 4_000_000
    return max(1, min(10_000, budget // per_sample))


def as_input_batch(x: Inputs, input_shape: Sequence[int]) -> np.ndarray:
    """``x`` (array or tensor) as float32 (N, C, H, W) for a model taking ``input_shape``.

    The checks of :func:`smoothcert.models.pixels.as_pixel_batch`, raised as :class:`InputError`.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    try:
        return as_pixel_batch(arr, input_shape)
    except PixelError as exc:
        raise InputError(str(exc)) from None


def noisy_copies(
    x: Inputs,
    input_shape: Sequence[int],
    sigma: float,
    copies: int,
    seed: int,
    noise: Noise = "gaussian",
    quantize: bool = False,
) -> np.ndarray:
    """``copies`` noisy copies x + σ·δ, δ ~ N(0, I), of each input of ``x``: float32 (N, copies, C, H, W).

    The noise is drawn as :class:`Sampler` draws it (float32, [0,1] pixel space, no clamping; or
    ``noise="discrete"`` on the inputs' grid levels, ``quantize`` as there), from a CPU generator
    of its own seeded with ``seed``: copies to look at, which change none of a run's draws (a
    run's generator is its own).
    """
    batch = torch.from_numpy(as_input_batch(x, input_shape))
    generator = torch.Generator().manual_seed(int(seed))
    if noise == "discrete":
        levels = torch.from_numpy(input_levels(batch.numpy(), quantize)).to(torch.int64)
        repeated = levels.unsqueeze(1).expand(-1, copies, *levels.shape[1:])
        grid = GridNoise(sigma_table(sigma), torch.device("cpu"))
        return grid.noisy(repeated.contiguous(), generator).numpy()
    gaussian = torch.randn(
        (batch.shape[0], copies, *batch.shape[1:]), generator=generator, dtype=batch.dtype
    )
    return gaussian.mul_(float(sigma)).add_(batch.unsqueeze(1)).numpy()


def input_levels(x: np.ndarray, quantize: bool) -> np.ndarray:
    """:func:`.discrete.grid_levels` of float inputs, its refusal raised as :class:`InputError`."""
    try:
        return discrete.grid_levels(x, quantize)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def sigma_table(sigma: float) -> discrete.Thresholds:
    """:func:`.discrete.thresholds` of ``sigma``, its refusal raised as :class:`InputError`."""
    try:
        return discrete.thresholds(float(sigma))
    except ValueError as exc:
        raise InputError(str(exc)) from None


def open_sampler(
    model: BaseClassifier,
    x: Inputs,
    sigma: float,
    options: RunOptions | None,
    noise: Noise = "gaussian",
    quantize: bool = False,
) -> Sampler:
    """The :class:`Sampler` of one engine call: ``model`` bound to ``sigma``
    (:func:`~smoothcert.models.base.bind_sigma`), the inputs ``x``, run as ``options`` says
    (None: :class:`RunOptions`' defaults), with Gaussian or discrete ``noise`` (``quantize``:
    round float inputs to the 8-bit grid instead of refusing those off it)."""
    try:
        check_noise(noise, float(sigma), quantize)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return Sampler(
        bind_sigma(model, sigma), x, sigma, options or RunOptions(), noise=noise, quantize=quantize
    )


def fitting_batch_size(model: BaseClassifier, device: torch.device, options: RunOptions) -> int:
    """The batch size a run uses: :func:`default_batch_size` when ``options.batch_size`` is None;
    else ``options.batch_size`` when that many copies fit ``options.memory_budget`` bytes (None:
    :func:`memory.default_budget`). One that does not fit is lowered to the largest power of two
    that does when ``options.lower_batch_size`` (:func:`memory.fit_batch`), and otherwise refused
    with :class:`~.checks.BatchSizeError`: a seed and a batch size mean one noise stream."""
    if options.batch_size is None:
        return default_batch_size(model.info.input_shape, device, model)
    requested, per_copy = int(options.batch_size), memory.bytes_per_copy(model)
    budget = (
        memory.default_budget(device)
        if options.memory_budget is None
        else int(options.memory_budget)
    )
    fitted = memory.fit_batch(requested, per_copy, budget)
    if fitted != requested and not options.lower_batch_size:
        raise BatchSizeError(requested, memory.copies_that_fit(per_copy, budget), budget)
    return fitted


class Sampler:
    """Draws noisy copies of a fixed set of inputs, feeds them to the model, counts the votes.

    Built by :func:`open_sampler`; takes parameters and options that
    :func:`~smoothcert.worker.smoothing.checks.check_params` accepted and checks the inputs
    themselves. A batch size or seed left at None is chosen here (by input size; at random) and
    recorded in :meth:`provenance`; a batch size asked for must fit the memory budget, or is
    lowered when the options ask for it (:func:`fitting_batch_size`). Discrete ``noise`` takes
    inputs on the 8-bit grid (or rounds them, ``quantize``); :class:`InputError` otherwise.
    """

    def __init__(
        self,
        model: BaseClassifier,
        x: Inputs,
        sigma: float,
        options: RunOptions,
        noise: Noise = "gaussian",
        quantize: bool = False,
    ):
        self.model = model
        device = torch.device(model.device)
        pixels = as_input_batch(x, model.info.input_shape)
        self.noise_kind, self.quantize = noise, bool(quantize)
        self.grid: GridNoise | None = None
        if noise == "discrete":
            levels = input_levels(pixels, quantize)
            self.grid = GridNoise(sigma_table(sigma), device)
            self.levels = torch.from_numpy(levels).to(device=device, dtype=torch.int64)
            pixels = (levels.astype(np.float32) / np.float32(discrete.LEVELS)).astype(np.float32)
        self.x = torch.from_numpy(pixels).to(device)
        self.requested_batch_size = None if options.batch_size is None else int(options.batch_size)
        self.batch_size = fitting_batch_size(model, device, options)
        seed = options.seed
        self.sigma, self.seed = float(sigma), int(draw_seed() if seed is None else seed)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.num_classes = int(model.info.num_classes)
        self.progress: Progress | None = options.progress
        self.should_cancel: CancelCheck | None = options.should_cancel
        self.noise: torch.Tensor | None = None
        self.largest = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.drawn = 0
        self.started = time.perf_counter()

    @property
    def num_inputs(self) -> int:
        return int(self.x.shape[0])

    def check_cancel(self) -> None:
        """Raise :class:`Canceled` when the cancel check says so (call it between batches)."""
        if self.should_cancel is not None and self.should_cancel():
            raise Canceled("canceled")

    def classify_noisy(self, owner: torch.Tensor) -> torch.Tensor:
        """Labels of one noisy copy of input ``owner[j]`` for each j (at most ``batch_size``)."""
        if self.noise is None:
            self.noise = torch.empty(
                (self.batch_size, *self.x.shape[1:]), dtype=self.x.dtype, device=self.x.device
            )
        batch = self.noise[: owner.numel()]
        if self.grid is not None:
            self.grid.noisy(self.levels.index_select(0, owner), self.generator, out=batch)
        else:
            torch.randn(batch.shape, generator=self.generator, out=batch)
            batch.mul_(self.sigma).add_(self.x.index_select(0, owner))
        scores = self.model.logits(batch)
        labels = scores.argmax(dim=1)
        # Both checked once per call (check_output), not per batch, so a GPU never waits on the host.
        self.nonfinite += (~torch.isfinite(scores).all(dim=1)).sum()
        self.largest = torch.maximum(self.largest, labels.max())
        self.drawn += int(owner.numel())
        return labels

    def check_output(self) -> None:
        """Refuse a model whose scores were NaN or infinite for some noisy copy (argmax would have
        voted them all for class 0), or that answered a class beyond the count it declares."""
        nonfinite = int(self.nonfinite)
        if nonfinite:
            raise InputError(
                f"the model returned non-finite scores (NaN or infinite) for {nonfinite} of "
                f"{self.drawn} noisy copies; no certificate can rest on them"
            )
        if int(self.largest) >= self.num_classes:
            raise InputError(
                f"the model answered class {int(self.largest)}, but declares {self.num_classes} classes"
            )

    def sample_counts(self, *sizes: int) -> list[Counts]:
        """Votes (N, K) per stage: ``sizes[s]`` noisy copies of every input, each stage its own.

        Stages never share a draw. All stages of all inputs form one stream of samples, so every
        batch except the last is full: sample j belongs to input j // m and, with m = sum(sizes),
        to the stage whose range holds j % m (an input's stages in order, inputs one after another).
        """
        x, k = self.x, self.num_classes
        num_inputs, per_input, num_stages = self.num_inputs, sum(sizes), len(sizes)
        total = per_input * num_inputs
        ends = torch.tensor(np.cumsum(sizes)[:-1], device=x.device)
        votes = torch.zeros(num_inputs * num_stages * k, dtype=torch.int64, device=x.device)
        for start in range(0, total, self.batch_size):
            self.check_cancel()
            stop = min(start + self.batch_size, total)
            sample = torch.arange(start, stop, device=x.device)
            owner = sample // per_input
            stage = torch.bucketize(sample % per_input, ends, right=True)
            labels = self.classify_noisy(owner)
            slot = (owner * num_stages + stage) * k + labels
            votes += torch.bincount(slot, minlength=votes.numel())
            if self.progress is not None:
                self.progress(stop, total)
        self.check_output()
        per_stage = votes.view(num_inputs, num_stages, k).cpu().numpy()
        return [per_stage[:, s] for s in range(num_stages)]

    def noise_fields(self, params: dict[str, Any]) -> dict[str, Any]:
        """The provenance's noise: its kind and, for discrete noise, K, the thresholds' sha256,
        the total variation per coordinate, the pixels per input (d), whether inputs were rounded
        to the grid, and ``alpha_effective`` over the d·n coordinates of one input's estimate."""
        if self.grid is None:
            return {"noise": "gaussian"}
        size = int(np.prod(self.x.shape[1:]))
        coordinates = size * int(params.get("n", params.get("n_max", 0)))
        return {
            **self.grid.table.describe(coordinates, float(params["alpha"])),
            "input_size": size,
            "quantize": self.quantize,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def provenance(self, params: dict[str, Any]) -> dict[str, Any]:
        """What produced a result: the call's parameters, seed, batch size (the one used, and the one
        asked for: None when chosen here), device, model (a pipeline's parts too), versions, and the
        process settings it ran under (:func:`smoothcert.models.process_tuning.applied`, and torch's
        thread count)."""
        info = self.model.info
        return {
            **params,
            **self.noise_fields(params),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "requested_batch_size": self.requested_batch_size,
            "num_inputs": self.num_inputs,
            "device": str(self.x.device),
            "runtime": self.model.runtime,
            "provider": self.model.provider,
            "precision": self.model.precision,
            "runtime_choice": getattr(self.model, "runtime_choice", None),
            "model_sha256": info.sha256,
            "model_format": info.format,
            "model_arch": info.arch,
            **({"model_parts": info.parts} if info.parts else {}),  # a pipeline names its two files
            "versions": software_versions(),
            "tuning": {**process_tuning.applied(), "torch_threads": torch.get_num_threads()},
            "elapsed_s": self.elapsed(),
        }
