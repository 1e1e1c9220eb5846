"""A worker whose batches are all refused for good stops by itself: ``max_consecutive_refusals`` refusals in a row, none
stored in between, end the run with one error line naming the reasons and what to fix, and exit status 1. A stored
batch starts the count again; ``stale`` refusals and ``duplicate`` answers (late resends) neither count nor reset it.
The relay is a bare ROUTER socket (``tests/loopback_relay.py``), the link and the worker are the real ones."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import pytest
from loopback_relay import FakeRelay, wait_for
from pydantic import ValidationError
from test_spool_resend_over_zmq import LAYOUT, filled_builder
from tmrl_common.protocol import Hello, SampleAck, SampleBatch, decode, encode
from tmrl_common.sockets import RelayEndpoint, SecurityConfig, TransportConfig
from tmrl_worker.config import WorkerConfig
from tmrl_worker.progress import progress_path, read_progress
from tmrl_worker.relay_link import RelayLink
from tmrl_worker.spool import SequenceCounter, Spool

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REWARD_DETAIL = "rewards hold values in [0, 1e+06], beyond max_abs_reward 10000"


def answer(relay: FakeRelay, routing_id: bytes, seq: int, outcome: str, reason: str = "", detail: str = "") -> None:
    """Send the trainer's answer about batch ``seq`` (through the relay stand-in)."""
    ack = SampleAck(worker="w-test", seqs=[seq], outcome=outcome, reason=reason, detail=detail)
    relay.socket.send_multipart([routing_id, *encode(ack, "trainer")])


class LinkUnderTest:
    """A real :class:`RelayLink` (``max_consecutive_refusals = 3``) to a relay stand-in; :meth:`send_one` hands it a
    batch and answers it as told."""

    def __init__(self, context, tmp_path, earlier_batches: int = 0) -> None:
        """``earlier_batches``: batches of an earlier run already in the spool (a durable spool's after a restart)."""
        self.relay = FakeRelay(context)
        self.give_ups = 0
        transport = TransportConfig(reconnect_ivl_ms=50, reconnect_ivl_max_ms=200, linger_ms=0)
        sequence, spool = SequenceCounter(tmp_path, "w-test"), Spool(100, 10_000_000, owner="w-test")
        for _ in range(earlier_batches):
            batch = filled_builder(3).build(seq=sequence.take(), weights_version=0)
            spool.add(batch.seq, encode(batch, "w-test"))
        self.link = RelayLink(
            worker_id="w-test", layout=LAYOUT,
            endpoint=RelayEndpoint("127.0.0.1", self.relay.port, transport, SecurityConfig(insecure=True)),
            sequence=sequence, spool=spool,
            ack_timeout_s=60.0, context=context, max_consecutive_refusals=3, on_give_up=self._gave_up,
        )
        self.link.start()
        self.routing_id = self.relay.receive_type(Hello)[0]

    def _gave_up(self) -> None:
        self.give_ups += 1

    def send_one(self, outcome: str, reason: str = "", detail: str = "") -> int:
        """Submit one batch, answer it with ``outcome`` and wait until the link has taken the answer."""
        answered = self.link.snapshot()["acks_received"]
        self.link.submit(filled_builder(3), weights_version=0)
        seq = self.relay.receive_type(SampleBatch)[2].seq
        answer(self.relay, self.routing_id, seq, outcome, reason, detail)
        wait_for(lambda: self.link.snapshot()["acks_received"] == answered + 1)
        return seq

    def close(self) -> None:
        self.link.stop()
        self.relay.close()


@pytest.fixture
def link_under_test(context, tmp_path):
    under_test = LinkUnderTest(context, tmp_path)
    yield under_test
    under_test.close()


def test_max_consecutive_refusals_defaults_to_5_and_must_be_positive():
    assert WorkerConfig().max_consecutive_refusals == 5
    with pytest.raises(ValidationError, match="max_consecutive_refusals"):
        WorkerConfig(max_consecutive_refusals=0)


