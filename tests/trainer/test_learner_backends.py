"""The learner seam (issue 16): every backend computes the reference update. On the same seeds and batches the
``cpu-fast`` backend and the ``cuda-graph`` backend's step (eager on CPU) end with the reference's actor, critics,
target critics, log alpha and Adam moments to float tolerance; a checkpoint written by one backend loads into another
and training continues the same; ``make_learner`` picks the backend the config names. The CUDA graph itself is
tested where CUDA is available and skipped with a reason elsewhere."""

from __future__ import annotations

import pytest
import torch
from random_episodes import fill_with_random_episodes
from tmrl_common.layout import tm20_image_layout, tm20_lidar_layout
from tmrl_trainer.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from tmrl_trainer.cpu_compiled import CompiledLearner
from tmrl_trainer.cpu_fast import SACLearner
from tmrl_trainer.cuda_graph import CudaGraphLearner
from tmrl_trainer.learner import BACKENDS, backend_name, make_learner
from tmrl_trainer.memory import ReplayMemory
from tmrl_trainer.reference import ReferenceLearner
from tmrl_trainer.sac import SACConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = tm20_lidar_layout()
IMAGE_LAYOUT = tm20_image_layout(img_hist_len=2, height=16, width=16, act_buf_len=2)
MEMORY = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=2000, seed=0), steps=800, batch_rows=100)
FAST = ["cpu-fast", "cuda-graph"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine "
                                "has none (the graph's maths is tested eagerly on CPU above)")


def _learner(backend: str, layout=LAYOUT, device: str = "cpu", **fields):
    config = SACConfig(hidden_sizes=[32, 32], **fields)
    return make_learner(config, config.architecture(layout, conv_channels=[4, 8]), device=device, seed=0,
                        backend=backend)


