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
NaN, and :func:`load_checkpoint` raises rather than load one (before touching the learner).

Settings do not come back with a checkpoint: the learner's config wins (an operator who changed ``actor_lr`` or
``gamma`` means it, and the learning rates in the saved optimizer state are replaced by the config's). So that a
resumed run never trains under other settings unnoticed, :func:`load_checkpoint` compares the SAC config saved in the
checkpoint with the learner's: a checkpoint whose tensors do not fit raises a one-line
:class:`CheckpointMismatchError` naming the fields that shape them (``redq_n``, ``critic_layer_norm``...) with both
values, and one that loads under other settings (``gamma``, ``batch_size``, a learning rate...) logs one warning
listing each ``field: saved -> config``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tmrl_common.atomic_file import replace_atomically
from tmrl_common.layout import ObservationLayout

from tmrl_trainer.guard import first_non_finite
from tmrl_trainer.learner import Learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.sac import LEARNING_RATE_FIELDS, SACConfig
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
    if memory is None:
        return write_atomically(path, pack(tensors, document))
    # the memory file takes its name only once the checkpoint is written: a checkpoint write that fails (a full
    # disk) must neither leave a memory file without its checkpoint (it held the space the next save needed, an
    # outside probe) nor pair the previous checkpoint of the same name with a newer memory (train-local's `latest`)
    final = memory_path_for(path)
    staged = write_atomically(final.with_name(f".{final.name}.staged.tmp"),
                              memory if isinstance(memory, bytes) else memory.to_bytes())
    try:
        written = write_atomically(path, pack(tensors, document))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    replace_atomically(staged, final)
    return written


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


SHAPING_FIELDS = frozenset({"redq_n", "critic_layer_norm", "learn_alpha", "hidden_sizes", "activation", "conv_channels"})
"""The :class:`SACConfig` fields that decide a learner's tensors (how many critics, which parameters they hold, the
optimizer's parameter groups, the networks' sizes): a checkpoint written under other values of them cannot load."""

NOT_COMPARED_ON_RESUME = frozenset({"backend", "sampling", "init_alpha"})
"""Fields a resumed run may change without a word: ``backend`` and ``sampling`` say how the update is computed, never
what; ``init_alpha`` only starts a fresh learner (a resumed one keeps the checkpoint's alpha)."""

WHY_IT_MATTERS = {
    "gamma": "the critics' targets change, so their Q values re-fit first",
    "n_step": "the critics' targets change, so their Q values re-fit first",
    "reward_scale": "the critics' targets change, so their Q values re-fit first",
    "redq_m": "the critics' targets change, so their Q values re-fit first",
    "target_entropy": "alpha moves towards the new entropy target",
    "update_order": "from here on the actor learns against the critics after their step (critic-first) or before it "
                    "(joint)",
}
"""A few words on what changing a field on a resumed run does, for the warning :func:`load_checkpoint` logs."""

IMPLIED_WHEN_ABSENT = {"update_order": "joint"}
"""What the code did before a field existed, for a checkpoint whose saved config lacks it: its value then. Only the
fields whose default is not the earlier behaviour: ``update_order`` came in 65f6923 (2026-11-27) with ``joint``, the
only order until then, and ``critic-first`` became the default in 327debc (2026-11-28). A field missing here and
from the saved config is not compared (what the code did is not known, or it is the default)."""


