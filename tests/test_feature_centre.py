"""The learned feature centring of ``lmoe`` and the MLP baselines (``feature-centring``,
fedmoe.models.centre.FeatureCentre): its per-sample gradient against a naive one-sample
loop, book-keeping's and every DP mode's clipped sum against naive clipping, that it
trains μ alone and towards the features' mean, that losses and predictions are what they
claim, its role under every method, and run folders, checkpoints and pickles made before
it existed."""

import copy
import json
import pickle

import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import TensorDataset

from fedmoe.config import FedMoEConfig
from fedmoe.methods import method_model
from fedmoe.models.centre import CENTRE_RATE, FeatureCentre, begin_local_round
from fedmoe.privacy import make_private
from fedmoe.privacy.bookkeeping import BookKeeping
from fedmoe.roles import Role, tensor_roles
from fedmoe.training import unwrap


def _model(**keys):
    # experts on (ν limit above any client): the centring's loss is added to the router's
    return method_model(FedMoEConfig(expert_noise_limit=1e6, **keys)).double()


#: lmoe and each MLP baseline (linear for local and fedavg, as the grids run them; fedper
#: with its ReLU body), as keyword arguments of :func:`_model`.
CENTRED = {"lmoe": {}, "fedavg": {"method": "fedavg", "mlp_width": 0},
           "fedper": {"method": "fedper", "mlp_width": 16},
           "local": {"method": "local", "mlp_width": 0}}


def _loss(model, x, y):  # per-sample (B,)
    out, aux = model(x)
    return unwrap(model).task.loss(out, y) + aux


def _batch(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 64, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (n,), generator=g))


def _naive_per_sample(model, x, y):
    """(B, P) per-sample gradients of every trainable tensor, one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(len(x)):
        grads = torch.autograd.grad(_loss(model, x[b:b + 1], y[b:b + 1]).sum(), params,
                                    allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows)


def _with_mean(model, seed=1):
    with torch.no_grad():  # μ ≠ 0 and ≠ the batch mean: every term of the gradient counts
        model.centre.shift.copy_(torch.randn(64, generator=torch.Generator().manual_seed(seed),
                                             dtype=torch.float64))
    begin_local_round(model)  # the model reads this μ while training
    return model


@pytest.mark.parametrize("name", list(CENTRED))
def test_per_sample_gradient_of_the_mean_is_kappa_times_mu_minus_x(name):
    model = _with_mean(_model(**CENTRED[name]))
    x, y = _batch()
    naive = _naive_per_sample(model, x, y)
    shift = [i for i, (n, p) in enumerate(model.named_parameters()) if n == "centre.shift"]
    assert shift == [len(list(model.parameters())) - 1]  # registered (and noised) last
    expected = CENTRE_RATE * (model.centre.mean - x)  # κ (μ - x_b), by hand
    assert torch.allclose(naive[:, -64:], expected, atol=1e-12)
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    _loss(gsm, x, y).sum().backward()
    assert torch.allclose(model.centre.shift.grad_sample, expected, atol=1e-12)
    gsm._close()


def test_book_keeping_clips_the_mean_with_the_rest_of_each_sample_gradient():
    """One noiseless book-keeping step = Σ_b min(1, C/‖g_b‖) g_b of the naive per-sample
    gradients, μ's coordinates included (the whole sample's gradient is clipped once)."""
    model = _with_mean(_model())
    x, y = _batch(2)
    naive = _naive_per_sample(model, x, y)
    for clip in (0.3, 1e9):
        stepped = copy.deepcopy(model)
        before = torch.cat([p.detach().flatten() for p in stepped.parameters()
                            if p.requires_grad])
        bk = BookKeeping(stepped, max_grad_norm=clip, noise_multiplier=0.0,
                         expected_batch_size=1, learning_rate=1.0,
                         generator=torch.Generator())
        bk.step(lambda m: _loss(m, x, y), len(x))
        bk.close()
        after = torch.cat([p.detach().flatten() for p in stepped.parameters()
                           if p.requires_grad])
        factors = (clip / (naive.norm(dim=1) + 1e-6)).clamp(max=1.0)
        assert torch.allclose(before - after, (factors[:, None] * naive).sum(0), atol=1e-9)
        if clip < 1:
            assert (factors < 1).all()  # the clipping was active


def test_the_task_never_moves_the_mean_and_the_mean_never_moves_the_model():
    model = _with_mean(_model())
    model.switch.set(False)  # no router loss: aux is the centring's alone
    x, y = _batch(3)
    model.train()
    out, aux = model(x)
    torch.autograd.backward(model.task.loss(out, y).sum())
    assert model.centre.shift.grad is None  # the model reads x - sg(μ)
    model.zero_grad(set_to_none=True)
    out, aux = model(x)
    aux.sum().backward()
    assert model.centre.shift.grad is not None
    assert model.trunk.weight.grad is None  # ½‖x - μ‖² depends on μ alone


def test_losses_are_the_tasks_and_the_model_predicts_on_centred_inputs():
    model = _with_mean(_model(feature_centring=True))
    plain = _model(feature_centring=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k != "centre.shift"})
    x, y = _batch(4)
    model.train(), plain.train()
    mu = model.centre.mean
    assert torch.allclose(_loss(model, x, y), _loss(plain, x - mu, y))  # value 0 added
    model.eval(), plain.eval()
    assert torch.allclose(model(x)[0], plain(x - mu)[0])
    assert torch.equal(model(x)[1], plain(x - mu)[1])  # the router's loss alone


def test_while_a_local_round_trains_the_model_reads_the_mean_it_began_with():
    """μ moves with every step, the inputs the model reads do not: x - μ₀ (the received
    global μ) for the whole round; the next round reads the μ it begins with, and
    evaluation the current one. A local round is train_dp_round's."""
    from fedmoe.training import train_dp_round

    model = _with_mean(_model(feature_centring=True))
    plain = _model(feature_centring=False)
    x, y = _batch(5, n=40)
    mu0 = model.centre.mean.clone()
    seen = []
    model.trunk.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    train_dp_round(model, TensorDataset(x, y), steps=3, sample_rate=1.0,
                   noise_multiplier=0.0, max_grad_norm=1.0, learning_rate=1.0,
                   grad_sample_mode="bookkeeping")
    assert len(seen) == 3 and all(torch.allclose(s, x - mu0) for s in seen)
    mu1 = model.centre.mean
    assert not torch.allclose(mu1, mu0)  # trained towards x's mean
    assert (mu1 - x.mean(0)).norm() < (mu0 - x.mean(0)).norm()
    model.eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "centre.shift"})
    plain.eval()
    assert torch.allclose(model(x)[0], plain(x - mu1)[0])  # evaluation: the current μ
    seen.clear()
    train_dp_round(model, TensorDataset(x, y), steps=1, sample_rate=1.0,
                   noise_multiplier=0.0, max_grad_norm=1.0, learning_rate=1.0,
                   grad_sample_mode="bookkeeping")
    assert torch.allclose(seen[0], x - mu1)


