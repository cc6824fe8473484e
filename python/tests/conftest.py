import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for _helpers


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: different per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