def config_differences(saved: Any, configured: SACConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, configured value)}`` for each field of ``configured`` that a checkpoint's saved
    ``sac_config`` holds with another value; a field the saved config lacks (written before the field existed) is
    compared with :data:`IMPLIED_WHEN_ABSENT`, what the code did then. Not compared: a field today's
    :class:`SACConfig` does not have, one the saved config lacks and that table does not name, and anything when no
    config was saved."""
    if not isinstance(saved, dict):
        return {}
    saved = {**IMPLIED_WHEN_ABSENT, **saved}
    current = configured.model_dump(mode="json")
    return {name: (saved[name], value) for name, value in current.items() if name in saved and saved[name] != value}


def _listed(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name}: {saved!r} -> {configured!r}" for name, (saved, configured) in sorted(differences.items()))


def torch_error_summary(exc: BaseException) -> str:
    """One line for a :meth:`load_state_dict` error: torch's first line and how many keys of each kind its dump lists
    (the dump itself runs to dozens of lines)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    problems: Counter[str] = Counter()
    for line in lines[1:]:
        kind = re.match(r"(size mismatch|missing key|unexpected key)", line, re.IGNORECASE)
        if kind is None:
            problems["other line"] += 1
        elif kind.group(1) == "size mismatch":
            problems["size mismatch"] += 1
        else:  # one line lists every key of its kind, each quoted
            problems[kind.group(1).lower()] += max(1, line.count('"') // 2)
    counted = ", ".join(f"{count} {kind}" + ("" if count == 1 else "es" if kind.endswith("h") else "s")
                        for kind, count in problems.items())
    return f"{lines[0]} {counted}".strip()


def mismatch_error(path: str | Path, saved_config: Any, learner: Learner, exc: BaseException) -> CheckpointMismatchError:
    """The one-line error for a checkpoint whose tensors do not fit ``learner``: the config fields that explain it with
    both values, else a summary of torch's error."""
    differences = {name: values for name, values in config_differences(saved_config, learner.config).items()
                   if name not in NOT_COMPARED_ON_RESUME}
    shaping = {name: values for name, values in differences.items() if name in SHAPING_FIELDS}
    if shaping:
        fields = "; ".join(f"{name} = {saved!r} where the config has {configured!r}"
                           for name, (saved, configured) in sorted(shaping.items()))
        return CheckpointMismatchError(f"checkpoint {path} does not fit this learner (different SAC config: it was "
                                       f"written with {fields}): start with the checkpoint's values, or from scratch "
                                       "in a new run_dir")
    if not isinstance(saved_config, dict):
        reason = "different SAC config? the checkpoint records none"
    elif differences:  # none of them should change a tensor, but a field added since might
        reason = f"different SAC config? saved -> config: {_listed(differences)}"
    else:
        reason = "its saved SAC config matches this learner's"
    return CheckpointMismatchError(f"checkpoint {path} does not fit this learner ({reason}): {torch_error_summary(exc)}")


def warn_of_changed_settings(path: str | Path, saved_config: Any, learner: Learner) -> None:
    """Log one warning listing each setting the loaded ``learner`` uses in place of the checkpoint's (nothing when
    none differs). Learning rates come from what the learner replaced in the saved optimizer state."""
    all_differences = config_differences(saved_config, learner.config)
    if "init_alpha" in all_differences:  # a restart probe changed it on resume and heard nothing
        saved, configured = all_differences["init_alpha"]
        alpha = float(learner.log_alpha.detach().exp())
        log.warning("checkpoint %s: init_alpha %r -> %r is not used: a resumed learner keeps the checkpoint's alpha, "
                    "%.4g%s", path, saved, configured, alpha,
                    " (fixed, learn_alpha being off: it changes only in a new run_dir)" if not learner.config.learn_alpha
                    else ", and learns it on from there")
    differences = {name: values for name, values in all_differences.items()
                   if name not in NOT_COMPARED_ON_RESUME | SHAPING_FIELDS | set(LEARNING_RATE_FIELDS.values())}
    differences.update(learner.learning_rates_overridden)
    if not differences:
        return
    why: dict[str, list[str]] = {}
    for name in sorted(differences):
        if name in WHY_IT_MATTERS:
            why.setdefault(WHY_IT_MATTERS[name], []).append(name)
    notes = "".join(f"; {', '.join(names)}: {note}" for note, names in why.items())
    log.warning("checkpoint %s was trained with other settings; the config's are used from here on: %s%s",
                path, _listed(differences), notes)


def saved_memory_state(path: str | Path) -> dict[str, Any] | None:
    """The ``extra`` state (dedupe window, ``memory_rows_added``) of checkpoint ``path`` when it was saved with a
    replay memory, read without touching a learner; ``None`` when it was not, or when the file cannot be read."""
    try:
        _, document = read_file(path)
    except (TensorFileError, OSError):
        return None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT or not document.get("memory"):
        return None
    extra = document.get("extra")
    return extra if isinstance(extra, dict) and "dedupe" in extra else None


def _only_bounds_changed(path: Path, saved: Any, current: dict[str, Any]) -> bool:
    """Whether architecture ``saved`` differs from ``current`` only in the observation bounds of its layout (the
    worker's clipping warning advises widening them): the networks are the same, so the checkpoint is resumed and
    the change logged. False for anything else, or a saved layout that does not read."""
    if not isinstance(saved, dict) or {k: v for k, v in saved.items() if k != "layout"} != \
            {k: v for k, v in current.items() if k != "layout"}:
        return False
    try:
        before = ObservationLayout.model_validate_json(saved["layout"])
    except (KeyError, TypeError, ValueError):
        return False
    now = ObservationLayout.model_validate_json(current["layout"])
    if before.without_bounds() != now.without_bounds():
        return False
    log.warning("checkpoint %s was written with other observation bounds (%s): the networks are the same, so it is "
                "resumed; batches are now held to the new bounds", path, "; ".join(before.bounds_changes(now)))
    return True


def load_checkpoint(path: str | Path, learner: Learner, memory: ReplayMemory | None = None) -> Checkpoint:
    """Restore ``learner`` (and ``memory`` when given and saved) from ``path``; raise :class:`CheckpointError`.

    A checkpoint written under other settings than ``learner.config`` raises :class:`CheckpointMismatchError` when
    its tensors do not fit, and otherwise loads with one warning naming each setting that differs (the config's win).
    """
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
    saved_architecture, current = document.get("architecture"), learner.architecture.to_flat_dict()
    if saved_architecture != current and _only_bounds_changed(path, saved_architecture, current):
        saved_architecture = current
    if saved_architecture != current:
        saved_architecture = saved_architecture if isinstance(saved_architecture, dict) else {}
        fields = "; ".join(f"{name} = {saved_architecture.get(name)!r} where the config has {current.get(name)!r}"
                           for name in sorted(set(saved_architecture) | set(current))
                           if saved_architecture.get(name) != current.get(name))
        raise CheckpointMismatchError(f"checkpoint {path} was written for another policy architecture ({fields}); "
                                      "start with the same layout and hidden sizes, or from scratch (another "
                                      "run_dir, or move its checkpoints folder elsewhere)")
    saved_config = document.get("sac_config")
    try:
        learner.load_state_dict(_join(document["learner"], tensors))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise mismatch_error(path, saved_config, learner, exc) from exc
    warn_of_changed_settings(path, saved_config, learner)
    restored = False
    if memory is not None and document.get("memory"):
        memory.load(memory_path_for(path))
        restored = True
    return Checkpoint(counters=document["counters"], sac_config=saved_config if isinstance(saved_config, dict) else {},
                      architecture=document["architecture"], memory_restored=restored,
                      memory_saved=bool(document.get("memory")), extra=document.get("extra") or {})
