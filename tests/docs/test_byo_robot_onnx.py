"""docs/byo-robot.md §5: the robot loop in plain numpy + onnxruntime runs as printed, with torch unimportable, on
the ONNX file ``tmrl-trainer export`` writes for a policy of the example's layout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tmrl_common.networks import PolicyArchitecture, build_actor
from tmrl_trainer.policy_export import export_onnx

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "byo-robot.md"

RUNNER = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
STEPS = 20
exec(compile(open("loop.py").read(), "byo-robot.md", "exec"))
assert all(-1.0 <= float(a[0]) <= 1.0 for a in actions), actions
print("actions", [round(float(a[0]), 4) for a in actions])
"""


def onnx_loop_block() -> str:
    section = DOC.read_text().split("## 5. Run the policy without Python's tmrl or torch", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "§5 has one Python block: the onnxruntime loop"
    return blocks[0]


@pytest.mark.timeout(120)
def test_the_documented_onnxruntime_loop_drives_the_cart_without_torch(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        from examples.byo_robot.robot import LAYOUT
    finally:
        sys.path.remove(str(REPO))
    torch.manual_seed(0)
    export_onnx(build_actor(PolicyArchitecture.for_layout(LAYOUT, hidden_sizes=[64, 64])), tmp_path / "policy.onnx")
    block = onnx_loop_block()
    assert "torch" not in block.replace("without torch", "")
    (tmp_path / "loop.py").write_text(block)
    result = subprocess.run([sys.executable, "-c", RUNNER], cwd=tmp_path, capture_output=True, text=True, timeout=100,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("actions [")
