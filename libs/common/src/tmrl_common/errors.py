"""Exceptions raised when a frame or a message cannot be accepted.

Every rejection carries a short machine-readable ``reason`` so services can count rejects per cause
(``tmrl_relay_rejects_total{reason="oversized"}``) and a human-readable message that says what was wrong.
"""

from __future__ import annotations

from typing import Literal

RejectReason = Literal[
    "oversized",  # a frame or a decoded array is larger than the configured limit
    "malformed",  # not valid msgpack, wrong frame count, truncated data
    "bad_version",  # protocol version this build does not speak
    "unknown_type",  # message type name not in the protocol
    "schema",  # valid msgpack but fields missing, of the wrong type or out of range
    "non_finite",  # NaN or infinity in a float array or float field
    "unknown_sender",  # sender not registered / not in the allow-list
    "duplicate",  # a batch (sender, seq) already accepted
    "stale",  # a batch seq below the trainer's horizon for that worker: too old to tell whether it was stored
    "observation_out_of_bounds",  # an observation value outside its layout component's declared bounds
    "action_out_of_bounds",  # an action outside the policy's action space [-1, 1]
    "reward_out_of_bounds",  # a reward whose magnitude exceeds the trainer's configured bound
]


class ProtocolError(ValueError):
    """A frame or message was rejected. ``reason`` is one of :data:`RejectReason`."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"[{reason}] {message}")
        self.reason: RejectReason = reason
        self.detail = message


class NonFiniteValue(ValueError):
    """A model validator's refusal of a NaN or an infinity (a layout bound): a decoded message holding one is rejected
    as ``non_finite``, as for a field pydantic checks itself; elsewhere an ordinary ``ValueError``."""


class ConfigError(ValueError):
    """A configuration file or environment override could not be applied."""
