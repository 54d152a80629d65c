"""``fedmoe export``: the exported model is the client's in-run personalised model (exactly
without compression, within int8's error with it), and bad input stops before anything is
written."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch

from clients.app import personal_model
from clients.state import ClientStore
from fedmoe.cli import main
from fedmoe.config import FedMoEConfig, NodeSettings
from fedmoe.data import load_client_data
from fedmoe.export import (GLOBAL_MODEL, ExportError, export_client, load_export,
                           load_tensors, param_bytes, store_tensors, stored_bytes)
from fedmoe.privacy.dp import simulation_noise

CLIENTS = 2
EPS = torch.finfo(torch.float32).eps  # MinMaxObserver's least scale


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from simulations.inline import run_inline

    folder = tmp_path_factory.mktemp("export") / "run"
    with simulation_noise(0):  # the accuracy figures below must not move with the DP noise
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


def _data_bytes(path_or_bytes) -> int:
    """Bytes of tensor data in a ``torch.save`` file: the sizes of its storage records
    (the zip entries under ``<archive>/data/``), read with zipfile, not with fedmoe."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with zipfile.ZipFile(source) as archive:
        return sum(info.file_size for info in archive.infolist()
                   if info.filename.split("/")[1:2] == ["data"])


def _oracle_step(x: torch.Tensor) -> float:
    """The int8 step of a tensor under the stated scheme, computed here from its range."""
    return (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255


class _Kinds(torch.nn.Module):
    """Tensors of every kind the storage meets: signed, all positive, all negative
    (a log prior), partly zero (pruned), constant, all zero, a float scalar flag, an
    integer buffer, a non-persistent buffer and float64."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.signed = torch.nn.Parameter(torch.randn(7, 5, generator=g))
        self.positive = torch.nn.Parameter(torch.rand(11, generator=g) * 3 + 0.5)
        w = torch.randn(6, 6, generator=g)
        self.pruned = torch.nn.Parameter(w * (w.abs() > 0.7))
        self.register_buffer("negative", -torch.rand(10, generator=g) * 4 - 1)
        self.register_buffer("constant", torch.full((4,), 2.5))
        self.register_buffer("zeros", torch.zeros(3))
        self.register_buffer("flag", torch.tensor(-1.0))
        self.register_buffer("count", torch.arange(5))
        self.register_buffer("scratch", torch.randn(8, generator=g), persistent=False)
        self.register_buffer("wide", torch.randn(9, generator=g, dtype=torch.float64))


def test_int8_storage_round_trips_within_half_a_step():
    model = _Kinds()
    stored = store_tensors(model, int8=True)
    back = load_tensors(stored)
    original = dict([*model.named_parameters(), *model.named_buffers()])
    assert back.keys() == original.keys()
    assert set(stored["exact"]) == {"flag", "count"}  # a scalar and an integer: exact
    for name, x in original.items():
        x = x.detach()
        assert back[name].dtype == x.dtype and back[name].shape == x.shape
        if name in stored["exact"]:
            assert torch.equal(back[name], x)
            continue
        i = stored["int8"]["names"].index(name)
        step = _oracle_step(x.float())
        assert stored["int8"]["scales"][i].item() == pytest.approx(max(step, EPS), rel=1e-6)
        error = (back[name].double() - x.double()).abs()
        assert error.max() <= step / 2 * (1 + 1e-5) + 1e-7, name
        assert torch.equal(back[name][x == 0], x[x == 0])  # zeros (pruned weights) stay zero
    # affine: an all-negative tensor (a log prior) uses all 256 codes, twice as fine as a
    # symmetric grid (max|x| / 127) would be
    assert stored["int8"]["scales"][stored["int8"]["names"].index("negative")] \
        == pytest.approx(float(-model.negative.min()) / 255, rel=1e-6)


def test_a_non_finite_tensor_is_refused_not_quantised():
    model = _Kinds()
    with torch.no_grad():
        model.signed[2, 3] = float("inf")
    with pytest.raises(ExportError, match="signed holds NaN or inf"):
        store_tensors(model, int8=True)


def test_stored_bytes_are_the_tensor_bytes_written():
    model = _Kinds()
    floats = sum(t.numel() for t in [*model.parameters(), *model.buffers()]
                 if t.dtype == torch.float32)
    for int8 in (False, True):
        stored = store_tensors(model, int8=int8)
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        assert stored_bytes(stored) == _data_bytes(buffer.getvalue())
    # float32: 4 bytes an entry; int8: a byte a code + 5 per quantised tensor (T = 8)
    assert param_bytes(model) == 4 * floats + 8 * 9 + 8 * 5
    quantised = 7 * 5 + 11 + 36 + 10 + 4 + 3 + 8 + 9
    assert stored_bytes(store_tensors(model, int8=True)) == quantised + 8 * 5 + 4 + 8 * 5


def test_int8_export_loads_and_predicts_within_the_bound(run_dir, tmp_path):
    """The exported int8 model's every tensor is within half its step of the in-run
    model's (the stated bound), so every Linear's output on a given input x moves by at most
    s_W/2·‖x‖₁ + s_b/2; its file holds no other tensor data, it takes ≤ 1/3.5 of the
    float32 bytes on the default model, and it predicts like the in-run model."""
    out = tmp_path / "int8.pt"
    base, int8 = export_client(run_dir, "partition-0", out, int8=True)
    exported = load_export(out)
    model, data = _in_run(run_dir, 0)
    in_run = {f"model.{name}": t.detach() for name, t in
              [*model.named_parameters(), *model.named_buffers()]}
    ours = dict([*exported["model"].named_parameters(), *exported["model"].named_buffers()])
    assert ours.keys() == in_run.keys()
    for name, x in in_run.items():
        if x.numel() == 1:
            assert torch.equal(ours[name], x), name
        else:
            error = (ours[name].detach() - x).abs().max().item()
            assert error <= _oracle_step(x) / 2 * (1 + 1e-5) + 1e-7, name
    assert _data_bytes(out) == int8.param_bytes
    assert base.param_bytes == param_bytes(model) == 4 * sum(t.numel() for t in in_run.values())
    assert int8.param_bytes * 3.5 <= base.param_bytes
    x = data.test.tensors[0]
    seen = []  # every Linear of the int8 model: (name, its input, its output)
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, i[0], o)))
             for n, m in exported["model"].named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        logits, reference = exported["model"](x), model(x)[0]
    for hook in hooks:
        hook.remove()
    assert seen
    for name, inputs, outputs in seen:  # per layer, on the same input: the bound carried over
        w, b = in_run[f"{name}.weight"], in_run[f"{name}.bias"]
        bound = (_oracle_step(w) / 2 * inputs.abs().sum(-1, keepdim=True)
                 + _oracle_step(b) / 2) * (1 + 1e-4) + 1e-5
        assert ((outputs - torch.nn.functional.linear(inputs, w, b)).abs() <= bound).all(), name
    agreement = (logits.argmax(-1) == reference.argmax(-1)).double().mean().item()
    assert agreement >= 0.95 and int8.agreement == pytest.approx(agreement)
    assert abs(int8.accuracy - base.accuracy) <= 0.02


def test_uncompressed_export_file_holds_exactly_the_float32_tensors(run_dir, tmp_path):
    out = tmp_path / "model.pt"
    base, = export_client(run_dir, "partition-0", out)
    assert _data_bytes(out) == base.param_bytes


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
    err = capsys.readouterr().err
    assert GLOBAL_MODEL in err and f"fedmoe simulate --resume {tmp_path}" in err


def test_export_files_of_the_first_format_still_load(tmp_path):
    """Files written before the tensors were stored apart (the whole module pickled)."""
    model = torch.nn.Linear(3, 2)
    torch.save({"format": "fedmoe-export-1", "model": model}, tmp_path / "old.pt")
    x = torch.randn(4, 3)
    assert torch.equal(load_export(tmp_path / "old.pt")["model"](x), model(x))


def test_an_export_whose_tensors_do_not_fit_its_model_is_refused(run_dir, tmp_path):
    out = tmp_path / "int8.pt"
    export_client(run_dir, "partition-0", out, int8=True)
    payload = torch.load(out, weights_only=False)
    del payload["tensors"]["exact"]["model.switch.state"]
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(ExportError, match="no data for model.switch.state"):
        load_export(tmp_path / "broken.pt")
