"""TransformerMoE: exact per-sample gradients, no coupling, causality, local switch, roles, DP-SGD."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch.utils.data import TensorDataset

from fedmoe.models.layers import expert_usage, set_use_local
from fedmoe.models.tasks import Classification, LanguageModel
from fedmoe.models.tmoe import TMoEConfig, TransformerMoE
from fedmoe.privacy import make_private
from fedmoe.roles import Role, tensor_roles
from fedmoe.training import per_sample_loss
from tests.test_models import naive_per_sample_grads

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

VOCAB, SEQ, CLASSES = 32, 8, 3
PHASES = ["pretrain", "finetune"]


def tiny(phase="pretrain", **overrides):
    config = {"vocab_size": VOCAB, "seq_len": SEQ, "num_classes": CLASSES, "hidden_dim": 16,
              "num_heads": 2, "num_layers": 2, "expert_hidden_dim": 8,
              "num_always_on_experts": 1, "num_shared_experts": 2, "num_local_experts": 2,
              "top_k": 2, "balance_coef": 0.05, "z_loss_coef": 0.01, **overrides}
    model = TransformerMoE(TMoEConfig(**config)).double()
    model.set_phase(phase)
    model.requires_grad_(True)  # the idle head too: its per-sample gradient must be exact 0
    return model


def batch(phase, n=5, length=SEQ):
    x = torch.randint(0, VOCAB, (n, length))
    y = torch.randint(0, VOCAB, (n, length)) if phase == "pretrain" else torch.randint(0, CLASSES, (n,))
    return x, y


def opacus_grad_samples(model, x, y):
    """Per-sample losses and Opacus (hooks) per-sample gradients, keys without ``_module.``."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        losses = per_sample_loss(gsm, x, y)
        losses.mean().backward()
        samples = {n.removeprefix("_module."): p.grad_sample.detach().clone()
                   for n, p in gsm.named_parameters() if p.grad_sample is not None}
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)
    return losses.detach(), samples


def starve(model, layer: int, expert: int) -> None:
    """Make one MoE layer's router never pick routed expert ``expert``."""
    with torch.no_grad():
        model.blocks[layer].moe.gate.proj.bias[expert] = -50.0


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("phase", PHASES)
def test_per_sample_grads_match_naive_loop(phase, num_layers):
    model = tiny(phase, num_layers=num_layers)
    starve(model, 0, 3)  # layer 0's local expert 1 receives no token in this batch
    x, y = batch(phase)
    usage = expert_usage(model, lambda: model(x))  # routed experts, layer by layer
    assert usage[3] == 0.0, "test setup: layer 0's expert 3 must receive no token"

    oracle = naive_per_sample_grads(model, x, y)
    _, samples = opacus_grad_samples(model, x, y)
    assert set(samples) == {n for n, _ in model.named_parameters()}
    for name, gs in samples.items():
        expected = torch.stack([g[name] for g in oracle])
        assert gs.shape == expected.shape, name
        assert (gs - expected).abs().max() < 1e-5, name
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        starved = samples[f"blocks.0.moe.local_experts.1.{name}"]
        assert starved.abs().max() == 0, name  # present, and exactly zero
    # Every routed expert no token chose (at random init a deeper layer may leave one idle)
    # has an all-zero per-sample gradient. In pretraining every position is scored, so every
    # chosen expert has a non-zero one (in finetuning only the last position is scored).
    experts = [f"blocks.{layer}.moe.{kind}.{i}.fc2.weight" for layer in range(num_layers)
               for kind in ("shared_experts", "local_experts") for i in range(2)]
    for name, share in zip(experts, usage, strict=True):
        if share == 0:
            assert samples[name].abs().max() == 0, name
        elif phase == "pretrain":
            assert samples[name].abs().max() > 0, name
    # The head of the other phase takes part with weight 0: present and exactly zero.
    idle = "cls_head" if phase == "pretrain" else "lm_head"
    active = "lm_head" if phase == "pretrain" else "cls_head"
    assert samples[f"{idle}.weight"].abs().max() == 0
    assert samples[f"{active}.weight"].abs().max() > 0
    assert samples["pos_emb.weight"].abs().max() > 0


