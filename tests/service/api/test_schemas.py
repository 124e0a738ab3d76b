"""Input decoding and checks of the certify request, without servers."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from smoothcert.service.api.schemas import check_inputs, check_labels, decode_inputs
from smoothcert.service.core.inputs import InputsTooLarge


def b64(array) -> str:
    buf = io.BytesIO()
    np.save(buf, array)
    return base64.b64encode(buf.getvalue()).decode()


def test_nested_list_and_base64_npy_decode_to_the_same_array():
    x = np.random.default_rng(0).random((2, 1, 3, 3)).astype(np.float32)
    assert np.array_equal(decode_inputs(x.tolist()).astype(np.float32), x)
    assert np.array_equal(decode_inputs(b64(x)).astype(np.float32), x)


def test_single_input_gets_a_batch_axis():
    assert check_inputs(np.zeros((1, 4, 4)), [1, 4, 4]).shape == (1, 1, 4, 4)
    assert check_inputs(np.zeros((1, 4, 4)), [1, 4, 4]).dtype == np.float32


@pytest.mark.parametrize(
    "arr,phrase",
    [
        (np.zeros((0, 1, 4, 4)), "shape [0, 1, 4, 4]"),
        (np.zeros((4, 4)), "the model takes [1, 4, 4]"),
        (np.full((1, 4, 4), 255.0), "scale 8-bit images"),
        (np.full((1, 4, 4), np.nan), "NaN"),
    ],
)
def test_bad_arrays(arr, phrase):
    with pytest.raises(ValueError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        check_inputs(arr, [1, 4, 4])


def test_npz_and_strings_are_refused():
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(3))
    with pytest.raises(ValueError, match=r"a \.npz archive, not a \.npy array"):
        decode_inputs(base64.b64encode(buf.getvalue()).decode())
    with pytest.raises(ValueError, match="must hold numbers"):
        decode_inputs(b64(np.array(["a", "b"])))


def test_inputs_over_the_decoded_budget_are_refused_from_their_shape():
    """4 bytes a value (float32, as stored), from the nested list's shape or the .npy header."""
    x = np.zeros((2, 1, 4, 4))
    assert decode_inputs(x.tolist(), 128).shape == decode_inputs(b64(x), 128).shape == x.shape
    for inputs in (x.tolist(), b64(x), b64(x.astype(np.uint8))):
        with pytest.raises(
            InputsTooLarge, match="would take 128 bytes once decoded, over the budget of 127"
        ):
            decode_inputs(inputs, 127)


def test_labels_checked_against_inputs_and_classes():
    check_labels([0, 9], 2, 10)
    with pytest.raises(ValueError, match="1 labels for 2 inputs"):
        check_labels([0], 2, 10)
    with pytest.raises(ValueError, match=r"\[0, 10\), got -1"):
        check_labels([0, -1], 2, 10)
