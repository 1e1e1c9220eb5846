"""The relay's Prometheus metrics, in a registry of their own, served over HTTP (``/metrics``, text format).

Rates (samples/s, bytes/s) are the ``rate()`` of the ``_total`` counters, as Prometheus computes them.
"""

from __future__ import annotations

import threading
import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from tmrl_common.protocol import WORKER_HEARTBEAT_COUNTERS

LINKS = ("workers", "trainer", "weights")


class TrafficCounters:
    """Counters bumped for every message, kept as plain integers (a prometheus ``Counter.inc`` takes a lock, which
    costs more than the rest of forwarding a batch) and exported by a collector when the registry is scraped.
    Only the relay's loop thread writes them."""

    def __init__(self) -> None:
        self.batches = 0
        self.steps = 0
        self.batch_bytes = 0
        self.received_bytes = dict.fromkeys(LINKS, 0)
        self.received_messages = dict.fromkeys(LINKS, 0)

    def describe(self):
        return list(self.collect())

    def collect(self):
        yield CounterMetricFamily("tmrl_relay_batches_forwarded", "Sample batches handed to the trainer's connection (one handed to a connection that then breaks never arrives; its worker resends it).", value=self.batches)
        yield CounterMetricFamily("tmrl_relay_steps_forwarded", "Environment steps (samples) in forwarded batches.", value=self.steps)
        yield CounterMetricFamily("tmrl_relay_batch_bytes_forwarded", "Bytes of sample batches forwarded (envelope + body).",
                                  value=self.batch_bytes)
        received_bytes = CounterMetricFamily("tmrl_relay_received_bytes", "Bytes received, per link.", labels=["link"])
        received_messages = CounterMetricFamily("tmrl_relay_received_messages", "Messages received, per link.", labels=["link"])
        for link in LINKS:
            received_bytes.add_metric([link], self.received_bytes[link])
            received_messages.add_metric([link], self.received_messages[link])
        yield received_bytes
        yield received_messages


class WorkerReports:
    """Exports each live worker's own counters from its latest ``heartbeat`` (``Peer.reported``) as
    ``tmrl_relay_worker_reported{worker,counter}``: what only the worker knows (its spool's drops and write errors,
    batches resent), which otherwise reached only its own log. ``peers`` is the relay's worker table, read on the
    HTTP thread: a copy of its entries, each ``reported`` dict replaced whole by the loop thread."""

    HELP = (f"Each live worker's own totals from its latest heartbeat ({', '.join(WORKER_HEARTBEAT_COUNTERS)}); "
            "they restart with the worker.")

    def __init__(self, peers, timeout_s: float) -> None:
        self.peers = peers
        self.timeout_s = timeout_s

    def describe(self):
        return [GaugeMetricFamily("tmrl_relay_worker_reported", self.HELP, labels=["worker", "counter"])]

    def collect(self):
        family = GaugeMetricFamily("tmrl_relay_worker_reported", self.HELP, labels=["worker", "counter"])
        now = time.monotonic()
        for sender, peer in sorted(list(self.peers.by_sender.items())):
            if now - peer.last_seen > self.timeout_s:
                continue
            for counter, value in sorted(peer.reported.items()):
                family.add_metric([sender, counter], value)
        yield family


