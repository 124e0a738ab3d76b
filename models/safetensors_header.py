"""The header of a safetensors model file, read and checked without torch.

The header is parsed and checked here in plain Python (no torch, no safetensors library) before
any tensor is read, so a file that lies about its sizes is refused with a one-line message.
Pickled PyTorch checkpoints are recognized by their first bytes and refused: smoothcert never
unpickles a model file (``torch.load`` of an upload runs the uploader's code).

Torch-free, so the API checks uploads with it; :mod:`smoothcert.models.safetensors_io` reads and
writes the tensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from smoothcert.models.metadata import ModelError

PICKLE_MAGIC = b"\x80"  # PROTO opcode that starts pickle protocol 2+ (legacy torch.save)
PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default zip container (holds a pickle)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


def looks_pickled(head: bytes) -> bool:
    """True when a file's first 9 bytes are those of a pickle (protocol 2+) or a torch.save zip.

    The 8-byte little-endian header length of a safetensors file can begin with the same bytes
    (a header of 640 bytes starts b"\\x80\\x02"), but its 9th byte is the header's "{", which
    neither a pickle nor a zip has there. Safety never rests on this test: nothing is unpickled.
    """
    if len(head) > 8 and head[8:9] == b"{":
        return False
    return head.startswith(ZIP_MAGIC) or (
        head[:1] == PICKLE_MAGIC and head[1:2] in PICKLE_PROTOCOLS
    )


def refuse_pickled_checkpoint(path: str | Path) -> None:
    """Raise ModelError if ``path`` starts like a pickle or a torch.save zip (reads 9 bytes)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if looks_pickled(head):
        raise ModelError(
            f"{Path(path).name} is a pickled PyTorch checkpoint; smoothcert never unpickles model "
            "files; convert it to safetensors (safetensors.torch.save_file(model.state_dict(), "
            "'model.safetensors')) or export it to ONNX"
        )


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ModelError(f"safetensors header names {dup!r} twice")
    return dict(pairs)


def _check_entry(name: str, entry: Any) -> tuple[int, int]:
    """Validate one tensor entry; return its (begin, end) byte offsets."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ModelError(f"safetensors entry {name!r} must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise ModelError(f"safetensors entry {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ModelError(f"safetensors entry {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise ModelError(f"safetensors entry {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise ModelError(
            f"safetensors entry {name!r} claims {offsets[1] - offsets[0]} bytes, "
            f"its shape {shape} of {dtype} needs {expected}"
        )
    return offsets[0], offsets[1]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str] | None]:
    """Parse and validate a safetensors header without reading any tensor data.

    Returns ``(tensors, metadata)``: ``tensors`` maps each tensor name to its ``dtype``, ``shape``
    and ``data_offsets``; ``metadata`` is the header's ``__metadata__`` string map, or None.
    Raises ModelError when the file is a pickle, is truncated, or its header is not JSON, names
    an unknown dtype, or has offsets that disagree with the shapes, overlap, leave gaps or do not
    end exactly at the end of the file.
    """
    path = Path(path)
    refuse_pickled_checkpoint(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelError(f"{path.name} is too short to be a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if not 2 <= header_len <= MAX_HEADER_BYTES or 8 + header_len > size:
            raise ModelError(
                f"{path.name}: safetensors header length {header_len} does not fit "
                f"in a file of {size} bytes (truncated or not safetensors)"
            )
        raw = f.read(header_len)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path.name}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{path.name}: safetensors header must be a JSON object")

    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ModelError(f"{path.name}: safetensors __metadata__ must map strings to strings")

    spans = sorted((_check_entry(name, entry), name) for name, entry in doc.items())
    position = 0
    for (begin, end), name in spans:
        if begin != position:
            raise ModelError(
                f"{path.name}: tensor {name!r} starts at byte {begin}, expected "
                f"{position} (overlapping or gapped data)"
            )
        position = end
    data_size = size - 8 - header_len
    if position != data_size:
        raise ModelError(
            f"{path.name}: header describes {position} bytes of tensor data, the "
            f"file holds {data_size} (truncated or padded)"
        )
    return doc, metadata
