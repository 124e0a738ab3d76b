"""Which runtime evaluates a model: :func:`select_runtime`, measured once per model, device and batch.

A safetensors model of an allow-listed architecture can run in more than one runtime; the
candidates are torch as loaded, torch with channels-last tensors, and onnxruntime on an ONNX graph
exported here from the same module (normalization included). ``runtime="auto"`` times a few
batches of each candidate at the batch size the run will use and keeps the fastest; a candidate
that fails to build, or whose scores on the loader's check batches do not agree with torch's (same
labels, scores within a relative 1e-3), is skipped with a log line. The choice is cached per model
sha256, device and batch size class (the next power of two) in ``<cache_dir>/runtime-choices.json``,
the export in ``<cache_dir>/exports/<sha256>.onnx``, so a second load measures nothing. ``"torch"``
and ``"onnxruntime"`` pin one. An ONNX upload is its own graph and runs in onnxruntime only. A
pipeline (denoiser + classifier) with ``"auto"`` gets each part in its fastest runtime: the
classifier as above, a DnCNN denoiser in torch or onnxruntime on its export
(:func:`select_denoiser_runtime`).

The certificate is about the classifier actually evaluated: with onnxruntime that is the exported
graph, which is why it must agree with the torch module before it is used, and why the chosen
runtime, the way it was chosen and the export's sha256 are recorded (``runtime_choice``) in the
provenance of every result.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from smoothcert.models.base import BaseClassifier, TorchClassifier
from smoothcert.models.metadata import ModelError, sha256_file
from smoothcert.models.runtime_rules import loaded_model_refusal

log = logging.getLogger(__name__)

CANDIDATES = ("torch", "torch-channels-last", "onnxruntime")
CUDA_CANDIDATES = (
    *CANDIDATES,
    "torch-compiled",
)  # inductor: minutes to compile on a small CPU, not there
# The runtimes and precisions a caller names are runtime_rules.py's. The noise is drawn and added
# in float32 whatever the precision; a reduced-precision model casts each noisy batch on the way in.
_REDUCED = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CHOICES_FILE = "runtime-choices.json"
EXPORT_VERSION = 1  # part of the cache key: a new exporter makes new exports
MEASURE_ROUNDS = 3  # rounds over the candidates, interleaved so a busy moment hits them all
MEASURE_BATCHES = 1  # timed batches per candidate and round (after one warm-up batch)
MEASURE_BUDGET_S = 10.0  # no round starts after this many seconds of timing (a large model)
MEASURE_MAX_BATCH = 4096  # larger batches are timed at this size: a load should not take minutes
AGREEMENT_RTOL = 1e-3
DENOISER_AGREEMENT_ATOL = 1e-4  # denoised [0,1] pixels, onnxruntime against torch
EXPORTABLE_DENOISERS = frozenset(
    {"dncnn"}
)  # plain convolutions; a diffusion denoiser stays in torch


class ChannelsLastClassifier(TorchClassifier):
    """A torch model whose weights and inputs are laid out channels-last (NHWC in memory); the
    arithmetic is the same, some CPU and GPU convolution kernels are faster on it."""

    memory_format = "channels_last"

    def __init__(self, model: TorchClassifier):
        # Module.to takes memory_format (documented, parsed by torch._C._nn._parse_to); torch's
        # overloads of it leave the keyword out.
        module = copy.deepcopy(model.module).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        super().__init__(module, model.info, model.device)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


class ReducedPrecisionClassifier(TorchClassifier):
    """A torch model computing in float16 or bfloat16: weights cast once, each float32 noisy batch
    cast on the way in, scores cast back to float32. It is another classifier than the float32
    one (labels may differ near a tie); a certificate made with it holds for it."""

    def __init__(self, model: TorchClassifier, precision: str):
        module = copy.deepcopy(model.module).to(dtype=_REDUCED[precision])
        super().__init__(module, model.info, model.device)
        self.precision = precision
        self._dtype = _REDUCED[precision]

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self._dtype)).float()

    @torch.inference_mode()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


class CompiledClassifier(TorchClassifier):
    """A torch model compiled by ``torch.compile`` (inductor); compiled at its first batch."""

    def __init__(self, model: TorchClassifier):
        super().__init__(model.module, model.info, model.device)
        self._compiled = torch.compile(model.module, dynamic=True)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x)

    @torch.inference_mode()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def check_precision(model: BaseClassifier, runtime: str, precision: str) -> None:
    """ModelError (what is allowed, in one line) unless ``model`` can run in ``runtime`` and
    ``precision`` on its device, by the rule of :mod:`smoothcert.models.runtime_rules` (which the
    API applies before it queues a job): float32 everywhere; bfloat16 in torch; float16 in torch
    on a CUDA device; an ONNX model in onnxruntime only; a pipeline in auto and float32 only."""
    refusal = loaded_model_refusal(_runs_as(model), runtime, precision, str(model.device))
    if refusal is not None:
        raise ModelError(refusal)


def _runs_as(model: Any) -> str:
    """The model format the rule knows ``model`` by, from what it is: an onnxruntime export of a
    safetensors model carries its source's ``info``, yet runs as an ONNX graph."""
    if _is_pipeline(model):
        return "pipeline"
    return "safetensors" if isinstance(model, TorchClassifier) else "onnx"


