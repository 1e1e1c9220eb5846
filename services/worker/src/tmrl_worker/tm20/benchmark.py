"""``tmrl-worker benchmark``: run a TrackMania env and report rtgym's timing statistics.

rtgym measures, with a running average (``benchmark_polyak``) and average deviation, the time-step duration, the
time ``step()`` blocks, the inference time (between two ``step()`` calls), ``send_control`` and observation capture.
Each figure is printed beside the nominal time step measured in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium
import numpy as np

if TYPE_CHECKING:
    from rich.console import Console

Policy = Callable[[tuple], np.ndarray]


def full_gas(observation: tuple) -> np.ndarray:
    """Default benchmark policy: full gas, straight."""
    return np.array([1.0, 0.0, 0.0], dtype=np.float32)


def run_benchmark(env: gymnasium.Env, steps: int = 200, policy: Policy = full_gas) -> dict[str, Any]:
    """Run ``steps`` time steps (resetting at episode ends) and return ``env.unwrapped.benchmarks()`` plus counts.

    The env must have been built with ``benchmark=True``.
    """
    observation, _ = env.reset()
    episodes, done_steps = 1, 0
    while done_steps < steps:
        observation, _, terminated, truncated, _ = env.step(policy(observation))
        done_steps += 1
        if terminated or truncated:
            observation, _ = env.reset()
            episodes += 1
    env.unwrapped.wait()
    return {"statistics": env.unwrapped.benchmarks(), "steps": done_steps, "episodes": episodes}


def benchmark_rows(statistics: dict[str, tuple[float | None, float]], nominal_step: float) -> list[tuple[str, str, str, str]]:
    """``(name, mean ms, average deviation ms, mean / nominal step)`` per statistic."""
    rows = []
    for name, (mean, deviation) in statistics.items():
        if mean is None:
            rows.append((name, "-", "-", "-"))
            continue
        rows.append((name, f"{1000 * mean:.2f}", f"{1000 * deviation:.2f}", f"{mean / nominal_step:.3f}"))
    return rows


def benchmark_tool(*, variant: str, steps: int, telemetry_port: int, reward_path: Path | None = None,
                   controller_kind: str = "auto", capture_backend: str = "auto", window_title: str = "Trackmania",
                   synthetic: bool = False, time_step_duration: float = 0.05, console: Console | None = None) -> int:
    """``tmrl-worker benchmark``: run ``steps`` steps of a TrackMania env and print rtgym's timings; exit code."""
    from contextlib import ExitStack

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tmrl_worker.envs import EnvFailure
    from tmrl_worker.tm20.capture import CaptureError
    from tmrl_worker.tm20.control import ControlError, GamepadUnavailableError
    from tmrl_worker.tm20.interfaces import TM20ConfigError, make_tm20_env
    from tmrl_worker.tm20.openplanet import TelemetryTimeoutError
    from tmrl_worker.tm20.synthetic import SyntheticSession
    from tmrl_worker.tm20.window import WindowNotFoundError
    from tmrl_worker.tm20.windows_only import WindowsOnlyError

    console = console or Console()
    with ExitStack() as stack:
        try:
            if synthetic:
                session = stack.enter_context(SyntheticSession())
                kwargs: dict[str, Any] = session.devices()
                if reward_path is not None:
                    kwargs.pop("reward")
                    kwargs["reward_path"] = reward_path
            else:
                kwargs = {"reward_path": reward_path, "telemetry_port": telemetry_port, "controller_kind": controller_kind,
                          "capture_backend": capture_backend, "window_title": window_title}
            env = make_tm20_env(variant, benchmark=True, time_step_duration=time_step_duration, **kwargs)
            stack.callback(env.unwrapped.interface.close)
            result = run_benchmark(env, steps)
        except (TM20ConfigError, TelemetryTimeoutError, CaptureError, WindowNotFoundError, WindowsOnlyError, ControlError,
                GamepadUnavailableError, EnvFailure) as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            return 2
    table = Table(title=f"rtgym timings, {variant}{' (synthetic session)' if synthetic else ''}: "
                        f"{result['steps']} steps, {result['episodes']} episode(s), nominal step {1000 * time_step_duration:.0f} ms")
    for column in ("statistic", "mean (ms)", "avg deviation (ms)", "mean / nominal step"):
        table.add_column(column, justify="right" if column != "statistic" else "left")
    for row in benchmark_rows(result["statistics"], time_step_duration):
        table.add_row(*row)
    console.print(table)
    return 0
