import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_openvla(tmp_path_factory) -> str:
    """A tiny random OpenVLA checkpoint in the openvla-7b on-disk layout (built once per test session)."""
    from common.models.tiny import make_tiny_openvla

    return make_tiny_openvla(str(tmp_path_factory.mktemp("tiny_openvla")))
