"""safetensors model files: the weights of an allow-listed architecture, read and written.

The header is checked first by :func:`~smoothcert.models.safetensors_header.read_safetensors_header`
(no torch), so a file that lies about its sizes is refused before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smoothcert.models.architectures import check_arch
from smoothcert.models.metadata import METADATA_KEY, ModelError, ModelInfo, info_to_json
from smoothcert.models.safetensors_header import read_safetensors_header


def load_safetensors_state(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors of a validated safetensors file (on CPU) and its ``__metadata__`` map.

    The header is checked by :func:`read_safetensors_header` before the safetensors library
    reads the data; any failure is a ModelError.
    """
    _, metadata = read_safetensors_header(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # the library's own errors carry no stable type
        raise ModelError(f"{Path(path).name}: cannot read safetensors data: {exc}") from None
    return state, metadata


def save_safetensors_model(path: str | Path, network: torch.nn.Module, info: ModelInfo) -> Path:
    """Write ``network.state_dict()`` to ``path`` with ``info`` in the header's ``__metadata__``.

    ``network`` is the bare architecture, *without* the normalization layer: the normalization
    travels in the metadata and the loader rebuilds it. ``info.arch`` must be on the allow-list.
    The file is self-describing: :func:`smoothcert.models.loaders.load_model` needs no other
    argument. Returns the path written.
    """
    if info.arch is None:
        raise ModelError(
            "info.arch is required: a safetensors file holds weights of a named architecture"
        )
    check_arch(info.arch)
    # Clones: state_dict tensors may share storage (tied weights), which save_file refuses.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: info_to_json(info)})
    return Path(path)