@pytest.mark.parametrize(("name", "role"), [("lmoe", Role.SHARED), ("fedavg", Role.SHARED),
                                            ("fedper", Role.SHARED), ("local", Role.LOCAL)])
def test_the_mean_takes_the_methods_role_starts_at_zero_and_the_key_switches_it(name, role):
    """Aggregated where the method aggregates its first layer; ``local``'s stays on the
    client (it sends nothing: no federated tensor at all)."""
    model = _model(**CENTRED[name])
    roles = tensor_roles(model)
    assert roles["centre.shift"] == role
    assert torch.equal(model.centre.shift, torch.zeros(64, dtype=torch.float64))
    without = _model(**CENTRED[name], feature_centring=False)
    assert set(roles) - set(tensor_roles(without)) == {"centre.shift"}
    assert without.centre is None
    if name == "local":
        assert set(roles.values()) == {Role.LOCAL}


def test_only_lmoe_of_the_moe_models_has_a_centre():
    for name in ("moe", "hmoe", "mtmoe", "tmoe"):
        assert "centre.shift" not in tensor_roles(method_model(FedMoEConfig(model=name)))


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_dp_sgd_takes_the_mean_to_the_features_mean(noise):
    """Book-keeping DP-SGD on the centring alone (the classifier frozen), 400 samples, q =
    0.25, 400 steps: μ ends at the features' mean, exactly without noise and within the
    noise's stationary spread (≈ 0.01 a coordinate) at σ = 1."""
    torch.manual_seed(5)
    model = _model()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "centre.shift")
    g = torch.Generator().manual_seed(6)
    x = 0.2 + 0.6 * torch.rand(400, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (400,), generator=g)
    target = x.mean(0)
    private = make_private(model, TensorDataset(x, y), sample_rate=0.25,
                           noise_multiplier=noise, max_grad_norm=1.0, learning_rate=2.0,
                           mode="bookkeeping")
    for _ in range(400):
        private.step(lambda m: _loss(m, x, y), len(x))
    private.close()
    error = (model.centre.mean - target).abs().max().item()
    assert error < (1e-6 if noise == 0 else 0.05), error
    assert (model.centre.mean - target).norm() < 0.1 * target.norm()


@pytest.mark.parametrize("name", ["lmoe", "fedavg", "fedper"])
def test_a_model_pickled_before_the_centring_predicts_as_it_did(name):
    model = _model(**CENTRED[name], feature_centring=False).float()
    old = copy.copy(model)  # as pickled by an fedmoe before the key: no ``centre``
    old.__dict__ = {k: v for k, v in model.__dict__.items() if k != "centre"}
    old._modules = {k: v for k, v in model._modules.items() if k != "centre"}
    with pytest.raises(AttributeError):
        old.centre  # noqa: B018
    loaded = pickle.loads(pickle.dumps(old))
    x = torch.rand(5, 64)
    loaded.eval(), model.eval()
    assert loaded.centre is None and torch.equal(loaded(x)[0], model(x)[0])


