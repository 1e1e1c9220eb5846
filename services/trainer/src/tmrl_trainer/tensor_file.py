"""Files of named tensors plus JSON metadata (safetensors format, never pickle), written atomically.

Checkpoints and saved replay memories are single safetensors files: the tensors are the file's entries and
everything else (counters, configs, optimizer layout) is one JSON document stored in the header's metadata under
the key ``tmrl``. Writing goes to a temporary file that replaces the target in one ``os.replace``, so a crash leaves
either the previous file or the new one.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_torch
from safetensors.torch import save as save_torch
from tmrl_common.atomic_file import read_regular_file, write_atomically  # noqa: F401 - write_atomically re-exported for checkpoint, memory, status

METADATA_KEY = "tmrl"
DOCUMENT_CRC_FIELD = "document_crc32"
"""Field :func:`pack` adds to a dict document: the CRC-32 of the JSON text of the document without it. Counters, the
update count and the optimizer's hyper-parameters live in the document, outside the per-tensor CRCs, so damage there
would otherwise load silently (and be saved again). A document without it (a file written before it) is not checked.
It sits inside the one JSON value so that the file stays byte-for-byte the same for the same content (safetensors
writes the header's metadata keys in no fixed order) and any JSON reader still reads it."""


class TensorFileError(ValueError):
    """A file is not a valid tmrl tensor file (truncated, not safetensors, metadata missing or not JSON)."""


def crc32_of(tensor: torch.Tensor | np.ndarray) -> int:
    """CRC-32 of a tensor's or an array's bytes in C order (what the file stores for it): saved beside the values,
    it catches damage that leaves them valid (a flipped exponent bit, an image byte), which no value check sees."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))


def crc32_problem(tensors: Mapping[str, torch.Tensor | np.ndarray], saved: object) -> tuple[str, str] | None:
    """What is wrong with ``tensors`` against ``saved``, the CRC-32 map written with them (:func:`crc32_of`):
    ``("malformed", "")`` when the map does not name every tensor once with an int, ``("mismatch", name)`` for the
    first tensor whose bytes differ; ``None`` when all match or there is no map (a file written before the maps were).
    The callers say it in their own words (a checkpoint, a saved replay memory)."""
    if saved is None:
        return None
    if not isinstance(saved, dict) or set(saved) != set(tensors) or not all(type(crc) is int for crc in saved.values()):
        return "malformed", ""
    return next((("mismatch", name) for name, tensor in tensors.items() if crc32_of(tensor) != saved[name]), None)


def pack(tensors: Mapping[str, torch.Tensor | np.ndarray], metadata: Any) -> bytes:
    """Safetensors bytes holding ``tensors`` (copied to the CPU: views of shared storage are allowed) and
    ``metadata`` (JSON-serialisable) in the header."""
    cpu = {name: (torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t.detach().cpu().clone())
           for name, t in tensors.items()}
    if isinstance(metadata, dict):
        metadata = {**metadata, DOCUMENT_CRC_FIELD: _document_crc(metadata)}
    return save_torch(cpu, metadata={METADATA_KEY: json.dumps(metadata)})


def _document_crc(document: dict) -> int:
    """CRC-32 of ``document``'s JSON text (what :func:`json.dumps` writes, which a load and dump gives back)."""
    return zlib.crc32(json.dumps(document).encode("utf-8"))


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of :func:`pack`; raise :class:`TensorFileError` on anything unreadable."""
    try:
        tensors = load_torch(bytes(data))
        if len(data) < 8:
            raise ValueError("file too short for a safetensors header")
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + header_size]))
        metadata = json.loads((header.get("__metadata__") or {})[METADATA_KEY])
        if isinstance(metadata, dict) and DOCUMENT_CRC_FIELD in metadata:
            saved = metadata.pop(DOCUMENT_CRC_FIELD)
            if saved != _document_crc(metadata):
                raise ValueError(f"its JSON document does not match the CRC-32 saved in it ({saved!r}): the header "
                                 "was damaged (counters, update count or optimizer settings)")
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise TensorFileError(f"not a tmrl tensor file: {type(exc).__name__}: {exc}") from exc
    return tensors, metadata


def read_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """:func:`unpack` the file at ``path``; a missing file raises :class:`FileNotFoundError`."""
    return unpack(read_regular_file(path))
