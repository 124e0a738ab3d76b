"""Denoisers: a [0,1] image batch in, a [0,1] image batch of the same shape out.

Denoised smoothing (Salman et al. 2020) puts a denoiser D in front of a classifier f that never
saw noise and certifies f(D(x + δ)); the noise is added in [0,1] pixel space before D, and f keeps
its own normalization. A denoiser file is a safetensors file of an allow-listed denoiser
architecture (:data:`~smoothcert.models.architectures.DENOISER_ARCHITECTURES`), self-describing
as the classifiers are (:func:`save_denoiser`), its size parameters in the metadata's ``extra``.
:func:`load_denoiser` checks it as :func:`~smoothcert.models.loaders.check_forward` checks a
classifier: finite images of the input's shape, on the same check batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from smoothcert.models.architectures import (
    DENOISER_ARCHITECTURES,
    DENOISER_DEFAULTS,
    DIFFUSION_ARCHITECTURES,
    build_denoiser,
)
from smoothcert.models.base import _leaf_output_bytes, _meta_copy, bind_sigma
from smoothcert.models.loaders import CHECK_SIGMA, check_batches, check_state_dict, resolve_device
from smoothcert.models.metadata import (
    METADATA_KEY,
    DenoiserInfo,
    ModelError,
    check_fields,
    denoiser_info_json,
    fields_from_metadata_map,
    sha256_file,
)
from smoothcert.models.safetensors_header import read_safetensors_header, refuse_pickled_checkpoint
from smoothcert.models.safetensors_io import load_safetensors_state


def is_denoiser_arch(arch: Any) -> bool:
    return isinstance(arch, str) and arch in DENOISER_ARCHITECTURES


def is_denoiser(model: Any) -> bool:
    """Whether a loaded model is a denoiser (a DnCNN or a diffusion denoiser): its info is a DenoiserInfo."""
    return isinstance(getattr(model, "info", None), DenoiserInfo)


def is_denoiser_file(path: str | Path, arch: str | None = None) -> bool:
    """Whether a model file holds a denoiser: a safetensors file naming a denoiser architecture
    (``arch`` overrides it), or an ONNX file whose metadata says ``kind: "denoiser"``."""
    if Path(path).suffix.lower() == ".onnx" and not arch:
        from smoothcert.models.diffusion import is_onnx_denoiser

        return is_onnx_denoiser(path)
    return is_denoiser_arch(described_arch(path, arch))


def registration_sigma(denoiser: Any) -> float:
    """The σ at which loading and registration checks run a denoiser that needs one (a diffusion
    denoiser): its recorded ``sigma``, else :data:`~smoothcert.models.loaders.CHECK_SIGMA` (0.25),
    the noise of the check batches."""
    return float(denoiser.info.sigma) if denoiser.info.sigma else CHECK_SIGMA


def described_arch(path: str | Path, arch: str | None = None) -> str | None:
    """The architecture a safetensors file names (or ``arch``, which overrides it); None for any
    other file. Reads the header only."""
    if arch:
        return arch
    if Path(path).suffix.lower() != ".safetensors":
        return None
    _, metadata = read_safetensors_header(path)
    return fields_from_metadata_map(metadata).get("arch")


class Denoiser(Protocol):
    """What a pipeline runs as its first part: :class:`TorchDenoiser`, its ONNX export
    (:class:`~smoothcert.models.onnx_runtime.OnnxDenoiser`), or a diffusion denoiser bound to σ
    (:mod:`smoothcert.models.diffusion`)."""

    info: DenoiserInfo
    device: torch.device  # where inputs live
    runtime: str
    provider: str
    precision: str

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] images (B, C, H, W) for a float32 batch of the same shape on :attr:`device`."""

    def work_bytes_per_sample(self) -> int:
        """An upper estimate of the memory one more input adds to a pass, as for a classifier."""


class TorchDenoiser:
    """A denoiser ``nn.Module`` in eval mode whose outputs are clamped to [0, 1]."""

    runtime = "torch"

    def __init__(
        self, module: torch.nn.Module, info: DenoiserInfo, device: str | torch.device = "cpu"
    ):
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.info = info
        self.provider = str(self.device)
        self.precision = "float32"
        self._work_bytes: int | None = None

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] for a float32 batch of the same shape on :attr:`device`."""
        return self.module(x).clamp_(0.0, 1.0)

    def work_bytes_per_sample(self) -> int:
        """The bytes of the leaf modules' outputs per input, as for a torch classifier."""
        if self._work_bytes is None:
            try:
                self._work_bytes = _leaf_output_bytes(
                    _meta_copy(self.module), self.info.input_shape, torch.device("meta")
                )
            except Exception:  # an operation without a meta kernel
                self._work_bytes = _leaf_output_bytes(
                    self.module, self.info.input_shape, self.device
                )
        return self._work_bytes


def save_denoiser(path: str | Path, network: torch.nn.Module, info: DenoiserInfo) -> Path:
    """Write ``network.state_dict()`` with ``info`` in the header, as :func:`load_denoiser` reads it."""
    if not is_denoiser_arch(info.arch):
        raise ModelError(
            f"info.arch must be a denoiser architecture ({', '.join(sorted(DENOISER_ARCHITECTURES))})"
        )
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: denoiser_info_json(info)})
    return Path(path)


