"""``centring-fold``: after μ moves, its move is folded into the bias of the layer that
reads x - μ, so the model computes the function it was trained as. Checked against direct
evaluation of that function (a linear layer read at the old μ, and the weighted average of
the clients' functions for the server's aggregate), for every centred method, on the
server and on the client (``local``), with the ids, noise seeds and records it touches."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch.utils.data import TensorDataset

from fedmoe.config import FedMoEConfig
from fedmoe.methods import method_model, noise_keys, result_keys, server_centre_fold
from fedmoe.models.centre import CENTRE_RATE, CentreFold, folded_bias
from fedmoe.privacy import LEDGER_FILE, LedgerBook
from fedmoe.records import to_arrays
from fedmoe.roles import split_state_dict
from fedmoe.training import train_plain_round
from server.strategy import FedMoE
from tests.helpers import LocalGrid
from tests.test_feature_centre import CENTRED

READERS = {"lmoe": "trunk", "fedavg": "head", "fedper": "body", "local": "head"}


def _config(name, **keys):
    return FedMoEConfig(expert_noise_limit=1e6, **CENTRED[name], **keys)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_the_folded_bias_reads_the_new_mean_as_the_old_bias_read_the_old(kind):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(5, 7)), rng.normal(size=5).astype(np.float32)
    mu_from, mu_to, x = rng.normal(size=7), rng.normal(size=7), rng.normal(size=(9, 7))
    if kind == "torch":
        w, b, mu_from, mu_to, x = (torch.tensor(a, dtype=torch.float64)
                                   for a in (w, b, mu_from, mu_to, x))
    new = folded_bias(w, b, mu_to - mu_from)
    before, after = (x - mu_from) @ w.T + b, (x - mu_to) @ w.T + new
    assert np.allclose(np.asarray(after), np.asarray(before), atol=1e-5)
    assert not np.allclose(np.asarray((x - mu_to) @ w.T + b), np.asarray(before), atol=1e-2)
    if kind == "numpy":
        assert new.dtype == np.float32  # the bias's dtype kept


@pytest.mark.parametrize("name", sorted(CENTRED))
def test_each_centred_model_names_the_layer_that_reads_the_centred_input(name):
    model = method_model(_config(name))
    fold = CentreFold.of(model)
    reader = READERS[name]
    assert fold == CentreFold("centre.shift", f"{reader}.weight", f"{reader}.bias", reader)
    # the reader is the first layer x - μ reaches: moving μ changes its output only
    x = torch.rand(4, 64)
    with torch.no_grad():
        model.eval()
        first = model.get_submodule(reader)
        seen = []
        handle = first.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        model(x)
        handle.remove()
    assert torch.allclose(seen[0], x - model.centre.mean)
    assert CentreFold.of(method_model(_config(name, feature_centring=False))) is None


def test_the_server_folds_only_a_shared_centre_and_only_when_asked():
    assert server_centre_fold(_config("lmoe")).bias == "trunk.bias"
    assert server_centre_fold(_config("fedper")).bias == "body.bias"
    assert server_centre_fold(_config("local")) is None  # the client's own: folded there
    assert server_centre_fold(_config("lmoe", centring_fold=False)) is None
    assert server_centre_fold(_config("fedavg", mlp_centring=False)) is None
    assert server_centre_fold(FedMoEConfig(model="moe")) is None  # no centre
    state = torch.random.get_rng_state()
    server_centre_fold(_config("lmoe"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's draws untouched


def _linear(arrays, fold, x, shift=None):
    """The reader's output W (x - κφ) + b from named arrays (float64)."""
    w, b = (np.asarray(arrays[k], np.float64) for k in (fold.weight, fold.bias))
    phi = np.asarray(arrays[fold.shift] if shift is None else shift, np.float64)
    return (x - CENTRE_RATE * phi) @ w.T + b