def _state(learner) -> dict[str, torch.Tensor]:
    """Every tensor of the learner's checkpoint state: weights, targets, log alpha, Adam moments and steps."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(tree, prefix):
        if isinstance(tree, torch.Tensor):
            tensors[prefix] = tree.detach().cpu().clone()
        elif isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}")

    state = learner.state_dict()
    for key in ("actor", "critics", "target_critics", "log_alpha", "optimizer"):
        walk(state[key], key)
    return tensors


def _assert_agree(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rtol: float = 1e-4,
                  atol: float = 1e-5) -> None:
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name].float(), value.float(), rtol=rtol, atol=atol,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def _own_batches(count: int, size: int = 64, seed: int = 1) -> list:
    """Batches that do not depend on which tests ran before (``MEMORY``'s sampler is shared by the module). Two
    backends' Adam steps round differently (about 1e-8 here); where a gradient is a sum that nearly cancels, Adam
    turns that into a visibly different step, so a comparison across backends must see the same batches every run."""
    memory = fill_with_random_episodes(ReplayMemory(LAYOUT, capacity=2000, seed=seed), steps=800, batch_rows=100)
    return [memory.sample(size) for _ in range(count)]


def _train(learners, batches) -> None:
    for batch in batches:
        for learner in learners:
            learner.update(batch, with_metrics=False)


def test_make_learner_builds_the_backend_the_config_names_and_auto_is_cpu_fast_on_cpu():
    assert BACKENDS == {"reference": ReferenceLearner, "cpu-fast": SACLearner, "cpu-compiled": CompiledLearner,
                        "cuda-graph": CudaGraphLearner}
    assert type(_learner("auto")) is SACLearner
    config = SACConfig(hidden_sizes=[8], backend="reference")
    assert type(make_learner(config, config.architecture(LAYOUT), device="cpu")) is ReferenceLearner
    with pytest.raises(ValueError, match="backend"):
        SACConfig(backend="tpu")


ORDERS = ["joint", "critic-first"]


@pytest.mark.parametrize("update_order", ORDERS)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(("redq_n", "redq_m"), [(2, 2), (4, 2)])
def test_a_fast_backend_ends_where_the_reference_does_after_the_same_batches(backend, redq_n, redq_m, update_order):
    fields = {"redq_n": redq_n, "redq_m": redq_m, "update_order": update_order}
    reference, fast = _learner("reference", **fields), _learner(backend, **fields)
    before = _state(reference)
    _assert_agree(before, _state(fast))  # same seed, same initial weights
    _train([reference, fast], [MEMORY.sample(64) for _ in range(8)])
    after = _state(reference)
    assert not torch.equal(before["actor.mean.weight"], after["actor.mean.weight"])  # it did learn
    assert not torch.equal(before["target_critics.first_bias"], after["target_critics.first_bias"])
    _assert_agree(after, _state(fast))
    assert reference.updates == fast.updates == 8


@pytest.mark.parametrize("update_order", ORDERS)
@pytest.mark.parametrize("backend", FAST)
def test_a_fast_backend_agrees_with_the_reference_on_image_observations_with_fixed_alpha(backend, update_order):
    memory = fill_with_random_episodes(ReplayMemory(IMAGE_LAYOUT, capacity=400, seed=0), steps=300, batch_rows=100)
    fields = {"learn_alpha": False, "redq_n": 3, "update_order": update_order}
    reference, fast = _learner("reference", IMAGE_LAYOUT, **fields), _learner(backend, IMAGE_LAYOUT, **fields)
    _train([reference, fast], [memory.sample(16) for _ in range(4)])
    _assert_agree(_state(reference), _state(fast))


@pytest.mark.parametrize("backend", FAST)
def test_a_fast_backend_agrees_with_the_reference_with_a_reward_scale(backend):
    reference, fast = _learner("reference", reward_scale=0.2), _learner(backend, reward_scale=0.2)
    unscaled = _learner("reference")
    batches = _own_batches(4)
    _train([reference, fast, unscaled], batches)
    _assert_agree(_state(reference), _state(fast))
    difference = (_state(unscaled)["critics.observation_weight"] - _state(reference)["critics.observation_weight"])
    assert difference.abs().max() > 1e-4  # the scale reached the critics' targets


def test_critics_with_layer_norm_train_on_the_reference_and_cuda_graph_backends_and_auto_picks_the_reference():
    assert type(_learner("auto", critic_layer_norm=True)) is ReferenceLearner  # cpu-fast computes plain critics only
    assert backend_name(_learner("auto", critic_layer_norm=True)) == "reference"
    assert backend_name(_learner("auto")) == "cpu-fast"  # what the trainer's start-up line names
    with pytest.raises(ValueError, match="critic_layer_norm needs the reference or cuda-graph backend"):
        _learner("cpu-fast", critic_layer_norm=True)
    reference, graph = _learner("reference", critic_layer_norm=True), _learner("cuda-graph", critic_layer_norm=True)
    plain = _learner("reference")
    before = _state(reference)
    assert {name for name in before if "norm_" in name} == {
        f"{critics}.norm_{kind}.{layer}" for critics in ("critics", "target_critics")
        for kind in ("weights", "biases") for layer in (0, 1)}
    _assert_agree({k: v for k, v in before.items() if "norm_" not in k}, _state(plain))  # same seed, same weights
    _train([reference, graph, plain], _own_batches(6))
    after = _state(reference)
    assert not torch.equal(before["critics.norm_weights.0"], after["critics.norm_weights.0"])  # the gains learn
    assert not torch.equal(before["target_critics.norm_biases.1"], after["target_critics.norm_biases.1"])
    _assert_agree(after, _state(graph))
    assert (after["critics.weights.0"] - _state(plain)["critics.weights.0"]).abs().max() > 1e-4


def test_a_checkpoint_with_critic_layer_norm_does_not_load_into_plain_critics(tmp_path):
    normed = _learner("reference", critic_layer_norm=True)
    _train([normed], _own_batches(2))
    path = save_checkpoint(tmp_path / "normed.safetensors", normed)
    again = _learner("auto", critic_layer_norm=True)
    load_checkpoint(path, again)
    _assert_agree(_state(normed), _state(again))
    with pytest.raises(CheckpointMismatchError, match="different SAC config"):
        load_checkpoint(path, _learner("auto"))


def test_the_default_update_order_is_the_critics_first_as_in_sb3_and_cleanrl():
    assert SACConfig().update_order == "critic-first"


def test_in_the_critic_first_order_only_the_actor_sees_the_updated_critics():
    """One update from the same seed: critics, targets and alpha step as in the joint order (their losses do not
    depend on the order), the actor does not (its loss reads the critics after their step). Adam's first step moves
    each weight by about its learning rate times the sign of its gradient: the actor's weights whose gradient changed
    sign against the updated critics (a large critic rate makes them many) differ by about twice the actor's rate."""
    batch = MEMORY.sample(64)
    joint = _learner("reference", critic_lr=0.05, update_order="joint")
    critic_first = _learner("reference", critic_lr=0.05, update_order="critic-first")
    _train([joint, critic_first], [batch])
    expected, actual = _state(joint), _state(critic_first)
    for name in expected:
        if name.startswith(("critics.", "target_critics.", "log_alpha", "optimizer.state.0", "optimizer.state.2")):
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    difference = (actual["actor.mean.weight"] - expected["actor.mean.weight"]).abs()
    assert difference.max() > 1.5 * joint.config.actor_lr


def test_an_unknown_update_order_is_a_config_error():
    with pytest.raises(ValueError, match="update_order"):
        SACConfig(update_order="actor-first")


@pytest.mark.parametrize(("writer", "reader"), [("reference", "cpu-fast"), ("cpu-fast", "reference"),
                                                ("cpu-fast", "cuda-graph"), ("cuda-graph", "reference"),
                                                ("cpu-compiled", "reference"), ("reference", "cpu-compiled")])
def test_a_checkpoint_of_one_backend_loads_into_another_and_training_continues_the_same(tmp_path, writer, reader):
    first = _learner(writer, redq_n=4, redq_m=2)
    _train([first], [MEMORY.sample(64) for _ in range(4)])
    path = save_checkpoint(tmp_path / "ckpt.safetensors", first, {"env_steps": 1})
    second = _learner(reader, redq_n=4, redq_m=2)
    load_checkpoint(path, second)
    _assert_agree(_state(first), _state(second))
    assert second.updates == 4
    _train([first, second], [MEMORY.sample(64) for _ in range(4)])  # the generator state came along too
    _assert_agree(_state(first), _state(second))


def test_the_reference_update_is_plain_pytorch_adam_over_module_parameters():
    learner = _learner("reference")
    assert isinstance(learner.optimizer, torch.optim.Adam)
    assert not any(learner.optimizer.defaults[flag] for flag in ("fused", "capturable"))
    grouped = [p for group in learner.optimizer.param_groups for p in group["params"]]
    assert grouped == [*learner.critics.parameters(), *learner.actor.parameters(), learner.log_alpha]


def test_the_cuda_graph_backend_on_cpu_runs_its_step_eagerly():
    learner = _learner("cuda-graph")
    assert not learner.capture
    metrics = learner.update(MEMORY.sample(32))
    assert set(metrics) == set(learner.METRICS) and not learner.graph_captured
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphLearner(learner.config, learner.architecture, device="cpu", capture=True)


@needs_cuda
@pytest.mark.parametrize("update_order", ORDERS)
def test_the_cuda_graph_replays_the_reference_update_on_the_gpu(update_order):
    reference = _learner("reference", device="cuda", update_order=update_order)
    graph = _learner("cuda-graph", device="cuda", update_order=update_order)
    eager = CudaGraphLearner(graph.config, graph.architecture, device="cuda", seed=0, capture=False)
    assert graph.capture
    _train([reference, graph, eager], _own_batches(8))
    assert graph.graph_captured and not eager.graph_captured
    _assert_agree(_state(eager), _state(graph), rtol=1e-6, atol=1e-8)  # the replays are the step itself (same kernels)
    _assert_agree(_state(reference), _state(graph))


@needs_cuda
@pytest.mark.parametrize("update_order", ORDERS)
def test_the_cuda_graph_applies_the_guard_without_asking_the_host(update_order):
    graph = _learner("cuda-graph", device="cuda", update_order=update_order)
    *batches, poisoned = _own_batches(5)
    _train([graph], batches)
    before = _state(graph)
    poisoned = poisoned._replace(reward=torch.full_like(poisoned.reward, 3e38)).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the update raises
    try:
        graph.update(poisoned, with_metrics=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graph.graph_captured and graph.guard.rejected_updates() == 1
    _assert_agree(before, _state(graph))


@needs_cuda
def test_the_cuda_graph_is_recorded_again_after_a_checkpoint_loads(tmp_path):
    reference, graph = _learner("reference", device="cuda"), _learner("cuda-graph", device="cuda")
    batches = _own_batches(10)
    _train([reference, graph], batches[:5])
    path = save_checkpoint(tmp_path / "ckpt.safetensors", reference, {})
    load_checkpoint(path, graph)
    assert not graph.graph_captured
    _train([reference, graph], batches[5:])
    assert graph.graph_captured
    _assert_agree(_state(reference), _state(graph))


@needs_cuda
def test_critics_with_layer_norm_replay_the_reference_update_in_the_cuda_graph():
    reference = _learner("reference", device="cuda", critic_layer_norm=True)
    graph = _learner("cuda-graph", device="cuda", critic_layer_norm=True)
    _train([reference, graph], _own_batches(8))
    assert graph.graph_captured
    _assert_agree(_state(reference), _state(graph))


@needs_cuda
@pytest.mark.parametrize("update_order", ORDERS)
def test_the_cuda_graph_replays_the_reference_update_on_image_observations(update_order):
    memory = fill_with_random_episodes(ReplayMemory(IMAGE_LAYOUT, capacity=400, seed=0), steps=300, batch_rows=100)
    batches = [memory.sample(16) for _ in range(6)]
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions (cuDNN's default) round each side differently
    try:
        fields = {"redq_n": 3, "update_order": update_order}
        reference = _learner("reference", IMAGE_LAYOUT, device="cuda", **fields)
        graph = _learner("cuda-graph", IMAGE_LAYOUT, device="cuda", **fields)
        _train([reference, graph], batches)
    finally:
        torch.backends.cudnn.allow_tf32 = allowed
    assert graph.graph_captured
    _assert_agree(_state(reference), _state(graph))
