"""The learned scale of the shared class scores (``score-scale``, fedmoe.models.prior.ScoreScale):
its per-sample gradient against a naive one-sample loop, the identity at initialisation,
its role, the direction DP-SGD moves it, and run folders recorded before it existed."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from fedmoe.config import ADDED_KEYS, FedMoEConfig
from fedmoe.methods import method_model
from fedmoe.models.prior import Calibrated, LabelPrior, ScoreScale, personal_logits
from fedmoe.models.tasks import Classification
from fedmoe.privacy import make_private
from fedmoe.roles import Role, tensor_roles


class _Head(nn.Module):
    """x (B, [L,] D) -> prior(scale(linear(x))): a label-prior classifier in miniature."""

    task = None

    def __init__(self, d=5, c=4):
        super().__init__()
        self.linear = nn.Linear(d, c)
        self.scale = ScoreScale()
        self.prior = LabelPrior(c)

    def forward(self, x):
        return personal_logits(self.scale, self.prior, self.linear(x), training=self.training)


def _loss(model, x, y):  # per-sample (B,)
    out = model(x)
    if x.dim() == 3:  # (B, L, C): a sample's loss is the mean over its positions
        out = out if isinstance(out, tuple) else (out,)
        return sum(F.cross_entropy(o.transpose(1, 2), y, reduction="none").mean(1)
                   for o in out)
    return Classification().loss(out, y)


@pytest.mark.parametrize("shape", [(6,), (6, 3)])
def test_per_sample_gradient_of_the_scale_matches_a_one_sample_loop(shape):
    torch.manual_seed(0)
    model = _Head().double()
    with torch.no_grad():
        model.scale.log_scale.fill_(0.7)  # s ≠ 1: the sampler's exp(θ) factor matters
        model.prior.set_counts(torch.tensor([5.0, 1.0, 0.0, 2.0]), pseudo_count=0.5)
    x = torch.randn(*shape, 5, dtype=torch.float64)
    y = torch.randint(0, 4, shape)
    naive = []
    for i in range(len(x)):
        model.zero_grad()
        _loss(model, x[i:i + 1], y[i:i + 1]).sum().backward()
        naive.append(model.scale.log_scale.grad.clone())
    naive = torch.stack(naive)  # (B, 1)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    _loss(gsm, x, y).sum().backward()
    assert torch.allclose(model.scale.log_scale.grad_sample, naive, atol=1e-12)
    gsm._close()


def test_the_scale_starts_as_the_identity_and_is_a_shared_tensor():
    with_scale = method_model(FedMoEConfig(score_scale=True))
    without = method_model(FedMoEConfig(score_scale=False))
    roles = tensor_roles(with_scale)
    assert roles["scale.log_scale"] == Role.SHARED
    assert set(roles) - set(tensor_roles(without)) == {"scale.log_scale"}
    without.load_state_dict({k: v for k, v in with_scale.state_dict().items()
                             if k != "scale.log_scale"})
    x = torch.rand(9, 64)
    with_scale.eval(), without.eval()
    assert torch.equal(with_scale(x)[0], without(x)[0])


def test_while_training_the_scores_learn_unscaled_and_the_scale_from_detached_scores():
    """The shared scores' gradient is exactly the one without a scale (s ≠ 1 changes
    nothing for them); the scale's own loss reaches no other parameter."""
    torch.manual_seed(3)
    keys = {"expert_noise_limit": 1e6, "feature_centring": False}  # the scores' tensors only
    with_scale = method_model(FedMoEConfig(score_scale=True, **keys))
    without = method_model(FedMoEConfig(score_scale=False, **keys))
    without.load_state_dict({k: v for k, v in with_scale.state_dict().items()
                             if k != "scale.log_scale"})
    with torch.no_grad():
        with_scale.scale.log_scale.fill_(1.3)
    x, y = torch.rand(11, 64), torch.randint(0, 10, (11,))
    out, _ = with_scale(x)
    assert isinstance(out, Calibrated)
    ref, _ = without(x)
    assert torch.allclose(out.logits, ref) and not torch.allclose(out.calibrated, ref)
    F.cross_entropy(out.logits, y).backward()
    F.cross_entropy(ref, y).backward()
    assert with_scale.scale.log_scale.grad is None
    grads = {n: p.grad for n, p in with_scale.named_parameters() if n != "scale.log_scale"}
    assert all(torch.allclose(grads[n], p.grad) for n, p in without.named_parameters())
    with_scale.zero_grad(set_to_none=True)
    out, _ = with_scale(x)
    F.cross_entropy(out.calibrated, y).backward()
    assert with_scale.scale.log_scale.grad is not None
    assert all(p.grad is None for n, p in with_scale.named_parameters()
               if n != "scale.log_scale")
    with_scale.eval()
    assert torch.allclose(with_scale(x)[0], out.calibrated)  # what it predicts


@pytest.mark.parametrize("model", ["moe", "hmoe"])
def test_every_model_with_a_label_prior_has_the_scale(model):
    assert "scale.log_scale" in tensor_roles(method_model(FedMoEConfig(model=model)))
    assert "scale.log_scale" not in tensor_roles(
        method_model(FedMoEConfig(model=model, score_scale=False)))