@pytest.mark.parametrize("name", ["lmoe", "fedavg", "fedper"])
@pytest.mark.parametrize("fold_on", [True, False])
def test_the_servers_new_global_model_computes_the_clients_averaged_function(
        tmp_path, name, fold_on):
    config = _config(name, centring_fold=fold_on, ema_decay=0.0)
    fold = CentreFold.of(method_model(config))
    rng = np.random.default_rng(1)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        sent = to_arrays(split_state_dict(method_model(config)))
        sent_arrays = {k: a.numpy() for k, a in sent.items()}
        sent_arrays[fold.shift] = rng.normal(size=64).astype(np.float32)  # a μ already moved
        sent = to_arrays({k: torch.tensor(v) for k, v in sent_arrays.items()})
        list(strategy.configure_train(2, sent, ConfigRecord(), LocalGrid(2)))
        replies = []
        for n in (30, 90):  # each client's trained reader and its own moved μ
            arrays = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                      for k, v in sent_arrays.items()}
            replies.append((arrays, n))
        new = {k: a.numpy() for k, a in strategy._aggregate(replies).items()}
    x = rng.uniform(0, 1, size=(6, 64))
    # the clients trained reading the μ sent: the average of their functions there
    oracle = sum(n * _linear(a, fold, x, shift=sent_arrays[fold.shift])
                 for a, n in replies) / sum(n for _, n in replies)
    got = _linear(new, fold, x)
    if fold_on:
        np.testing.assert_allclose(got, oracle, atol=1e-4)
        assert not np.allclose(new[fold.bias], sum(n * a[fold.bias] for a, n in replies) / 120)
    else:
        assert not np.allclose(got, oracle, atol=1e-2)  # the plain average is shifted
    for key in new:  # the fold moves the reader's bias alone
        if key != fold.bias:
            np.testing.assert_allclose(
                new[key], sum(n * a[key] for a, n in replies) / 120, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold_on", [True, False])
def test_a_local_centre_is_folded_by_its_client_after_its_round(fold_on):
    """``local``: the model the round leaves reads the current μ and computes what it
    trained as, W (x - μ₀) + b with μ₀ the μ it read (direct evaluation of the copy
    trained without the fold, the same batches)."""
    model = method_model(_config("local")).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    data = TensorDataset(x, y)
    plain, folded = model, copy.deepcopy(model)
    for m, fold in ((plain, False), (folded, fold_on)):
        train_plain_round(m, data, steps=6, sample_rate=0.3, learning_rate=0.5,
                          generator=torch.Generator().manual_seed(3), fold_centre=fold)
    assert not torch.allclose(plain.centre.mean, plain.centre.reference)  # μ moved
    with torch.no_grad():
        trained = (x - plain.centre.reference) @ plain.head.weight.T + plain.head.bias
        folded.eval()
        out, _ = folded(x)
    assert torch.allclose(plain.centre.mean, folded.centre.mean)  # the same μ and W
    if fold_on:
        assert torch.allclose(out, trained, atol=1e-10)
    else:
        assert not torch.allclose(out, trained, atol=1e-3)


@pytest.mark.parametrize("name", ["lmoe", "fedavg"])
def test_a_client_leaves_a_shared_centre_to_the_server(name):
    model = method_model(_config(name)).double()
    before = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(20, 64, generator=g, dtype=torch.float64),
                         torch.randint(0, 10, (20,), generator=g))
    for m, fold in ((model, True), (before, False)):
        train_plain_round(m, data, steps=3, sample_rate=0.5, learning_rate=0.5,
                          generator=torch.Generator().manual_seed(1), fold_centre=fold)
    for (k, a), b in zip(model.state_dict().items(), before.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # no client-side fold: the server's would double it


def test_the_fold_shares_noise_draws_and_leaves_uncentred_and_older_runs_their_ids():
    on, off = _config("lmoe"), _config("lmoe", centring_fold=False)
    assert noise_keys(on) == noise_keys(off)  # paired: the same DP noise in a grid
    assert result_keys(on) != result_keys(off)  # but two runs
    assert "centring-fold" not in result_keys(off)  # as recorded before the key existed
    for name in ("lmoe", "fedavg"):  # nothing centred: the key is not read
        plain = {"feature_centring": False} if name == "lmoe" else {"mlp_centring": False}
        assert (result_keys(_config(name, **plain))
                == result_keys(_config(name, centring_fold=False, **plain)))
        assert "centring-fold" not in result_keys(_config(name, **plain))
    assert "centring-fold" not in result_keys(FedMoEConfig(model="moe"))
    recorded = {k: v for k, v in on.to_run_config().items() if k != "centring-fold"}
    assert FedMoEConfig.from_recorded(recorded).centring_fold is False


@pytest.mark.parametrize("fold_on", [True, False])
def test_the_dp_round_of_local_folds_what_it_trained(monkeypatch, fold_on):
    """The DP path (train_dp_round): the folded model computes W (x - μ₀) + b of the
    parameters the round ended with, captured just before the fold."""
    import fedmoe.training as training
    from fedmoe.training import train_dp_round

    seen = []
    real = training.end_local_round

    def capture(model):
        seen.append((model.centre.reference.clone(), model.head.bias.detach().clone()))
        real(model)

    monkeypatch.setattr(training, "end_local_round", capture)
    model = method_model(_config("local")).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (40,), generator=g)
    train_dp_round(model, TensorDataset(x, y), steps=5, sample_rate=0.3, noise_multiplier=1.0,
                   max_grad_norm=1.0, learning_rate=0.5, fold_centre=fold_on)
    assert len(seen) == int(fold_on)
    if fold_on:
        reference, bias = seen[0]
        with torch.no_grad():
            model.eval()
            out, _ = model(x)
            assert torch.allclose(out, (x - reference) @ model.head.weight.T + bias,
                                  atol=1e-10)


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("fold_on", [True, False])
def test_the_client_app_passes_the_runs_centring_fold_to_its_round(monkeypatch, tmp_path,
                                                                   private, fold_on):
    import clients.app as client_app
    from tests.helpers import context, message, train_plan

    config = _config("local", centring_fold=fold_on, num_server_rounds=3, sample_rate=0.25,
                     target_epsilon=4.0 if private else float("inf"))
    asked = []
    name = "train_dp_round" if private else "train_plain_round"
    real = getattr(client_app, name)
    monkeypatch.setattr(client_app, name, lambda *a, **k: asked.append(k["fold_centre"])
                        or real(*a, **k))
    if private:
        plan = train_plan(config=config, sigma=2.0)
    else:  # ε = ∞: a non-private round (σ = 0)
        from fedmoe.privacy import plan_client
        from fedmoe.records import RoundPlan

        plan = RoundPlan.for_training(1, plan_client(config, "c", num_train=100,
                                                     budget=float("inf"), delta=1e-4))
        assert plan.noise_multiplier == 0
    arrays = to_arrays(split_state_dict(method_model(config)))  # local: nothing shared
    client_app.app(message(config=config, plan=plan, arrays=arrays),
                   context(state_dir=str(tmp_path)))
    assert asked == [fold_on]