def batch_class(batch_size: int) -> int:
    """The power of two at or above ``batch_size``: batches of one class share a runtime choice."""
    return 1 << max(0, int(batch_size) - 1).bit_length()


def select_runtime(
    model: BaseClassifier,
    runtime: str = "auto",
    *,
    batch_size: int,
    cache_dir: str | Path | None = None,
    precision: str = "float32",
) -> BaseClassifier:
    """``model`` in the runtime ``runtime`` asks for (module docstring), with ``runtime_choice``
    set: ``{"requested", "chosen", "how", ...}``. ``model`` is what the loader returned (torch for
    safetensors, onnxruntime for ONNX); a copy of it is returned when it already runs where asked.
    A reduced ``precision`` runs in torch, not measured against others.
    A pipeline (``"auto"`` and float32 only) comes back with each part in its own fastest runtime
    (the classifier's choice as above, the denoiser's by :func:`select_denoiser_runtime`).
    Without ``cache_dir`` the export is made in a temporary folder and nothing is cached. Raises ModelError
    when :func:`check_precision` refuses ``runtime`` and ``precision`` for the model (the rule of
    runtime_rules.py), and when a pinned onnxruntime export fails or disagrees with torch.
    """
    check_precision(model, runtime, precision)
    if _is_pipeline(model):
        return _select_pipeline(model, batch_size, cache_dir)
    if precision != "float32":
        assert isinstance(model, TorchClassifier)  # check_precision refused the others
        return _mark(
            ReducedPrecisionClassifier(model, precision),
            runtime,
            "torch",
            f"precision {precision}: torch",
        )
    if not isinstance(model, TorchClassifier):
        return _mark(model, runtime, model.runtime, "the model's own format")
    if runtime == "torch":
        return _mark(model, runtime, "torch", "pinned")
    if cache_dir is None:  # an onnxruntime session holds its graph: the export's folder can go
        with tempfile.TemporaryDirectory(prefix="smoothcert-runtime-") as tmp:
            return _select(model, runtime, batch_size, Path(tmp), keep=False)
    return _select(model, runtime, batch_size, Path(cache_dir), keep=True)


