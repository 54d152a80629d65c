"""Users' own data files (fedmoe.data.files): every reader, every fault one clear error, the
client refusing bad data before any charge, and simulation on a CSV file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType

from clients.app import app
from fedmoe.config import ConfigError, FedMoEConfig, NodeSettings
from fedmoe.data import check_split, load_client_data, load_node_data, with_data_shape
from fedmoe.data.files import DataFileError, infer_spec, load_file
from fedmoe.models import model_for
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import DATA_UNUSABLE, DELTA_TOO_LARGE, LEDGER_UNUSABLE, to_arrays
from fedmoe.roles import split_state_dict
from server.strategy import FedMoE
from tests.helpers import LocalGrid, context, message, train_plan


def blobs(n: int = 60, features: int = 5, classes: int = 3, seed: int = 0):
    """x (n, features) float, y (n,) int with every class present."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, features)) + y[:, None]
    return x.astype(np.float32), y.astype(np.int64)


def write_csv(path, x, y, label="label", header=None):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header or [f"f{i}" for i in range(x.shape[1])] + [label])
        for row, lab in zip(x, y):
            w.writerow([*(repr(float(v)) for v in row), int(lab)])
    return path


# ---------------------------------------------------------------------- readers
def test_csv_npz_hf_and_images_give_the_same_arrays(tmp_path):
    x, y = blobs()
    csv_path = write_csv(tmp_path / "d.csv", x, y, label="target")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    from datasets import Dataset

    Dataset.from_dict({"x": x, "label": y}).save_to_disk(str(tmp_path / "hf"))
    Dataset.from_dict({"a": x[:, 0], "b": x[:, 1], "label": y}).save_to_disk(
        str(tmp_path / "hf-cols"))

    got = load_file(f"csv:{csv_path}", "target")
    np.testing.assert_allclose(got.x, x, rtol=1e-6)
    np.testing.assert_array_equal(got.y, y)
    for spec in (f"npz:{tmp_path / 'd.npz'}", f"hf:{tmp_path / 'hf'}"):
        got = load_file(spec)
        np.testing.assert_allclose(got.x, x, rtol=1e-6)
        np.testing.assert_array_equal(got.y, y)
    cols = load_file(f"hf:{tmp_path / 'hf-cols'}")
    np.testing.assert_allclose(cols.x, x[:, :2], rtol=1e-6)
    assert (got.num_features, got.num_classes) == (5, 3)


