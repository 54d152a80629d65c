"""Update codecs on the wire: the client encodes after DP noise, keeps its residual on disk,
the server decodes and validates (a malformed update is dropped with the reason), the global
tensors travel encoded per client, and the bytes reported are the serialised sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.common.serde import array_record_to_proto, config_record_to_proto

import clients.app as client_app
from clients.state import REFERENCE_FILE, RESIDUAL_FILE, open_store
from fedmoe.compression import CODECS, Codec
from fedmoe.config import FedMoEConfig, NodeSettings
from fedmoe.models import model_for
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import (
    ARRAYS,
    BAD_MESSAGE,
    DOWNLINK,
    UPDATE,
    decode_upload,
    encode_upload,
    to_arrays,
    update_bytes,
)
from fedmoe.roles import split_state_dict
from server.strategy import FedMoE
from tests.helpers import LocalGrid, context, message, train_plan

#: The default model (lmoe), a short round: q = 0.25 → 4 DP-SGD steps.
CONFIG = FedMoEConfig(num_server_rounds=3, sample_rate=0.25, target_epsilon=4.0)


def initial(config: FedMoEConfig = CONFIG) -> ArrayRecord:
    return to_arrays(split_state_dict(model_for(config)))


@pytest.fixture
def book(tmp_path):
    with LedgerBook(tmp_path / "server" / LEDGER_FILE) as b:
        yield b


# ----------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("name", CODECS)
def test_upload_round_trip_and_its_byte_count(name):
    start = split_state_dict(model_for(CONFIG))
    trained = {k: v + 0.1 * torch.randn_like(v) for k, v in start.items()}
    codec = Codec(name, topk_fraction=0.05)
    record, residual = encode_upload(trained, start, codec, None)
    # the byte count is the record's protobuf serialisation
    assert update_bytes(RecordDict({ARRAYS: record})) == len(
        array_record_to_proto(record).SerializeToString())
    full = decode_upload(record, codec, {k: v.numpy() for k, v in start.items()})
    for key, value in trained.items():
        got = torch.from_numpy(full[key].numpy())
        assert got.dtype == value.dtype and got.shape == value.shape
        delta = (value - start[key]).double()
        err = (got.double() - value.double()).abs().max().item()
        if name == "none":
            assert err == 0  # exactly the trained tensors
        elif name == "q8":
            assert err <= delta.abs().max().item() / 127 + 1e-6
            # what the server decoded plus the residual is exactly the update
            np.testing.assert_allclose(got.double() - start[key].double() + residual[key],
                                       delta, atol=1e-6)
    if name != "none":  # one raw array: the payload and a small constant envelope
        payload = Codec(name, 0.05).encoded_bytes(
            {k: (tuple(v.shape), v.numpy().dtype.str) for k, v in start.items()})
        assert list(record.keys()) == [UPDATE]
        assert payload < update_bytes(RecordDict({ARRAYS: record})) < payload + 100


def test_codec_never_sees_a_pre_noise_tensor(monkeypatch):
    """The codec runs once per train round, after DP-SGD has returned, on the noised result:
    at σ = 1000 its input is far larger than any noise-free update could be (each of the
    ``steps`` DP-SGD steps moves the parameters by at most lr·C·B/(q·n) ≤ lr·C/q without
    noise, B ≤ n the batch size)."""
    config = CONFIG.replace(upload_codec="q8")
    events, seen = [], []
    real_round, real_encode = client_app.train_dp_round, Codec.encode

    def dp_round(*args, **kwargs):
        events.append("dp-sgd start")
        result = real_round(*args, **kwargs)
        events.append("dp-sgd done")
        return result

    def encode(self, update, rng=None):
        events.append("encode")
        seen.append({k: np.array(v, dtype=np.float64) for k, v in update.items()})
        return real_encode(self, update, rng)

    monkeypatch.setattr(client_app, "train_dp_round", dp_round)
    monkeypatch.setattr(Codec, "encode", encode)
    plan = train_plan(1, config, sigma=1000.0)
    reply = client_app.app(message(config=config, plan=plan), context())
    assert not reply.has_error()
    assert events == ["dp-sgd start", "dp-sgd done", "encode"]
    norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in seen[0].values()))
    noise_free_max = config.learning_rate * config.max_grad_norm * plan.steps / plan.sample_rate
    assert norm > 10 * noise_free_max


# --------------------------------------------------------------------- client state
def test_residual_lives_in_the_client_state_dir_and_feeds_the_next_round(tmp_path, monkeypatch):
    config = CONFIG.replace(upload_codec="sign")
    ctx = context(state_dir=str(tmp_path / "c0"))
    assert not client_app.app(message(config=config), ctx).has_error()
    path = tmp_path / "c0" / RESIDUAL_FILE
    stored = torch.load(path, weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in split_state_dict(model_for(config)).items()}
    assert {k: tuple(v.shape) for k, v in stored.items()} == shapes
    assert any(v.abs().sum() > 0 for v in stored.values())
    passed = []
    real = client_app.encode_upload

    def spy(trained, start, codec, residual, **kwargs):
        passed.append(residual)
        return real(trained, start, codec, residual, **kwargs)

    monkeypatch.setattr(client_app, "encode_upload", spy)
    # a fresh context (a restarted client): the residual comes from disk
    assert not client_app.app(message(config=config, server_round=2,
                                       plan=train_plan(2, config)),
                              context(state_dir=str(tmp_path / "c0"))).has_error()
    for key, value in stored.items():
        np.testing.assert_array_equal(passed[0][key], value.numpy())
    # error feedback off: no residual kept
    off = config.replace(error_feedback=False)
    client_app.app(message(config=off, server_round=3, plan=train_plan(3, off)),
                   context(state_dir=str(tmp_path / "c0")))
    assert not path.exists()


# -------------------------------------------------------------------------- server
def _train(strategy, grid, server_round, arrays):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return messages, grid.send_and_receive(messages)


def _tamper_truncate(record: ArrayRecord) -> ArrayRecord:
    array = record[UPDATE]
    return ArrayRecord({UPDATE: Array(dtype="uint8", shape=(len(array.data) - 1,),
                                      stype=array.stype, data=array.data[:-1])})


def _tamper_stype(record: ArrayRecord) -> ArrayRecord:
    array = record[UPDATE]
    return ArrayRecord({UPDATE: Array(dtype="uint8", shape=(len(array.data),),
                                      stype="fedmoe.codec.sign", data=array.data)})


def _tamper_scale(record: ArrayRecord) -> ArrayRecord:
    array = record[UPDATE]
    data = np.array([np.nan], "<f4").tobytes() + array.data[4:]
    return ArrayRecord({UPDATE: Array(dtype="uint8", shape=(len(data),), stype=array.stype,
                                      data=data)})


@pytest.mark.parametrize("tamper,reason", [
    (_tamper_truncate, "bytes, the global model's shapes need exactly"),
    (_tamper_stype, "this run expects 'fedmoe.codec.q8'"),
    (_tamper_scale, "scale must be finite"),
    (lambda _: initial(), "one array 'update'"),  # plain tensors where an update is due
])
def test_malformed_encoded_reply_is_dropped_with_the_reason(book, tamper, reason):
    config = CONFIG.replace(upload_codec="q8")
    grid, strategy = LocalGrid(2), FedMoE(config, book=book)
    _, replies = _train(strategy, grid, 1, initial(config))
    sizes = [update_bytes(r.content) for r in replies]
    bad = replies[0]
    bad.content[ARRAYS] = tamper(bad.content.array_records[ARRAYS])
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.history[-1]
    bad_client = strategy.clients[bad.metadata.src_node_id]
    assert len(record.rejected) == 1 and record.rejected[0].startswith(bad_client)
    assert reason in record.rejected[0]
    assert metrics["num-clients"] == 1 and bad_client not in record.train
    good = strategy.clients[replies[1].metadata.src_node_id]
    assert record.upload_bytes == {good: sizes[1]}  # serialised size as received
    assert set(arrays.keys()) == set(initial(config).keys())


def test_download_codec_sends_plain_tensors_first_then_updates(book):
    config = CONFIG.replace(download_codec="q4", upload_codec="topk", codec_topk_fraction=0.1)
    grid, strategy = LocalGrid(2), FedMoE(config, book=book)
    arrays = initial(config)
    for server_round in (1, 2):
        messages, replies = _train(strategy, grid, server_round, arrays)
        assert not any(r.has_error() for r in replies)
        for msg in messages:
            link = msg.content.config_records[DOWNLINK]
            assert link["codec"] == "q4" and (link["base"] == 0) == (server_round == 1)
            expected = array_record_to_proto(msg.content.array_records[ARRAYS]).ByteSize() \
                + config_record_to_proto(link).ByteSize()
            client = strategy.clients[msg.metadata.dst_node_id]
            assert strategy.history[-1].download_bytes[client] == expected
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert not strategy.history[-1].rejected
    # the client's reconstruction is the server's: both computed it from the same bytes
    for node, ctx in grid.contexts.items():
        store = open_store(ctx, NodeSettings.from_node_config(ctx.node_config))
        seq, held = store.load_reference()
        server_seq, server_held = strategy.downlink._held[strategy.clients[node]]
        assert seq == server_seq
        for key in held:
            np.testing.assert_array_equal(held[key], server_held[key])
    # a client that lost its reference refuses; the server then sends it plain tensors
    ctx = grid.contexts[10]
    store = open_store(ctx, NodeSettings.from_node_config(ctx.node_config))
    (store.root / REFERENCE_FILE).unlink()
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    refused = [r for r in replies if r.has_error()]
    assert len(refused) == 1 and refused[0].error.code == BAD_MESSAGE
    assert "holds nothing" in refused[0].error.reason
    strategy.aggregate_evaluate(2, replies)
    messages, replies = _train(strategy, grid, 3, arrays)
    bases = {m.metadata.dst_node_id: m.content.config_records[DOWNLINK]["base"]
             for m in messages}
    assert bases[10] == 0 and bases[11] > 0
    assert not any(r.has_error() for r in replies)


def test_client_refuses_an_encoded_message_of_another_codec(tmp_path):
    config = CONFIG.replace(download_codec="sign")
    msg = message(config=config)
    msg.content[DOWNLINK] = ConfigRecord({"codec": "q8", "seq": 1, "base": 0})
    reply = client_app.app(msg, context(state_dir=str(tmp_path / "c")))
    assert reply.has_error() and reply.error.code == BAD_MESSAGE
    assert "download-codec 'sign'" in reply.error.reason
    assert not (tmp_path / "c" / LEDGER_FILE).exists()  # refused before any charge


# ----------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("name", CODECS)
def test_two_round_simulation_with_each_codec_reports_its_bytes(tmp_path, name):
    from simulations.inline import run_inline

    config = FedMoEConfig(num_server_rounds=2, upload_codec=name, download_codec=name,
                          codec_topk_fraction=0.05, run_dir=str(tmp_path / "run"))
    results = run_inline(config, 2).results
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["upload-codec"] == name
    assert len(results["rounds"]) == 2 and not any(r["rejected"] for r in results["rounds"])
    plain = 0
    for key, value in split_state_dict(model_for(config)).items():
        plain += value.numel() * 4
    for rnd in saved["rounds"]:
        for client in rnd["clients"]:
            assert client["upload_bytes"] > 0 and client["download_bytes"] > 0
            assert client["personalized_accuracy"] is not None
            if name == "none":
                assert client["upload_bytes"] > plain  # float32 tensors and their envelope
            else:
                assert client["upload_bytes"] < plain / 3
    for client in saved["final"]["clients"]:
        assert 0 <= client["personalized_accuracy"] <= 1


@pytest.mark.parametrize("name", [c for c in CODECS if c != "none"])
def test_encoded_update_survives_flowers_serialisation(name):
    """What Flower's engine does to a reply on the way (protobuf out and back in)."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    start = split_state_dict(model_for(CONFIG))
    trained = {k: v + 0.1 for k, v in start.items()}
    record, _ = encode_upload(trained, start, Codec(name), None)
    content = recorddict_from_proto(recorddict_to_proto(RecordDict({ARRAYS: record})))
    received = content.array_records[ARRAYS]
    assert received[UPDATE].data == record[UPDATE].data
    glob = {k: v.numpy() for k, v in start.items()}
    a = decode_upload(received, Codec(name), glob)
    b = decode_upload(record, Codec(name), glob)
    for key in glob:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
