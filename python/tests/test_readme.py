"""Runs every ```python block of python/README.md and of the top-level README.md, each in a fresh namespace (blocks
that import torch are skipped when torch is missing)."""

import importlib.util
import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
READMES = [HERE.parent / "README.md", HERE.parent.parent / "README.md"]
BLOCKS = [(readme, code) for readme in READMES
          for code in re.findall(r"^```python\n(.*?)^```", readme.read_text(), flags=re.S | re.M)]


def test_readmes_have_python_blocks():
    for readme in READMES:
        assert any(r == readme for r, _ in BLOCKS), f"{readme} has no ```python block"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block(index):
    readme, code = BLOCKS[index]
    if re.search(r"^import torch", code, flags=re.M) and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    exec(compile(code, f"{readme}:python block {index + 1}", "exec"), {"__name__": f"readme_block_{index + 1}"})
