"""``fedmoe export``: the exported model is the client's in-run personalised model (exactly
without compression, within int8's error with it), and bad input stops before anything is
written."""

from __future__ import annotations

import json

import pytest
import torch

from clients.app import personal_model
from clients.state import ClientStore
from fedmoe.cli import main
from fedmoe.config import FedMoEConfig, NodeSettings
from fedmoe.data import load_client_data
from fedmoe.export import GLOBAL_MODEL, export_client, load_export, param_bytes

CLIENTS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from simulations.inline import run_inline

    folder = tmp_path_factory.mktemp("export") / "run"
    run_inline(FedMoEConfig(num_server_rounds=2, run_dir=str(folder)), CLIENTS)
    return folder


def _in_run(run_dir, partition):
    """The personalised model the client's own evaluate handler built in the last round:
    ``clients.app.personal_model`` from its state dir and the final global tensors."""
    config = FedMoEConfig.from_run_config(json.loads((run_dir / "results.json").read_text())
                                          ["config"])
    node = NodeSettings(partition_id=partition, num_partitions=CLIENTS)
    store = ClientStore(run_dir / "clients" / f"partition-{partition}")
    model = personal_model(config, node, store,
                           torch.load(run_dir / GLOBAL_MODEL, weights_only=True),
                           config.num_server_rounds)
    model.eval()
    data = load_client_data(config, partition, CLIENTS)
    return model, data


def test_uncompressed_export_predicts_exactly_like_the_in_run_model(run_dir, tmp_path):
    out = tmp_path / "model.pt"
    measured = export_client(run_dir, "partition-1", out)
    exported = load_export(out)
    assert exported["dp_protected"] and exported["compression"] == []
    model, data = _in_run(run_dir, 1)
    x = data.test.tensors[0]
    with torch.no_grad():
        assert torch.equal(exported["model"](x), model(x)[0])
    # and its accuracy is the one the run reported for that client
    results = json.loads((run_dir / "results.json").read_text())
    reported = {c["client"]: c for c in results["final"]["clients"]}["partition-1"]
    assert measured[0].accuracy == pytest.approx(reported["personalized_accuracy"], abs=1e-12)


def test_int8_export_is_within_quantisation_error(run_dir, tmp_path):
    """Stated bound: every Linear weight moves by at most half its int8 step (scale/2), so
    the logits move little: the predicted class agrees on ≥ 95 % of the test split, the
    accuracy is within 2 points, and the tensors take < 1/3 of the float32 bytes."""
    out = tmp_path / "int8.pt"
    base, int8 = export_client(run_dir, "partition-0", out, int8=True)
    exported = load_export(out)
    model, data = _in_run(run_dir, 0)
    x = data.test.tensors[0]
    with torch.no_grad():
        ours, theirs = exported["model"](x), model(x)[0]
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95
    assert abs(int8.accuracy - base.accuracy) <= 0.02
    assert int8.param_bytes < base.param_bytes / 3 == param_bytes(model) / 3
    for module in exported["model"].modules():  # every Linear's weight is int8 now
        assert not isinstance(module, torch.nn.Linear) or callable(module.weight)


def test_pruned_and_distilled_exports(run_dir, tmp_path):
    _, pruned = export_client(run_dir, "partition-0", tmp_path / "p.pt", prune=0.5)
    assert pruned.nonzero <= 0.55 * pruned.parameters
    base, student = export_client(run_dir, "partition-0", tmp_path / "s.pt", distill_hidden=16)
    exported = load_export(tmp_path / "s.pt")
    assert not exported["dp_protected"]  # trained on raw data without DP: stays local
    assert student.agreement >= 0.8 and student.parameters < 64 * 16 + 16 + 16 * 10 + 10 + 1


@pytest.mark.parametrize("args,message", [
    (["--client", "partition-7"], "no state of client 'partition-7'"),
    (["--client", "partition-1", "--num-partitions", "1"], "not among the 1 clients"),
    (["--client", "partition-0", "--prune", "1.5"], "--prune must be in [0, 1)"),
    (["--client", "partition-0", "--distill", "-3"], "--distill must be"),
])
def test_bad_export_input_exits_2_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "x.pt"
    assert main(["export", str(run_dir), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_folder_without_a_global_model_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    assert main(["export", str(tmp_path), "--client", "partition-0", "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert GLOBAL_MODEL in capsys.readouterr().err
