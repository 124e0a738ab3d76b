"""One-step diffusion denoising (Carlini et al. 2023): an ε-prediction diffusion model as a denoiser.

A diffusion model is trained on images in [−1, 1] noised as x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε for
timesteps t = 0 … T−1 (``alphas_cumprod`` = ᾱ_t, part of the file's metadata). Noise δ ~ N(0, σ²I)
added in [0,1] pixel space is noise of 2σ in [−1, 1], so x + δ is the model's x_t, up to the
factor √ᾱ_t, at the timestep whose noise-to-signal ratio (1 − ᾱ_t)/ᾱ_t is (2σ)²
(:func:`timestep_for_sigma` picks the nearest step). One ε prediction then gives the denoised image:

    x_t = √ᾱ_t · (2(x + δ) − 1),   x̂₀ = (x_t − √(1 − ᾱ_t)·ε̂(x_t, t)) / √ᾱ_t,   D(x + δ) = clamp((x̂₀ + 1)/2, 0, 1).

A diffusion denoiser therefore needs σ: :meth:`DiffusionDenoiser.for_sigma` returns a bound copy
(the engine binds the job's σ through :func:`smoothcert.models.base.bind_sigma`), and
:meth:`~DiffusionDenoiser.denoise` on an unbound one is a ModelError. The bound σ and timestep are
in :attr:`~DiffusionDenoiser.sigma_binding`, which a pipeline's provenance repeats.

Two forms: a safetensors ``diffusion_unet`` (:class:`TorchDiffusionDenoiser`, loaded by
:func:`smoothcert.models.denoisers.load_denoiser`), and an ONNX graph of two inputs
(:class:`OnnxDiffusionDenoiser`): ``x_t`` float32 (B, C, H, W) and ``t`` **int64** (B,), the
0-based timestep, one output ε̂ float32 (B, C, H, W); its ``metadata_props`` hold, under the key
``smoothcert``, the JSON ``{"kind": "denoiser", "input_shape": [C, H, W], "extra": {"prediction":
"epsilon", "schedule": {"alphas_cumprod": [...], ...}}, ...}`` (:func:`export_diffusion_onnx`
writes it for the project's own models).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoothcert.models.diffusion_schedule import (
    check_alphas_cumprod,
    schedule_of,
    sigma_at,
    timestep_for_sigma,
)
from smoothcert.models.metadata import (
    METADATA_KEY,
    DenoiserInfo,
    ModelError,
    check_fields,
    denoiser_info_json,
    described_kind,
    fields_from_metadata_map,
    sha256_file,
)

PREDICTION = "epsilon"
TIMESTEP_DTYPE = "int64"  # what the ONNX form's ``t`` input takes


# --- the denoisers ------------------------------------------------------------------------------


class DiffusionDenoiser:
    """One-step denoising with an ε-prediction model (module docstring); subclasses give ε̂.

    Unbound (as loaded) it cannot denoise; :meth:`for_sigma` gives a bound copy sharing the
    network. ``alphas_cumprod`` is the float64 schedule.
    """

    runtime = "torch"

    def __init__(self, info: DenoiserInfo, alphas_cumprod: Any, device: str | torch.device = "cpu"):
        self.info = info
        self.alphas_cumprod = check_alphas_cumprod(alphas_cumprod)
        self.device = torch.device(device)
        self.provider = str(self.device)
        self.precision = "float32"
        self.sigma: float | None = None
        self.timestep: int | None = None

    def for_sigma(self, sigma: float) -> DiffusionDenoiser:
        """A copy bound to pixel noise ``sigma`` (its timestep from :func:`timestep_for_sigma`); this
        one is left as it is (a loaded model is shared by jobs of different σ)."""
        timestep = timestep_for_sigma(self.alphas_cumprod, sigma)
        bound = copy.copy(self)
        bound.sigma, bound.timestep = float(sigma), timestep
        return bound

    @property
    def sigma_binding(self) -> dict[str, Any]:
        """What provenance records of the binding: the σ, the timestep t, and the σ that t matches
        exactly (the schedule is discrete); empty when unbound."""
        if self.timestep is None:
            return {}
        return {
            "sigma": self.sigma,
            "timestep": self.timestep,
            "timestep_sigma": sigma_at(self.alphas_cumprod, self.timestep),
        }

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] images (B, C, H, W) for noisy ones of the bound σ on :attr:`device`; ModelError when unbound."""
        if self.timestep is None:
            raise ModelError(
                "a diffusion denoiser needs the noise level σ to choose its timestep: bind it with "
                "for_sigma(σ) (the engine does, through bind_sigma)"
            )
        alpha = float(self.alphas_cumprod[self.timestep])
        keep, noise = math.sqrt(alpha), math.sqrt(1.0 - alpha)
        x_t = keep * (2.0 * x.to(torch.float32) - 1.0)
        eps = self.eps(x_t, self.timestep)
        x0 = (x_t - noise * eps) / keep
        return ((x0 + 1.0) * 0.5).clamp_(0.0, 1.0)

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """ε̂ (B, C, H, W) for ``x_t`` at timestep ``t``."""
        raise NotImplementedError

    def _scratch_bytes(self) -> int:
        """x_t, ε̂ and x̂₀ beside the network's own work, per input."""
        return 3 * 4 * int(np.prod(self.info.input_shape))


