"""Shared fixtures: thread limits and the data directory."""

import os
from pathlib import Path

import pytest
import torch

# One thread: the tests run tiny networks, where thread overhead dominates on 2 shared cores.
torch.set_num_threads(1)
torch.set_num_interop_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The directory holding the IDX files; tests needing it skip when it is absent."""
    root = Path(os.environ.get("DGMOOD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "fashion-mnist").is_dir():
        pytest.skip(f"no dataset directory at {root}; set DGMOOD_DATA")
    return root