def test_image_folder_one_subfolder_per_class(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    expected = {}
    for name in ("cat", "dog"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(4, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / "img" / name / f"{i}.png")
            expected[(name, i)] = pixels.reshape(-1) / 255.0
    got = load_file(f"images:{tmp_path / 'img'}")
    assert got.x.shape == (12, 12) and list(got.y) == [0] * 6 + [1] * 6  # cat, dog sorted
    np.testing.assert_allclose(got.x[7], expected[("dog", 1)], atol=1e-6)
    assert infer_spec(str(tmp_path / "img")) == f"images:{tmp_path / 'img'}"


def test_spec_inferred_from_a_node_data_path(tmp_path):
    x, y = blobs()
    write_csv(tmp_path / "a.csv", x, y)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    from datasets import Dataset

    Dataset.from_dict({"x": x, "label": y}).save_to_disk(str(tmp_path / "saved"))
    assert infer_spec(str(tmp_path / "a.csv")).startswith("csv:")
    assert infer_spec(str(tmp_path / "a.npz")).startswith("npz:")
    assert infer_spec(str(tmp_path / "saved")).startswith("hf:")
    assert infer_spec(f"npz:{tmp_path / 'a.csv'}") == f"npz:{tmp_path / 'a.csv'}"  # as given


# ---------------------------------------------------------------------- faults
def _faulty(tmp_path):
    """(spec, label column, words the error must hold) for every kind of fault."""
    x, y = blobs()
    cases = []

    def csv_case(name, text, *words, label="label"):
        path = tmp_path / name
        path.write_text(text)
        cases.append((f"csv:{path}", label, (str(path), *words)))

    good = "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20))
    cases.append((f"csv:{tmp_path / 'nope.csv'}", "label", ("nope.csv", "no such file")))
    csv_case("empty.csv", "", "empty")
    csv_case("header.csv", "a,b,label\n", "no examples")
    csv_case("nolabel.csv", good, "no label column 'y'", "label-column", label="y")
    csv_case("nan.csv", good.replace("\n3,0,1", "\nnan,0,1"), "NaN", "example 3")
    csv_case("inf.csv", good.replace("\n4,1,0", "\n4,inf,0"), "NaN or ±inf")
    csv_case("text.csv", good.replace("\n5,2,1", "\nfive,2,1"), "column 'a'", "'five'",
             "not a number")
    csv_case("ragged.csv", good.replace("\n6,0,0", "\n6,0"), "line 8", "fields")
    csv_case("onecls.csv", "a,label\n" + "".join(f"{i},1\n" for i in range(20)),
             "label 1", "at least 2 classes")
    csv_case("few.csv", "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(4)),
             "4 example(s)", "at least 10")
    csv_case("neg.csv", good.replace("\n7,1,1", "\n7,1,-1"), "-1", "not a class number")
    csv_case("frac.csv", good.replace("\n7,1,1", "\n7,1,0.5"), "not a class number")
    csv_case("onlylabel.csv", "label\n" + "".join(f"{i % 2}\n" for i in range(20)),
             "no feature columns")

    def npz_case(name, *words, **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        cases.append((f"npz:{path}", "label", (str(path), *words)))

    npz_case("noy.npz", "['y']", "numpy.savez", x=x)
    npz_case("nanx.npz", "NaN", x=np.where(np.arange(60)[:, None] == 9, np.nan, x), y=y)
    npz_case("len.npz", "60 feature rows but 59 labels", x=x, y=y[:-1])
    npz_case("strlabels.npz", "map class names", x=x, y=np.array(["a", "b"] * 30))
    npz_case("empty.npz", "no examples", x=np.zeros((0, 3)), y=np.zeros(0))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    cases.append((f"npz:{junk}", "label", (str(junk), "not a readable .npz")))
    cases.append((f"csv:{tmp_path}", "label", ("is a folder",)))
    cases.append((f"hf:{tmp_path / 'missing'}", "label", ("no such folder",)))
    notsaved = tmp_path / "plain-dir"
    notsaved.mkdir()
    cases.append((f"hf:{notsaved}", "label", ("not a saved Hugging Face dataset",)))
    cases.append((f"images:{notsaved}", "label", ("no class sub-folders",)))
    cases.append((f"parquet:{junk}", "label", ("KIND:PATH",)))
    return cases


def test_every_fault_is_one_clear_error_naming_the_file(tmp_path):
    for spec, label, words in _faulty(tmp_path):
        with pytest.raises(DataFileError) as err:
            load_file(spec, label)
        for word in words:
            assert word in str(err.value), (spec, str(err.value))


def test_hf_and_image_faults(tmp_path):
    from datasets import Dataset
    from PIL import Image

    Dataset.from_dict({"x": [[1.0, 2.0]] * 12, "y": [0, 1] * 6}).save_to_disk(
        str(tmp_path / "nolabel"))
    Dataset.from_dict({"name": ["a"] * 12, "label": [0, 1] * 6}).save_to_disk(
        str(tmp_path / "text"))
    with pytest.raises(DataFileError, match="no label column 'label'"):
        load_file(f"hf:{tmp_path / 'nolabel'}")
    with pytest.raises(DataFileError, match="column 'name'.*not numeric"):
        load_file(f"hf:{tmp_path / 'text'}")
    for cls, size in (("0", (4, 4)), ("1", (5, 4))):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("L", size).save(tmp_path / "img" / cls / f"{i}.png")
    with pytest.raises(DataFileError, match="same size"):
        load_file(f"images:{tmp_path / 'img'}")
    (tmp_path / "img" / "1" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataFileError, match=r"0\.png: not a readable image"):
        load_file(f"images:{tmp_path / 'img'}")


def test_feature_and_class_count_must_fit_the_model(tmp_path):
    x, y = blobs(features=5, classes=3)
    path = write_csv(tmp_path / "d.csv", x, y)
    config = FedMoEConfig(dataset="node", num_features=6, num_classes=3, model="moe")
    with pytest.raises(DataFileError, match=r"5 features, the run's model takes 6"):
        load_node_data(config, str(path))
    with pytest.raises(DataFileError, match=r"label 2, but the run's model has 2 classes"):
        load_node_data(config.replace(num_features=5, num_classes=2), str(path))
    with pytest.raises(DataFileError, match="5 features, the run's model takes 4"):
        with_data_shape(FedMoEConfig(dataset=f"csv:{path}", num_features=4))


# ---------------------------------------------------------------------- config
def test_dataset_specs_in_the_run_config():
    assert FedMoEConfig(dataset="csv:/x.csv").is_file_data
    with pytest.raises(ConfigError, match="KIND:PATH"):
        FedMoEConfig(dataset="xls:/x.xls")
    with pytest.raises(ConfigError, match="needs num-features and num-classes"):
        FedMoEConfig(dataset="node")
    with pytest.raises(ConfigError, match="trains on dataset 'pystdlib'"):
        FedMoEConfig(dataset="csv:/x.csv", model="tmoe")
    with pytest.raises(ConfigError, match="leave num-features"):
        FedMoEConfig(dataset="digits", num_features=32)
    with pytest.raises(ConfigError, match="client-id"):
        NodeSettings.from_node_config({"data-path": "/x.csv"})
    node = NodeSettings.from_node_config({"data-path": "/x.csv", "client-id": "a"})
    assert (node.partition_id, node.num_partitions) == (0, 1)


def test_simulation_partitions_a_csv_like_digits(tmp_path):
    x, y = blobs(n=120, features=7, classes=4)
    path = write_csv(tmp_path / "d.csv", x, y)
    config = with_data_shape(FedMoEConfig(dataset=f"csv:{path}", model="moe"))
    assert (config.num_features, config.num_classes) == (7, 4)
    sizes = check_split(config, 3)
    assert sum(a + b for a, b in sizes) == 120
    seen = []
    for p in range(3):
        data = load_client_data(config, p, 3)
        assert data.train.tensors[0].shape[1] == 7
        seen += [tuple(r) for r in torch.cat([data.train.tensors[0], data.test.tensors[0]])
                 .tolist()]
    assert sorted(seen) == sorted(tuple(r) for r in torch.tensor(x).tolist())  # a partition


def test_node_splits_its_own_file_into_train_and_test(tmp_path):
    x, y = blobs(n=50)
    path = write_csv(tmp_path / "d.csv", x, y)
    config = FedMoEConfig(dataset="node", num_features=5, num_classes=3, model="moe",
                          test_fraction=0.2)
    data = load_node_data(config, str(path))
    assert (len(data.train), len(data.test)) == (40, 10)
    both = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, torch.tensor(x).tolist()))


# ---------------------------------------------------------------------- client
NODE_CONFIG = FedMoEConfig(num_server_rounds=3, sample_rate=0.25, target_epsilon=4.0,
                           model="moe", dataset="node", num_features=5, num_classes=3)


@pytest.mark.parametrize("kind", [MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE])
def test_client_refuses_a_bad_file_before_any_charge(tmp_path, kind):
    bad = tmp_path / "bad.csv"
    bad.write_text("f0,f1,label\n" + "".join(f"{i},nan,{i % 2}\n" for i in range(30)))
    state = tmp_path / "state"
    reply = app(message(kind=kind, config=NODE_CONFIG),
                context(state_dir=str(state), data_path=str(bad), client_id="a"))
    assert reply.has_error() and reply.error.code == DATA_UNUSABLE
    assert str(bad) in reply.error.reason and "NaN" in reply.error.reason
    assert not (state / LEDGER_FILE).exists()  # nothing charged, nothing created


def test_client_trains_on_its_own_file(tmp_path):
    x, y = blobs(n=80)
    path = write_csv(tmp_path / "d.csv", x, y)
    ctx = context(state_dir=str(tmp_path / "s"), data_path=str(path), client_id="a")
    info = app(message(kind=MessageType.QUERY, config=NODE_CONFIG), ctx)
    assert not info.has_error(), info.error.reason if info.has_error() else ""
    assert info.content.config_records["client"]["num-train"] == 64
    reply = app(message(config=NODE_CONFIG, plan=train_plan(1, NODE_CONFIG)), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert (tmp_path / "s" / LEDGER_FILE).exists()


def test_pinned_delta_and_accountant_refuse_another(tmp_path):
    x, y = blobs(n=80)
    path = write_csv(tmp_path / "d.csv", x, y)
    node = dict(state_dir=str(tmp_path / "s"), data_path=str(path), client_id="a")
    # the query reports the pinned values, before any ledger exists
    info = app(message(kind=MessageType.QUERY, config=NODE_CONFIG),
               context(**node, delta=1e-3, accountant="rdp"))
    record = info.content.config_records["client"]
    assert (record["ledger-delta"], record["ledger-accountant"]) == (1e-3, "rdp")
    # a server planning another δ (1e-4) or accountant is refused, nothing charged
    for pins in ({"delta": 1e-3}, {"accountant": "prv"}):
        reply = app(message(config=NODE_CONFIG, plan=train_plan(1, NODE_CONFIG, delta=1e-4)),
                    context(**node, **pins))
        assert reply.has_error() and reply.error.code == LEDGER_UNUSABLE
        assert "pinned" in reply.error.reason
        assert not (tmp_path / "s" / LEDGER_FILE).exists()
    # at its pinned values it trains, and its ledger is created at them
    ok = app(message(config=NODE_CONFIG, plan=train_plan(1, NODE_CONFIG, delta=1e-3)),
             context(**node, delta=1e-3, accountant="rdp"))
    assert not ok.has_error(), ok.error.reason if ok.has_error() else ""
    # re-pinning the node to other values than its ledger's is refused at the query
    info = app(message(kind=MessageType.QUERY, config=NODE_CONFIG),
               context(**node, delta=1e-4, accountant="rdp"))
    assert info.has_error() and "created at δ=0.001" in info.error.reason
    # a pinned δ the node's data cannot support (not below 1/n) is refused up front
    info = app(message(kind=MessageType.QUERY, config=NODE_CONFIG),
               context(state_dir=str(tmp_path / "t"), data_path=str(path), client_id="b",
                       delta=0.5))
    assert info.has_error() and info.error.code == DELTA_TOO_LARGE


def test_simulate_preflight_exits_2_on_a_bad_file(tmp_path, capsys):
    from fedmoe.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n" + "".join(f"{i},{i},0\n" for i in range(30)))
    out = tmp_path / "run"
    code = main(["simulate", "--clients", "3", "--out", str(out),
                 "--run-config", f"dataset='csv:{bad}'"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "at least 2 classes" in err
    assert not out.exists()  # refused before anything started
    assert main(["simulate", "--clients", "3", "--out", str(out), "--run-config",
                 "dataset='node' num-features=5 num-classes=3"]) == 2
    assert "for deployments" in capsys.readouterr().err


def test_server_plans_a_pinned_node_at_its_delta_and_leaves_out_a_bad_file(tmp_path):
    """Through the real strategy: a node pinned to δ=1e-3 is planned and charged at it (the
    run's δ rule would give 1e-4 for n=64); a run that asks another target-delta leaves it
    out with the reason; a node with a malformed file is left out at the query."""
    x, y = blobs(n=80)
    good = write_csv(tmp_path / "good.csv", x, y)
    bad = tmp_path / "bad.csv"
    bad.write_text("f0,label\n" + "".join(f"{i},1\n" for i in range(30)))
    nodes = {0: {"data_path": str(good), "client_id": "a", "state_dir": str(tmp_path / "a"),
                 "delta": 1e-3, "accountant": "rdp"},
             1: {"data_path": str(bad), "client_id": "b", "state_dir": str(tmp_path / "b")}}
    with LedgerBook(tmp_path / "server.sqlite") as book:
        grid = LocalGrid(2, node_configs=nodes)
        strategy = FedMoE(NODE_CONFIG, book=book)
        strategy.discover(grid, grid.get_node_ids(), 1)
        assert strategy.plans["a"].delta == 1e-3 and "b" not in strategy.plans
        assert "at least 2 classes" in strategy.all_excluded()["node-11"]
        arrays = to_arrays(split_state_dict(model_for(NODE_CONFIG)))
        replies = grid.send_and_receive(
            list(strategy.configure_train(1, arrays, ConfigRecord(), grid)))
        assert [r.has_error() for r in replies] == [False]
    with LedgerBook(tmp_path / "a" / LEDGER_FILE, read_only=True) as client_book:
        assert client_book.get("a").delta == 1e-3
    with LedgerBook(tmp_path / "server2.sqlite") as book:
        strategy = FedMoE(NODE_CONFIG.replace(target_delta=1e-4), book=book)
        strategy.discover(LocalGrid(2, node_configs=nodes), [10], 1)
        assert "δ=0.001" in strategy.excluded["a"] and "target-delta=0.0001" in \
            strategy.excluded["a"]


# ---------------------------------------------------------------------- feature bounds
def wide(n: int = 60):
    """Two features of very different public ranges: a count in [0, 4000], a share."""
    rng = np.random.default_rng(3)
    y = np.arange(n) % 2
    x = np.column_stack([rng.uniform(0, 4000, n), rng.uniform(0, 1, n)])
    return x.astype(np.float32), y.astype(np.int64)


def test_feature_bounds_map_each_public_range_to_unit_and_clip(tmp_path):
    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    bounds = tmp_path / "bounds.csv"
    bounds.write_text("feature,low,high\nshare,0,2\narea,1000,3000\n")  # any order, by name
    got = load_file(f"csv:{path}", "label", str(bounds))
    # the naive formula per element: (clip(x, lo, hi) - lo) / (hi - lo)
    want = np.column_stack([(np.clip(x[:, 0], 1000, 3000) - 1000) / 2000, x[:, 1] / 2])
    np.testing.assert_allclose(got.x, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.y, y)
    whole = load_file(f"csv:{path}", "label", "0:4000")  # one range for every feature
    np.testing.assert_allclose(whole.x, x / 4000, rtol=1e-6, atol=1e-7)
    np.savez(tmp_path / "d.npz", x=x, y=y)  # no names: rows by 0-based index
    (tmp_path / "idx.csv").write_text("feature,low,high\n0,1000,3000\n1,0,2\n")
    np.testing.assert_allclose(load_file(f"npz:{tmp_path / 'd.npz'}", "label",
                                         str(tmp_path / "idx.csv")).x, want, rtol=1e-6,
                               atol=1e-7)
    assert load_file(f"csv:{path}").x.max() > 1000  # the cached raw read is unchanged


@pytest.mark.parametrize("text, match", [
    ("name,lo,hi\narea,0,1\nshare,0,1\n", "header must be feature,low,high"),
    ("feature,low,high\narea,0,4000\n", r"no bounds for 1 feature\(s\) \(share\)"),
    ("feature,low,high\narea,0,4000\nshare,0,1\nsize,0,1\n", "'size' is not in the data"),
    ("feature,low,high\narea,0,4000\narea,0,1\nshare,0,1\n", "listed twice"),
    ("feature,low,high\narea,0,4000\nshare,1,1\n", "finite low < high"),
    ("feature,low,high\narea,0,inf\nshare,0,1\n", "finite low < high"),
    ("feature,low,high\narea,zero,4000\nshare,0,1\n", "must be numbers"),
    ("feature,low,high\narea,0\nshare,0,1\n", "each row is feature,low,high"),
    ("feature,low,high\narea,0,4000\n7,0,1\n", "'7' is not in the data"),
])
def test_every_fault_of_a_bounds_file_is_one_clear_error(tmp_path, text, match):
    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    bounds = tmp_path / "bounds.csv"
    bounds.write_text(text)
    with pytest.raises(DataFileError, match=match) as err:
        load_file(f"csv:{path}", "label", str(bounds))
    assert str(bounds) in str(err.value)


@pytest.mark.parametrize("spec", ["5:1", "3:3", "0:inf", "nan:1", "-inf:0"])
def test_a_bad_bounds_range_is_refused_by_the_config(spec):
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        FedMoEConfig(dataset="csv:/x.csv", feature_bounds=spec)


def test_feature_bounds_need_a_data_file():
    with pytest.raises(ConfigError, match="leave feature-bounds empty"):
        FedMoEConfig(feature_bounds="0:1")
    FedMoEConfig(dataset="node", num_features=2, num_classes=2, feature_bounds="0:1")


def test_simulation_and_node_train_on_the_scaled_features(tmp_path):
    x, y = wide(n=90)
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    config = with_data_shape(FedMoEConfig(dataset=f"csv:{path}", model="lmoe",
                                          feature_bounds="0:4000"))
    for p in range(3):
        data = load_client_data(config, p, 3)
        both = torch.cat([data.train.tensors[0], data.test.tensors[0]])
        assert 0 <= both.min() and both.max() <= 1
    node = FedMoEConfig(dataset="node", num_features=2, num_classes=2, model="lmoe",
                        feature_bounds="0:4000")
    data = load_node_data(node, str(path))
    assert data.train.tensors[0].max() <= 1


def test_unscaled_features_warn_naming_the_columns_and_the_fix(tmp_path):
    from fedmoe.data import DataScaleWarning, _warn_once
    from fedmoe.data.files import scale_warning

    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    spec = f"csv:{path}"
    message = scale_warning(spec, load_file(spec))
    assert message and "1 feature(s)" in message and "area up to" in message
    assert "feature-bounds" in message and "share" not in message.split("(")[1]
    assert scale_warning(spec, load_file(spec, "label", "0:4000")) is None
    _warn_once.cache_clear()
    node = FedMoEConfig(dataset="node", num_features=2, num_classes=2, model="lmoe")
    with pytest.warns(DataScaleWarning, match="area up to"):
        load_node_data(node, str(path))


def test_bounds_that_clip_much_of_a_feature_warn_naming_it_and_its_share(tmp_path):
    from fedmoe.data import DataScaleWarning, _warn_once
    from fedmoe.data.files import CLIP_WARNING_SHARE, scale_warning
    from simulations.runner import preflight

    x, y = wide()  # area uniform in [0, 4000], share in [0, 1]
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    spec, raw = f"csv:{path}", load_file(f"csv:{path}")
    bounds = tmp_path / "b.csv"
    bounds.write_text("feature,low,high\narea,0,1000\nshare,0,1\n")  # a range in other units
    outside = float((x[:, 0] > 1000).mean())
    message = scale_warning(spec, raw, str(bounds))
    assert message and "1 feature(s)" in message and f"area: {outside:.0%} outside [0, 1000]" \
        in message and "share" not in message
    assert scale_warning(spec, raw, "0:4000") is None  # the public range: nothing clipped
    # the threshold: bounds that clip 4 of the 60 values (6.7 %) warn, 3 (5 %) do not
    edge = np.sort(raw.x[:, 0].astype(np.float64))
    assert CLIP_WARNING_SHARE == 0.05
    assert scale_warning(spec, raw, f"0:{(edge[-5] + edge[-4]) / 2}") is not None
    assert scale_warning(spec, raw, f"0:{(edge[-4] + edge[-3]) / 2}") is None
    # where a user meets it: fedmoe simulate's pre-flight, a SuperNode's log
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        preflight(FedMoEConfig(dataset=spec, run_dir=str(tmp_path / "a"),
                               feature_bounds=str(bounds)), 3)
    assert "fedmoe: warning: " in err.getvalue() and "area: " in err.getvalue()
    _warn_once.cache_clear()
    node = FedMoEConfig(dataset="node", num_features=2, num_classes=2, model="lmoe",
                        feature_bounds=str(bounds))
    with pytest.warns(DataScaleWarning, match="outside their feature-bounds"):
        load_node_data(node, str(path))


def test_simulate_refuses_an_incomplete_bounds_file_before_it_starts(tmp_path, capsys):
    from fedmoe.cli import main

    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    bounds = tmp_path / "b.csv"
    bounds.write_text("feature,low,high\narea,0,4000\n")
    assert main(["simulate", "--clients", "3", "--out", str(tmp_path / "run"),
                 "--run-config", f"dataset='csv:{path}' feature-bounds='{bounds}'"]) == 2
    err = capsys.readouterr().err
    assert "no bounds for 1 feature(s) (share)" in err and str(bounds) in err
    assert not (tmp_path / "run").exists()


def test_preflight_prints_the_scale_warning_once_the_data_is_read(tmp_path, capsys):
    from simulations.runner import preflight

    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    preflight(FedMoEConfig(dataset=f"csv:{path}", run_dir=str(tmp_path / "a")), 3)
    err = capsys.readouterr().err
    assert err.startswith("fedmoe: warning: ") and "area up to" in err
    preflight(FedMoEConfig(dataset=f"csv:{path}", run_dir=str(tmp_path / "b"),
                           feature_bounds="0:4000"), 3)
    assert capsys.readouterr().err == ""


def test_tabular_bounds_round_away_from_the_data(tmp_path):
    from simulations.tabular import main, outward

    assert [outward(v, True) for v in (2501, 0.43, 1.0, 0.0, -0.57)] == [3000, 0.5, 1, 0, -0.5]
    assert [outward(v, False) for v in (143.5, 0.43, -0.57, 7)] == [100, 0.4, -0.6, 7]
    assert main([str(tmp_path)]) == 0
    for name in ("cancer", "wine"):
        data = load_file(f"csv:{tmp_path / name}.csv")
        scaled = load_file(f"csv:{tmp_path / name}.csv", "label",
                           str(tmp_path / f"{name}_bounds.csv"))
        assert np.array_equal(scaled.y, data.y)
        assert scaled.x.min() >= 0 and scaled.x.max() <= 1 and scaled.x.max() > 0.5


def test_a_spreadsheets_byte_order_mark_is_read_as_nothing(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM: the first column keeps its name."""
    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y, header=["area", "share", "label"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    bounds = tmp_path / "bounds.csv"
    bounds.write_bytes(b"\xef\xbb\xbffeature,low,high\narea,0,4000\nshare,0,1\n")
    got = load_file(f"csv:{path}", "label", str(bounds))
    assert got.names == ("area", "share")
    np.testing.assert_allclose(got.x[:, 0], x[:, 0] / 4000, rtol=1e-6, atol=1e-7)


def test_bounds_name_columns_in_a_file_with_names_and_indices_in_one_without(tmp_path):
    x, y = wide()
    digits = write_csv(tmp_path / "d.csv", x, y, header=["1", "0", "label"])  # names look
    bounds = tmp_path / "b.csv"                                         # like indices
    bounds.write_text("feature,low,high\n0,0,1\n1,0,4000\n")
    got = load_file(f"csv:{digits}", "label", str(bounds))
    np.testing.assert_allclose(got.x[:, 0], x[:, 0] / 4000, rtol=1e-6, atol=1e-7)  # "1"
    same = write_csv(tmp_path / "a.csv", x, y, header=["a", "a", "label"])
    with pytest.raises(DataFileError, match="more than one column named 'a'"):
        load_file(f"csv:{same}", "label", str(bounds))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    bounds.write_text("feature,low,high\n0,0,4000\n\u00b2,0,1\n")  # a digit, not ASCII
    with pytest.raises(DataFileError, match="'\u00b2' is not in the data"):
        load_file(f"npz:{tmp_path / 'd.npz'}", "label", str(bounds))


@pytest.mark.parametrize("spec", ["0:1:2", "0:", " ", "255"])
def test_a_broken_range_is_named_as_one(tmp_path, spec):
    x, y = wide()
    path = write_csv(tmp_path / "d.csv", x, y)
    with pytest.raises(DataFileError, match="not a range LOW:HIGH"):
        load_file(f"csv:{path}", "label", spec)


def test_image_folders_refuse_bounds(tmp_path):
    from PIL import Image

    for label in (0, 1):
        (tmp_path / "img" / str(label)).mkdir(parents=True)
        for i in range(6):
            image = Image.new("L", (4, 4), color=40 * i + label)
            image.save(tmp_path / "img" / str(label) / f"{i}.png")
    assert load_file(f"images:{tmp_path / 'img'}").x.max() <= 1
    with pytest.raises(DataFileError, match="pixels in \\[0, 1\\] already"):
        load_file(f"images:{tmp_path / 'img'}", "label", "0:255")


def test_export_names_a_data_or_bounds_file_it_cannot_use(monkeypatch, tmp_path, capsys):
    import fedmoe.export
    from fedmoe.cli import main

    def gone(*args, **kwargs):
        raise DataFileError("feature-bounds '/gone.csv': not a range LOW:HIGH ...")

    monkeypatch.setattr(fedmoe.export, "export_client", gone)
    assert main(["export", str(tmp_path), "--client", "partition-0",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert capsys.readouterr().err.startswith("fedmoe: error: feature-bounds '/gone.csv'")


def test_export_refuses_a_data_or_bounds_file_edited_since_the_run(tmp_path, capsys):
    """results.json records the SHA-256 of the files the run config names; an export reads
    the client's split again (to measure, to distill), so an edited file would measure the
    model on other records than it was trained and tested on."""
    from fedmoe.cli import main
    from fedmoe.export import ExportError, export_client
    from simulations.inline import run_inline

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2)).astype(np.float32) * 50
    data = write_csv(tmp_path / "data.csv", x, np.arange(120) % 2)
    bounds = tmp_path / "bounds.csv"
    bounds.write_text("feature,low,high\nf0,-200,200\nf1,-200,200\n")
    run_dir = tmp_path / "run"
    run_inline(FedMoEConfig(num_server_rounds=1, run_dir=str(run_dir), dataset=f"csv:{data}",
                            feature_bounds=str(bounds)), 2)
    recorded = json.loads((run_dir / "results.json").read_text())["inputs"]
    assert set(recorded) == {"dataset", "feature-bounds"}
    original = data.read_bytes(), bounds.read_bytes()
    out = tmp_path / "model.pt"
    for path, key in ((data, "dataset"), (bounds, "feature-bounds")):
        edited = path.read_bytes()
        path.write_bytes(edited.replace(b"-200", b"-300") if path == bounds
                         else edited + edited.splitlines(keepends=True)[1])  # one record more
        with pytest.raises(ExportError, match=f"changed since the run started \\({key} = "):
            export_client(run_dir, "partition-0", out)
        assert main(["export", str(run_dir), "--client", "partition-0", "--out", str(out)]) == 2
        assert "put the file(s) back as they were" in capsys.readouterr().err
        assert not out.exists()
        data.write_bytes(original[0]), bounds.write_bytes(original[1])
    assert export_client(run_dir, "partition-0", out) and out.is_file()  # as they were: it exports
