"""Trainer configuration (table ``[trainer]`` of the TOML config; env ``TMRL_TRAINER__<FIELD>``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainerConfig(BaseModel):
    """Where the relay is and how to train."""

    model_config = ConfigDict(extra="forbid")

    trainer_id: str = "trainer"
    relay_host: str = "127.0.0.1"
    trainer_port: int = Field(default=5556, ge=1, le=65535)
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``."""
