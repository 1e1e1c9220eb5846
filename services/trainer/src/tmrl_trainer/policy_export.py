"""``tmrl-trainer export``: the deterministic actor as an ONNX file (run it without Python or torch) or as a policy
file, from a trainer run's ``policy.safetensors`` or from a checkpoint.

The ONNX graph is :meth:`Actor.forward <tmrl_common.networks.Actor.forward>` with ``deterministic=True`` exported by
``torch.onnx.export`` (the torch.export-based exporter; needs the ``onnx`` extra: ``onnx`` and ``onnxscript``):

* inputs, in the observation tuple's order: one per layout component, named after it (``speed``, ``lidar``,
  ``image``...), then ``action_0`` ... ``action_{L-1}`` for the action buffer, oldest first; each of shape
  ``[batch, *part shape]``, dtype ``float32`` (``uint8`` for image components, scaled by the graph);
* output ``action``: ``[batch, action_dim]`` float32 in ``[-1, 1]`` (``tanh`` of the Gaussian's mean); an env with
  other bounds rescales it as the worker does (``low + (a + 1) / 2 * (high - low)``);
* metadata (``metadata_props``): ``tmrl_architecture`` (the JSON of ``PolicyArchitecture.to_flat_dict``, layout
  included) and ``tmrl_version``.

:func:`check_onnx` runs the file with onnxruntime on random observations and returns the largest difference from
torch, which the command prints.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from tmrl_common.atomic_file import write_atomically
from tmrl_common.errors import ProtocolError
from tmrl_common.layout import ObservationLayout
from tmrl_common.networks import Actor, PolicyArchitecture, PolicyFileError, build_actor

from tmrl_trainer.checkpoint import CHECKPOINT_FORMAT, CheckpointError, check_tensors, torch_error_summary
from tmrl_trainer.tensor_file import TensorFileError, read_file

ACTOR_PREFIX = "learner.actor."
"""Where a checkpoint keeps the actor's tensors (:meth:`SACLearner.state_dict` ``["actor"]``)."""
OUTPUT_NAME = "action"


class ExportError(ValueError):
    """The source cannot be exported (unreadable, not a policy or checkpoint) or the ONNX tools are missing."""


class NotACheckpointError(ExportError):
    """The file does not read as a trainer checkpoint at all (so it may be something else, a policy file)."""


class DamagedCheckpointError(ExportError):
    """A trainer checkpoint that the trainer would not resume from either: a non-finite value, or bytes that do not
    match the CRC-32 saved with them."""


def input_names(layout: ObservationLayout) -> list[str]:
    """ONNX input names, in observation-tuple order: the components, then ``action_0`` (oldest) ... ."""
    return [c.name for c in layout.components] + [f"action_{i}" for i in range(layout.action_history)]


def input_dtypes(layout: ObservationLayout) -> list[np.dtype]:
    return [np.dtype(dtype) for dtype in layout.observation_dtypes()]


def random_observations(layout: ObservationLayout, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A batch of observation parts (uint8 images anywhere in 0-255, floats in [-2, 2]) for checks and timings."""
    parts = []
    for shape, dtype in zip(layout.observation_shapes(), input_dtypes(layout), strict=True):
        if dtype == np.uint8:
            parts.append(rng.integers(0, 256, size=(batch, *shape), dtype=np.uint8))
        else:
            parts.append(rng.uniform(-2.0, 2.0, size=(batch, *shape)).astype(np.float32))
    return parts


def actor_from_checkpoint(path: Path) -> tuple[Actor, int]:
    """The actor of a trainer checkpoint and its ``weights_version`` counter (0 when the checkpoint has none)."""
    try:
        tensors, document = read_file(path)
    except (FileNotFoundError, TensorFileError) as exc:
        raise NotACheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise NotACheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    try:  # what the trainer refuses to resume from is not exported either
        check_tensors(path, tensors, document)
    except CheckpointError as exc:
        raise DamagedCheckpointError(str(exc)) from exc
    try:
        actor = build_actor(PolicyArchitecture.from_flat_dict(document["architecture"]))
    except (KeyError, TypeError, ValueError, ProtocolError) as exc:  # no architecture, or one that does not validate
        raise ExportError(f"checkpoint {path} has no valid architecture: {exc}") from exc
    state = {name[len(ACTOR_PREFIX):]: tensor for name, tensor in tensors.items() if name.startswith(ACTOR_PREFIX)}
    try:
        actor.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"checkpoint {path} holds no actor that fits its architecture: "
                          f"{torch_error_summary(exc)}") from exc
    return actor.eval(), int(document.get("counters", {}).get("weights_version", 0))


def load_actor(path: Path) -> tuple[Actor, int]:
    """An actor and its version from a policy file or, failing that, a trainer checkpoint."""
    from tmrl_common.networks import read_policy_file

    try:
        return read_policy_file(path)
    except PolicyFileError as policy_error:
        try:
            return actor_from_checkpoint(path)
        except NotACheckpointError:  # neither: the policy file's reason is the one to give
            raise ExportError(f"{path} is neither a policy file nor a trainer checkpoint ({policy_error})") from None


class DeterministicActor(torch.nn.Module):
    """``actor(observation, deterministic=True)`` with the observation parts as separate arguments (ONNX inputs)."""

    def __init__(self, actor: Actor) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, *observation: torch.Tensor) -> torch.Tensor:
        action, _ = self.actor(list(observation), deterministic=True, with_log_prob=False)
        return action.clamp(-1.0, 1.0)  # onnxruntime's tanh can land a float ulp past 1 where torch's gives 1


def export_onnx(actor: Actor, path: Path, version: int = 0) -> Path:
    """Write ``actor``'s deterministic policy as ONNX (see the module docstring); batch size is dynamic. The file's
    folder is created first when missing (an :class:`OSError` when it cannot be), as for a policy file."""
    try:
        import onnx
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx extra: pip install onnx onnxscript (or tmrl-trainer[onnx])") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # before the export, which takes seconds
    layout = actor.architecture.layout
    names = input_names(layout)
    example = tuple(torch.from_numpy(part) for part in random_observations(layout, 2, np.random.default_rng(0)))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    module = DeterministicActor(actor.cpu().eval()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notices about torchvision ops and pytree internals
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, example, input_names=names, output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"observation": tuple({0: batch} for _ in names)}, dynamo=True,
                                    verbose=False, report=False,
                                    optimize=True)
    model = program.model_proto
    for key, value in (("tmrl_architecture", json.dumps(actor.architecture.to_flat_dict())),
                       ("tmrl_version", str(version))):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    # written atomically: a write that fails (a full disk, a file-size limit) must not leave a truncated model where
    # a good one was (a full-disk probe's); a policy is far below protobuf's 2 GiB limit for one serialised message
    return write_atomically(path, model.SerializeToString(), mode=0o644)


def check_onnx(actor: Actor, path: Path, observations: int = 64, seed: int = 0) -> float:
    """Largest ``|onnxruntime - torch|`` over ``observations`` random observations (one batch); needs onnxruntime."""
    import onnxruntime

    layout = actor.architecture.layout
    parts = random_observations(layout, observations, np.random.default_rng(seed))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_actions,) = session.run([OUTPUT_NAME], dict(zip(input_names(layout), parts, strict=True)))
    with torch.no_grad():
        torch_actions, _ = actor([torch.from_numpy(p) for p in parts], deterministic=True, with_log_prob=False)
    return float(np.abs(onnx_actions - torch_actions.numpy()).max())
