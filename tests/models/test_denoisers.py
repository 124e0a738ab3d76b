"""Denoisers and pipeline models: [0,1] images in and out, shapes checked, provenance naming both parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoothcert.models.denoisers import load_denoiser
from smoothcert.models.loaders import load_model
from smoothcert.models.metadata import ModelError, pipeline_sha256
from smoothcert.models.pipeline import DenoisedClassifier, compose, load_pipeline
from smoothcert.worker.smoothing import RunOptions, certify
from tests.support.denoisers import random_denoiser


def test_the_denoiser_maps_unit_images_to_unit_images_of_the_same_shape(tmp_path):
    # Weights scaled by 50 push the raw outputs far beyond [0, 1]: the clamp has work to do.
    path = random_denoiser(tmp_path / "d.safetensors", input_shape=(3, 5, 7), scale=50.0)
    denoiser = load_denoiser(path, device="cpu")
    assert denoiser.info.input_shape == (3, 5, 7) and denoiser.info.extra["depth"] == 3
    x = torch.rand((16, 3, 5, 7), generator=torch.Generator().manual_seed(1))
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    raw = denoiser.module(noisy)
    out = denoiser.denoise(noisy)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert raw.min() < 0 and raw.max() > 1  # so the bounds above are the clamp's doing
    assert torch.equal(out, raw.clamp(0, 1))


def test_size_parameters_are_read_from_the_weights_when_the_metadata_lacks_them(tmp_path):
    path = random_denoiser(tmp_path / "d.safetensors", depth=4, width=5)
    denoiser = load_denoiser(path, device="cpu")
    assert (denoiser.info.extra["depth"], denoiser.info.extra["width"]) == (4, 5)


def test_a_denoiser_is_not_a_classifier_nor_a_classifier_a_denoiser(tmp_path, demo_paths):
    path = random_denoiser(tmp_path / "d.safetensors")
    with pytest.raises(ModelError, match="is a denoiser .* not a classifier"):
        load_model(path, device="cpu")
    with pytest.raises(ModelError, match="is not a denoiser"):
        load_denoiser(demo_paths["safetensors"], device="cpu")


def test_a_pipeline_refuses_parts_whose_shapes_differ(tmp_path, demo_paths):
    denoiser = load_denoiser(
        random_denoiser(tmp_path / "d.safetensors", input_shape=(1, 6, 6)), device="cpu"
    )
    classifier = load_model(demo_paths["safetensors"], device="cpu")
    with pytest.raises(ModelError, match=r"shape \[1, 6, 6\].* takes \[1, 8, 8\]"):
        DenoisedClassifier(denoiser, classifier)
    with pytest.raises(
        ModelError, match="second part of a pipeline must be a classifier, not a denoiser"
    ):
        compose(denoiser, denoiser)


def test_a_pipeline_certifies_f_of_d_and_names_both_parts(tmp_path, demo_paths, digits_test_set):
    """The pipeline's votes are those of the classifier on the clamped denoised noisy copies: the
    engine run on a torch module written out by hand as f(clamp(D(x + δ))) gives the same rows."""
    path = random_denoiser(tmp_path / "d.safetensors", scale=0.3)
    pipeline = load_pipeline(path, demo_paths["safetensors"], device="cpu")
    denoiser, classifier = pipeline.denoiser, pipeline.classifier
    x = digits_test_set[0][:6].numpy()
    run = certify(
        pipeline, x, 0.5, n0=20, n=200, alpha=0.001, options=RunOptions(batch_size=100, seed=7)
    )

    class ByHand:
        info, device, runtime, provider, precision = (
            classifier.info,
            torch.device("cpu"),
            "torch",
            "cpu",
            "float32",
        )

        @torch.inference_mode()
        def logits(self, batch):
            return classifier.module(denoiser.module(batch).clamp(0, 1))

        def work_bytes_per_sample(self):
            return pipeline.work_bytes_per_sample()

    expected = certify(
        ByHand(), x, 0.5, n0=20, n=200, alpha=0.001, options=RunOptions(batch_size=100, seed=7)
    )

    def rows(r):
        return [(row.prediction, row.n_a, row.radius, row.abstained) for row in r.results]

    assert rows(run) == rows(expected)
    parts = run.provenance["model_parts"]
    assert parts["denoiser"]["sha256"] == denoiser.info.sha256
    assert parts["classifier"]["sha256"] == classifier.info.sha256
    assert run.provenance["model_sha256"] == pipeline_sha256(
        denoiser.info.sha256, classifier.info.sha256
    )
    assert run.provenance["model_format"] == "pipeline" and "model_parts" not in expected.provenance
    assert np.isfinite([r.radius for r in run.results if not r.abstained]).all()