def test_a_run_recorded_before_the_centring_loads_without_it():
    from server.checkpoint import config_differences

    recorded = FedMoEConfig().to_run_config()
    del recorded["feature-centring"]
    config = FedMoEConfig.from_recorded(recorded)
    assert config.feature_centring is False
    assert "centre.shift" not in tensor_roles(method_model(config))
    assert "feature-centring (run folder: False, now: True)" in config_differences(
        recorded, FedMoEConfig(resume=True))


def test_the_centre_handles_token_dimensions():
    layer = FeatureCentre(3).double()
    x = torch.rand(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.shift.fill_(0.4)
    gsm = GradSampleModule(layer, batch_first=True, loss_reduction="sum")
    (0.5 * gsm(x).pow(2)).sum().backward()
    expected = CENTRE_RATE * (CENTRE_RATE * 0.4 - x).sum(1)
    assert torch.allclose(layer.shift.grad_sample, expected, atol=1e-12)
    gsm._close()


@pytest.mark.parametrize("name", list(CENTRED))
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_every_dp_mode_clips_the_whole_sample_gradient_and_takes_empty_batches(mode, name):
    """One noiseless step in each grad-sample mode equals Σ_b min(1, C/‖g_b‖) g_b / E[B]
    of the naive per-sample gradients, μ's included; an empty Poisson batch (a noise-only
    step, which hooks mode still runs forward) works too."""
    model = _with_mean(_model(**CENTRED[name]))
    x, y = _batch(6, n=8)
    naive = _naive_per_sample(model, x, y)
    before = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    private = make_private(model, TensorDataset(x, y), sample_rate=1.0, noise_multiplier=0.0,
                           max_grad_norm=0.3, learning_rate=1.0, mode=mode)
    private.step(lambda m: _loss(m, x, y), len(x))
    after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    factors = (0.3 / (naive.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = (factors[:, None] * naive).sum(0) / len(x)
    assert torch.allclose(before - after, expected, atol=1e-9)
    private.step(lambda m: _loss(m, x[:0], y[:0]), 0)  # raised in hooks mode before
    private.close()


# ------------------------------------------------- baselines recorded before they centred
def _baseline_recorded_before(method):
    """A baseline's run config as fedmoe recorded it before the baselines centred: every
    key, ``feature-centring`` at its default true (which the baselines ignored then), no
    ``mlp-centring``."""
    recorded = FedMoEConfig(method=method, mlp_width=0 if method != "fedper" else 16
                            ).to_run_config()
    del recorded["mlp-centring"]
    recorded["feature-centring"] = True
    return recorded


@pytest.mark.parametrize("method", ["fedavg", "fedper", "local"])
def test_a_baseline_recorded_before_it_centred_builds_and_resumes_its_own_model(method):
    from server.checkpoint import config_differences

    recorded = _baseline_recorded_before(method)
    config = FedMoEConfig.from_recorded(recorded)
    assert config.feature_centring and not config.mlp_centring
    model = method_model(config)
    assert model.centre is None  # the tensors it saved fit: no centre.shift
    made = method_model(FedMoEConfig(method=method, mlp_width=config.mlp_width,
                                     feature_centring=False))
    model.load_state_dict(made.state_dict())
    resumed = FedMoEConfig.from_recorded({**recorded, "resume": True})  # `fedmoe --resume`
    assert config_differences(recorded, resumed) == [] and not resumed.mlp_centring
    assert "mlp-centring (run folder: False, now: True)" in config_differences(
        recorded, FedMoEConfig(method=method, mlp_width=config.mlp_width, resume=True))


def test_a_message_of_a_server_before_the_baselines_centred_builds_the_model_it_sends():
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedmoe.records import ARRAYS, CONFIG, RUN_CONFIG, RoundPlan, read_server_message
    from fedmoe.roles import merge_state_dict, split_state_dict

    sender = method_model(FedMoEConfig(method="fedavg", mlp_width=0, feature_centring=False))
    content = RecordDict({CONFIG: RoundPlan(1).to_record(),
                          RUN_CONFIG: ConfigRecord(_baseline_recorded_before("fedavg")),
                          ARRAYS: ArrayRecord(split_state_dict(sender))})
    global_state, _, config = read_server_message(content)
    merge_state_dict(method_model(config), global_state)  # raised RoleError before


@pytest.mark.parametrize("method", ["fedavg", "local"])
def test_a_baseline_run_recorded_before_it_centred_exports(tmp_path, method):
    """A finished baseline run whose results.json says ``feature-centring: true`` and has
    no ``mlp-centring`` (every baseline run of the releases before) exports the model it
    trained; it raised RoleError on the missing centre.shift."""
    from fedmoe.export import export_client, load_export
    from simulations.inline import run_inline

    run = tmp_path / "run"
    run_inline(FedMoEConfig(method=method, mlp_width=0, feature_centring=False,
                            num_server_rounds=1, run_dir=str(run)), 2)
    results = json.loads((run / "results.json").read_text())
    results["config"] = {**_baseline_recorded_before(method), **{
        k: v for k, v in results["config"].items()
        if k not in ("feature-centring", "mlp-centring")}}
    (run / "results.json").write_text(json.dumps(results))
    export_client(run, "partition-1", tmp_path / "model.pt")
    exported = load_export(tmp_path / "model.pt")["model"]
    assert getattr(exported, "centre", None) is None
