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


@pytest.fixture
def system_temp_dir(monkeypatch):
    """For tests that run Ray: its worker processes (the simulated clients) cannot see the
    per-test temp dir above, so the test process goes back to the system's temp dir and
    agrees with them; ``fedmoe simulate`` then moves the clients' state into the run folder."""
    monkeypatch.setattr(tempfile, "tempdir", None)
