import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import convert_tiny  # noqa: E402


@pytest.fixture
def tiny_moe():
    return convert_tiny