def _select(
    model: TorchClassifier, runtime: str, batch_size: int, cache: Path, keep: bool
) -> BaseClassifier:
    if runtime == "onnxruntime":
        return _mark(_onnx_candidate(model, cache), runtime, "onnxruntime", "pinned")
    key = f"{model.info.sha256}|{model.device}|batch<={batch_class(batch_size)}"
    choices = _read_choices(cache)
    cached = choices.get(key)
    if cached is not None and cached.get("chosen") in CUDA_CANDIDATES:
        try:
            chosen = _build(cached["chosen"], model, cache)
        except ModelError as exc:
            log.warning(
                "runtime %s cached for %s no longer builds (%s); measuring again",
                cached["chosen"],
                key,
                exc,
            )
        else:
            log.info(
                "runtime for %s: %s, from the cache %s", key, cached["chosen"], cache / CHOICES_FILE
            )
            return _mark(
                chosen, runtime, cached["chosen"], "auto, from the cache", cached.get("measured")
            )
    built: dict[str, BaseClassifier] = {}
    for name in CUDA_CANDIDATES if model.device.type == "cuda" else CANDIDATES:
        try:
            built[name] = _build(name, model, cache)
        except (ModelError, RuntimeError, ValueError, OSError) as exc:
            log.warning(
                "runtime %s skipped for %s: %s",
                name,
                key,
                str(exc).splitlines()[0] if str(exc) else exc,
            )
    measured = measure(built, batch_size)
    best = max(measured, key=lambda name: measured[name])
    log.info(
        "runtime for %s: measured %s samples/s; chose %s",
        key,
        ", ".join(f"{k} {v:,.0f}" for k, v in measured.items()),
        best,
    )
    choices = _read_choices(cache)  # again: another process may have written meanwhile
    choices[key] = {
        "chosen": best,
        "measured": {k: round(v, 1) for k, v in measured.items()},
        "at": round(time.time(), 3),
    }
    if keep:
        _write_choices(cache, choices)
    return _mark(built[best], runtime, best, "auto, measured", measured)


