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


@pytest.fixture(scope="session")
def tiny_oft(tiny_openvla, tmp_path_factory) -> str:
    """An OpenVLA-OFT checkpoint: the tiny OpenVLA plus the dataset_statistics.json an OFT checkpoint carries."""
    import json
    import shutil

    oft = str(tmp_path_factory.mktemp("tiny_oft") / "model")
    shutil.copytree(tiny_openvla, oft)
    bounds = {"q01": [-0.9] * 6 + [0.0], "q99": [0.9] * 6 + [1.0], "mask": [True] * 6 + [False]}
    with open(os.path.join(oft, "dataset_statistics.json"), "w") as f:
        json.dump({"libero_spatial_no_noops": {"action": bounds}}, f)
    return oft


@pytest.fixture(scope="session")
def tiny_vjepa2(tmp_path_factory) -> str:
    """A tiny random V-JEPA 2 world model in the Hugging Face layout."""
    from common.models.tiny import make_tiny_vjepa2

    return make_tiny_vjepa2(str(tmp_path_factory.mktemp("tiny_vjepa2")))