class _AtTimestep(torch.nn.Module):
    """``module(x, t)`` at a fixed t as a one-input module, for the per-input memory estimate."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device))


class TorchDiffusionDenoiser(DiffusionDenoiser):
    """An ε-prediction ``nn.Module`` ``module(x_t, t)`` (e.g. ``diffusion_unet``) in eval mode."""

    def __init__(
        self,
        module: torch.nn.Module,
        info: DenoiserInfo,
        alphas_cumprod: Any,
        device: str | torch.device = "cpu",
    ):
        super().__init__(info, alphas_cumprod, device)
        self.module = module.to(self.device).eval()
        self._work_bytes: int | None = None

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        steps = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
        return self.module(x_t, steps)

    def work_bytes_per_sample(self) -> int:
        """The leaf modules' outputs per input (as for a torch classifier) and the step's own tensors."""
        from smoothcert.models.base import _leaf_output_bytes, _meta_copy

        if self._work_bytes is None:
            wrapped = _AtTimestep(self.module)
            try:
                leaves = _leaf_output_bytes(
                    _meta_copy(wrapped), self.info.input_shape, torch.device("meta")
                )
            except Exception:  # an operation without a meta kernel
                leaves = _leaf_output_bytes(wrapped, self.info.input_shape, self.device)
            self._work_bytes = leaves + self._scratch_bytes()
        return self._work_bytes


class OnnxDiffusionDenoiser(DiffusionDenoiser):
    """An ONNX ε-prediction graph of inputs ``x_t`` float32 (B, C, H, W) and ``t`` int64 (B,),
    run by onnxruntime (the CUDA provider when asked for and available); tensors stay on the CPU."""

    runtime = "onnxruntime"

    def __init__(
        self, path: str | Path, info: DenoiserInfo, alphas_cumprod: Any, session: Any, graph: Any
    ):
        super().__init__(info, alphas_cumprod, "cpu")
        self.session = session
        self.provider = session.get_providers()[0]
        inputs = session.get_inputs()
        images = [i for i in inputs if i.type == "tensor(float)" and len(i.shape) == 4]
        steps = [i for i in inputs if i.type == "tensor(int64)" and len(i.shape) == 1]
        if len(inputs) != 2 or len(images) != 1 or len(steps) != 1:
            got = ", ".join(f"{i.name} {i.type} rank {len(i.shape)}" for i in inputs)
            raise ModelError(
                f"{Path(path).name}: an ONNX diffusion denoiser takes two inputs, x_t float32 "
                f"(B, C, H, W) and t int64 (B,), not {got}"
            )
        self._x_name, self._t_name = images[0].name, steps[0].name
        self._out_name = session.get_outputs()[0].name
        from smoothcert.models.onnx_runtime import graph_bytes_per_sample

        self._work_bytes = (
            graph_bytes_per_sample(graph, self._x_name, info.input_shape) + self._scratch_bytes()
        )

    def eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x = x_t.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(
            [self._out_name],
            {self._x_name: x, self._t_name: np.full(x.shape[0], t, dtype=np.int64)},
        )
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x_t.device)

    def work_bytes_per_sample(self) -> int:
        return self._work_bytes


def diffusion_from_module(
    module: torch.nn.Module, info: DenoiserInfo, device: torch.device
) -> TorchDiffusionDenoiser:
    """A loaded ``diffusion_unet`` as a denoiser; its schedule from ``info.extra``."""
    return TorchDiffusionDenoiser(
        module, info, schedule_of(info.extra, info.name or str(info.arch)), device
    )


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a map (external data is not read)."""
    from smoothcert.models.onnx_runtime import parse_onnx

    return {p.key: p.value for p in parse_onnx(path).metadata_props}


