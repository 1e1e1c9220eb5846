"""Trainer configuration (table ``[trainer]`` of the TOML config; env ``TMRL_TRAINER__<FIELD>``)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tmrl_common.config import MAX_DURATION_S, MAX_SEED, refuse_empty_path
from tmrl_common.protocol import RESERVED_WORKER_IDS, SENDER_PATTERN
from tmrl_common.sockets import SecurityConfig, TransportConfig, check_host

from tmrl_trainer.ingest import DEFAULT_MAX_WORKERS
from tmrl_trainer.sac import SACConfig, check_batch_fits_the_memory

MAX_TORCH_THREADS = 1024
"""More is a typo: a probe's 1,000,000,000 had libgomp ask for 216 GB, 100,000,000 crashed train-local."""

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else a ValueError naming them (checked before torch sees it)."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N (N: the GPU's index)")
    return value


class TrainerConfig(BaseModel):
    """Where the relay is and how to train."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite rate, bound or interval is a typo

    trainer_id: str = "trainer"
    relay_host: str = "127.0.0.1"
    trainer_port: int = Field(default=5556, ge=1, le=65535)
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``."""
    torch_threads: int | None = Field(default=None, ge=1, le=MAX_TORCH_THREADS)
    """Intra-op threads for torch; ``None``: half the CPU cores (at least 1, at most 8), leaving the rest to the
    ingest thread and to workers on the same machine (oversubscribed cores make small SAC updates many times slower)."""

    # what is learned
    env: str = "sim"
    """The workers' env, which fixes the observation layout batches must follow: ``sim``/``sim-fast``/``tm20-lidar``
    (TrackMania LIDAR layout), ``tm20-lidar-progress``, ``tm20-full``, ``gym:<id>`` (layout from the gymnasium env's
    spaces). For ``module:Class`` envs set ``layout_file``."""
    layout_file: Path | None = None
    """A JSON :class:`~tmrl_common.layout.ObservationLayout`; overrides ``env`` (with a warning at start when ``env``
    names a layout of its own that differs: its workers must then be set to send the file's)."""
    sac: SACConfig = Field(default_factory=SACConfig)
    """Learner hyperparameters; ``sac.learning_starts`` is the warm-up (rows stored before the first update) and
    ``sac.utd`` the maximum number of updates per sample received."""
    memory_capacity: int = Field(default=1_000_000, ge=2)
    save_memory: bool = False
    """Save the replay memory and the ingest dedupe state with every checkpoint (``<checkpoint>.memory.safetensors``,
    about the size of the stored rows, three kept) and restore them on restart: no second warm-up, and batches resent
    after the restart that were already stored are recognised as duplicates. Off: a restarted trainer starts with an
    empty memory and refills it from the workers."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    # service loop
    publish_every: int = Field(default=100, ge=1)
    """Publish the actor's weights every this many updates (the weights version increments each time)."""
    checkpoint_every: int = Field(default=5000, ge=1)
    """Save a checkpoint every this many updates (and when the trainer stops)."""
    run_dir: Path = Path("runs/trainer")
    """Holds ``status.json``, ``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/``; the trainer resumes from the
    latest checkpoint found there."""
    max_abs_reward: float = Field(default=1e4, gt=0)
    """A batch holding a reward of larger magnitude is refused at ingest (``reward_out_of_bounds``): finite but
    absurd values (3e38) would otherwise overflow the learner's losses."""
    max_abs_observation: float = Field(default=1e6, gt=0)
    """Bound on the observation values of layout components that declare no ``low``/``high`` of their own (refused
    as ``observation_out_of_bounds``); components that declare bounds are held to those."""
    allowed_workers: list[str] = Field(default_factory=list)
    """Worker ids whose batches are accepted (empty: any worker the relay lets through)."""
    max_workers: int = Field(default=DEFAULT_MAX_WORKERS, ge=1, le=1_000_000)
    """Worker ids this trainer keeps state for (counters, dedupe window, episode, how each batch ended). A new id
    beyond them is not answered (its batches stay in its spool and are resent) and is counted in ``status.json``
    (``over_max_workers``): in ``--insecure`` mode any client can invent ids, and each would cost state for the run."""
    status_interval_s: float = Field(default=1.0, ge=0.01, le=MAX_DURATION_S)
    train_record_every_s: float = Field(default=1.0, ge=0, le=MAX_DURATION_S)
    """At most one learner record (a ``train`` line of ``metrics.jsonl`` and its TensorBoard points) per this many
    seconds; 0: one at every weights publication: at 1,000 updates/s and publish_every 100, about 400 MB of records a day.
    Episode records are never thinned."""
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=MAX_DURATION_S)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    """CurveZMQ: ``secret_key_file`` (the trainer's pair, allow-listed at the relay) and ``server_public_key_file``;
    or ``insecure = true`` (``--insecure``) for plain text on a trusted loopback."""

    _paths_given = field_validator("layout_file", "run_dir", mode="before")(refuse_empty_path)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @model_validator(mode="after")
    def _batches_fit_the_memory(self) -> TrainerConfig:
        check_batch_fits_the_memory(self.sac, self.memory_capacity)
        return self

    @field_validator("trainer_id")
    @classmethod
    def _id_fits_the_wire(cls, value: str) -> str:
        if not SENDER_PATTERN.fullmatch(value):
            raise ValueError(f"trainer_id {value!r} must match {SENDER_PATTERN.pattern}")
        if value == "relay":
            raise ValueError("trainer_id 'relay' is reserved: the relay's own messages carry it")
        return value

    @field_validator("allowed_workers")
    @classmethod
    def _worker_ids_fit_the_wire(cls, value: list[str]) -> list[str]:
        unusable = [worker for worker in value if not SENDER_PATTERN.fullmatch(worker)]
        if unusable:  # no worker can say hello under such an id, so the entry could only be a typo
            raise ValueError(f"allowed_workers {unusable} can never match a worker: ids must match {SENDER_PATTERN.pattern}")
        reserved = sorted(RESERVED_WORKER_IDS.intersection(value))
        if reserved:
            raise ValueError(f"allowed_workers {reserved} can never match a worker: those ids are reserved")
        return value

    @field_validator("relay_host")
    @classmethod
    def _host_given(cls, value: str) -> str:
        return check_host(value, "relay_host")
