"""Runs every ```python block of python/README.md, in order, each in a fresh namespace (blocks that import torch are
skipped when torch is missing)."""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block(index):
    code = BLOCKS[index]
    if re.search(r"^import torch", code, flags=re.M) and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    exec(compile(code, f"{README}:python block {index + 1}", "exec"), {"__name__": f"readme_block_{index + 1}"})
