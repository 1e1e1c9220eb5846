"""The scripts behind docs/img/ still run: the architecture diagram and the learning-curve plot regenerate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "diagrams" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_diagram_regenerates_at_the_committed_size(tmp_path: Path) -> None:
    output = _load("architecture").draw(tmp_path / "architecture.png")
    with Image.open(output) as fresh, Image.open(REPO / "docs" / "img" / "architecture.png") as committed:
        assert fresh.size == committed.size == (1760, 990)


def test_learning_curve_plots_each_worker_from_metrics_jsonl(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"kind": "train", "updates": 10}]
    lines += [{"kind": "episode", "worker": w, "worker_steps": 100 * (i + 1), "return": float(i)}
              for w in ("worker-1", "worker-2") for i in range(12)]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    plot = _load("learning_curve")
    assert {w: len(p) for w, p in plot.read_episodes(metrics).items()} == {"worker-1": 12, "worker-2": 12}
    output = plot.draw(metrics, tmp_path / "curve.png", "test", window=5, references=[("expert", 10.0)])
    with Image.open(output) as image:
        assert image.size[0] > 400 and image.size[1] > 200


def test_learning_curve_refuses_a_file_without_episodes(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "train", "updates": 1}) + "\n")
    with pytest.raises(SystemExit, match="no episode records"):
        _load("learning_curve").read_episodes(metrics)
