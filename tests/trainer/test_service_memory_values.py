"""A resumed trainer whose saved replay memory was corrupted on disk (bytes overwritten with 0xFF, so NaN values)
resumes the learner with an empty memory instead of training on, and re-saving, the NaN rows."""

from __future__ import annotations

import numpy as np
from test_service import make_config, pendulum_batch, restore_torch_threads  # noqa: F401 - the fixture is autouse
from tmrl_trainer.service import TrainerService


def test_a_memory_file_corrupted_to_nan_is_refused_and_the_trainer_resumes_with_an_empty_memory(tmp_path, caplog):
    config = make_config(tmp_path, save_memory=True)
    first = TrainerService(config)
    first.ingestor.handle(pendulum_batch("w1", 0, 60))
    assert first.run(max_updates=4) == 4
    memory_file = first.run_dir / "checkpoints" / "checkpoint-000000000004.memory.safetensors"
    data = memory_file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    middle = (header_end + len(data)) // 2  # the tester's damage: a run of 0xFF bytes in the middle of the arrays
    memory_file.write_bytes(data[: middle - 100] + b"\xff" * 200 + data[middle + 100 :])

    with caplog.at_level("WARNING", logger="tmrl_trainer.service"):
        second = TrainerService(config)
    try:
        assert second.learner.updates == 4 and len(second.memory) == 0
        assert "could not be restored" in caplog.text and "the file is corrupt" in caplog.text
        second.ingestor.handle(pendulum_batch("w1", 0, 60))  # fresh dedupe window: stored again
        assert len(second.memory) == 60
        assert np.isfinite(second.memory.ring_arrays()["frames.obs"][:60]).all()
    finally:
        second.shutdown()