def load_denoiser(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    arch: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    sigma: float | None = None,
    name: str | None = None,
    **_ignored: Any,
) -> Any:
    """Load a denoiser file (safetensors, or the ONNX form of a diffusion model) on ``device`` and
    check it (:func:`check_denoiser`).

    The input shape comes from ``input_shape`` or the file; the size parameters from the file's
    ``extra``, else from the weights (DnCNN: the first convolution's width and the number of
    convolutions). A ``diffusion_unet`` file, or an ONNX file whose metadata says it is a denoiser,
    loads as an unbound diffusion denoiser (:mod:`smoothcert.models.diffusion`), checked at
    :func:`registration_sigma`. Classifier fields (class count, normalization) are ignored: a
    denoiser has none. Raises ModelError, one line, for a missing or pickled file, an architecture
    that is not a denoiser's, weights that do not fit it, or outputs that are not finite images of
    the input's shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no such file: {path}")
    refuse_pickled_checkpoint(path)
    if path.suffix.lower() == ".onnx":
        from smoothcert.models.diffusion import load_onnx_diffusion

        onnx_denoiser = load_onnx_diffusion(
            path, device=resolve_device(device), input_shape=input_shape, sigma=sigma, name=name
        )
        check_denoiser(onnx_denoiser)
        return onnx_denoiser
    if path.suffix.lower() != ".safetensors":
        raise ModelError(
            f"{path.name}: a denoiser must be a .safetensors file of an allow-listed denoiser "
            f"architecture ({', '.join(sorted(DENOISER_ARCHITECTURES))})"
        )
    tensors, metadata = read_safetensors_header(path)
    described = fields_from_metadata_map(metadata)
    given = check_fields(
        {
            k: v
            for k, v in dict(input_shape=input_shape, sigma=sigma, name=name).items()
            if v is not None
        }
    )
    fields = {**described, **given, **({"arch": arch} if arch else {})}
    arch = fields.get("arch")
    if not is_denoiser_arch(arch):
        raise ModelError(
            f"{path.name} is not a denoiser: its architecture is {arch!r}, a denoiser's is one of "
            f"{', '.join(sorted(DENOISER_ARCHITECTURES))}"
        )
    assert arch is not None
    if "input_shape" not in fields:
        raise ModelError(f"{path.name}: a denoiser needs its input_shape [C, H, W]")
    shape = fields["input_shape"]
    extra = dict(fields.get("extra", {}))
    size = {
        k: int(extra[k]) if k in extra else _size_from_weights(tensors, k, arch)
        for k in DENOISER_DEFAULTS[arch]
    }
    state, _ = load_safetensors_state(path)
    with torch.device("meta"):
        net = build_denoiser(arch, shape[0], **size)
    check_state_dict(net, state, arch)
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    info = DenoiserInfo(
        format="safetensors",
        input_shape=shape,
        arch=arch,
        sigma=fields.get("sigma"),
        sha256=sha256_file(path),
        name=fields.get("name"),
        extra={**extra, **size},
    )
    if arch in DIFFUSION_ARCHITECTURES:
        from smoothcert.models.diffusion import diffusion_from_module

        denoiser: Any = diffusion_from_module(net, info, resolve_device(device))
    else:
        denoiser = TorchDenoiser(net, info, resolve_device(device))
    check_denoiser(denoiser)
    return denoiser


def _size_from_weights(tensors: dict[str, dict], key: str, arch: str = "dncnn") -> int:
    """DnCNN's ``depth`` (its convolutions) or ``width`` (the first one's outputs) read from the
    weights; another architecture's default (its files record their sizes)."""
    if arch != "dncnn":
        return DENOISER_DEFAULTS[arch][key]
    convs = [
        k
        for k, t in tensors.items()
        if k.startswith("layers.") and k.endswith(".weight") and len(t["shape"]) == 4
    ]
    if key == "depth":
        return max(len(convs), 2)
    first = tensors.get("layers.0.weight")
    return (
        int(first["shape"][0]) if first and first["shape"] else DENOISER_DEFAULTS["dncnn"]["width"]
    )


def check_denoiser(denoiser: Any) -> None:
    """Run :func:`~smoothcert.models.loaders.check_batches` (a denoiser that needs σ bound to
    :func:`registration_sigma`); ModelError unless each gives finite images of the input's shape."""
    denoiser = bind_sigma(denoiser, registration_sigma(denoiser))
    shape = denoiser.info.input_shape
    for what, batch in check_batches(shape).items():
        try:
            out = denoiser.denoise(batch.to(denoiser.device))
        except Exception as exc:  # torch raises its own types for a shape mismatch
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(
                f"the denoiser cannot run on input shape {list(shape)}: {first_line}"
            ) from None
        if tuple(out.shape) != tuple(batch.shape):
            raise ModelError(
                f"the denoiser turns images of shape {list(shape)} into {list(out.shape[1:])}; "
                "it must keep the input's shape"
            )
        if not bool(torch.isfinite(out).all()):
            raise ModelError(f"the denoiser returns NaN or infinite pixels for {what}")
