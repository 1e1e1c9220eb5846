"""Worker configuration (table ``[worker]`` of the TOML config; env ``TMRL_WORKER__<FIELD>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tmrl_common.config import MAX_DURATION_S, MAX_SEED, refuse_empty_path
from tmrl_common.protocol import RESERVED_WORKER_IDS, SENDER_PATTERN
from tmrl_common.sockets import SecurityConfig, TransportConfig, check_host

WorkerMode = Literal["train", "test", "expert"]


class WorkerConfig(BaseModel):
    """Which environment to run, where the relay is, and how samples are batched, spooled and resent."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite interval or timeout is a typo

    worker_id: str = "worker-1"
    """Unique per worker (letters, digits, ``_.:-``; at most 64 characters): it names the worker on the wire and its
    sequence-number state file."""
    relay_host: str = "127.0.0.1"
    worker_port: int = Field(default=5555, ge=1, le=65535)
    weights_port: int = Field(default=5557, ge=1, le=65535)
    env: str = "sim"
    """``sim`` (built-in race track, real time), ``sim-fast`` (same track, synchronous), ``tm20-lidar``,
    ``tm20-lidar-progress``, ``tm20-full``, ``module:Class`` (your rtgym interface) or ``gym:<id>`` (any gymnasium env)."""
    env_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to the env: interface keyword arguments for rtgym envs (TrackMania: ``reward_path``,
    ``telemetry_port``...), ``gymnasium.make`` keyword arguments for ``gym:`` and ``sim-fast``."""
    mode: WorkerMode = "train"
    """``train``: send samples, use received weights; ``test``: send no samples (its hello fetches the latest weights),
    use received weights; ``expert``: send samples, ignore weights (scripted expert of the env, or ``policy_file``)."""
    policy_file: Path | None = None
    """A safetensors policy (weights + architecture metadata) used in ``expert`` mode instead of the env's expert."""
    deterministic: bool = False
    """Act with the policy's mean action instead of sampling (``test`` mode always acts deterministically)."""
    keep_best: bool = False
    """``test`` mode only: keep the policy of the best episode driven so far in
    ``state_dir/<worker_id>.best-policy.safetensors``, with ``.best-policy.json`` saying what it did
    (:class:`~tmrl_worker.runtime.BestPolicyKeeper`). Received weights are then swapped in at episode starts only, so
    that each episode is driven by one version."""

    # real-time settings (rtgym envs)
    time_step_duration: float = Field(default=0.05, gt=0, le=MAX_DURATION_S)
    """Seconds per real-time step (0.05 = 20 Hz)."""
    max_episode_steps: int = Field(default=1000, ge=1)
    """Truncate episodes after this many steps (rtgym ``ep_max_length``; gymnasium envs keep their own limit too)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop the worker after this many environment steps (default: run until interrupted)."""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    """Seeds the first env reset, the random warm-up policy and the exploration noise of the received actors (two
    workers with the same seed and weights take the same actions); ``None``: fresh randomness every run."""
    max_steps_per_second: float | None = Field(default=None, gt=0)
    """Cap the step rate of synchronous envs (``sim-fast``, ``gym:``), e.g. to leave CPU to a trainer on the same
    machine; ``None``: as fast as possible. Real-time envs are paced by rtgym."""

    # batching and delivery
    batch_steps: int = Field(default=100, ge=1, le=100_000)
    """Send a batch every this many steps (and at every episode end)."""
    compress: bool = True
    """zlib-compress sample arrays (newest frame per step only is always applied)."""
    verify_observations: bool = False
    """Verification mode: each row also carries an 8-byte digest of the full observation the env returned, and the
    trainer counts rebuilt observations that differ (``verification`` in its ``status.json``; must stay 0). Costs one
    BLAKE2b per step on the rollout thread and 8 bytes per row."""
    spool_max_batches: int = Field(default=1000, ge=1)
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Unacknowledged batches kept for resending; beyond either bound the oldest is dropped (counted, logged)."""
    durable_spool: bool = False
    """Also keep unacknowledged batches on disk (``state_dir/<worker_id>.spool/``, one file per batch, deleted on
    acknowledgement) and resend them after a restart: a crashed or SIGKILLed worker then loses only its partly built
    batch. One fsynced file write per batch, on the sender thread. Off: the spool lives in memory only."""
    ack_timeout_s: float = Field(default=10.0, gt=0, le=MAX_DURATION_S)
    """Resend a batch that has not been acknowledged after this long (doubling after each resend, up to 8x); every
    unacknowledged batch is also resent at once after a reconnection."""
    max_consecutive_refusals: int = Field(default=5, ge=1)
    """Stop the worker when this many batches in a row were refused for good, none stored in between: by the trainer
    (its ``rejected`` answer: another observation layout, rewards over its ``max_abs_reward``, values out of bounds,
    a worker outside its ``allowed_workers``...) or by the relay (``oversized``, ``malformed``). Such a worker's data
    can never be stored, so it logs one error naming the reasons and what to fix, delivers what it can
    (``flush_timeout_s``; what stays unacknowledged stays in the spool) and exits with status 1. Refusals as
    ``stale`` or ``duplicate`` (late resends of batches the trainer may have stored), and refusals of batches an
    earlier run made (a durable spool's), neither count nor reset the count."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=MAX_DURATION_S)
    flush_timeout_s: float = Field(default=10.0, ge=0, le=MAX_DURATION_S)
    """At shutdown, wait this long for the last batches to be acknowledged."""
    stop_grace_s: float = Field(default=15.0, gt=0, le=MAX_DURATION_S)
    """After a stop request (SIGTERM, Ctrl-C), how long ``tmrl-worker run`` lets the env's current reset or step take
    to return: an env that blocks without seeing the stop (a robot interface waiting on its hardware) would otherwise
    keep the worker from stopping. Past it, the worker delivers what it sent (``flush_timeout_s``) and exits with
    status 1, naming the call it was stuck in."""
    long_call_warning_s: float = Field(default=20.0, gt=0, le=MAX_DURATION_S)
    """A reset or step of the env that has not returned for this long is logged as a warning (again each time the
    wait doubles), and once it returns, how long it took: a blocking call stops the progress lines too."""
    state_dir: Path = Path("~/.local/state/tmrl/worker")
    """Holds ``<worker_id>.state.json`` (the sequence-number reservation that keeps ``seq`` unique across restarts),
    ``<worker_id>.progress.json`` (rewritten after every step; a restarted worker logs what a killed run lost) and,
    with ``durable_spool``, ``<worker_id>.spool/``."""

    # sockets
    transport: TransportConfig = Field(default_factory=TransportConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    """CurveZMQ: ``secret_key_file`` (this worker's pair, allow-listed at the relay) and ``server_public_key_file``;
    or ``insecure = true`` (``--insecure``) for plain text on a trusted loopback."""

    _paths_given = field_validator("policy_file", "state_dir", mode="before")(refuse_empty_path)

    @model_validator(mode="after")
    def _keep_best_needs_test_mode(self) -> WorkerConfig:
        if self.keep_best and self.mode != "test":
            raise ValueError(f"keep_best needs test mode (--test), not {self.mode!r}: only a test worker drives the "
                             "received weights deterministically, episode by episode")
        return self

    @model_validator(mode="after")
    def _policy_file_needs_expert_mode(self) -> WorkerConfig:
        if self.policy_file is not None and self.mode != "expert":  # it was ignored without a word (a config probe)
            raise ValueError(f"policy_file is driven in expert mode only (--expert --policy FILE), not {self.mode!r}: "
                             "a train or test worker acts with the trainer's weights; to score a policy file, run "
                             "`tmrl-worker eval --policy FILE`")
        return self

    @model_validator(mode="after")
    def _tm20_options_are_valid(self) -> WorkerConfig:
        """A TrackMania env's ``env_options`` are checked as the config is read (option names, the ``recovery``,
        ``stale_frames``, ``lidar``, ``reward_config`` and ``emulated_game`` tables, ``capture_backend`` and
        ``controller_kind``): unchecked, a typo would surface only when the env is built."""
        from tmrl_worker.envs import TM20_SPECS

        if self.env.strip() not in TM20_SPECS:
            return self
        from tmrl_worker.tm20.interfaces import check_options

        # a TM20ConfigError is a ValueError: one line
        check_options(self.env.strip(), self.env_options, time_step_duration=self.time_step_duration)
        return self

    @model_validator(mode="after")
    def _sim_options_are_valid(self) -> WorkerConfig:
        """The simulator's ``env_options`` (:class:`~tmrl_worker.sim.config.SimConfig` fields) are checked as the config
        is read, as TrackMania's are: unchecked, an unknown option, a bad value or ``episode_tracks`` that draws a
        held-out track passed ``--show-config`` and surfaced only when the env was built."""
        from tmrl_worker.envs import SIM_SPECS, one_line_message

        if self.env.strip() not in SIM_SPECS:
            return self
        from pydantic import ValidationError
        from tmrl_common.config import did_you_mean

        from tmrl_worker.sim.config import SimConfig

        for name in self.env_options:
            if name not in SimConfig.model_fields:
                raise ValueError(f"env_options.{name}: unknown option for env {self.env.strip()!r}"
                                 f"{did_you_mean(name, SimConfig.model_fields)}")
        options = dict(self.env_options)
        if self.env.strip() == "sim":  # the real-time simulator steps at the worker's time_step_duration
            given = options.setdefault("time_step_duration", self.time_step_duration)
            if "time_step_duration" in self.model_fields_set and given != self.time_step_duration:
                raise ValueError(f"time_step_duration = {self.time_step_duration!r} and env_options.time_step_duration "
                                 f"= {given!r} disagree: set the step once (time_step_duration)")
        try:
            SimConfig.model_validate(options)
        except ValidationError as exc:
            raise ValueError(f"env_options for env {self.env.strip()!r}: {one_line_message(exc)}") from None
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> WorkerConfig:
        if self.worker_port == self.weights_port:
            raise ValueError(f"worker_port and weights_port must differ (both {self.worker_port}): the relay binds a "
                             "different socket to each")
        return self

    @field_validator("relay_host")
    @classmethod
    def _host_given(cls, value: str) -> str:
        return check_host(value, "relay_host")

    @field_validator("worker_id")
    @classmethod
    def _id_fits_the_wire(cls, value: str) -> str:
        if not SENDER_PATTERN.fullmatch(value):
            raise ValueError(f"worker_id {value!r} must match {SENDER_PATTERN.pattern}")
        if value in RESERVED_WORKER_IDS:
            raise ValueError(f"worker_id {value!r} is reserved (the relay's messages and the trainer's default id use "
                             f"{' and '.join(sorted(RESERVED_WORKER_IDS))}): name the worker, e.g. worker-1")
        return value
