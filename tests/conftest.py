import tempfile

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_temp_dir(tmp_path, monkeypatch):
    """Clients without a state-dir keep state under the temp dir: one per test."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
