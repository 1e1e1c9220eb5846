"""Simulator configuration: the track, the car, the sensors, the reward and the clock (pydantic, TOML-friendly)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tmrl_common.config import MAX_DURATION_S

from tmrl_worker.reward import TrajectoryRewardConfig
from tmrl_worker.sim.track import check_track_name

ObservationKind = Literal["lidar", "lidar_progress", "image"]

SIM_REWARD = TrajectoryRewardConfig(search_window=60, patience=20, grace_steps=40, no_progress_steps=40,
                                    finish_bonus=100.0)
"""The simulator's reward settings (a 30 m search window, 2 s of grace, 2 s without progress end an episode);
fields a config leaves out keep these values."""


class CarParams(BaseModel):
    """A light rear-wheel-drive car with grippy tyres. SI units (m, s, rad)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    engine_accel: float = Field(default=12.0, gt=0)
    """Acceleration at full throttle from standstill; it falls linearly to 0 at ``top_speed``."""
    top_speed: float = Field(default=45.0, gt=0)
    brake_decel: float = Field(default=18.0, gt=0)
    coast_decel: float = Field(default=1.0, ge=0)
    """Rolling resistance and drag when neither pedal is pressed."""
    reverse_accel: float = Field(default=5.0, ge=0)
    reverse_speed: float = Field(default=8.0, ge=0)
    """Braking at a standstill reverses, up to this speed."""
    wheelbase: float = Field(default=2.7, gt=0)
    max_steer_deg: float = Field(default=32.0, gt=0, lt=80)
    grip: float = Field(default=14.0, gt=0)
    """Largest lateral acceleration the tyres hold (m/s²); asking for more makes the car understeer."""
    scrub_decel: float = Field(default=0.25, ge=0)
    """Speed lost per m/s² of lateral acceleration asked beyond ``grip`` (sliding tyres)."""
    crash_speed: float = Field(default=5.0, ge=0)
    """A hit with more than this speed (m/s) across the wall is a crash: the engine stalls for ``crash_stall`` s."""
    crash_stall: float = Field(default=1.2, ge=0)
    half_width: float = Field(default=1.0, gt=0)
    wall_friction: float = Field(default=2.5, ge=0)
    """On touching a wall the speed across it is lost and, on top, ``wall_friction`` times that much of the speed
    along it: a 30° hit at 30 m/s leaves 30·cos30° − 30·sin30° ≈ 11 m/s, scraping along a wall costs a little per tick."""


class SimConfig(BaseModel):
    """Everything that defines a simulated race-track environment."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    track: str = "hairpins"
    """A built-in track (``oval``, ``hairpins``, ``circuit``), ``random:SEED`` or ``random-open:SEED`` (SEED in the
    digits 0-9), or ``file:PATH``, a track of your own (:class:`~tmrl_worker.sim.track.TrackFile`); another name, or a
    file that holds no usable track, is refused when the config is read. (:class:`~tmrl_worker.sim.env.RaceTrackEnv` given a
    :class:`~tmrl_worker.sim.track.Track` object records that track's own name here.)"""
    episode_tracks: str | None = None
    """A new track at every reset, drawn with the env's seeded generator from a comma list of tracks and seed ranges
    (``random:1000-100000``: a procedural track with a seed from 1000 to 99999; ``hairpins,circuit``), see
    :mod:`tmrl_worker.sim.track_pool`. Never one of the held-out evaluation tracks ``random:0`` to ``random:19``.
    None: always ``track``."""
    observation: ObservationKind = "lidar"
    img_hist_len: int = Field(default=4, ge=1, le=16)
    lidar_beams: int = Field(default=19, ge=2, le=181)
    lidar_range: float = Field(default=80.0, gt=0)
    """LIDAR distances are in metres, capped at this range (TrackMania's LIDAR counts pixels instead)."""
    image_size: int = Field(default=64, ge=16, le=256)
    image_metres_per_pixel: float = Field(default=0.75, gt=0)
    physics_hz: float = Field(default=100.0, gt=0, le=2000)
    time_step_duration: float = Field(default=0.05, gt=0, le=MAX_DURATION_S)
    """Seconds of simulated time per environment step (20 Hz like tmrl's TrackMania setup)."""
    max_episode_steps: int = Field(default=1000, ge=1)
    act_buf_len: int = Field(default=2, ge=0, le=16)
    reward_spacing: float = Field(default=0.5, gt=0)
    """Spacing of the reward points resampled from the demonstration (metres)."""
    demo_path: str | None = None
    """Reward demonstration: a points file (safetensors from ``tmrl-worker sim record-demo`` or a plain ``.npy``
    of 2-D positions) driven on this track. None: the track's centre line, start to finish."""
    reward: TrajectoryRewardConfig = SIM_REWARD
    """The simulator's reward settings. A table that sets some fields (``reward = { step_penalty = 0.5 }``) keeps
    the others at the simulator's values (:data:`SIM_REWARD`), not at TrackMania's defaults."""
    start_jitter: float = Field(default=0.5, ge=0)
    """Random lateral offset (metres, uniform ±) of the start position; the heading also varies by ±3° × this."""
    car: CarParams = CarParams()

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_over_sim_defaults(cls, value: object) -> object:
        if isinstance(value, dict):
            return {**SIM_REWARD.model_dump(), **value}
        return value

    @field_validator("track")
    @classmethod
    def _track_name_known(cls, value: str) -> str:
        return check_track_name(value)  # a TrackError is a ValueError: pydantic reports it with the field's name

    @field_validator("episode_tracks")
    @classmethod
    def _episode_tracks_parse(cls, value: str | None) -> str | None:
        if value is not None:
            from tmrl_worker.sim.track_pool import parse_episode_tracks

            parse_episode_tracks(value)  # a TrackError is a ValueError: pydantic reports it with the field's name
        return value

    @model_validator(mode="after")
    def _physics_divides_step(self) -> SimConfig:
        ticks = self.time_step_duration * self.physics_hz
        if abs(ticks - round(ticks)) > 1e-6 or round(ticks) < 1:
            raise ValueError(f"time_step_duration ({self.time_step_duration} s) must be a whole number of physics ticks "
                             f"at physics_hz={self.physics_hz}")
        return self

    @property
    def ticks_per_step(self) -> int:
        return round(self.time_step_duration * self.physics_hz)

    @property
    def tick_seconds(self) -> float:
        return 1.0 / self.physics_hz
