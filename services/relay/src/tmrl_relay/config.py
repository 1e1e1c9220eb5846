"""Relay configuration (table ``[relay]`` of the TOML config; env ``TMRL_RELAY__<FIELD>``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RelayConfig(BaseModel):
    """Where the relay listens and how much it holds."""

    model_config = ConfigDict(extra="forbid")

    bind_host: str = "127.0.0.1"
    worker_port: int = Field(default=5555, ge=1, le=65535)
    """Workers connect here: samples in, acks out."""
    trainer_port: int = Field(default=5556, ge=1, le=65535)
    """The trainer connects here: samples out, acks and weights in."""
    weights_port: int = Field(default=5557, ge=1, le=65535)
    """Workers subscribe here for weights (pub/sub; late joiners get the latest)."""
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    """Prometheus metrics over HTTP; 0 disables."""
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
