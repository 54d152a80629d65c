"""End to end through Flower's real simulation engine (Ray): ServerApp + ClientApps."""

import json

import pytest

from clients.state import run_state_root
from fedmoe.cli import main as cli
from fedmoe.config import FedMoEConfig
from simulations.runner import run


@pytest.mark.slow
@pytest.mark.usefixtures("system_temp_dir")
def test_two_rounds_three_clients_end_to_end(tmp_path, capsys):
    config = FedMoEConfig(num_server_rounds=2, run_dir=str(tmp_path / "run"))
    returned = run(config, num_clients=3)

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results == returned
    assert (tmp_path / "run" / "progress.png").stat().st_size > 1000
    assert results["config"] == config.to_run_config()
    assert [r["round"] for r in results["rounds"]] == [1, 2]

    by_round = [{c["client"]: c for c in r["clients"]} for r in results["rounds"]]
    clients = ["partition-0", "partition-1", "partition-2"]
    assert sorted(by_round[0]) == sorted(by_round[1]) == clients
    for pid in clients:
        first, second = by_round[0][pid]["epsilon"], by_round[1][pid]["epsilon"]
        assert 0 < first < second <= config.target_epsilon  # ε composes across rounds
        assert by_round[1][pid]["num_examples"] > 0

    final = results["final"]
    assert final["epsilon_max"] == pytest.approx(max(c["epsilon"] for c in final["clients"]))
    assert final["epsilon_max"] <= config.target_epsilon
    # ten classes: chance is 0.1
    assert final["personalized_accuracy_mean"] > 0.2
    assert all(not r["rejected"] and not r["mismatches"] for r in results["rounds"])
    # the server's ledger and every client's agree, and the privacy report lists each client
    privacy = {p["client"]: p for p in results["privacy"]["clients"]}
    assert sorted(privacy) == clients and results["privacy"]["stopped"] is None
    assert results["excluded"] == []  # every client took part
    for pid in clients:
        assert privacy[pid]["rounds"] == 2 and privacy[pid]["rounds_allowed"] == 2
        assert privacy[pid]["epsilon"] == pytest.approx(by_round[1][pid]["epsilon"], rel=1e-9)
        assert privacy[pid]["delta"] < 1 / privacy[pid]["num_train"]
    assert (tmp_path / "run" / "privacy.png").stat().st_size > 1000
    assert (tmp_path / "run" / "ledger.sqlite").exists()

    # the simulated clients' own state left the temp dir for the run folder; each client's
    # ledger there agrees with the server's
    kept = tmp_path / "run" / "clients" / f"run-{results['run_id']}"
    assert not run_state_root(results["run_id"]).exists()
    assert sorted(p.name for p in kept.iterdir()) == clients
    capsys.readouterr()
    for pid in clients:
        assert (kept / pid / "local_experts.pt").exists()
        assert cli(["budget", str(kept / pid), "--json"]) == 0
        [own] = json.loads(capsys.readouterr().out)
        assert own["client"] == pid
        assert own["epsilon"] == pytest.approx(privacy[pid]["epsilon"], rel=1e-9)
