"""Pictures of the race track: a PNG of the track with a driven trajectory (matplotlib, Agg backend) and
RGB frames / GIFs of an episode (pillow)."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tmrl_common.atomic_file import write_atomically

from tmrl_worker.sim.car import CarPose
from tmrl_worker.sim.track import Track

BACKGROUND = (34, 85, 34)
ROAD = (90, 90, 90)
WALL = (235, 235, 235)
TRAIL = (255, 200, 0)
CAR = (220, 30, 30)


def render_track_png(track: Track, path: str | Path, trajectory: np.ndarray | Sequence | None = None,
                     title: str | None = None, speeds: np.ndarray | Sequence | None = None) -> Path:
    """Save a PNG of ``track`` with an optional driven ``trajectory`` (``(N, 2)`` positions), coloured by ``speeds``."""
    path = Path(path)
    track_figure(track, trajectory, title, speeds).savefig(path, format="png")
    return path


def track_figure(track: Track, trajectory: np.ndarray | Sequence | None = None, title: str | None = None,
                 speeds: np.ndarray | Sequence | None = None):
    """The matplotlib ``Figure`` :func:`render_track_png` saves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    left, right = track.walls()
    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")  # the title and colour bar fit the canvas
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if track.closed:  # a circuit: grey inside the outer wall, white inside the inner one
        outer, inner = (left, right) if _area(left) > _area(right) else (right, left)
        axes.fill(outer[:, 0], outer[:, 1], color="0.75", zorder=0)
        axes.fill(inner[:, 0], inner[:, 1], color="white", zorder=0)
    else:
        road = np.concatenate([left, right[::-1]])
        axes.fill(road[:, 0], road[:, 1], color="0.75", zorder=0)
    axes.plot(left[:, 0], left[:, 1], color="k", linewidth=1)
    axes.plot(right[:, 0], right[:, 1], color="k", linewidth=1)
    centre = track.lap_path()
    axes.plot(centre[:, 0], centre[:, 1], color="0.5", linewidth=0.6, linestyle="--")
    axes.plot(*centre[0], marker="s", color="green", label="start")
    if not track.closed:
        axes.plot(*centre[-1], marker="s", color="black", label="finish")
    if trajectory is not None and len(trajectory) > 1:
        points = np.asarray(trajectory, dtype=np.float64)
        if speeds is not None:
            scatter = axes.scatter(points[:, 0], points[:, 1], c=np.asarray(speeds), s=4, cmap="plasma", zorder=3)
            figure.colorbar(scatter, ax=axes, label="speed (km/h)", shrink=0.8)
        else:
            axes.plot(points[:, 0], points[:, 1], color="tab:red", linewidth=1.2, label="trajectory", zorder=3)
    axes.set_aspect("equal")
    text = title or f"track {track.name} ({track.length:.0f} m, {'closed' if track.closed else 'open'})"
    axes.set_title("\n".join(textwrap.wrap(text, 70)))  # a long track name or outcome wraps instead of running off
    axes.legend(loc="best", fontsize=8)
    return figure


def _area(loop: np.ndarray) -> float:
    """Unsigned area enclosed by a closed polyline (shoelace formula)."""
    x, y = loop[:, 0], loop[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


class TrackFrameRenderer:
    """Draws RGB frames of the whole track with the car and its trail, fitted in ``max_size`` pixels."""

    def __init__(self, track: Track, max_size: int = 400, margin: float = 5.0) -> None:
        self.track = track
        xmin, ymin, xmax, ymax = track.bounds(margin=margin)
        self._scale = max_size / max(xmax - xmin, ymax - ymin)
        self._xmin, self._ymax = xmin, ymax
        self.size = (max(1, math.ceil((xmax - xmin) * self._scale)), max(1, math.ceil((ymax - ymin) * self._scale)))
        self._base = Image.new("RGB", self.size, BACKGROUND)
        draw = ImageDraw.Draw(self._base)
        left, right = track.walls()
        for i in range(len(left) - 1):
            draw.polygon(self._pixels([left[i], left[i + 1], right[i + 1], right[i]]), fill=ROAD)
        draw.line(self._pixels(left), fill=WALL, width=2)
        draw.line(self._pixels(right), fill=WALL, width=2)
        if not track.closed:
            draw.line(self._pixels([left[-1], right[-1]]), fill=(0, 0, 0), width=3)

    def _pixels(self, points) -> list[tuple[float, float]]:
        return [((x - self._xmin) * self._scale, (self._ymax - y) * self._scale) for x, y in points]

    def frame(self, pose: CarPose, trail: Sequence[tuple[float, float]] = ()) -> np.ndarray:
        """An ``(height, width, 3)`` uint8 picture."""
        image = self._base.copy()
        draw = ImageDraw.Draw(image)
        if len(trail) > 1:
            draw.line(self._pixels(trail), fill=TRAIL, width=1)
        length, width = 4.5, 2.0
        ch, sh = math.cos(pose.heading), math.sin(pose.heading)
        corners = [(pose.x + ch * fx - sh * fy, pose.y + sh * fx + ch * fy)
                   for fx, fy in ((length / 2, 0.0), (-length / 2, width / 2), (-length / 2, -width / 2))]
        draw.polygon(self._pixels(corners), fill=CAR)
        return np.asarray(image)


def write_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 20.0) -> Path:
    """Save uint8 frames (``(H, W)`` grayscale or ``(H, W, 3)`` RGB) as a looping GIF, written atomically: a write
    that fails (a full disk) leaves any earlier file at ``path`` as it was (a full-disk probe's good GIF became a
    truncated one)."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    images = [Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    encoded = io.BytesIO()
    images[0].save(encoded, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0)
    return write_atomically(path, encoded.getvalue(), mode=0o644)