def is_onnx_denoiser(path: str | Path) -> bool:
    """Whether an ONNX file's metadata says ``kind: "denoiser"``; ModelError for a file that is not ONNX."""
    return described_kind(onnx_metadata(path)) == "denoiser"


def load_onnx_diffusion(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    input_shape: tuple[int, int, int] | None = None,
    sigma: float | None = None,
    name: str | None = None,
) -> OnnxDiffusionDenoiser:
    """An ONNX diffusion denoiser (module docstring), unbound and not yet checked (the caller
    runs :func:`~smoothcert.models.denoisers.check_denoiser`). ModelError, one line, for a file of
    external data or non-standard operators, one that does not say it is an ε-prediction denoiser
    with a schedule, or inputs other than (x_t float32, t int64)."""
    from smoothcert.models.onnx_runtime import (
        _open_session,
        _resolve_input_shape,
        check_onnx_contents,
    )

    path = Path(path)
    graph = check_onnx_contents(path)
    metadata = {p.key: p.value for p in graph.metadata_props}
    if described_kind(metadata) != "denoiser":
        raise ModelError(
            f"{path.name} is not a denoiser: its metadata_props[{METADATA_KEY!r}] must say "
            '"kind": "denoiser"'
        )
    described = fields_from_metadata_map(metadata)
    extra = dict(described.get("extra", {}))
    if extra.get("prediction", PREDICTION) != PREDICTION:
        raise ModelError(
            f"{path.name}: only ε-prediction diffusion models are supported, not "
            f"prediction {extra.get('prediction')!r}"
        )
    alphas = schedule_of(extra, path.name)
    session = _open_session(path, device, None)
    x_inputs = [i for i in session.get_inputs() if i.type == "tensor(float)" and len(i.shape) == 4]
    given = check_fields(
        {
            k: v
            for k, v in dict(input_shape=input_shape, sigma=sigma, name=name).items()
            if v is not None
        }
    )
    wanted = given.get("input_shape") or described.get("input_shape")
    shape = _resolve_input_shape(wanted, x_inputs[0].shape) if x_inputs else wanted
    if shape is None:
        raise ModelError(f"{path.name}: a denoiser needs its input_shape [C, H, W]")
    info = DenoiserInfo(
        format="onnx",
        input_shape=tuple(shape),
        arch=described.get("arch"),
        sigma=given.get("sigma", described.get("sigma")),
        sha256=sha256_file(path),
        name=given.get("name", described.get("name")),
        extra=extra,
    )
    return OnnxDiffusionDenoiser(path, info, alphas, session, graph)


def export_diffusion_onnx(denoiser: TorchDiffusionDenoiser, path: str | Path) -> Path:
    """Write ``denoiser``'s network as the ONNX form (inputs ``x_t`` float32, ``t`` int64, output
    ``eps``; dynamic batch) with its metadata (schedule included, ``exported_from`` the source's
    sha256) under ``smoothcert`` in ``metadata_props``; atomically. Returns ``path``."""
    import onnx

    path = Path(path)
    module = copy.deepcopy(denoiser.module).cpu().eval()
    x = torch.zeros((2, *denoiser.info.input_shape))
    t = torch.zeros(2, dtype=torch.int64)
    info = replace(
        denoiser.info,
        format="onnx",
        extra={
            **denoiser.info.extra,
            "prediction": PREDICTION,
            "timestep_input": TIMESTEP_DTYPE,
            "exported_from": denoiser.info.sha256,
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with (
            warnings.catch_warnings()
        ):  # the TorchScript exporter is deprecated; it needs no onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (x, t),
                tmp,
                dynamo=False,
                input_names=["x_t", "t"],
                output_names=["eps"],
                opset_version=17,
                dynamic_axes={"x_t": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}},
            )
        proto = onnx.load(tmp)
        proto.metadata_props.add(key=METADATA_KEY, value=denoiser_info_json(info))
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