def test_the_link_gives_up_once_at_the_third_refusal_in_a_row_with_one_error_naming_reason_detail_and_fix(
        link_under_test, caplog):
    under_test = link_under_test
    with caplog.at_level(logging.WARNING, logger="tmrl_worker.relay_link"):
        under_test.send_one("rejected", "reward_out_of_bounds", REWARD_DETAIL)
        under_test.send_one("rejected", "reward_out_of_bounds", REWARD_DETAIL)
        assert under_test.link.gave_up is None and under_test.give_ups == 0
        last = under_test.send_one("rejected", "reward_out_of_bounds", REWARD_DETAIL)
        under_test.send_one("rejected", "reward_out_of_bounds", REWARD_DETAIL)  # after giving up: no second error
    message = under_test.link.gave_up
    assert under_test.give_ups == 1
    assert message.startswith("w-test: 3 batches in a row were refused for good, none stored in between "
                              "(reward_out_of_bounds: 3); the last: batch seq ")
    assert f"batch seq {last} [reward_out_of_bounds]: the trainer refused it: {REWARD_DETAIL}" in message
    assert "fix what the reason names" in message and "then restart the worker" in message
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [message]
    assert "\n" not in message
    assert under_test.link.snapshot()["batches_rejected"] == 4


def test_a_batch_stored_between_refusals_starts_the_count_again(link_under_test):
    under_test = link_under_test
    for outcome in ["rejected", "rejected", "stored", "rejected", "rejected"]:
        under_test.send_one(outcome, "schema" if outcome == "rejected" else "", "another layout")
    assert under_test.link.gave_up is None and under_test.give_ups == 0
    assert under_test.link.snapshot()["refused_in_a_row"] == 2
    under_test.send_one("rejected", "schema", "another layout")  # the third since the stored one
    assert under_test.give_ups == 1 and "3 batches in a row" in under_test.link.gave_up


def test_stale_refusals_and_duplicate_answers_neither_count_nor_end_a_refusal_streak(link_under_test):
    under_test = link_under_test
    under_test.send_one("rejected", "schema", "another layout")
    for _ in range(3):  # more than the limit: none counts
        under_test.send_one("rejected", "stale", "below this worker's horizon 4096")
    under_test.send_one("duplicate")  # a resend of a batch stored earlier: says nothing about the data made now
    under_test.send_one("rejected", "schema", "another layout")
    assert under_test.link.gave_up is None and under_test.link.snapshot()["refused_in_a_row"] == 2
    under_test.send_one("rejected", "schema", "another layout")
    assert under_test.give_ups == 1
    assert "3 batches in a row" in under_test.link.gave_up and "(schema: 3)" in under_test.link.gave_up



def test_refusals_of_an_earlier_runs_batches_resent_from_the_spool_do_not_count_towards_the_streak(context, tmp_path):
    """A worker restarted after its cause was fixed first resends what its durable spool kept; those old batches are
    refused again, which says nothing about the data it makes now."""
    under_test = LinkUnderTest(context, tmp_path, earlier_batches=4)
    try:
        for _ in range(4):
            seq = under_test.relay.receive_type(SampleBatch)[2].seq
            answer(under_test.relay, under_test.routing_id, seq, "rejected", "schema", "another layout")
        wait_for(lambda: under_test.link.snapshot()["acks_received"] == 4)
        snapshot = under_test.link.snapshot()
        assert snapshot["batches_rejected"] == snapshot["rejected.schema"] == 4 and snapshot["refused_in_a_row"] == 0
        assert under_test.link.gave_up is None
        for _ in range(3):
            under_test.send_one("rejected", "schema", "another layout")
        assert under_test.give_ups == 1 and "(schema: 3)" in under_test.link.gave_up
    finally:
        under_test.close()

# ---------------------------------------------------------------------------------------------- the whole worker


class AnsweringRelay:
    """A relay stand-in on its own thread: ``answer_all(seqs)``, called with every batch seq received so far, returns
    the ``(seq, reason)`` pairs to refuse now (each seq is answered once); the others get no answer."""

    def __init__(self, context, answer_all: Callable[[list[int]], list[tuple[int, str]]]) -> None:
        self.relay = FakeRelay(context)
        self.port = self.relay.port
        self.answer_all = answer_all
        self.received: list[int] = []
        self.answered: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="answering-relay", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        socket = self.relay.socket  # used by this thread only until close()
        while not self._stop.is_set():
            if not socket.poll(20):
                continue
            routing_id, *frames = socket.recv_multipart()
            envelope, message = decode(frames)
            if not isinstance(message, SampleBatch):
                continue
            self.received.append(message.seq)
            for seq, reason in self.answer_all(self.received):
                if seq not in self.answered:
                    self.answered.add(seq)
                    ack = SampleAck(worker=envelope.sender, seqs=[seq], outcome="rejected", reason=reason,
                                    detail=REWARD_DETAIL)
                    socket.send_multipart([routing_id, *encode(ack, "trainer")])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.relay.close()


