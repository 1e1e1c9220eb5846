"""A new track per episode (``episode_tracks``): draws from the training range only, never a held-out evaluation
track, the same tracks for the same reset seeds, in the fast env, the real-time interface and the worker's expert."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from tmrl_worker.envs import make_env
from tmrl_worker.sim import HELD_OUT_TRACK_SEEDS, RaceTrackEnv, RaceTrackInterface, SimConfig
from tmrl_worker.sim.track import TrackError
from tmrl_worker.sim.track_pool import TRACK_CACHE_SIZE, SeedRange, TrackPool, parse_episode_tracks


def _seed(name: str) -> int:
    return int(name.split(":")[1])


def test_a_seed_range_draws_only_seeds_inside_it_and_never_a_held_out_one():
    pool = TrackPool("random:20-60")
    rng = np.random.default_rng(0)
    seeds = [_seed(pool.draw(rng)) for _ in range(2000)]
    assert min(seeds) == 20 and max(seeds) == 59  # HIGH is excluded; 2000 draws cover all 40 seeds
    assert not set(seeds) & set(HELD_OUT_TRACK_SEEDS)


def test_the_same_generator_seed_draws_the_same_tracks():
    pool = TrackPool("random:1000-100000,hairpins")

    def draws(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [pool.draw(rng) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_a_list_draws_each_item_and_a_range_item_a_seed_in_its_range():
    pool = TrackPool("hairpins, circuit ,random-open:5-8")
    assert pool.items == ("hairpins", "circuit", SeedRange("random-open", 5, 8))
    rng = np.random.default_rng(1)
    names = {pool.draw(rng) for _ in range(300)}
    assert names == {"hairpins", "circuit", "random-open:5", "random-open:6", "random-open:7"}


def test_a_track_file_in_the_pool_is_read_once_so_an_edit_or_deletion_mid_run_changes_nothing(tmp_path):
    """The tracks probe: with 60 items a file track fell out of the cache of built tracks and was read again; a file
    edited mid-run (`width = "broken"`) then stopped the worker (`its reset raised TrackError`), and one edited into
    another valid track would have changed what it trained on without a word."""
    path = tmp_path / "mine.toml"
    path.write_text('closed = true\nwidth = 12.0\ncentre = [[0, 0], [200, 0], [200, 120], [0, 120]]\n')
    pool = TrackPool(f"file:{path},random:1000-100000")
    first = pool.track(f"file:{path}")
    for seed in range(1000, 1000 + 2 * TRACK_CACHE_SIZE):  # every other track the run drew since
        pool.track(f"random:{seed}")
    path.write_text('width = "broken"\n')
    assert pool.track(f"file:{path}") is first
    path.unlink()
    assert pool.track(f"file:{path}") is first


@pytest.mark.parametrize("spec", ["random:0-1000", "random:19-25", "random:5", "hairpins,random:12"])
def test_a_spec_that_could_draw_a_held_out_track_is_refused(spec):
    with pytest.raises(TrackError, match="held-out"):
        parse_episode_tracks(spec)
    with pytest.raises(ValidationError, match="held-out"):
        SimConfig(episode_tracks=spec)


@pytest.mark.parametrize("spec", ["", "hairpins,", "random:50-50", "nowhere", "random:x-9"])
def test_an_empty_or_unknown_item_is_refused_when_the_config_is_read(spec):
    with pytest.raises(TrackError):
        parse_episode_tracks(spec)


def test_open_procedural_seeds_are_not_the_held_out_closed_tracks():
    assert parse_episode_tracks("random-open:0-20") == (SeedRange("random-open", 0, 20),)


def test_the_fast_env_drives_a_new_track_per_episode_and_repeats_them_for_the_same_seeds():
    env = RaceTrackEnv(episode_tracks="random:1000-100000", max_episode_steps=5)
    names = []
    for seed in range(4):
        env.reset(seed=seed)
        names.append(env.track.name)
        assert env.car.track is env.track and env.episode.track is env.track
        env.step(np.array([1.0, 0.0, 0.0], np.float32))
        assert env.car.pose().speed >= 0.0
    assert len(set(names)) == 4 and all(1000 <= _seed(n) < 100000 for n in names)
    again = RaceTrackEnv(episode_tracks="random:1000-100000")
    assert [(again.reset(seed=seed), again.track.name)[1] for seed in range(4)] == names


def test_without_episode_tracks_every_episode_is_on_the_configured_track():
    env = RaceTrackEnv(track="oval")
    for seed in range(3):
        env.reset(seed=seed)
        assert env.track.name == "oval"


def test_the_realtime_interface_draws_the_same_tracks_and_hands_the_car_to_the_physics_thread():
    fast = RaceTrackEnv(episode_tracks="random:1000-100000")
    interface = RaceTrackInterface({"episode_tracks": "random:1000-100000"})
    try:
        for seed in (3, 4):
            fast.reset(seed=seed)
            interface.reset(seed=seed)
            assert interface.track.name == fast.track.name
            assert interface.loop.car is interface.car and interface.car.track is interface.track
            assert interface.loop.pose().x == pytest.approx(fast.car.pose().x, abs=2.0)
    finally:
        interface.close()


def test_the_workers_expert_follows_the_track_of_each_episode_to_the_finish():
    handle = make_env("sim-fast", max_episode_steps=1500, options={"episode_tracks": "random:1000-100000"})
    tracks = []
    for seed in range(2):
        observation = handle.reset(seed=seed)
        tracks.append(handle.env.unwrapped.track.name)
        done, info = False, {}
        while not done:
            observation, _, terminated, truncated, info = handle.step(handle.expert(observation))
            done = terminated or truncated
        assert info["finished"], f"the expert did not finish {tracks[-1]}"
    assert tracks[0] != tracks[1]


def test_a_range_above_64_bits_is_refused_when_the_config_is_read_naming_the_largest_high():
    for spec in ("random:1000-99999999999999999999999", "random-open:99999999999999999999999-99999999999999999999999"
                 "9", f"random:1000-{2**63 + 1}"):
        with pytest.raises(TrackError, match=f"at most {2**63}"):
            parse_episode_tracks(spec)
        with pytest.raises(ValidationError, match=f"at most {2**63}"):
            SimConfig(episode_tracks=spec)


def test_a_range_up_to_two_to_the_63_draws_the_largest_64_bit_seed():
    env = RaceTrackEnv(episode_tracks=f"random:{2**63 - 1}-{2**63}", max_episode_steps=5)
    env.reset(seed=0)
    assert env.track.name == f"random:{2**63 - 1}"


def test_a_single_seed_larger_than_64_bits_is_still_a_track():
    seed = "9" * 30
    env = RaceTrackEnv(episode_tracks=f"random:{seed}", max_episode_steps=5)
    env.reset(seed=0)
    assert env.track.name == f"random:{seed}" and env.track.closed


@pytest.mark.parametrize("spec", ["random:١٢", "random:٢٠-٣٠", "random:²", "random-open:１２"])
def test_seeds_in_other_than_ascii_digits_are_refused(spec):
    with pytest.raises(TrackError, match="digits 0-9"):
        parse_episode_tracks(spec)
