"""Every table of docs/protocol.md that states what the code does is what the code does:

* each number of §8 (decoding limits, caps and queues per link, intervals and timeouts) equals the default of the
  config field, constant or schema bound named in its ``code`` column;
* each built-in env's layout in §6.1 is the layout the code builds for that env;
* the policy tensors of §7.1 (names, shapes, dtypes) are the actor's, and the architecture keys and defaults are
  :class:`PolicyArchitecture`'s and the trainer's;
* the maths of §7.1, written here in plain numpy from the doc alone, gives the torch actor's actions.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from annotated_types import MaxLen
from tmrl_common.layout import ObservationComponent, ObservationLayout, tm20_image_layout, tm20_lidar_layout
from tmrl_common.networks import PolicyArchitecture, build_actor, weights_update_from_actor
from tmrl_common.protocol import DecodeLimits, Heartbeat, SampleAck, SampleBatch, WeightsUpdate
from tmrl_common.sockets import TransportConfig
from tmrl_relay.config import RelayConfig
from tmrl_trainer.config import TrainerConfig
from tmrl_trainer.relay_link import HelloBackoff
from tmrl_trainer.sac import SACConfig
from tmrl_trainer.service import layout_for_env
from tmrl_worker.config import WorkerConfig
from tmrl_worker.envs import make_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "protocol.md").read_text()
DEFAULTS = {"DecodeLimits": DecodeLimits(), "RelayConfig": RelayConfig(), "WorkerConfig": WorkerConfig(),
            "TrainerConfig": TrainerConfig(), "TransportConfig": TransportConfig(), "HelloBackoff": HelloBackoff()}
MODELS = {"SampleBatch": SampleBatch, "SampleAck": SampleAck, "WeightsUpdate": WeightsUpdate, "Heartbeat": Heartbeat,
          "ObservationLayout": ObservationLayout}
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def section(title: str) -> str:
    """The text under the heading that ends with ``title``, up to the next heading of the same level or above."""
    lines = DOC.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith("#") and line.endswith(title)]
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start + 1:end])


def tables(text: str) -> list[list[dict[str, str]]]:
    """Markdown tables of ``text`` as lists of rows keyed by the header cells."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i + 1].strip()):
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
                rows.append(dict(zip(header, cells, strict=False)) if len(cells) == len(header) else None)
            if None not in rows:  # a table with a ragged row is not one of those this test reads
                found.append(rows)
    return found


def value_of(cell: str) -> float:
    """``1 024 bytes`` → 1024, ``64 MiB`` → 67108864, ``2.0 s`` → 2.0, ``-1 (no cap)`` → -1."""
    match = re.match(r"(-?[\d ]*\d(?:\.\d+)?)\s*(KiB|MiB|GiB)?", cell)
    assert match, f"no number in {cell!r}"
    return float(match.group(1).replace(" ", "")) * UNITS.get(match.group(2) or "", 1)


def code_default(code: str) -> float:
    """The default the ``code`` cell names: ``Config.field[.field]``, ``Config.method()``, ``Config.method("arg")``,
    ``module.CONSTANT``, ``module.CONSTANT["key"]`` or
    ``max_length(Model.field)``."""
    code = code.strip("`")
    if code.startswith("max_length("):
        model, field = code[len("max_length("):-1].split(".")
        bounds = [m.max_length for m in MODELS[model].model_fields[field].metadata if isinstance(m, MaxLen)]
        assert bounds, f"{code}: no max_length"
        return bounds[0]
    head, *path = code.split(".")
    if head in DEFAULTS:
        value = DEFAULTS[head]
        for name in path:
            call = re.fullmatch(r'(\w+)\((?:"(\w+)")?\)', name)  # method() or method("argument")
            value = (getattr(value, call.group(1))(*filter(None, [call.group(2)])) if call else getattr(value, name))
        return value
    module, constant = code.rsplit(".", 1)
    item = re.fullmatch(r'(\w+)\["(\w+)"\]', constant)  # CONSTANT["key"]: one entry of a dict
    if item:
        return getattr(importlib.import_module(module), item.group(1))[item.group(2)]
    return getattr(importlib.import_module(module), constant)


def numbers_rows() -> list[dict[str, str]]:
    rows = [row for table in tables(section("8. Limits and numbers")) for row in table if "code" in row]
    assert len(rows) >= 40
    return rows


@pytest.mark.parametrize("row", numbers_rows(), ids=lambda row: row["code"].strip("`"))
def test_every_number_of_section_8_is_the_codes_default(row):
    assert value_of(row["default"]) == code_default(row["code"])