class RelayMetrics:
    """Every counter and gauge the relay exports. Hot-path children (per link) are bound once here."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.traffic = TrafficCounters()
        r.register(self.traffic)
        self.rejects = Counter("tmrl_relay_rejects", "Messages rejected, per reason and link.", ["reason", "link"], registry=r)
        self.dropped_batches = Counter("tmrl_relay_dropped_batches", "Pending batches dropped (oldest first) past max_pending_bytes.", registry=r)
        self.dropped_bytes = Counter("tmrl_relay_dropped_bytes", "Bytes of pending batches dropped.", registry=r)
        self.late_messages = Counter("tmrl_relay_late_messages", "Messages a peer sent on a connection before it replaced it with a new one (it took it as dead: a stalled network path, a paused relay) and read only after the new hello: ignored, neither rejected nor answered.", ["link"], registry=r)
        self.held_resends = Counter("tmrl_relay_held_resends", "Batches resent by their worker while a copy was already held for the trainer: not held twice.", registry=r)
        self.acks = Counter("tmrl_relay_acks_forwarded", "Sample acks routed from the trainer to a worker's connection (queued on it: one queued when that connection closes is lost, and the worker resends and is acked again).", registry=r)
        self.acks_undeliverable = Counter("tmrl_relay_acks_undeliverable", "Sample acks whose worker is not connected (it resends; the trainer re-acks).", registry=r)
        self.weights_published = Counter("tmrl_relay_weights_published", "Weights messages published on the weights socket (new versions only, at most one per weights_min_interval_s).", registry=r)
        self.weights_handovers = Counter("tmrl_relay_weights_handovers", "Latest weights handed to a worker over its own link after hello, per result (sent, blocked = its queue was full).", ["result"], registry=r)
        self.subscriptions = Counter("tmrl_relay_weights_subscriptions", "Workers' subscriptions (to the empty topic) read from the weights socket; they never cause a publication.", registry=r)
        self.foreign_subscriptions = Counter("tmrl_relay_weights_foreign_subscriptions", "Subscriptions to a topic other than the empty one (workers never send these); past a bound of live ones the weights socket is re-opened.", registry=r)
        self.weights_socket_reopened = Counter("tmrl_relay_weights_socket_reopened", "Times the weights socket was closed and bound again to free the subscriptions to topics no worker uses.", registry=r)
        self.role_refusals = Counter("tmrl_relay_role_refusals", "Hellos refused a role, per link and why (trainer_alive: another trainer holds the role; not_a_trainer_key; wrong_role: the hello names the other socket's role).", ["link", "why"], registry=r)
        self.handshake_failures = Counter("tmrl_relay_handshake_failures", "Connections refused during the ZMTP/CURVE handshake, per link and kind (auth: key not allow-listed; protocol: wrong server key or mechanism; timeout: no handshake within 30 s; other).", ["link", "kind"], registry=r)
        self.disconnects = Counter("tmrl_relay_disconnects", "Connections that ended, per link: peers leaving, and peers "
                                   "dropped by ZeroMQ for a frame over the socket's cap (it does not tell which).",
                                   ["link"], registry=r)
        self.errors_sent = Counter("tmrl_relay_errors_sent", "error messages sent back to peers.", registry=r)
        self.connected_workers = Gauge("tmrl_relay_connected_workers", "Workers that said hello and were heard from within peer_timeout_s.", registry=r)
        self.trainer_connected = Gauge("tmrl_relay_trainer_connected", "1 while a trainer is registered and alive.", registry=r)
        self.weights_version = Gauge("tmrl_relay_weights_version", "Version of the cached (latest) weights; -1 before any.", registry=r)
        self.weights_version.set(-1)
        self.pending_bytes = Gauge("tmrl_relay_pending_bytes", "Bytes of sample batches held for the trainer.", registry=r)
        self.pending_batches = Gauge("tmrl_relay_pending_batches", "Sample batches held for the trainer.", registry=r)
        self.cached_weights_bytes = Gauge("tmrl_relay_cached_weights_bytes", "Bytes of the cached latest weights message.", registry=r)
        self.open_files = Gauge("tmrl_relay_open_files", "Files the relay process holds open (one per connection, plus its own); at its open-file limit no new peer gets in. Linux only.", registry=r)
        self.allowed_keys = Gauge("tmrl_relay_allowed_keys", "Public keys in the allow-list, per link (0 in --insecure mode).", ["link"], registry=r)

    def reject(self, reason: str, link: str) -> None:
        self.rejects.labels(reason=reason, link=link).inc()

    def reject_count(self, reason: str, link: str) -> float:
        """Current value of one reject counter (for tests and logs)."""
        value = self.registry.get_sample_value("tmrl_relay_rejects_total", {"reason": reason, "link": link})
        return value or 0.0

    def summary(self) -> str:
        """What this relay did, for its last log line (a soak probe: the workers and the trainer end with totals,
        the relay said only "relay stopped")."""
        def total(name: str) -> int:
            return int(self.registry.get_sample_value(name) or 0)

        rejected = sum(int(sample.value) for metric in self.rejects.collect() for sample in metric.samples
                       if sample.name == "tmrl_relay_rejects_total")
        held = int(self.registry.get_sample_value("tmrl_relay_pending_batches") or 0)
        return (f"{self.traffic.batches} batches ({self.traffic.steps} steps) forwarded to the trainer, "
                f"{total('tmrl_relay_acks_forwarded_total')} acks to workers, {total('tmrl_relay_dropped_batches_total')} "
                f"batches dropped, {held} held for a trainer at the stop, {total('tmrl_relay_weights_published_total')} "
                f"weights versions published, {rejected} messages rejected")


class MetricsServer:
    """The HTTP endpoint serving a registry; :meth:`close` stops it."""

    def __init__(self, metrics: RelayMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
