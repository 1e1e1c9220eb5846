"""``tmrl-trainer export``: the deterministic actor as ONNX, run by onnxruntime, agrees with torch to 1e-5 on the
same observations (real simulator observations and random ones), for the MLP (LIDAR) and the CNN (image) actors;
inputs are named and ordered as the observation tuple; a checkpoint exports like the policy file it came from."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from tmrl_common.layout import tm20_image_layout, tm20_lidar_layout
from tmrl_common.networks import PolicyArchitecture, build_actor, read_policy_file
from tmrl_trainer.checkpoint import save_checkpoint
from tmrl_trainer.cli import app
from tmrl_trainer.policy_export import export_onnx, input_names
from tmrl_trainer.sac import SACConfig, SACLearner
from tmrl_worker.envs import make_env
from tmrl_worker.runtime import save_policy_file
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def sim_observations(observation: str, steps: int = 24) -> list[np.ndarray]:
    """``steps`` observations of the synchronous simulator under random actions, batched part by part."""
    env = make_env("sim-fast", max_episode_steps=500, options={"observation": observation})
    rng = np.random.default_rng(0)
    rows = [env.reset(seed=0)]
    while len(rows) < steps:
        observation_tuple, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 3))
        rows.append(env.reset(seed=len(rows)) if terminated or truncated else observation_tuple)
    env.close()
    return [np.stack([np.asarray(row[i]) for row in rows]) for i in range(len(rows[0]))]


def run_onnx(path, names, parts) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["action"], dict(zip(names, parts, strict=True)))[0]


@pytest.mark.parametrize(("observation", "layout", "kind"), [
    ("lidar", tm20_lidar_layout(), "mlp"),
    ("image", tm20_image_layout(), "cnn"),
])
def test_onnxruntime_agrees_with_torch_on_simulator_observations(tmp_path, observation, layout, kind):
    torch.manual_seed(1)
    actor = build_actor(PolicyArchitecture.for_layout(layout)).eval()
    assert actor.architecture.kind == kind
    path = export_onnx(actor, tmp_path / "policy.onnx", version=9)
    parts = sim_observations(observation)
    onnx_actions = run_onnx(path, input_names(layout), parts)
    with torch.no_grad():
        torch_actions = actor([torch.from_numpy(p) for p in parts], deterministic=True, with_log_prob=False)[0].numpy()
    assert onnx_actions.shape == (len(parts[0]), 3) and onnx_actions.dtype == np.float32
    np.testing.assert_allclose(onnx_actions, torch_actions, atol=1e-5, rtol=0)
    assert np.abs(onnx_actions).max() <= 1.0
    # the worker's one-observation call (Actor.act) and a batch of one through onnxruntime
    single = [p[5:6] for p in parts]
    np.testing.assert_allclose(run_onnx(path, input_names(layout), single)[0],
                               actor.act([p[0] for p in single], deterministic=True), atol=1e-5, rtol=0)


def test_inputs_are_the_observation_tuple_in_order_and_metadata_rebuilds_the_architecture(tmp_path):
    layout = tm20_image_layout()
    actor = build_actor(PolicyArchitecture.for_layout(layout, hidden_sizes=[32]))
    model = onnx.load(str(export_onnx(actor, tmp_path / "p.onnx", version=3)))
    inputs = [(i.name, i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
              for i in model.graph.input]
    assert inputs == [("speed", onnx.TensorProto.FLOAT, ["batch", 1]),
                      ("image", onnx.TensorProto.UINT8, ["batch", 4, 64, 64]),
                      ("action_0", onnx.TensorProto.FLOAT, ["batch", 3]),
                      ("action_1", onnx.TensorProto.FLOAT, ["batch", 3])]
    assert [o.name for o in model.graph.output] == ["action"]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["tmrl_version"] == "3"
    assert PolicyArchitecture.from_flat_dict(json.loads(metadata["tmrl_architecture"])) == actor.architecture


def test_a_checkpoint_exports_the_same_policy_as_its_policy_file(tmp_path):
    config = SACConfig(hidden_sizes=[32, 32])
    learner = SACLearner(config, config.architecture(tm20_lidar_layout()), device="cpu", seed=4)
    checkpoint = save_checkpoint(tmp_path / "checkpoint-1.safetensors", learner, {"weights_version": 6})
    result = runner.invoke(app, ["export", str(checkpoint), "--onnx", str(tmp_path / "c.onnx"),
                                 "--policy-out", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 0, result.output
    assert "largest |difference|" in result.output
    exported, version = read_policy_file(tmp_path / "c.safetensors")
    assert version == 6
    for name, tensor in learner.actor.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0)
    parts = sim_observations("lidar", steps=8)
    with torch.no_grad():
        expected = learner.actor([torch.from_numpy(p) for p in parts], deterministic=True, with_log_prob=False)[0]
    np.testing.assert_allclose(run_onnx(tmp_path / "c.onnx", input_names(tm20_lidar_layout()), parts),
                               expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("damage", "message"), [
    ("changed value", r"tensor learner.actor.mean.weight does not match the CRC-32 saved with it"),
    ("nan", r"holds a non-finite value in learner.actor.mean.weight"),
])
def test_a_damaged_checkpoint_is_not_exported_and_the_one_line_error_says_why(tmp_path, damage, message):
    """What the trainer would refuse to resume from is not exported either (an outside probe exported a checkpoint
    whose actor weight a flipped bit had made 6e36)."""
    from tmrl_trainer import tensor_file

    config = SACConfig(hidden_sizes=[16])
    learner = SACLearner(config, config.architecture(tm20_lidar_layout()), device="cpu", seed=4)
    checkpoint = save_checkpoint(tmp_path / "checkpoint-1.safetensors", learner)
    tensors, document = tensor_file.read_file(checkpoint)  # document: the CRCs of the values as saved
    tensors["learner.actor.mean.weight"][0, 0] = 6.0e36 if damage == "changed value" else float("nan")
    checkpoint.write_bytes(tensor_file.pack(tensors, document))
    result = runner.invoke(app, ["export", str(checkpoint), "--onnx", str(tmp_path / "c.onnx")])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert re.search(message, result.stderr) and not (tmp_path / "c.onnx").exists()


def test_a_policy_file_exports_from_the_command_line_and_bad_sources_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    policy = save_policy_file(build_actor(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[16])),
                              tmp_path / "policy.safetensors", version=2)
    result = runner.invoke(app, ["export", str(policy), "--onnx", str(tmp_path / "p.onnx")])
    assert result.exit_code == 0 and (tmp_path / "p.onnx").stat().st_size > 0
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    result = runner.invoke(app, ["export", str(junk), "--onnx", str(tmp_path / "j.onnx")])
    assert result.exit_code == 2 and "neither a policy file nor a trainer checkpoint" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "j.onnx").exists()
    result = runner.invoke(app, ["export", str(policy)])
    assert result.exit_code == 2 and "--onnx" in result.output


def test_outputs_in_missing_folders_are_created_and_unwritable_ones_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    policy = save_policy_file(build_actor(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[16])),
                              tmp_path / "policy.safetensors", version=2)
    onnx_out, policy_out = tmp_path / "a" / "b" / "p.onnx", tmp_path / "c" / "d" / "p.safetensors"
    result = runner.invoke(app, ["export", str(policy), "--onnx", str(onnx_out), "--policy-out", str(policy_out),
                                 "--no-check"])
    assert result.exit_code == 0, result.output
    assert onnx.load(str(onnx_out)).graph.output[0].name == "action"
    assert read_policy_file(policy_out)[1] == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for option in ("--onnx", "--policy-out"):
        target = blocker / "sub" / ("p.onnx" if option == "--onnx" else "p.safetensors")
        result = runner.invoke(app, ["export", str(policy), option, str(target)])
        # "cannot write ...: File exists" (a config probe) did not say which part of the path was wrong
        assert result.exit_code == 2 and result.stderr == f"tmrl-trainer export: {target}: {blocker} is a file, not a folder\n"
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def _small_checkpoint(tmp_path, hidden=(16,)):
    config = SACConfig(hidden_sizes=list(hidden))
    learner = SACLearner(config, config.architecture(tm20_lidar_layout()), device="cpu", seed=4)
    return save_checkpoint(tmp_path / "checkpoint-1.safetensors", learner), learner


@pytest.mark.parametrize(("change", "says"), [
    ("no architecture", "has no valid architecture"),
    ("bad architecture", "has no valid architecture"),
    ("missing actor tensor", "holds no actor that fits its architecture: Error(s) in loading state_dict"),
    ("another architecture's actor", "holds no actor that fits its architecture"),
])
def test_a_checkpoint_that_reads_but_cannot_be_exported_says_what_is_wrong_with_it(tmp_path, change, says):
    """An outside probe: a checkpoint missing its architecture was a KeyError traceback, and every other problem
    was reported as 'neither a policy file nor a trainer checkpoint ... write it with save_policy_file'."""
    from tmrl_trainer import tensor_file

    checkpoint, _ = _small_checkpoint(tmp_path)
    tensors, document = tensor_file.read_file(checkpoint)
    if change == "no architecture":
        del document["architecture"]
    elif change == "bad architecture":
        document["architecture"]["hidden_sizes"] = "wide"
    elif change == "missing actor tensor":
        del tensors["learner.actor.mean.weight"]
    else:
        other, _ = _small_checkpoint(tmp_path / "other", hidden=(8,))
        other_tensors, _ = tensor_file.read_file(other)
        tensors.update({name: tensor for name, tensor in other_tensors.items() if name.startswith("learner.actor.")})
    document["crc32"] = {name: tensor_file.crc32_of(tensor) for name, tensor in tensors.items()}  # consistent again
    checkpoint.write_bytes(tensor_file.pack(tensors, document))
    result = runner.invoke(app, ["export", str(checkpoint), "--policy-out", str(tmp_path / "p.safetensors")])
    assert result.exit_code == 2, result.output
    assert says in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert "neither a policy file" not in result.stderr and "Traceback" not in result.output


def test_export_never_writes_over_its_source_a_device_or_its_other_output(tmp_path):
    checkpoint, _ = _small_checkpoint(tmp_path)
    before = checkpoint.read_bytes()
    for arguments, says in (
        (["--policy-out", str(checkpoint)], f"{checkpoint} is the source"),
        (["--policy-out", str(tmp_path / "." / checkpoint.name)], "is the source"),
        (["--onnx", str(tmp_path / "x.onnx"), "--policy-out", str(tmp_path / "x.onnx")], "is the other output"),
        (["--onnx", str(tmp_path / "model.bin")], "an ONNX file's name must end in .onnx"),
        (["--policy-out", "/dev/null"], "/dev/null exists and is not a regular file"),
    ):
        result = runner.invoke(app, ["export", str(checkpoint), *arguments, "--no-check"])
        assert result.exit_code == 2 and says in result.stderr, (arguments, result.output)
    assert checkpoint.read_bytes() == before and not (tmp_path / "x.onnx").exists()
    assert not (tmp_path / "model.bin").exists()


def test_a_checkpoint_given_where_a_policy_file_is_wanted_is_told_how_to_export_it(tmp_path):
    from tmrl_common.networks import PolicyFileError

    checkpoint, _ = _small_checkpoint(tmp_path)
    with pytest.raises(PolicyFileError, match="a trainer checkpoint: `tmrl-trainer export` it with --policy-out FILE"):
        read_policy_file(checkpoint)


def test_the_onnx_policy_stays_within_the_action_bounds_on_far_out_observations(tmp_path):
    torch.manual_seed(0)
    actor = build_actor(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[32]))
    path = export_onnx(actor, tmp_path / "p.onnx")
    rng = np.random.default_rng(1)  # observations that sweep the mean through tanh's saturation
    parts = [(rng.standard_normal((65536, *shape)) * 30).astype(np.float32)
             for shape in tm20_lidar_layout().observation_shapes()]
    actions = run_onnx(path, input_names(tm20_lidar_layout()), parts)
    assert np.abs(actions).max() <= 1.0  # without the clamp: 554 actions at 1.0000001 here


def test_check_asked_for_by_name_fails_without_onnxruntime_while_the_default_only_says_so(tmp_path, monkeypatch):
    torch.manual_seed(0)
    policy = save_policy_file(build_actor(PolicyArchitecture.for_layout(tm20_lidar_layout(), hidden_sizes=[16])),
                              tmp_path / "policy.safetensors", version=2)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    default = runner.invoke(app, ["export", str(policy), "--onnx", str(tmp_path / "default.onnx")])
    assert default.exit_code == 0 and "onnxruntime is not installed" in default.stderr
    asked = runner.invoke(app, ["export", str(policy), "--onnx", str(tmp_path / "asked.onnx"), "--check"])
    assert asked.exit_code == 1 and "--check needs onnxruntime" in asked.stderr
    assert asked.stderr.strip().count("\n") == 0 and (tmp_path / "asked.onnx").stat().st_size > 0
    skipped = runner.invoke(app, ["export", str(policy), "--onnx", str(tmp_path / "skipped.onnx"), "--no-check"])
    assert skipped.exit_code == 0 and "onnxruntime" not in skipped.output


def test_output_names_too_long_for_the_file_system_are_one_line_errors(tmp_path):
    """A CLI probe: train-local's --run-dir and export's --onnx with a 300-character name ended in ENAMETOOLONG
    tracebacks (`Path.exists()` raises it)."""
    from tmrl_trainer.cli import app
    from typer.testing import CliRunner

    long_name = tmp_path / ("x" * 300)
    runner = CliRunner()
    local = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "5", "--run-dir", str(long_name)])
    assert local.exit_code == 2 and "Traceback" not in local.output
    assert f"tmrl-trainer train-local: cannot use --run-dir {long_name}: File name too long" in local.output
    source = tmp_path / "policy.safetensors"
    local = runner.invoke(app, ["train-local", "--env", "Pendulum-v1", "--steps", "5", "--eval-episodes", "0",
                                "--run-dir", str(tmp_path / "run")])
    assert local.exit_code == 0, local.output
    exported = runner.invoke(app, ["export", str(tmp_path / "run" / "checkpoints" / "latest.safetensors"),
                                   "--policy-out", str(source), "--onnx", f"{long_name}.onnx"])
    assert exported.exit_code == 2 and "Traceback" not in exported.output
    assert f"tmrl-trainer export: cannot use {long_name}.onnx: File name too long" in exported.output
