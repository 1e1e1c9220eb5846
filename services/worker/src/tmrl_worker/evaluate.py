"""``tmrl-worker eval``: run a saved policy deterministically for a few episodes, no relay and no trainer.

What it runs:

* ``sim`` (any ``track``, ``random:SEED`` included) is evaluated on the simulator's **synchronous** mode
  (``sim-fast``: same observations, actions and one-step action delay as the real-time mode, see
  :mod:`tmrl_worker.sim.env`), so an episode takes milliseconds of CPU instead of its simulated duration;
* ``gym:<id>`` envs are synchronous anyway;
* ``module:Class`` interfaces (and ``tm20-*``) run through rtgym in **real time**: each step lasts
  ``time_step_duration`` of wall-clock time, as in training, because the interface's machine runs against the clock.

Episode ``i`` is reset with seed ``seed + i``. The GIF shows the best episode (highest return): it is driven a second
time with the same seed while frames are drawn, which reproduces it exactly on synchronous envs (the replayed return
is checked against the first run). The GIF's path is checked before the env is built (a name ending in ``.gif``, its
folder created, a file creatable there), so a bad path fails before the episodes, not after them.

``max_episode_steps`` truncates ``sim`` and ``module:Class`` episodes; a ``gym:<id>`` env keeps its own time limit
(``env_options = {max_episode_steps = N}`` is given to ``gymnasium.make`` and changes it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tmrl_common.atomic_file import OutputPathError, prepare_output_file
from tmrl_common.config import MAX_DURATION_S

from tmrl_worker.envs import EnvHandle, EnvSpecError, finished_flag, make_env
from tmrl_worker.runtime import Policy, load_evaluated_policy

GIF_MAX_FRAMES = 200
"""A GIF keeps at most this many frames (every k-th step of the episode)."""

MAX_EPISODES = 10_000
"""The most episodes one evaluation runs."""


class GifPathError(ValueError):
    """The GIF cannot be written where asked: a name not ending in ``.gif``, a folder that cannot be created or
    written, or a write that failed after the episodes."""


class EvalConfig(BaseModel):
    """What to evaluate and on which env (the ``[worker]`` table gives the env defaults, the command line the rest)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    policy: Path
    """A safetensors policy file (``policy.safetensors`` of a trainer run, or :func:`save_policy_file`), or an ONNX
    export of one (``tmrl-trainer export --onnx``, run by onnxruntime; the name must end in ``.onnx``)."""
    env: str = "sim"
    track: str | None = None
    """``sim`` only: the track (``oval``, ``hairpins``, ``circuit``, ``random:SEED``, ``random-open:SEED``,
    ``file:PATH``)."""
    episodes: int = Field(default=5, ge=1, le=MAX_EPISODES)
    seed: int = Field(default=0, ge=0)
    """Episode ``i`` is reset with seed ``seed + i`` (gymnasium takes no negative seed)."""
    time_step_duration: float = Field(default=0.05, gt=0, le=MAX_DURATION_S)
    max_episode_steps: int = Field(default=1000, ge=1)
    """Truncates ``sim`` and ``module:Class`` episodes; a ``gym:<id>`` env keeps its own time limit."""
    env_options: dict[str, Any] = Field(default_factory=dict)
    gif: Path | None = None
    """Where to write the GIF of the best episode; the name must end in ``.gif`` (see :func:`prepare_gif_path`)."""


