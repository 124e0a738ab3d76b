"""Which runtime and precision can evaluate a model on a device: the one rule, torch-free.

The API refuses a certify request by it before a job is queued (:func:`runtime_refusal`, in the
words of a stored model and the server's settings), and :mod:`smoothcert.models.runtimes` refuses
a loaded model by it before building anything (:func:`loaded_model_refusal`, in the words of a
loaded model), so the API queues only what a worker on that device can run. The rule, in order:

1. the runtime is one of :data:`RUNTIMES` and the precision one of :data:`PRECISIONS`;
2. a pipeline (denoiser + classifier) runs each part in its own loader and fastest runtime:
   runtime auto and precision float32 only;
3. an ONNX model is its own graph and runs in onnxruntime only: runtime torch is refused;
4. a reduced precision (float16, bfloat16) runs in torch only: not with runtime onnxruntime, not
   for an ONNX model;
5. float16 needs a CUDA device (``cuda`` or ``cuda:N``); the device ``auto`` is resolved by the
   worker, so only a device named otherwise (``cpu``) is refused here.

Standard library only: the API imports this module, as it imports smoothcert.models.metadata.
"""

from __future__ import annotations

# The same names as smoothcert.service.core.params.Runtime and Precision (models/ does not import
# the service). The noise is drawn in float32 whatever the precision.
RUNTIMES = ("auto", "torch", "onnxruntime")
PRECISIONS = ("float32", "float16", "bfloat16")
ONNX, PIPELINE = "onnx", "pipeline"  # the model formats with rules of their own

# The rules a runtime and precision can break, as _broken_rule names them.
UNKNOWN_RUNTIME, UNKNOWN_PRECISION = "unknown runtime", "unknown precision"
PIPELINE_PINNED, TORCH_ON_ONNX = "pipeline pinned", "torch on onnx"
REDUCED_OUTSIDE_TORCH, FLOAT16_OFF_CUDA = "reduced precision outside torch", "float16 off cuda"


def _broken_rule(model_format: str, runtime: str, precision: str, device: str) -> str | None:
    """The first rule of the module docstring that ``runtime`` and ``precision`` break for a
    model of ``model_format`` on ``device``, or None."""
    if runtime not in RUNTIMES:
        return UNKNOWN_RUNTIME
    if precision not in PRECISIONS:
        return UNKNOWN_PRECISION
    if model_format == PIPELINE and (runtime != "auto" or precision != "float32"):
        return PIPELINE_PINNED
    if runtime == "torch" and model_format == ONNX:
        return TORCH_ON_ONNX
    if precision != "float32" and (runtime == "onnxruntime" or model_format == ONNX):
        return REDUCED_OUTSIDE_TORCH
    if precision == "float16" and not _may_be_cuda(device):
        return FLOAT16_OFF_CUDA
    return None


def _may_be_cuda(device: str) -> bool:
    return device in ("auto", "cuda") or device.startswith("cuda:")


def _shared_words(rule: str, runtime: str, precision: str) -> str | None:
    """The refusals both callers word alike."""
    if rule == UNKNOWN_RUNTIME:
        return f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}"
    if rule == UNKNOWN_PRECISION:
        return f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}"
    if rule == REDUCED_OUTSIDE_TORCH:
        return (
            f"precision {precision} runs in torch only (a safetensors model, runtime auto or "
            "torch); onnxruntime evaluates the float32 graph"
        )
    return None


def runtime_refusal(
    model_format: str, runtime: str, precision: str, device: str, model_id: str
) -> str | None:
    """Why a job cannot run the stored model ``model_id``, of ``model_format`` ("safetensors",
    "onnx" or "pipeline"), in ``runtime`` and ``precision`` on workers whose device is ``device``
    (SMOOTHCERT_DEVICE: auto, cpu, cuda, cuda:N), in the API's words; None when it can."""
    rule = _broken_rule(model_format, runtime, precision, device)
    if rule is None:
        return None
    if rule == PIPELINE_PINNED:
        return (
            f"model {model_id} is a pipeline, whose parts each run in their own loader: "
            "runtime auto and precision float32 only"
        )
    if rule == TORCH_ON_ONNX:
        return (
            f"runtime torch needs a safetensors model; model {model_id} is ONNX, which runs "
            "in onnxruntime only: use runtime auto or onnxruntime"
        )
    if rule == FLOAT16_OFF_CUDA:
        where = "the CPU" if device == "cpu" else device
        return (
            f"precision float16 needs a CUDA device and this server's workers run on {where} "
            f"(SMOOTHCERT_DEVICE={device}); use float32, or bfloat16"
        )
    return _shared_words(rule, runtime, precision)


def loaded_model_refusal(
    model_format: str, runtime: str, precision: str, device: str
) -> str | None:
    """Why a loaded model of ``model_format`` ("safetensors", "onnx" or "pipeline"), on
    ``device`` (a torch device's name: cpu, cuda:0), cannot run in ``runtime`` and ``precision``,
    in the words of :mod:`smoothcert.models.runtimes` and the CLI; None when it can."""
    rule = _broken_rule(model_format, runtime, precision, device)
    if rule is None:
        return None
    if rule == PIPELINE_PINNED:
        return (
            "a pipeline runs each part (denoiser, classifier) in its own runtime: runtime auto "
            "and precision float32 only"
        )
    if rule == TORCH_ON_ONNX:
        return (
            "runtime torch needs a safetensors model; an ONNX model is its own graph and runs "
            "in onnxruntime only (use runtime auto or onnxruntime)"
        )
    if rule == FLOAT16_OFF_CUDA:
        return (
            f"precision float16 needs a CUDA device, not {device}; use float32 "
            "(or bfloat16, which torch runs on a CPU)"
        )
    return _shared_words(rule, runtime, precision)
