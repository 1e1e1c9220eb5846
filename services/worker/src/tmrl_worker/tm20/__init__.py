"""TrackMania 2020: screen capture, LIDAR, OpenPlanet telemetry, gamepad/keyboard control, rtgym interfaces, tools.

Nothing here imports a Windows-only package at import time (see :mod:`tmrl_worker.tm20.windows_only`).

Build an environment::

    from tmrl_worker.tm20.interfaces import make_tm20_env
    env = make_tm20_env("lidar", reward_path="reward.safetensors", telemetry_port=9000)
"""