class EpisodeResult(BaseModel):
    """One deterministic episode."""

    episode: int
    seed: int
    episode_return: float = Field(serialization_alias="return")
    steps: int
    ended: str
    """``terminated`` (a terminal state: finish line, crash, off the rail...) or ``truncated`` (time limit)."""
    finished: bool | None
    """Whether the env says the task was completed (the simulator's finish line: ``info["finished"]``);
    ``None`` when the env does not report it."""
    seconds: float | None
    """``steps`` at the env's step rate; ``None`` when the env gives no step duration."""
    lap_time_s: float | None
    """``seconds`` of a finished episode, else ``None``."""
    wall_contacts: int | None
    """Physics ticks spent touching a wall (the simulator's ``info["wall_hits"]``, 5 ticks per 20 Hz step: 1,000 in a
    1,000-step episode is a quarter of its time on a wall); ``None`` when not reported."""
    progress: float | None = None
    """The fraction of the lap covered (the simulator's ``info["progress"]``): the figure to compare across tracks,
    whose returns differ (2 per metre of centre line, plus 100 at the finish: a lap of ``hairpins`` returns 1030, one
    of ``random:3`` 1366); ``None`` when not reported."""
    track: str | None = None
    """The simulator's track of this episode (``episode_tracks`` draws one per episode); ``None`` for other envs."""


class EvalSummary(BaseModel):
    """All episodes, their mean and spread, and where the GIF went: the ``--json`` document."""

    policy: str
    policy_version: int
    env: str
    evaluated_as: str
    """The env spec actually run (``sim`` is evaluated as ``sim-fast``)."""
    track: str | None
    """The simulator's track, when every episode ran on it (``None`` for other envs, and when ``episode_tracks`` drew
    several: each episode names its own)."""
    realtime: bool
    step_seconds: float | None
    seed: int
    episodes: list[EpisodeResult]
    mean_return: float
    std_return: float
    """Population standard deviation of the returns (0 for one episode)."""
    min_return: float
    max_return: float
    finished: int | None
    """Episodes finished (``None`` when the env does not report it)."""
    mean_lap_time_s: float | None
    best_episode: int
    """Highest return (the fewest steps among equal returns): the episode the GIF shows."""
    gif: str | None = None
    gif_error: str | None = None
    """Why the GIF asked for was not written although every episode ran (:class:`GifReplayError`)."""

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1)


def evaluated_spec(config: EvalConfig) -> tuple[str, dict[str, Any]]:
    """The env spec and options to build: ``sim`` becomes the synchronous ``sim-fast`` with the same time step and
    track; ``track`` on any other env is an :class:`EnvSpecError`."""
    options = dict(config.env_options)
    spec = config.env.strip()
    if spec in ("sim", "sim-fast"):
        options.setdefault("time_step_duration", config.time_step_duration)
        if config.track is not None:
            options["track"] = config.track
            # the track asked for, not a training config's pool of tracks drawn at each reset (which ran the
            # episodes on random training tracks while the summary named the last of them)
            options.pop("episode_tracks", None)
        return "sim-fast", options
    if config.track is not None:
        raise EnvSpecError(f"--track applies to the simulator (sim) only, not to env {spec!r}")
    return spec, options


def run_episode(env: EnvHandle, policy: Policy, seed: int, on_frame: Callable[[], None] | None = None
                ) -> tuple[float, int, bool, dict]:
    """Drive one episode from ``env.reset(seed)``; return ``(return, steps, terminated, last info)``.
    ``on_frame`` is called after the reset and after every step (to draw frames)."""
    observation = env.reset(seed=seed)
    if on_frame is not None:
        on_frame()
    total, steps, info = 0.0, 0, {}
    while True:
        observation, reward, terminated, truncated, info = env.step(policy.act(observation))
        total += reward
        steps += 1
        if on_frame is not None:
            on_frame()
        if terminated or truncated:
            return total, steps, terminated, info


def episode_result(index: int, seed: int, outcome: tuple[float, int, bool, dict], step_seconds: float | None,
                   track: str | None = None) -> EpisodeResult:
    """The :class:`EpisodeResult` of ``run_episode``'s ``outcome`` at ``step_seconds`` per step, on ``track``."""
    total, steps, terminated, info = outcome
    finished = finished_flag(info)
    seconds = steps * step_seconds if step_seconds else None
    wall, progress = info.get("wall_hits"), info.get("progress")
    return EpisodeResult(episode=index, seed=seed, episode_return=total, steps=steps,
                         ended="terminated" if terminated else "truncated", finished=finished, seconds=seconds,
                         lap_time_s=seconds if finished else None,
                         wall_contacts=int(wall) if isinstance(wall, (int, np.integer)) else None,
                         progress=float(progress) if isinstance(progress, (int, float, np.number))
                         and not isinstance(progress, bool) and math.isfinite(progress) else None,
                         track=track)


