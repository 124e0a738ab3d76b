"""The base classifier f that randomized smoothing wraps.

The engine needs :meth:`BaseClassifier.logits`: a batch of noisy images in [0,1] pixel space
(already on :attr:`device`) in, scores (on the same device) out; it takes their argmax itself, after
checking that they are finite. Normalization is the model's own business, applied after the noise.
:meth:`BaseClassifier.work_bytes_per_sample` tells the engine how large a batch fits in memory.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Protocol, runtime_checkable

import torch

from smoothcert.models.metadata import ModelInfo, Normalization


@runtime_checkable
class BaseClassifier(Protocol):
    info: ModelInfo
    device: torch.device  # where inputs and noise live
    runtime: str  # "torch" | "onnxruntime"
    provider: str  # what actually runs it, e.g. "cpu", "cuda:0", "CPUExecutionProvider"
    precision: str  # "float32", ...

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, K) for a float32 batch (B, C, H, W) on :attr:`device`."""

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (B,) int64 on :attr:`device`."""

    def work_bytes_per_sample(self) -> int:
        """An upper estimate of the memory one more input adds to a forward pass: the bytes of every
        intermediate result and the scores, per input (what the model frees as it goes counts too)."""


def bind_sigma(model: Any, sigma: float) -> Any:
    """``model.for_sigma(sigma)`` for a model that needs the noise level (a pipeline whose
    denoiser is a diffusion model picks its timestep from it), else ``model`` itself. The engine
    calls it with the run's σ before sampling; the bound model is a new object, the argument is
    left as it is (workers share a loaded model across jobs of different σ)."""
    for_sigma = getattr(model, "for_sigma", None)
    return model if for_sigma is None else for_sigma(sigma)


class Normalize(torch.nn.Module):
    """First layer of every torch model: (x - mean) / std per channel (std may be absent)."""

    mean: torch.Tensor  # buffers, (1, C, 1, 1)
    std: torch.Tensor

    def __init__(self, norm: Normalization | None, channels: int):
        super().__init__()
        mean = norm.mean if norm else (0.0,) * channels
        std = norm.std if norm and norm.std else (1.0,) * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"normalization has {len(mean)} channels, the model takes {channels}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TorchClassifier:
    """A torch ``nn.Module`` (normalization included) as a base classifier, in eval mode."""

    runtime = "torch"

    def __init__(
        self, module: torch.nn.Module, info: ModelInfo, device: str | torch.device = "cpu"
    ):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.info = info
        self.provider = str(self.device)
        self.precision = "float32"
        self._work_bytes: int | None = None

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.inference_mode()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).argmax(dim=1)

    def work_bytes_per_sample(self) -> int:
        """Measured once, on a batch of 2: the outputs of every leaf module, per input."""
        if self._work_bytes is None:
            try:
                # On the meta device only shapes are computed: no arithmetic, no memory, and the
                # module itself is not called (a copy whose weights are meta tensors is).
                self._work_bytes = _leaf_output_bytes(
                    _meta_copy(self.module), self.info.input_shape, torch.device("meta")
                )
            except (
                Exception
            ):  # an operation without a meta kernel, or a module that cannot be copied
                self._work_bytes = _leaf_output_bytes(
                    self.module, self.info.input_shape, self.device
                )
        return self._work_bytes


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are meta tensors (the weights are not copied)."""
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = torch.nn.Parameter(
            torch.empty_like(param, device="meta"), param.requires_grad
        )
    for buffer in module.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(module, memo)


# Results of functional code between layers (a residual sum, a reshape) and the allocator's
# slack are not seen by the hooks below; the peak of the layers' results is doubled for them.
PEAK_MARGIN = 2


@torch.inference_mode()
def _leaf_output_bytes(
    module: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device, batch: int = 2
) -> int:
    """Bytes per input of the tensors the leaf modules of ``module`` return on a zero batch: the
    peak of those alive at once (each is freed when nothing refers to it any more, as in a real
    inference pass) times :data:`PEAK_MARGIN`, and at most the sum of all of them."""
    total = live = peak = 0
    alive: dict[int, int] = {}

    def release(key: int) -> None:
        nonlocal live
        live -= alive.pop(key, 0)

    def count(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total, live, peak
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if (
                isinstance(out, torch.Tensor) and id(out) not in alive
            ):  # an in-place result is its input
                size = out.numel() * out.element_size()
                total += size
                live += size
                alive[id(out)] = size
                weakref.finalize(out, release, id(out))
                peak = max(peak, live)

    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        module(torch.zeros((batch, *input_shape), device=device))
    finally:
        for handle in handles:
            handle.remove()
    return -(-min(total, PEAK_MARGIN * peak) // batch)