@pytest.mark.parametrize("name", ["lmoe", "fedavg"])
def test_the_fold_follows_the_server_optimisers_step(tmp_path, name):
    """With server momentum and a server learning rate the new global model computes what
    the server optimiser's step (FedAvgM) gives read at the μ sent: the fold comes after
    the step (folding the aggregate before it would scale the fold by the rate)."""
    from server.aggregation import server_step

    config = _config(name, ema_decay=0.0, server_momentum=0.9, server_learning_rate=0.5)
    fold = CentreFold.of(method_model(config))
    rng = np.random.default_rng(2)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        sent = {k: a.numpy() for k, a in to_arrays(split_state_dict(method_model(config))).items()}
        sent[fold.shift] = rng.normal(size=64).astype(np.float32)
        list(strategy.configure_train(2, to_arrays({k: torch.tensor(v) for k, v in sent.items()}),
                                      ConfigRecord(), LocalGrid(2)))
        strategy.velocity = {k: rng.normal(0, 0.1, v.shape) for k, v in sent.items()}
        velocity = {k: v.copy() for k, v in strategy.velocity.items()}
        replies = [({k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                     for k, v in sent.items()}, n) for n in (40, 80)]
        new = {k: a.numpy() for k, a in strategy._aggregate(replies).items()}
    average = {k: sum(n * a[k].astype(np.float64) for a, n in replies) / 120 for k in sent}
    stepped = server_step(sent, average, velocity, 0.9, 0.5)
    x = rng.uniform(0, 1, size=(6, 64))
    np.testing.assert_allclose(_linear(new, fold, x),
                               _linear(stepped, fold, x, shift=sent[fold.shift]), atol=1e-4)
    np.testing.assert_allclose(new[fold.shift], stepped[fold.shift], rtol=1e-6)


def test_a_run_folder_that_centres_nothing_resumes_whatever_centring_fold_says():
    """A checkpoint written before the key existed reads it as false; a run that centres
    nothing does not read it, so today's default does not refuse the resume. A centred
    run does read it: there the difference is refused."""
    from server.checkpoint import config_differences

    for plain in (_config("fedavg", mlp_centring=False), _config("lmoe", feature_centring=False),
                  FedMoEConfig(model="moe")):
        saved = {k: v for k, v in plain.to_run_config().items() if k != "centring-fold"}
        assert config_differences(saved, plain) == []
    centred = _config("lmoe")
    saved = {k: v for k, v in centred.to_run_config().items() if k != "centring-fold"}
    assert config_differences(saved, centred) == [
        "centring-fold (run folder: False, now: True)"]