def summarise(config: EvalConfig, spec: str, env: EnvHandle, policy: Policy,
              results: list[EpisodeResult]) -> EvalSummary:
    returns = [r.episode_return for r in results]
    finished = [r for r in results if r.finished]
    reported = any(r.finished is not None for r in results)
    best = max(results, key=lambda r: (r.episode_return, -r.steps))  # equal returns: the quicker episode
    return EvalSummary(
        policy=str(config.policy), policy_version=policy.version, env=config.env, evaluated_as=spec,
        track=tracks.pop() if len(tracks := {r.track for r in results}) == 1 else None, realtime=env.realtime,
        step_seconds=env.step_seconds, seed=config.seed, episodes=results, mean_return=statistics.fmean(returns),
        std_return=statistics.pstdev(returns), min_return=min(returns), max_return=max(returns),
        finished=len(finished) if reported else None,
        mean_lap_time_s=statistics.fmean(r.lap_time_s for r in finished) if finished else None,
        best_episode=best.episode)


def render_frame(env: EnvHandle) -> np.ndarray:
    """One RGB frame of ``env`` (built with ``render_mode="rgb_array"``); :class:`EnvSpecError` when it draws none."""
    import gymnasium

    try:
        frame = env.env.render()
    except gymnasium.error.DependencyNotInstalled as exc:
        raise EnvSpecError(f"env {env.spec!r} cannot draw frames for --gif: {exc}") from exc
    if frame is None:
        raise EnvSpecError(f"env {env.spec!r} returned no frame from render(); it cannot make a GIF")
    return np.asarray(frame, dtype=np.uint8)


def prepare_gif_path(path: Path) -> Path:
    """Check, before any episode runs, that the GIF can be written at ``path``: the name ends in ``.gif`` (the file is
    GIF data whatever its name), its folder exists or is created (as ``tmrl-trainer export`` creates its outputs'), and
    a file can be created there (:func:`~tmrl_common.atomic_file.prepare_output_file`). Raises :class:`GifPathError`."""
    try:
        return prepare_output_file(path, "--gif", ".gif")
    except OutputPathError as exc:
        raise GifPathError(str(exc)) from exc


class GifReplayError(RuntimeError):
    """The best episode, driven again from its seed to draw the GIF, did not repeat: the env is not reproducible from
    its seed, so no GIF is written (it would show another episode than the one reported)."""


def record_gif(env: EnvHandle, policy: Policy, best: EpisodeResult, path: Path) -> Path:
    """Drive ``best`` again (same seed) while drawing frames; write every k-th frame (at most
    :data:`GIF_MAX_FRAMES`) as a looping GIF at the env's pace. A failed write is a :class:`GifPathError`; a replay
    that differs from ``best`` is a :class:`GifReplayError`."""
    from tmrl_worker.sim.render import write_gif

    frames: list[np.ndarray] = []
    every = max(1, math.ceil((best.steps + 1) / GIF_MAX_FRAMES))
    counter = {"n": 0}

    def draw() -> None:
        if counter["n"] % every == 0:
            frames.append(render_frame(env))
        counter["n"] += 1

    total, steps, _, _ = run_episode(env, policy, best.seed, on_frame=draw)
    if steps != best.steps or not math.isclose(total, best.episode_return, rel_tol=1e-6, abs_tol=1e-6):
        raise GifReplayError(f"replaying episode {best.episode} (seed {best.seed}) for the GIF gave return {total:.3f} "
                           f"in {steps} steps instead of {best.episode_return:.3f} in {best.steps}: "
                           f"env {env.spec!r} is not reproducible from its seed")
    fps = 1.0 / (env.step_seconds * every) if env.step_seconds else 20.0
    try:
        return write_gif(frames, path, fps=fps)
    except OSError as exc:
        raise GifPathError(f"--gif {str(path)!r}: writing the GIF failed after the episodes: "
                           f"{exc.strerror or exc}") from exc


