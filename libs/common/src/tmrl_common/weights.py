"""Policy weights as safetensors bytes: the only format tmrl uses for tensors on the wire and on disk.

This module works on NumPy arrays so the relay and tools can inspect weights without torch;
``tmrl_common.networks`` converts to and from torch state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load_numpy
from safetensors.numpy import save as _save_numpy

from tmrl_common.errors import ProtocolError


def tensors_to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named arrays to safetensors bytes (contiguous copies are made where needed)."""
    return _save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata or {}))


def tensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes; raise :class:`ProtocolError` (reason ``malformed``) when they are not valid."""
    try:
        tensors = _load_numpy(bytes(data))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ProtocolError("malformed", f"weights are not a valid safetensors file: {exc}") from exc
    for name, array in tensors.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError("non_finite", f"weight tensor {name!r} holds NaN/inf values")
    return tensors