@pytest.mark.parametrize("gate", ["linear", "attention"])
@pytest.mark.parametrize("phase", PHASES)
def test_no_coupling_between_samples(phase, gate):
    model = tiny(phase, gate=gate)
    x, y = batch(phase, n=4)
    losses, grads = opacus_grad_samples(model, x, y)
    x2 = x.clone()
    x2[0] = torch.randint(0, VOCAB, (SEQ,))
    assert not torch.equal(x2[0], x[0])
    losses2, grads2 = opacus_grad_samples(model, x2, y)
    assert losses2[0] != losses[0]  # sample 0 did change
    torch.testing.assert_close(losses2[1:], losses[1:], rtol=0, atol=1e-12)
    # and per sample it is the loss of that sample alone
    alone = torch.cat([per_sample_loss(model, x[i : i + 1], y[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alone.detach(), losses, rtol=0, atol=1e-10)
    changed = 0
    for name, g in grads.items():
        torch.testing.assert_close(grads2[name][1:], g[1:], rtol=0, atol=1e-12, msg=name)
        changed += int(not torch.allclose(grads2[name][0], g[0]))
    assert changed > 0


def test_causality():
    model = tiny("pretrain")
    x, _ = batch("pretrain", n=3)
    t = 5
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(x)[0], model(x2)[0]
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=(0, 2)).min() > 0  # every later position


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("length", [1, 3, SEQ])
def test_shapes_and_shorter_inputs(phase, length):
    model = tiny(phase)
    x, _ = batch(phase, n=4, length=length)
    outputs, aux = model(x)
    if phase == "pretrain":
        assert isinstance(model.task, LanguageModel)
        assert outputs.shape == (4, length, VOCAB)
    else:
        assert isinstance(model.task, Classification)
        assert outputs.shape == (4, CLASSES)
    assert aux.shape == (4,) and (aux > 0).all()
    with pytest.raises(ValueError, match="sequence length"):
        model(torch.randint(0, VOCAB, (2, SEQ + 1)))


def test_finetune_reads_the_last_position():
    model = tiny("finetune")
    x, _ = batch("finetune", n=2)
    x2 = x.clone()
    x2[:, -1] = (x[:, -1] + 1) % VOCAB  # only the last position sees the last token
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(x2)[0])


def test_aux_is_the_sum_of_the_layers_aux():
    model = tiny("pretrain", num_layers=2)
    x, _ = batch("pretrain")
    seen = []
    hooks = [b.moe.register_forward_hook(lambda m, i, o: seen.append(o[1]))
             for b in model.blocks]
    _, aux = model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    torch.testing.assert_close(aux, seen[0] + seen[1])
    no_aux = tiny("pretrain", balance_coef=0.0, z_loss_coef=0.0)
    assert (no_aux(x)[1] == 0).all()


def test_phase_validation_and_config_validation():
    model = tiny()
    with pytest.raises(ValueError, match="phase"):
        model.set_phase("train")
    with pytest.raises(ValueError, match="num_heads"):
        TMoEConfig(hidden_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        TMoEConfig(num_shared_experts=1, num_local_experts=0, top_k=2)
    with pytest.raises(ValueError, match="gate"):
        TMoEConfig(gate="sparse")
    with pytest.raises(ValueError, match="num_layers"):
        TMoEConfig(num_layers=0)
    with pytest.raises(ValueError, match="num_local_experts"):
        TMoEConfig(num_local_experts=-1)


@pytest.mark.parametrize("phase", PHASES)
def test_use_local_switch(phase):
    model = tiny(phase)
    x, _ = batch(phase)

    def perturb_local():
        with torch.no_grad():
            for block in model.blocks:
                for p in block.moe.local_experts.parameters():
                    p.add_(torch.randn_like(p))

    with torch.no_grad():
        set_use_local(model, False)
        global_before = model(x)[0]
        perturb_local()
        torch.testing.assert_close(model(x)[0], global_before, rtol=0, atol=0)
        set_use_local(model, True)
        personal_before = model(x)[0]
        perturb_local()
        assert not torch.allclose(model(x)[0], personal_before)


@pytest.mark.parametrize("gate", ["linear", "attention"])
def test_roles(gate):
    model = tiny(gate=gate, num_layers=1, num_always_on_experts=1, num_shared_experts=1,
                 num_local_experts=1, top_k=1)
    roles = tensor_roles(model)
    expert = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    router = ["proj.weight", "proj.bias"] if gate == "linear" else ["query.weight",
                                                                     "query.bias", "keys.weight"]
    local = {f"blocks.0.moe.local_experts.0.{n}" for n in expert}
    gates = {f"blocks.0.moe.gate.{n}" for n in router}
    shared = {
        "tok_emb.weight", "pos_emb.weight",
        "blocks.0.ln1.weight", "blocks.0.ln1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
        "blocks.0.attn.out.weight", "blocks.0.attn.out.bias",
        "blocks.0.ln2.weight", "blocks.0.ln2.bias",
        *(f"blocks.0.moe.always_on.0.{n}" for n in expert),
        *(f"blocks.0.moe.shared_experts.0.{n}" for n in expert),
        "ln_f.weight", "ln_f.bias", "lm_head.weight", "lm_head.bias",
        "cls_head.weight", "cls_head.bias",
    }
    assert {k for k, r in roles.items() if r == Role.LOCAL} == local
    assert {k for k, r in roles.items() if r == Role.GATE} == gates
    assert {k for k, r in roles.items() if r == Role.SHARED} == shared
    assert set(roles) == local | gates | shared

    # and by pattern, on a deeper model with the default expert counts
    model = tiny(gate=gate, num_layers=3)
    for key, role in tensor_roles(model).items():
        if ".moe.local_experts." in key:
            assert role == Role.LOCAL, key
        elif ".moe.gate." in key:
            assert role == Role.GATE, key
        else:
            assert role == Role.SHARED, key


@pytest.mark.parametrize("phase", PHASES)
def test_dp_sgd_steps_end_to_end(phase):
    """Clipped gradient + noise reach every tensor the phase trains; the idle head, frozen,
    stays exactly as it was."""
    model = TransformerMoE(TMoEConfig(vocab_size=VOCAB, seq_len=SEQ, num_classes=CLASSES,
                                      hidden_dim=16, num_heads=2, num_layers=2,
                                      expert_hidden_dim=8))
    model.set_phase(phase)
    x, y = batch(phase, n=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    private = make_private(model, TensorDataset(x, y), sample_rate=0.5, noise_multiplier=1.0,
                           max_grad_norm=1.0, learning_rate=0.1,
                           generator=torch.Generator().manual_seed(0))
    try:
        steps = 0
        for _ in range(2):
            for xb, yb in private.loader:
                if len(xb) == 0:
                    continue
                private.optimizer.zero_grad()
                loss = per_sample_loss(private.module, xb, yb).mean()
                assert torch.isfinite(loss)
                loss.backward()
                private.optimizer.step()
                steps += 1
    finally:
        private.module._close()
    assert steps > 0
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, before[n]) == (n not in trains), n


def test_set_phase_freezes_the_idle_head():
    model = tiny()
    names = {n for n, _ in model.named_parameters()}

    def trained():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    for _ in range(2):  # and back
        model.set_phase("pretrain")
        assert trained() == names - {"cls_head.weight", "cls_head.bias"}
        model.set_phase("finetune")
        assert trained() == names - {"lm_head.weight", "lm_head.bias"}
    assert {n for n, p in TransformerMoE(TMoEConfig()).named_parameters()
            if not p.requires_grad} == {"cls_head.weight", "cls_head.bias"}  # as built


# ------------------------------------------------------------------ the unigram prior
def test_the_unigram_prior_is_a_local_log_distribution_on_the_next_token_logits():
    model = tiny("pretrain", unigram_prior=True)
    plain = tiny("pretrain")
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("prior.")})
    counts = torch.arange(1.0, VOCAB + 1)
    model.prior.set_counts(counts, pseudo_count=1.0)
    x, _ = batch("pretrain")
    with torch.no_grad():
        logits = model(x)[0]
        torch.testing.assert_close(logits, plain(x)[0] + model.prior.log_prior)
        set_use_local(model, False)  # the global-only model has no prior
        set_use_local(plain, False)
        torch.testing.assert_close(model(x)[0], plain(x)[0])
        set_use_local(model, True)
        set_use_local(plain, True)
        model.set_phase("finetune")  # the classifier has none
        plain.set_phase("finetune")
        torch.testing.assert_close(model(x)[0], plain(x)[0])
    roles = tensor_roles(model)
    assert {roles[k] for k in ("prior.log_prior", "prior.counts", "prior.noise")} == {Role.LOCAL}
    assert not any(n.startswith("prior.") for n, _ in model.named_parameters())  # never noised


