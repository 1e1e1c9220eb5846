"""Trainer checkpoints without pickle: one safetensors file, written atomically, that resumes bit-for-bit.

Every tensor of a learner's ``state_dict()`` (networks, target networks, ``log(alpha)``, Adam moments and step
counts, the noise generator's state; the same form for every backend of :mod:`tmrl_trainer.learner`, so a checkpoint
written by one loads into any other) is a safetensors entry; the rest of the tree (optimizer parameter groups,
counters, the SAC config and the policy architecture) is a JSON document in the file's header metadata, where each
tensor appears as ``{"$tensor": "<entry name>"}``. The replay memory, when saved, goes to a second file next to it
(``<name>.memory.safetensors``), also written atomically and always before the checkpoint itself, so a checkpoint
never names a memory file that was not written yet. A caller's own JSON state (the distributed trainer's dedupe
window) can ride along in the document as ``extra``.

Non-finite state is refused both ways: :func:`save_checkpoint` raises rather than write a learner holding an inf or a
NaN, and :func:`load_checkpoint` raises rather than load one (before touching the learner). Learning rates are the
one part of the saved optimizer state that does not win on load: the learner's config does (an operator who changed
``actor_lr`` means it), and :func:`load_checkpoint` logs every rate it changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from tmrl_trainer.guard import first_non_finite
from tmrl_trainer.learner import Learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.tensor_file import TensorFileError, crc32_of, crc32_problem, pack, read_file, write_atomically

CHECKPOINT_FORMAT = "tmrl-checkpoint-1"
MEMORY_SUFFIX = ".memory.safetensors"
"""How a checkpoint's replay memory file name ends (see :func:`memory_path_for`)."""


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be read, holds non-finite values, or does not fit the learner it is loaded into."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint written for another policy architecture or SAC config (a configuration error: every
    checkpoint of the same run would fail the same way)."""


class Checkpoint(BaseModel):
    """What :func:`load_checkpoint` returns besides restoring the learner (and memory)."""

    counters: dict[str, int]
    """Caller-defined progress counters (environment steps, episodes, published weights version...)."""
    sac_config: dict[str, Any]
    architecture: dict[str, Any]
    memory_restored: bool
    memory_saved: bool = False
    """Whether the checkpoint was written with a replay memory (whose file may since have gone missing)."""
    extra: dict[str, Any] = {}
    """The ``extra`` JSON document given to :func:`save_checkpoint` (empty when none was)."""


def memory_path_for(path: str | Path) -> Path:
    """Where the replay memory of the checkpoint at ``path`` is saved."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + MEMORY_SUFFIX)


def _split(tree: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON-able copy of ``tree`` with tensors moved into ``tensors``; tuples and non-string-keyed dicts are tagged."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {"$tensor": prefix}
    if isinstance(tree, dict):
        if all(isinstance(key, str) for key in tree):
            return {key: _split(value, tensors, f"{prefix}.{key}") for key, value in tree.items()}
        return {"$items": [[key, _split(value, tensors, f"{prefix}.{key}")] for key, value in tree.items()]}
    if isinstance(tree, tuple):
        return {"$tuple": [_split(value, tensors, f"{prefix}.{i}") for i, value in enumerate(tree)]}
    if isinstance(tree, list):
        return [_split(value, tensors, f"{prefix}.{i}") for i, value in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store {type(tree).__name__} at {prefix!r} in a checkpoint")


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"$tensor"}:
            return tensors[tree["$tensor"]]
        if set(tree) == {"$items"}:
            return {key: _join(value, tensors) for key, value in tree["$items"]}
        if set(tree) == {"$tuple"}:
            return tuple(_join(value, tensors) for value in tree["$tuple"])
        return {key: _join(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_join(value, tensors) for value in tree]
    return tree


def save_checkpoint(path: str | Path, learner: Learner, counters: dict[str, int] | None = None,
                    memory: ReplayMemory | bytes | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``learner`` (and ``memory`` when given) to ``path`` atomically; return ``path``.

    ``memory`` is a :class:`ReplayMemory` or its :meth:`ReplayMemory.to_bytes` taken earlier (a snapshot copied under
    a lock, written here outside it). ``extra`` is any JSON-serialisable dict, returned as :attr:`Checkpoint.extra`.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _split(learner.state_dict(), tensors, "learner")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"refusing to write checkpoint {path}: {bad} holds a non-finite value")
    document = {
        "format": CHECKPOINT_FORMAT,
        "learner": tree,
        "counters": {key: int(value) for key, value in (counters or {}).items()},
        "sac_config": learner.config.model_dump(mode="json"),
        "architecture": learner.architecture.to_flat_dict(),
        "memory": memory is not None,
        "extra": extra or {},
        "crc32": {name: crc32_of(tensor) for name, tensor in tensors.items()},
    }
    if isinstance(memory, bytes):
        write_atomically(memory_path_for(path), memory)
    elif memory is not None:
        memory.save(memory_path_for(path))
    return write_atomically(path, pack(tensors, document))


def check_tensors(path: str | Path, tensors: dict[str, torch.Tensor], document: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` when a checkpoint's tensors hold a non-finite value, or bytes that differ from
    the CRC-32 saved with them (the document's ``crc32`` map; a checkpoint written before it was has none and is held
    to the value check alone): what neither resuming nor exporting may use. The non-finite check comes first, so
    that its message names a NaN as such."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds a non-finite value in {bad}")
    problem = crc32_problem(tensors, document.get("crc32"))
    if problem is None:
        return
    kind, name = problem
    if kind == "malformed":
        raise CheckpointError(f"checkpoint {path} is malformed: its crc32 map does not name every tensor once")
    raise CheckpointError(f"checkpoint {path}: tensor {name} does not match the CRC-32 saved with it (the file was "
                          "damaged after it was written)")


def load_checkpoint(path: str | Path, learner: Learner, memory: ReplayMemory | None = None) -> Checkpoint:
    """Restore ``learner`` (and ``memory`` when given and saved) from ``path``; raise :class:`CheckpointError`."""
    try:
        tensors, document = read_file(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except TensorFileError as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    except OSError as exc:  # a folder in its place, no permission, a disk error: this one cannot be resumed from
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    check_tensors(path, tensors, document)
    if document.get("architecture") != learner.architecture.to_flat_dict():
        raise CheckpointMismatchError(f"checkpoint {path} was written for another policy architecture; "
                                      "start with the same layout and hidden sizes, or from scratch")
    try:
        learner.load_state_dict(_join(document["learner"], tensors))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit this learner (different SAC config?): "
                                      f"{exc}") from exc
    for name, (saved, configured) in learner.learning_rates_overridden.items():
        log.info("checkpoint %s was saved with %s = %g; the config's %g is used", path, name, saved, configured)
    restored = False
    if memory is not None and document.get("memory"):
        memory.load(memory_path_for(path))
        restored = True
    return Checkpoint(counters=document["counters"], sac_config=document["sac_config"],
                      architecture=document["architecture"], memory_restored=restored,
                      memory_saved=bool(document.get("memory")), extra=document.get("extra") or {})
