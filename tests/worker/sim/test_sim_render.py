"""Rendering: PNG of a track with a driven trajectory, GIF of an episode, top-down camera frames."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tmrl_worker.sim import PurePursuitDriver, RaceTrackEnv
from tmrl_worker.sim.camera import ROAD, WALL, TopDownCamera
from tmrl_worker.sim.render import render_track_png, write_gif
from tmrl_worker.sim.track import load_track


def drive(env: RaceTrackEnv, steps: int) -> list[np.ndarray]:
    driver = PurePursuitDriver(env.track, env.config.car)
    env.reset(seed=0)
    frames = [env.render()]
    for _ in range(steps):
        env.step(driver.act(env.car.pose()))
        frames.append(env.render())
    return frames


def test_track_png_with_a_trajectory_is_a_valid_image(tmp_path):
    env = RaceTrackEnv(track="hairpins", render_mode="rgb_array")
    drive(env, 40)
    path = render_track_png(env.track, tmp_path / "track.png", trajectory=env.trajectory,
                            speeds=np.linspace(0, 100, len(env.trajectory)))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_episode_gif_plays_one_frame_per_step(tmp_path):
    env = RaceTrackEnv(track="circuit", render_mode="rgb_array")
    frames = drive(env, 29)
    path = write_gif(frames, tmp_path / "episode.gif", fps=20)
    with Image.open(path) as image:
        assert image.format == "GIF" and image.size == (frames[0].shape[1], frames[0].shape[0])
        durations = []
        for index in range(image.n_frames):  # pillow merges identical consecutive frames, adding their durations
            image.seek(index)
            durations.append(image.info["duration"])
        assert image.n_frames > 5 and sum(durations) == 30 * 50


def test_top_down_camera_shows_road_ahead_and_walls_beside():
    track = load_track("oval")  # straight along +x, 12 m wide
    camera = TopDownCamera(track, size=64, metres_per_pixel=0.75)
    frame = camera.frame(20.0, 0.0, 0.0)
    assert frame.shape == (64, 64) and frame.dtype == np.uint8
    assert frame[10, 32] == ROAD  # straight ahead, on the road
    assert frame[10, 0] == 0  # far to the side: outside the track
    assert (frame[10] == WALL).sum() >= 2  # both walls cross the row
    turned = camera.frame(20.0, 0.0, np.pi / 2)  # facing the left wall, 6 m away = 8 pixels above the car
    assert (turned[:40, 32] == 0).any()


def test_a_long_title_stays_on_the_canvas_beside_the_speed_colour_bar():
    """An operator probe: render-track's PNG title was cut by the colour bar."""
    from tmrl_worker.sim.render import track_figure
    from tmrl_worker.sim.track import load_track

    track = load_track("hairpins")
    path = track.lap_path()
    title = ("random-open:123456789: braking driver, did not finish in 1000 steps (50.00 s), 3 crash(es), "
             "return -123.4")
    figure = track_figure(track, path, title=title, speeds=np.linspace(0.0, 100.0, len(path)))
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)  # the constrained layout places everything at drawing time
    canvas = figure.bbox
    title_box = figure.axes[0].title.get_window_extent(renderer)
    assert canvas.x0 <= title_box.x0 and title_box.x1 <= canvas.x1 and title_box.y1 <= canvas.y1
    bar_box = figure.axes[1].get_window_extent(renderer)
    assert title_box.x1 <= bar_box.x0  # not under the colour bar