def evaluate(config: EvalConfig, on_episode: Callable[[EpisodeResult], None] | None = None) -> EvalSummary:
    """Run ``config.episodes`` deterministic episodes of ``config.policy`` on ``config.env``.

    Raises :class:`~tmrl_worker.envs.EnvSpecError` (env cannot be built or cannot render),
    :class:`~tmrl_worker.runtime.PolicyFileError` (unreadable policy, or one whose layout is not the env's) and
    :class:`GifPathError` (the GIF cannot be written: checked before the env is built, and at the end)."""
    if config.gif is not None:
        prepare_gif_path(config.gif)
    spec, options = evaluated_spec(config)
    env = make_env(spec, time_step_duration=config.time_step_duration, max_episode_steps=config.max_episode_steps,
                   options=options, render_mode="rgb_array" if config.gif is not None else None)
    try:
        policy = load_evaluated_policy(config.policy, env.layout)
        if config.gif is not None:  # fail before the episodes, not after them
            env.reset(seed=config.seed)
            render_frame(env)
        results = []
        for index in range(config.episodes):
            seed = config.seed + index
            outcome = run_episode(env, policy, seed)
            track = env.env.unwrapped.track.name if spec == "sim-fast" else None  # the episode's, after its reset
            results.append(episode_result(index, seed, outcome, env.step_seconds, track))
            if on_episode is not None:
                on_episode(results[-1])
        summary = summarise(config, spec, env, policy, results)
        if config.gif is not None:
            best = results[summary.best_episode]
            try:
                summary.gif = str(record_gif(env, policy, best, config.gif))
            except GifReplayError as exc:  # the episodes' results stand; only the GIF cannot show them
                summary.gif_error = str(exc)
        return summary
    finally:
        env.close()
        _stop_interface(env)


def _stop_interface(env: EnvHandle) -> None:
    """Call an rtgym interface's own ``close()`` when it has one (the worker never does: it runs until killed, but
    an evaluation ends, and a robot interface's threads should end with it)."""
    close = getattr(getattr(env.env.unwrapped, "interface", None), "close", None)
    if callable(close):
        close()


def episode_line(result: EpisodeResult) -> str:
    """One human-readable line per episode (naming its track on the simulator: a pool draws one per episode)."""
    outcome = {True: "finished", False: "not finished", None: result.ended}[result.finished]
    track = f", {result.track}" if result.track is not None else ""
    line = f"episode {result.episode} (seed {result.seed}{track}): return {result.episode_return:9.2f}, " \
           f"{outcome:12s} {result.steps:5d} steps"
    if result.progress is not None and not result.finished:
        line += f" ({100 * result.progress:.1f} % of the lap)"
    if result.lap_time_s is not None:
        line += f", lap {result.lap_time_s:.2f} s"
    elif result.seconds is not None:
        line += f", {result.seconds:.2f} s"
    if result.wall_contacts is not None:
        line += f", {result.wall_contacts} wall-contact ticks"
    return line


def summary_line(summary: EvalSummary) -> str:
    """The mean and spread of the returns (plus finishes and mean lap time when the env reports them)."""
    n = len(summary.episodes)
    line = (f"{n} episodes: mean return {summary.mean_return:.2f} ± {summary.std_return:.2f} "
            f"(min {summary.min_return:.2f}, max {summary.max_return:.2f}); best: episode {summary.best_episode}")
    if summary.finished is not None:
        line += f"; finished {summary.finished}/{n}"
    if summary.mean_lap_time_s is not None:
        line += f", mean lap {summary.mean_lap_time_s:.2f} s"
    return line