def worker_config_toml(tmp_path, port: int) -> str:
    """A ``sim-fast`` worker sending 10-step batches to ``port``, with the default ``max_consecutive_refusals``."""
    return "\n".join([
        "[worker]", 'worker_id = "w-refused"', 'env = "sim-fast"', f"worker_port = {port}", "weights_port = 1",
        f'state_dir = "{tmp_path / "state"}"', "batch_steps = 10", "max_steps_per_second = 500",
        "max_steps = 1500",  # bounds a worker that would not stop by itself (3 s)
        "flush_timeout_s = 0.5", "[worker.transport]", "linger_ms = 0",
    ]) + "\n"


def test_a_worker_whose_every_batch_is_refused_stops_after_5_with_status_1_its_summary_and_one_error_line(
        context, tmp_path, caplog):
    from tmrl_worker.cli import app
    from typer.testing import CliRunner

    relay = AnsweringRelay(context, lambda seqs: [(seq, "reward_out_of_bounds") for seq in seqs])
    config = tmp_path / "tmrl.toml"
    config.write_text(worker_config_toml(tmp_path, relay.port))
    try:
        with caplog.at_level(logging.INFO):
            result = CliRunner().invoke(app, ["run", "--insecure", "--config", str(config)])
    finally:
        relay.close()
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert re.match(r"tmrl-worker: w-refused: 5 batches in a row were refused for good, none stored in between "
                    r"\(reward_out_of_bounds: 5\); the last: batch seq \d+ \[reward_out_of_bounds\]: the trainer "
                    f"refused it: {re.escape(REWARD_DETAIL)}; ", lines[-1]), lines[-1]
    assert lines[-1].endswith("then restart the worker (max_consecutive_refusals = 5)")  # the default
    stamp_date, stamp_time, summary = lines[-2].split(" ", 2)  # the run's summary (stamped), refused batches last
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", f"{stamp_date} {stamp_time}")
    assert re.match(r"w-refused: (\d+) steps, .*; delivery: .* 0 acknowledged, .* (\d+) rejected "
                    r"\(reward_out_of_bounds: \2\)$", summary), summary
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [lines[-1].removeprefix("tmrl-worker: ")]
    steps = int(summary.split()[1])
    assert steps < 1500  # it stopped by itself, long before max_steps


def test_batches_still_unanswered_when_the_worker_gives_up_stay_in_its_durable_spool(context, tmp_path):
    from tmrl_worker.runtime import BatchesRefused, run_worker

    # the first 3 batches are refused once the 4th has arrived; nothing else is ever answered
    relay = AnsweringRelay(context, lambda seqs: [(seq, "schema") for seq in seqs[:3]] if len(seqs) >= 4 else [])
    config = WorkerConfig(worker_id="w-refused", env="sim-fast", worker_port=relay.port, weights_port=1,
                          state_dir=tmp_path, batch_steps=10, max_steps_per_second=500, max_steps=1500,
                          max_consecutive_refusals=3, flush_timeout_s=0.3, durable_spool=True,
                          transport=TransportConfig(linger_ms=0), security=SecurityConfig(insecure=True))
    try:
        with pytest.raises(BatchesRefused, match=r"3 batches in a row .*\(schema: 3\)") as stopped:
            run_worker(config)
    finally:
        relay.close()
    delivery = stopped.value.stats.delivery
    assert delivery["batches_rejected"] == 3 and delivery["spool_dropped"] == 0
    assert delivery["spool_batches"] == delivery["batches_built"] - 3 >= 1
    assert len(list((tmp_path / "w-refused.spool").glob("*.batch"))) == delivery["spool_batches"]
    assert stopped.value.stats.steps < 1500
    assert read_progress(progress_path(tmp_path, "w-refused")).running is False  # an orderly stop, not a crash


@pytest.mark.parametrize(("acked", "advice"), [(0, ": allow it with `tmrl-relay keys add` on the relay host"),
                                               (9, " (and allowed it at other times: the key was added late, or "
                                                   "removed while this worker ran)")])
def test_the_summary_advises_allowing_a_refused_key_only_while_nothing_was_acknowledged(acked, advice):
    from tmrl_worker.cli import run_summary
    from tmrl_worker.runtime import RolloutStats

    delivery = {"steps_submitted": 900, "batches_built": 9, "spool_acked": acked, "spool_resent": 0,
                "spool_dropped": 0, "spool_batches": 9 - acked, "batches_rejected": 0, "handshake_refused": 2}
    summary = run_summary("worker-2", RolloutStats(steps=900, delivery=delivery))
    assert summary.endswith(f"; the relay refused this worker's key 2 time(s){advice}"), summary