def test_the_links_frame_caps_are_stated_as_they_are_set():
    """An overload probe: 8 connections each streaming a 400 MiB frame they never finished pinned 1.6 GB of relay
    memory through the workers' port, whose cap was the trainer's weights cap."""
    assert RelayConfig().socket_frame_cap() == 128 * (1 << 20)
    assert RelayConfig().socket_frame_cap("trainer") == 512 * (1 << 20)
    assert "on the workers link up to 128 MiB, on the trainer link up to 512 MiB" in DOC


# ----------------------------------------------------------------------------------------------------- layouts

COMPONENT = re.compile(r"`([a-z][a-z0-9_]*) \[([\d, ]+)\] (float32|uint8) ×(\d+)(?: in \[(-?[\d.]+), (-?[\d.]+)\])?`")


def doc_layout(row: dict[str, str]) -> ObservationLayout:
    components = [ObservationComponent(name=name, frame_shape=[int(d) for d in shape.split(",")], dtype=dtype,
                                       history=int(history), low=float(low) if low else None,
                                       high=float(high) if high else None)
                  for name, shape, dtype, history, low, high in COMPONENT.findall(row["components"])]
    return ObservationLayout(components=components, action_dim=int(row["A"]), action_history=int(row["action_history"]))


def code_layout(env_cell: str) -> ObservationLayout:
    spec = re.match(r"`([^`]+)`", env_cell).group(1)
    if spec == "sim":
        observation = re.search(r'observation = "(\w+)"', env_cell)
        options = {"observation": observation.group(1)} if observation else {}
        handle = make_env("sim-fast", max_episode_steps=5, options=options)
        handle.close()
        trainer = layout_for_env("sim") if not observation else handle.layout  # the trainer's built-in for `sim`
        assert trainer == handle.layout
        return handle.layout
    if spec.startswith("gym:"):
        handle = make_env(spec)
        handle.close()
        assert layout_for_env(spec) == handle.layout
        return handle.layout
    if ":" in spec:  # the interface's declared layout (building it through rtgym would start its clock)
        module, name = spec.split(":")
        sys.path.insert(0, str(REPO))
        try:
            return getattr(importlib.import_module(module), name)().layout
        finally:
            sys.path.remove(str(REPO))
    return layout_for_env(spec)


def layout_rows() -> list[dict[str, str]]:
    (rows,) = [t for t in tables(section("6.1 Observation layout")) if t and "components" in t[0]]
    return rows


def shape_of(layout: ObservationLayout) -> tuple:
    """What the table states: each component's name, frame shape, dtype, history and declared bounds, A and the
    action history."""
    fields = {"name", "frame_shape", "dtype", "history", "low", "high"}
    return [c.model_dump(include=fields) for c in layout.components], layout.action_dim, layout.action_history


@pytest.mark.parametrize("row", layout_rows(), ids=lambda row: row["env (worker `env`)"])
def test_each_built_in_envs_layout_is_the_codes(row):
    assert shape_of(doc_layout(row)) == shape_of(code_layout(row["env (worker `env`)"]))


def test_every_built_in_env_spec_has_a_layout_row():
    specs = " ".join(row["env (worker `env`)"] for row in layout_rows())
    for spec in ("`sim`", "`sim-fast`", "`tm20-lidar`", "`tm20-lidar-progress`", "`tm20-full`", "`gym:", ":MyRobotInterface`"):
        assert spec in specs
    for observation in ("lidar_progress", "image"):
        assert f'observation = "{observation}"' in specs


# ----------------------------------------------------------------------------------------------- policy network

def tensor_tables() -> list[list[dict[str, str]]]:
    found = [t for t in tables(section("7.1 The policy network")) if t and "tensor" in t[0]]
    assert len(found) == 2
    return found


@pytest.mark.parametrize(("index", "layout"), [(0, tm20_lidar_layout()), (1, tm20_image_layout())], ids=["mlp", "cnn"])
def test_the_documented_tensors_are_the_default_actors(index, layout):
    sac = SACConfig()
    actor = build_actor(sac.architecture(layout))
    rows = tensor_tables()[index]
    assert [row["tensor"].strip("`") for row in rows] == list(actor.state_dict())
    assert [json.loads(row["shape"]) for row in rows] == [list(t.shape) for t in actor.state_dict().values()]
    data = weights_update_from_actor(actor, 1).tensors
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert [header[row["tensor"].strip("`")]["dtype"] for row in rows] == [row["dtype"] for row in rows]


