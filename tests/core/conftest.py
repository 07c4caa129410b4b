import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _onnx_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Cached ONNX graphs go to a per-session temporary folder, never the user's cache."""
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path_factory.getbasetemp() / "tessera-cache"))
