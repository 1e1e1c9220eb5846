"""A new track per episode: the tracks a simulator draws from at every reset (``SimConfig.episode_tracks``).

The spec is a comma list of items, each drawn with equal probability:

* a track name (``hairpins``, ``random:1234``, ``random-open:7``, ``file:my-track.toml``): that track;
* ``random:LOW-HIGH`` (or ``random-open:LOW-HIGH``): a procedural track whose seed is drawn uniformly from
  ``LOW`` to ``HIGH - 1``; ``HIGH`` is at most :data:`MAX_RANGE_HIGH` (2**63: the draw is a 64-bit integer), while a
  single ``random:SEED`` may be any size.

Seeds are written in the ASCII digits 0-9.

So ``random:1000-100000`` gives a policy 99,000 different closed tracks to learn from, and ``hairpins,circuit`` two
built-in ones. The draw uses the env's seeded generator, so a reset seed gives the same track every time.

The closed procedural tracks of :data:`~tmrl_worker.sim.track.HELD_OUT_TRACK_SEEDS` (``random:0`` to ``random:19``)
are kept for evaluation: a spec that could draw one of them is refused, so "drives tracks it never saw" holds.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from tmrl_worker.sim.track import (
    BUILTIN_TRACKS,
    HELD_OUT_TRACK_SEEDS,
    TRACK_FILE_PREFIX,
    Track,
    TrackError,
    check_track_name,
    load_track,
)

_RANGE = re.compile(r"^(random|random-open):([0-9]+)-([0-9]+)$")
_SEED = re.compile(r"^random:([0-9]+)$")

MAX_RANGE_HIGH = 2**63
"""Largest ``HIGH`` of a seed range ``random:LOW-HIGH`` (exclusive): seeds are drawn as 64-bit integers."""

TRACK_CACHE_SIZE = 32
"""Built tracks kept in memory (a procedural one takes tens of milliseconds to generate)."""


@dataclass(frozen=True)
class SeedRange:
    """``prefix:LOW-HIGH``: procedural tracks with seeds ``LOW`` to ``HIGH - 1``."""

    prefix: str
    low: int
    high: int

    def draw(self, rng: np.random.Generator) -> str:
        return f"{self.prefix}:{int(rng.integers(self.low, self.high))}"


def parse_episode_tracks(spec: str, files: dict[str, Track] | None = None) -> tuple[str | SeedRange, ...]:
    """The items of an ``episode_tracks`` spec; :class:`TrackError` for an empty spec, an unknown track, an empty
    seed range, one above :data:`MAX_RANGE_HIGH`, or one that includes a held-out seed (``random:0`` to ``random:19``).
    A ``file:`` item is read and built to be checked; ``files``, when given, keeps those tracks by item."""
    held_out = HELD_OUT_TRACK_SEEDS
    items: list[str | SeedRange] = []
    for text in (part.strip() for part in spec.split(",")):
        if not text:
            raise TrackError(f"episode_tracks {spec!r} has an empty item; write tracks separated by commas")
        match = _RANGE.fullmatch(text)
        if match:
            prefix, low, high = match.group(1), _range_bound(match.group(2), text), _range_bound(match.group(3), text)
            if high <= low:
                raise TrackError(f"episode_tracks item {text!r}: the range {low}-{high} is empty (HIGH is excluded)")
            if prefix == "random" and low < held_out.stop and high > held_out.start:
                raise TrackError(f"episode_tracks item {text!r} includes the held-out evaluation tracks random:"
                                 f"{held_out.start}..{held_out.stop - 1}; start the range at {held_out.stop} or above")
            items.append(SeedRange(prefix, low, high))
            continue
        if text.startswith(TRACK_FILE_PREFIX):
            track = load_track(text)  # its own error says what is wrong with the file
            if files is not None:
                files[text] = track
            items.append(text)
            continue
        try:  # refused when the config is read
            check_track_name(text)
        except TrackError:
            raise TrackError(f"episode_tracks item {text!r} is not a track: use {', '.join(BUILTIN_TRACKS)}, "
                             "random:SEED, random-open:SEED (SEED in the digits 0-9), file:PATH or a range random:LOW-HIGH "
                             f"(HIGH at most {MAX_RANGE_HIGH})") from None
        seed = _SEED.fullmatch(text)
        if seed and int(seed.group(1)) in held_out:
            raise TrackError(f"episode_tracks item {text!r} is a held-out evaluation track (random:"
                             f"{held_out.start}..{held_out.stop - 1}); train on other seeds")
        items.append(text)
    return tuple(items)


def _range_bound(digits: str, item: str) -> int:
    """``LOW`` or ``HIGH`` of the range ``item``; :class:`TrackError` beyond :data:`MAX_RANGE_HIGH`."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(MAX_RANGE_HIGH)) or int(significant) > MAX_RANGE_HIGH:
        raise TrackError(f"episode_tracks item {item!r}: range bounds must be at most {MAX_RANGE_HIGH} (2**63, seeds "
                         f"are drawn as 64-bit integers); for a larger seed name the track alone, random:SEED")
    return int(significant)


class TrackPool:
    """Draws the next episode's track from an ``episode_tracks`` spec and builds it (recent tracks cached)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._files: dict[str, Track] = {}
        """The ``file:`` tracks, read once (by the spec's check) and never again: evicted from the cache and read
        anew, a file edited or deleted mid-run stopped the worker hours in, or changed what it trained on without a
        word (a probe)."""
        self.items = parse_episode_tracks(spec, self._files)
        self._cache: OrderedDict[str, Track] = OrderedDict()

    def draw(self, rng: np.random.Generator) -> str:
        """The name of a track drawn with ``rng``: an item uniformly, then a seed uniformly within a range."""
        item = self.items[int(rng.integers(len(self.items)))]
        return item.draw(rng) if isinstance(item, SeedRange) else item

    def track(self, name: str) -> Track:
        """The built track ``name`` (from the cache when it was built recently; a ``file:`` item as it was read at
        the start)."""
        if name in self._files:
            return self._files[name]
        track = self._cache.pop(name, None) or load_track(name)
        self._cache[name] = track
        while len(self._cache) > TRACK_CACHE_SIZE:
            self._cache.popitem(last=False)
        return track