def measure(candidates: dict[str, Any], batch_size: int, call: str = "logits") -> dict[str, float]:
    """Samples per second of each candidate's ``logits`` (or method ``call``: a denoiser's ``denoise``)
    on a fixed uniform batch of ``batch_size``
    (a candidate whose first batch fails is left out, with a log line):
    the best of MEASURE_ROUNDS interleaved rounds of MEASURE_BATCHES batches (no round begun after
    MEASURE_BUDGET_S), after a warm-up (batches above MEASURE_MAX_BATCH are timed at that size)."""
    any_model = next(iter(candidates.values()))
    shape, device = any_model.info.input_shape, any_model.device
    size = min(int(batch_size), MEASURE_MAX_BATCH)
    x = torch.rand((size, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    best: dict[str, float] = {}
    for name, candidate in list(candidates.items()):
        try:
            getattr(candidate, call)(x)  # warm-up; a compiled candidate compiles here
        except Exception as exc:  # each runtime raises its own types
            log.warning(
                "runtime %s skipped: its first batch failed: %s",
                name,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            candidates = {k: v for k, v in candidates.items() if k != name}
    timing_began = time.perf_counter()
    for round_ in range(MEASURE_ROUNDS):
        if round_ and time.perf_counter() - timing_began > MEASURE_BUDGET_S:
            break
        for name, candidate in candidates.items():
            started = time.perf_counter()
            for _ in range(MEASURE_BATCHES):
                getattr(candidate, call)(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = MEASURE_BATCHES * len(x) / max(time.perf_counter() - started, 1e-9)
            best[name] = max(best.get(name, 0.0), rate)
    return best


def _is_pipeline(model: Any) -> bool:
    from smoothcert.models.pipeline import DenoisedClassifier

    return isinstance(model, DenoisedClassifier)


def _select_pipeline(model: Any, batch_size: int, cache_dir: str | Path | None) -> Any:
    """A pipeline with each part in its fastest runtime: the classifier as any model
    (:func:`select_runtime`), the denoiser by :func:`select_denoiser_runtime`; both choices are in
    the pipeline's ``runtime_choice`` under ``parts``."""
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="smoothcert-runtime-") as tmp:
            return _select_pipeline(model, batch_size, tmp)
    # select_runtime's models carry runtime_choice (set by _mark), which BaseClassifier does not name.
    classifier: Any = select_runtime(
        model.classifier, "auto", batch_size=batch_size, cache_dir=cache_dir
    )
    denoiser = select_denoiser_runtime(model.denoiser, batch_size=batch_size, cache_dir=cache_dir)
    chosen = model.with_parts(denoiser, classifier)
    parts = {"denoiser": denoiser.runtime_choice, "classifier": classifier.runtime_choice}
    chosen.runtime_choice = {
        "requested": "auto",
        "chosen": chosen.runtime,
        "how": "auto, per part",
        "parts": parts,
    }
    return chosen


def select_denoiser_runtime(denoiser: Any, *, batch_size: int, cache_dir: str | Path) -> Any:
    """``denoiser`` (a :class:`~smoothcert.models.denoisers.TorchDenoiser`) in its fastest runtime, with
    ``runtime_choice`` set, as :func:`select_runtime` chooses for a classifier: torch as loaded, or
    onnxruntime on its ONNX export (DnCNN only, :data:`EXPORTABLE_DENOISERS`; any other denoiser stays
    in torch), used only when its images agree with torch's within DENOISER_AGREEMENT_ATOL on the
    loader's check batches. Measured at ``batch_size``; cached per denoiser sha256, device and batch
    size class beside the classifiers' choices, the export under ``exports/``."""
    if denoiser.info.arch not in EXPORTABLE_DENOISERS:
        return _mark(denoiser, "auto", denoiser.runtime, "auto, the only runtime of this denoiser")
    cache = Path(cache_dir)
    key = f"denoiser|{denoiser.info.sha256}|{denoiser.device}|batch<={batch_class(batch_size)}"
    cached = _read_choices(cache).get(key)
    if cached is not None and cached.get("chosen") in ("torch", "onnxruntime"):
        try:
            chosen = denoiser if cached["chosen"] == "torch" else onnx_denoiser(denoiser, cache)
        except ModelError as exc:
            log.warning(
                "runtime %s cached for %s no longer builds (%s); measuring again",
                cached["chosen"],
                key,
                exc,
            )
        else:
            return _mark(
                chosen, "auto", cached["chosen"], "auto, from the cache", cached.get("measured")
            )
    built: dict[str, Any] = {"torch": denoiser}
    try:
        built["onnxruntime"] = onnx_denoiser(denoiser, cache)
    except (ModelError, RuntimeError, ValueError, OSError) as exc:
        log.warning(
            "runtime onnxruntime skipped for %s: %s",
            key,
            str(exc).splitlines()[0] if str(exc) else exc,
        )
    measured = measure(built, batch_size, call="denoise")
    best = max(measured, key=lambda name: measured[name])
    log.info(
        "runtime for %s: measured %s samples/s; chose %s",
        key,
        ", ".join(f"{k} {v:,.0f}" for k, v in measured.items()),
        best,
    )
    choices = _read_choices(cache)
    choices[key] = {
        "chosen": best,
        "measured": {k: round(v, 1) for k, v in measured.items()},
        "at": round(time.time(), 3),
    }
    _write_choices(cache, choices)
    return _mark(built[best], "auto", best, "auto, measured", measured)


def onnx_denoiser(denoiser: Any, cache: Path) -> Any:
    """onnxruntime on the denoiser's ONNX export (made once, kept under ``cache/exports``), checked
    to give torch's images on the loader's check batches."""
    from smoothcert.models.onnx_runtime import OnnxDenoiser

    path = cache / "exports" / f"denoiser-{denoiser.info.sha256}-v{EXPORT_VERSION}.onnx"
    if not path.is_file():
        export_module(denoiser.module, path, denoiser.info.input_shape)
    try:
        exported = OnnxDenoiser(
            path, denoiser.info, device=denoiser.device, work_bytes=denoiser.work_bytes_per_sample()
        )
    except ModelError:
        path.unlink(missing_ok=True)
        raise
    exported.graph_sha256 = sha256_file(path)
    check_denoiser_agreement(denoiser, exported)
    return exported


def check_denoiser_agreement(reference: Any, other: Any) -> None:
    """ModelError unless ``other`` denoises every check batch of the loader to within
    DENOISER_AGREEMENT_ATOL (absolute, in [0, 1] pixels) of ``reference``."""
    from smoothcert.models.loaders import check_batches

    for what, batch in check_batches(reference.info.input_shape).items():
        want = reference.denoise(batch.to(reference.device)).float().cpu()
        got = other.denoise(batch.to(other.device)).float().cpu()
        gap = float((want - got).abs().max())
        if not gap <= DENOISER_AGREEMENT_ATOL:  # NaN fails too
            raise ModelError(
                f"the {other.runtime} export of the denoiser disagrees with torch on the {what}: "
                f"pixels differ by up to {gap:.3g}"
            )


def _build(name: str, model: TorchClassifier, cache: Path) -> BaseClassifier:
    if name == "torch":
        return model
    if name == "torch-channels-last":
        return ChannelsLastClassifier(model)
    if name == "torch-compiled":
        return CompiledClassifier(model)
    return _onnx_candidate(model, cache)


def _onnx_candidate(model: TorchClassifier, cache: Path) -> BaseClassifier:
    """onnxruntime on the module's ONNX export (made once, kept under ``cache/exports``), checked
    to agree with torch on the loader's check batches."""
    from smoothcert.models.onnx_runtime import OnnxClassifier

    path = cache / "exports" / f"{model.info.sha256}-v{EXPORT_VERSION}.onnx"
    if not path.is_file():
        export_module(model.module, path, model.info.input_shape)
    try:
        onnx_model = OnnxClassifier(
            path,
            device=model.device,
            input_shape=model.info.input_shape,
            num_classes=model.info.num_classes,
        )
    except ModelError:
        path.unlink(missing_ok=True)  # a damaged export is made again next time
        raise
    onnx_model.info = model.info  # the classifier of the uploaded file (its sha256, format, arch)
    onnx_model.graph_sha256 = sha256_file(path)
    check_agreement(model, onnx_model)
    return onnx_model


def export_module(module: torch.nn.Module, path: Path, input_shape: tuple[int, int, int]) -> None:
    """Write ``module`` (on the CPU, a copy) as a self-contained ONNX graph with a dynamic batch
    axis, atomically (a concurrent reader sees the old file or the whole new one)."""
    from smoothcert.models.demo import export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        export_onnx(copy.deepcopy(module).cpu().eval(), Path(tmp), "{}", input_shape=input_shape)
        os.replace(tmp, path)
    except Exception as exc:  # the exporter raises many types; the candidate is then skipped
        Path(tmp).unlink(missing_ok=True)
        raise ModelError(
            f"the ONNX export failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def check_agreement(reference: TorchClassifier, other: BaseClassifier) -> None:
    """ModelError unless ``other`` gives the labels of ``reference`` on every check batch of the
    loader and scores within AGREEMENT_RTOL of the largest score's magnitude."""
    from smoothcert.models.loaders import check_batches

    for what, batch in check_batches(reference.info.input_shape).items():
        want = reference.logits(batch.to(reference.device)).float().cpu()
        got = other.logits(batch.to(other.device)).float().cpu()
        scale = float(want.abs().max()) + 1e-6
        wrong = int((want.argmax(dim=1) != got.argmax(dim=1)).sum())
        gap = float((want - got).abs().max())
        if wrong or gap > AGREEMENT_RTOL * scale:
            raise ModelError(
                f"the {other.runtime} export disagrees with torch on the {what}: {wrong} labels "
                f"differ, scores by up to {gap:.3g}"
            )


def _mark(
    model: BaseClassifier,
    requested: str,
    chosen: str,
    how: str,
    measured: dict[str, float] | None = None,
) -> BaseClassifier:
    """A shallow copy of ``model`` (the same weights or session) carrying its ``runtime_choice``:
    the loaded model may be shared by calls that asked for different runtimes."""
    model = copy.copy(model)
    choice: dict[str, Any] = {"requested": requested, "chosen": chosen, "how": how}
    if measured:
        choice["measured_samples_per_s"] = {k: round(v, 1) for k, v in measured.items()}
    graph_sha256 = getattr(model, "graph_sha256", None)  # an onnxruntime export's
    if graph_sha256:
        choice["graph_sha256"] = graph_sha256
    model.runtime_choice = choice  # type: ignore[attr-defined]
    return model


def _read_choices(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads((cache / CHOICES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_choices(cache: Path, choices: dict[str, Any]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(choices, f, indent=1, sort_keys=True)
    os.replace(tmp, cache / CHOICES_FILE)
