"""Bring your own robot: a simulated cart on a rail, driven in real time through an rtgym interface.

See ``docs/byo-robot.md`` for the tutorial that trains it through relay, trainer and workers.
"""
