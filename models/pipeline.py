"""A pipeline model: a denoiser followed by a classifier, certified as one base classifier.

:class:`DenoisedClassifier` is f(D(x)): the engine adds its noise in [0,1] pixel space as for any
model, the denoiser D maps the noisy batch to [0,1] images of the same shape (clamped), and the
classifier f scores them behind its own normalization. Its ``info`` is the classifier's (input
shape, classes, class names) with ``format`` "pipeline", the pipeline's sha256
(:func:`~smoothcert.models.metadata.pipeline_sha256` of the two files' digests), and ``parts``
naming both files, which every result's provenance repeats.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from smoothcert.models.base import BaseClassifier, bind_sigma
from smoothcert.models.denoisers import (
    Denoiser,
    is_denoiser,
    load_denoiser,
    registration_sigma,
)
from smoothcert.models.loaders import check_forward, load_model
from smoothcert.models.metadata import PIPELINE, ModelError, ModelInfo, pipeline_sha256


def part_summary(info: Any) -> dict[str, Any]:
    """What a pipeline's provenance says of one part: sha256, format, arch and name."""
    return {"sha256": info.sha256, "format": info.format, "arch": info.arch, "name": info.name}


class DenoisedClassifier:
    """``classifier(denoiser(x))`` as a :class:`~smoothcert.models.base.BaseClassifier`.

    Inputs live on the denoiser's device; the denoised images move to the classifier's device
    (an ONNX classifier may run on the CPU) and the scores come back. ModelError when the two
    parts take different input shapes.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        classifier: BaseClassifier,
        *,
        name: str | None = None,
        ids: dict[str, str] | None = None,
    ):
        d, c = denoiser.info, classifier.info
        if tuple(d.input_shape) != tuple(c.input_shape):
            raise ModelError(
                f"the denoiser takes and returns images of shape {list(d.input_shape)}, the classifier "
                f"takes {list(c.input_shape)}; a pipeline's parts must agree"
            )
        self.denoiser, self.classifier = denoiser, classifier
        self.device = denoiser.device
        self.runtime = "+".join(dict.fromkeys([denoiser.runtime, classifier.runtime]))
        self.provider = "+".join(dict.fromkeys([denoiser.provider, classifier.provider]))
        self.precision = classifier.precision
        parts = {"denoiser": part_summary(d), "classifier": part_summary(c)}
        for role, model_id in (ids or {}).items():
            parts[role]["id"] = model_id
        self.info = ModelInfo(
            format=PIPELINE,
            input_shape=c.input_shape,
            num_classes=c.num_classes,
            arch=f"{d.arch}+{c.arch}",
            class_names=c.class_names,
            normalization=c.normalization,
            sigma=d.sigma,
            sha256=pipeline_sha256(d.sha256, c.sha256),
            name=name or f"{d.name or d.arch} + {c.name or c.arch}",
            parts=parts,
        )

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        clean = self.denoiser.denoise(x)
        return self.classifier.logits(clean.to(self.classifier.device)).to(self.device)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)

    def for_sigma(self, sigma: float) -> DenoisedClassifier:
        """This pipeline with its denoiser bound to the run's σ, a new object (a diffusion denoiser
        picks its timestep; the provenance's ``model_parts.denoiser`` then names σ and timestep);
        itself when the denoiser ignores σ (DnCNN)."""
        bind = getattr(self.denoiser, "for_sigma", None)
        if bind is None:
            return self
        denoiser = bind(sigma)  # a bound diffusion denoiser: it names its σ and timestep
        bound = copy.copy(self)
        bound.denoiser = denoiser
        parts = {role: dict(part) for role, part in (self.info.parts or {}).items()}
        parts["denoiser"].update(denoiser.sigma_binding)
        bound.info = replace(self.info, parts=parts)
        return bound

    def with_parts(self, denoiser: Any, classifier: BaseClassifier) -> DenoisedClassifier:
        """This pipeline with its parts replaced by the same networks in other runtimes
        (:func:`smoothcert.models.runtimes.select_runtime`): ``info`` and sha256 stay, ``runtime``
        and ``provider`` name the new parts'."""
        other = copy.copy(self)
        other.denoiser, other.classifier = denoiser, classifier
        other.runtime = "+".join(dict.fromkeys([denoiser.runtime, classifier.runtime]))
        other.provider = "+".join(dict.fromkeys([denoiser.provider, classifier.provider]))
        return other

    def work_bytes_per_sample(self) -> int:
        """Both parts' per-input memory: the denoised batch is alive while the classifier runs."""
        return self.denoiser.work_bytes_per_sample() + self.classifier.work_bytes_per_sample()


def compose(denoiser: Denoiser, classifier: BaseClassifier, **kwargs: Any) -> DenoisedClassifier:
    """The pipeline of two loaded parts, run on the check batches of every model (check_forward),
    with a denoiser that needs σ bound to its :func:`~smoothcert.models.denoisers.registration_sigma`."""
    if not is_denoiser(denoiser):
        raise ModelError("the first part of a pipeline must be a denoiser")
    if is_denoiser(classifier) or isinstance(classifier, DenoisedClassifier):
        raise ModelError(
            "the second part of a pipeline must be a classifier, not "
            + ("a denoiser" if is_denoiser(classifier) else "a pipeline")
        )
    model = DenoisedClassifier(denoiser, classifier, **kwargs)
    check_forward(bind_sigma(model, registration_sigma(denoiser)))
    return model


def load_pipeline(
    denoiser_path, classifier_path, *, device: str | torch.device = "auto", **classifier_fields: Any
) -> DenoisedClassifier:
    """Load a denoiser file and a classifier file (``classifier_fields`` as for
    :func:`~smoothcert.models.loaders.load_model`) as one checked pipeline on ``device``."""
    return compose(
        load_denoiser(denoiser_path, device=device),
        load_model(classifier_path, device=device, **classifier_fields),
    )


def load_stored_pipeline(
    store, meta: dict[str, Any], device: str | torch.device = "auto"
) -> DenoisedClassifier:
    """Load a pipeline record of the model store: both parts with their recorded fields.

    ModelError when a part was deleted or is no longer the file the pipeline was registered with.
    """
    from smoothcert.models.loaders import load_stored_model

    parts: dict[str, Any] = {}  # a denoiser and a classifier: compose() checks which is which
    for role in ("denoiser", "classifier"):
        part = store.get(meta[role])
        if part is None:
            raise ModelError(f"the {role} {meta[role]} of pipeline {meta['id']} was deleted")
        recorded = (meta.get("parts") or {}).get(role, {}).get("sha256")
        if recorded is not None and part.get("sha256") != recorded:
            raise ModelError(
                f"the {role} {meta[role]} of pipeline {meta['id']} is not the file it was registered with"
            )
        parts[role] = load_stored_model(store, part, device)
    return compose(
        parts["denoiser"],
        parts["classifier"],
        name=meta.get("name"),
        ids={"denoiser": meta["denoiser"], "classifier": meta["classifier"]},
    )