def _trained_scale(logit_size: float, steps: int) -> float:
    """s after ``steps`` noiseless clipped DP-SGD steps (book-keeping) on a frozen
    4-class classifier whose scores for the right class are ``3 · logit_size`` (0 for the
    others) on data with 15 % of its labels moved to the next class. Calibrated scores
    give the right class probability 0.85 = e^m / (e^m + 3): margin m = ln 17 = 2.83, so
    the scale that fits is s* = 2.83 / (3 · logit_size)."""
    torch.manual_seed(1)
    model = _Head(d=4, c=4).double()
    with torch.no_grad():
        model.linear.weight.copy_(torch.eye(4, dtype=torch.float64) * logit_size)
        model.linear.bias.zero_()
    model.linear.requires_grad_(False)
    x = torch.eye(4, dtype=torch.float64).repeat(50, 1) * 3.0
    y = torch.arange(4).repeat(50)
    flip = torch.arange(len(y)) % 20 < 3  # exactly 15 % of each class
    y[flip] = (y[flip] + 1) % 4
    private = make_private(model, TensorDataset(x, y), sample_rate=0.5, noise_multiplier=0.0,
                           max_grad_norm=1.0, learning_rate=0.5, mode="bookkeeping")
    for _ in range(steps):
        private.step(lambda m: _loss(m, x, y), len(x))
    private.close()
    return model.scale.scale


@pytest.mark.parametrize("logit_size", [0.3, 3.0])
def test_dp_sgd_takes_the_scale_to_the_one_that_calibrates_the_scores(logit_size):
    """From too-flat scores s rises, from too-sharp ones it falls, and it ends within 5 %
    of the calibrated s* (the test above pins each step's gradient)."""
    calibrated = math.log(17) / (3 * logit_size)
    early, late = _trained_scale(logit_size, 10), _trained_scale(logit_size, 300)
    assert (early > 1.0) == (calibrated > 1.0) and early != 1.0
    assert abs(late / calibrated - 1) < 0.05, (late, calibrated)


def test_a_run_recorded_before_the_scale_loads_as_it_was_made(tmp_path):
    recorded = FedMoEConfig().to_run_config()
    for key in ADDED_KEYS:
        del recorded[key]
    config = FedMoEConfig.from_recorded(recorded)
    assert config.score_scale is False  # the model that run trained had no scale
    assert "scale.log_scale" not in tensor_roles(method_model(config))
    assert FedMoEConfig.from_recorded(FedMoEConfig().to_run_config()).score_scale is True
    (tmp_path / "results.json").write_text(json.dumps({"config": recorded}))
    from fedmoe.export import run_config
    assert run_config(tmp_path).score_scale is False


def _recorded_before(config: FedMoEConfig | None = None) -> dict:
    """A run config as an fedmoe before the added keys wrote it."""
    recorded = (config or FedMoEConfig()).to_run_config()
    for key in ADDED_KEYS:
        del recorded[key]
    return recorded


def test_a_checkpoint_written_before_the_scale_resumes_with_its_own_model(tmp_path):
    from server.checkpoint import config_differences

    old = _recorded_before()
    resumed = FedMoEConfig.from_recorded({**old, "resume": True})
    assert not resumed.score_scale
    assert config_differences(old, resumed) == []
    assert config_differences(old, FedMoEConfig(resume=True)) == [  # today's defaults
        "centring-fold (run folder: False, now: True)",
        "ema-decay (run folder: 0.0, now: 0.5)",
        "feature-centring (run folder: False, now: True)",
        "score-scale (run folder: False, now: True)"]


def test_a_message_of_a_server_before_the_scale_builds_the_model_it_sends():
    """An upgraded client of a federation whose server is older: the message's config has
    no score-scale (nor feature-centring), its global tensors no scale (nor centre); the
    client's model must fit them."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedmoe.records import ARRAYS, CONFIG, RUN_CONFIG, RoundPlan, read_server_message
    from fedmoe.roles import merge_state_dict, split_state_dict

    sender = method_model(FedMoEConfig(score_scale=False, feature_centring=False))
    content = RecordDict({CONFIG: RoundPlan(1).to_record(),
                          RUN_CONFIG: ConfigRecord(_recorded_before()),
                          ARRAYS: ArrayRecord(split_state_dict(sender))})
    global_state, _, config = read_server_message(content)
    assert not config.score_scale
    merge_state_dict(method_model(config), global_state)  # raised RoleError before


def test_an_export_pickled_before_the_scale_predicts_as_it_did():
    import io

    model = method_model(FedMoEConfig(score_scale=False)).eval()
    x = torch.rand(4, 64)
    expected = model(x)[0]
    del model._modules["scale"]  # the object an earlier fedmoe pickled had no such module
    with pytest.raises(AttributeError):
        model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x)[0], expected)


def test_no_scale_without_a_label_prior():
    config = FedMoEConfig(label_prior_share=0.0)
    assert config.score_scale and "scale.log_scale" not in tensor_roles(method_model(config))
