"""A stopping trainer answers no batch after the final checkpoint's snapshot of its memory: an answer ``stored`` makes
the worker drop the batch from its spool for good, so a batch answered after the snapshot would be in no memory. A
bare ROUTER socket plays the relay (``tests/loopback_relay.py``)."""

from __future__ import annotations

import time

from loopback_relay import FakeRelay
from test_service import make_config, pendulum_batch, restore_torch_threads  # noqa: F401 - the fixture is autouse
from tmrl_common.protocol import Hello, SampleAck
from tmrl_trainer import service as service_module
from tmrl_trainer.checkpoint import save_checkpoint
from tmrl_trainer.service import TrainerService


def _answers(relay: FakeRelay, timeout_s: float) -> list[SampleAck]:
    """Every ack the trainer sends within ``timeout_s``."""
    answers, deadline = [], time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if relay.socket.poll(int(left * 1000)):
            _, _, message = relay.receive(timeout_s=0.1)
            if isinstance(message, SampleAck):
                answers.append(message)
    return answers


def test_a_batch_arriving_during_the_final_checkpoint_is_not_answered_stored_and_lost(tmp_path, context, monkeypatch):
    """A chaos probe: a trainer stopped by SIGTERM answered 'stored' for a batch that arrived after its final
    checkpoint had copied the memory (the ingest thread ran until after the checkpoint), so the restarted trainer
    did not hold those 50 rows and the worker, answered, never resent them."""
    relay = FakeRelay(context)
    try:
        config = make_config(tmp_path, save_memory=True, trainer_port=relay.port)
        service = TrainerService(config)
        service.link.start()
        routing_id = relay.receive_type(Hello)[0]
        relay.socket.send_multipart([routing_id, *pendulum_batch("w1", 0, 60)])
        assert [a.outcome for a in _answers(relay, 1.0)] == ["stored"]

        answered_after_snapshot: list[SampleAck] = []

        def a_batch_arrives_then_save(*args, **kwargs):  # the memory is copied, its lock released: writing it
            relay.socket.send_multipart([routing_id, *pendulum_batch("w1", 1, 60)])
            answered_after_snapshot.extend(_answers(relay, 1.0))
            return save_checkpoint(*args, **kwargs)

        monkeypatch.setattr(service_module, "save_checkpoint", a_batch_arrives_then_save)
        service.shutdown()  # no update yet: the warm-up's checkpoint-0 holds the memory
        stored = 1 + sum(a.outcome == "stored" for a in answered_after_snapshot)
    finally:
        relay.close()
    resumed = TrainerService(make_config(tmp_path, save_memory=True))
    try:
        assert len(resumed.memory) == 60 * stored  # every batch answered stored came back
        assert stored == 1  # the late batch is not answered: its worker resends it to the next trainer
    finally:
        resumed.shutdown()