def test_with_a_unigram_prior_per_sample_grads_still_match_the_naive_loop():
    model = tiny("pretrain", unigram_prior=True)
    model.prior.set_counts(torch.rand(VOCAB) * 10, pseudo_count=0.5)
    x, y = batch("pretrain")
    oracle = naive_per_sample_grads(model, x, y)
    _, samples = opacus_grad_samples(model, x, y)
    assert set(samples) == {n for n, _ in model.named_parameters()}
    for name, gs in samples.items():
        assert (gs - torch.stack([g[name] for g in oracle])).abs().max() < 1e-5, name


def _tmoe_round(tmp_path, server_round):
    """The train messages of ``server_round`` for 2 tmoe clients (1 pretraining round)."""
    from flwr.app import ConfigRecord

    from fedmoe.config import FedMoEConfig
    from fedmoe.models import model_for
    from fedmoe.privacy import LEDGER_FILE, LedgerBook
    from fedmoe.records import read_server_message, to_arrays
    from fedmoe.roles import split_state_dict
    from server.strategy import FedMoE
    from tests.helpers import LocalGrid

    config = FedMoEConfig(model="tmoe", num_server_rounds=3, pretrain_rounds=1,
                          max_windows=40, target_epsilon=8.0)
    grid = LocalGrid(2)
    with LedgerBook(tmp_path / LEDGER_FILE) as book:
        strategy = FedMoE(config, book=book)
        arrays = to_arrays(split_state_dict(model_for(config, server_round)))
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        charged = {c: [e.sample_rate for e in book.get(c).entries] for c in book.clients()}
    return config, grid, sent, [read_server_message(m.content)[1] for m in sent], charged


