"""The reliability tests reuse the end-to-end process harness (``tests/e2e/process_stack.py``)."""

import sys
from pathlib import Path

_E2E = str(Path(__file__).resolve().parent.parent / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)
