"""Worker configuration (table ``[worker]`` of the TOML config; env ``TMRL_WORKER__<FIELD>``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WorkerConfig(BaseModel):
    """Which environment to run and where the relay is."""

    model_config = ConfigDict(extra="forbid")

    worker_id: str = "worker-1"
    relay_host: str = "127.0.0.1"
    worker_port: int = Field(default=5555, ge=1, le=65535)
    weights_port: int = Field(default=5557, ge=1, le=65535)
    env: str = "sim"
    """``sim`` (built-in race track), ``tm20-lidar``, ``tm20-lidar-progress``, ``tm20-full``, or ``module:Class``."""