def test_the_unigram_histogram_is_asked_for_and_charged_only_in_a_pretraining_round(tmp_path):
    _, _, sent, plans, charged = _tmoe_round(tmp_path / "a", 1)
    assert len(sent) == 2 and all(p.prior_noise > 0 for p in plans)
    assert all(rates[0] == 1.0 and len(rates) == 2 for rates in charged.values())
    # a client first sampled in a fine-tune round: no histogram asked for, none charged
    config, grid, sent, plans, charged = _tmoe_round(tmp_path / "b", 2)
    assert len(sent) == 2 and all(p.prior_noise == 0 for p in plans)
    assert all(rates == [config.sample_rate] for rates in charged.values())


def test_a_tmoe_client_refuses_a_histogram_request_in_a_round_that_trains_on_labels(tmp_path):
    from dataclasses import replace

    from fedmoe.records import server_message
    from flwr.app import Message, MessageType

    config, grid, sent, plans, _ = _tmoe_round(tmp_path, 2)
    forged = replace(plans[0], prior_noise=3.0)  # a server that asks anyway
    msg = Message(server_message(sent[0].content.array_records["arrays"], forged, config),
                  dst_node_id=sent[0].metadata.dst_node_id, message_type=MessageType.TRAIN)
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "next-token windows" in reply.error.reason


@pytest.mark.slow
def test_fine_tuning_starts_from_the_released_pretrained_model_afresh(tmp_path, monkeypatch):
    """At the switch to fine-tuning (a new task, the language-model head frozen) training
    starts from the model pretraining released — the moving average of its global models
    (ema-decay) — with no FedAvgM velocity and no average from pretraining: round 3
    trains from ½(w_1 + w_2) and releases its own w_3 at first."""
    from fedmoe.config import FedMoEConfig
    from server import strategy as strategy_module
    from simulations.inline import run_inline

    before: list[dict] = []  # velocity before each server step
    trained: list[dict] = []  # global arrays after each round's aggregation
    sent: list[dict] = []  # global arrays of each round's train messages
    released: list[dict] = []  # what each round evaluates
    step = strategy_module.server_step
    numpy = lambda arrays: {k: a.numpy().copy() for k, a in arrays.items()}  # noqa: E731

    def spy(global_arrays, combined, velocity, momentum, learning_rate):
        before.append({k: v.copy() for k, v in velocity.items()})
        out = step(global_arrays, combined, velocity, momentum, learning_rate)
        trained.append({k: np.asarray(v).copy() for k, v in out.items()})
        return out

    class Spied(strategy_module.FedMoE):
        def configure_train(self, server_round, arrays, *args):
            sent.append(numpy(arrays))
            return super().configure_train(server_round, arrays, *args)

        def configure_evaluate(self, server_round, arrays, *args):
            released.append(numpy(arrays))
            return super().configure_evaluate(server_round, arrays, *args)

    monkeypatch.setattr(strategy_module, "server_step", spy)
    monkeypatch.setattr("server.app.FedMoE", Spied)
    config = FedMoEConfig(model="tmoe", num_server_rounds=4, pretrain_rounds=2,
                          max_windows=40, target_epsilon=8.0, server_momentum=0.9,
                          ema_decay=0.5, run_dir=str(tmp_path / "run"))
    run_inline(config, 2)
    assert len(before) == len(trained) == len(sent) == len(released) == 4
    assert not before[0] and any(np.any(v) for v in before[1].values())
    assert not before[2]  # round 3, the first fine-tuning round: momentum reset
    moving = {k for k, v in before[3].items() if np.any(v)}  # round 4 carries round 3's on
    assert moving and all(not k.startswith("lm_head.") for k in moving)
    assert not np.any(before[3]["lm_head.weight"])  # frozen in fine-tuning: it stays put
    for key, w1 in trained[0].items():
        pretrained = (0.5 * w1.astype(np.float64) + 0.5 * trained[1][key]).astype(w1.dtype)
        np.testing.assert_allclose(released[1][key], pretrained, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(sent[2][key], released[1][key])  # trains from it
        np.testing.assert_array_equal(released[2][key], trained[2][key])  # a new average
    assert any(not np.array_equal(sent[2][k], trained[1][k]) for k in sent[2])