def test_the_architecture_keys_and_defaults_are_the_codes():
    (rows,) = [t for t in tables(section("7.1 The policy network")) if t and "key" in t[0]]
    flat = SACConfig().architecture(tm20_lidar_layout()).to_flat_dict()
    assert [row["key"].strip("`") for row in rows] == list(flat)
    stated = {row["key"].strip("`"): row["default"].split("`")[1] for row in rows if row["default"].startswith("`")}
    assert set(stated) == {"kind", "hidden_sizes", "activation", "log_std_min", "log_std_max", "conv_channels"}
    for key, text in stated.items():
        assert (text if isinstance(flat[key], str) else json.loads(text)) == flat[key]
    image = SACConfig().architecture(tm20_image_layout()).to_flat_dict()
    assert (flat["kind"], image["kind"]) == ("mlp", "cnn")  # cnn when the layout has a uint8 image component
    assert PolicyArchitecture(layout=tm20_lidar_layout()).hidden_sizes == SACConfig().hidden_sizes


# the maths of §7.1, from the doc alone ----------------------------------------------------------------------------

ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh,
               "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))), "silu": lambda x: x / (1.0 + np.exp(-x))}


def conv4x4_stride2(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x [C, H, W]`` → ``[O, (H-4)//2+1, (W-4)//2+1]``: a 4x4 convolution, stride 2, no padding, plus bias."""
    _, height, width = x.shape
    out_h, out_w = (height - 4) // 2 + 1, (width - 4) // 2 + 1
    patches = np.lib.stride_tricks.sliding_window_view(x, (4, 4), axis=(1, 2))[:, ::2, ::2][:, :out_h, :out_w]
    return np.einsum("chwij,ocij->ohw", patches, weight) + bias[:, None, None]


def documented_action(tensors: dict[str, np.ndarray], architecture: dict, observation: list[np.ndarray]) -> np.ndarray:
    layout = ObservationLayout.model_validate_json(architecture["layout"])
    act = ACTIVATIONS[architecture["activation"]]
    features, flat_parts = [], list(range(len(observation)))
    if architecture["kind"] == "cnn":
        for k, (index, component) in enumerate((i, c) for i, c in enumerate(layout.components)
                                               if c.dtype == "uint8" and len(c.frame_shape) in (2, 3)):
            x = observation[index].astype(np.float64).reshape(-1, *component.frame_shape[-2:]) / 255.0
            for j in range(len(architecture["conv_channels"])):
                x = act(conv4x4_stride2(x, tensors[f"encoder.cnns.{k}.{2 * j}.weight"],
                                        tensors[f"encoder.cnns.{k}.{2 * j}.bias"]))
            features.append(x.reshape(-1))
            flat_parts.remove(index)
    for index in flat_parts:
        part = observation[index].astype(np.float64)
        features.append(part.reshape(-1) / (255.0 if observation[index].dtype == np.uint8 else 1.0))
    x = np.concatenate(features)
    for i in range(len(architecture["hidden_sizes"])):
        x = act(x @ tensors[f"trunk.{2 * i}.weight"].T + tensors[f"trunk.{2 * i}.bias"])
    return np.tanh(x @ tensors["mean.weight"].T + tensors["mean.bias"])


@pytest.mark.parametrize(("layout", "activation"), [(tm20_lidar_layout(), "relu"), (tm20_lidar_layout(), "elu"),
                                                    (tm20_image_layout(), "relu"), (tm20_image_layout(), "silu")])
def test_the_documented_maths_in_numpy_gives_the_torch_actors_action(layout, activation):
    torch.manual_seed(3)
    actor = build_actor(PolicyArchitecture.for_layout(layout, activation=activation, hidden_sizes=[64, 32]))
    update = weights_update_from_actor(actor, 1)  # what a worker receives: safetensors bytes + flat architecture
    from safetensors.numpy import load

    tensors = {name: array.astype(np.float64) for name, array in load(update.tensors).items()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        observation = [rng.integers(0, 256, shape, dtype=np.uint8) if dtype == "uint8"
                       else rng.normal(0, 1, shape).astype(np.float32)
                       for shape, dtype in zip(layout.observation_shapes(),
                                               [c.dtype for c in layout.components] + ["float32"] * layout.action_history,
                                               strict=True)]
        np.testing.assert_allclose(documented_action(tensors, update.architecture, observation),
                                   actor.act(observation, deterministic=True), atol=2e-5, rtol=0)


def test_the_heartbeat_counters_the_relay_exports_are_listed_as_the_code_has_them():
    """A third-party worker written from the document alone named its counters batches_sent and acks: the relay
    ignored them, and the document did not list the names it exports."""
    from tmrl_common.protocol import WORKER_HEARTBEAT_COUNTERS

    listed = re.search(r"named in `WORKER_HEARTBEAT_COUNTERS` \(([^)]*)\)", DOC)
    assert listed is not None
    assert re.findall(r"`(\w+)`", listed.group(1)) == list(WORKER_HEARTBEAT_COUNTERS)
