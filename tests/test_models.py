"""Every model of the family: Opacus per-sample gradients against a naive one-sample loop
(an unused expert included), no coupling between samples with the router losses on, the
local/global switch, and the role of every tensor asserted explicitly."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedmoe.models import build_model, set_use_local
from fedmoe.models.tasks import MISSING
from fedmoe.roles import Role, tensor_roles
from fedmoe.training import per_sample_loss

AUX = {"balance_coef": 0.05, "z_loss_coef": 0.01}


#: The label prior's local buffers: log π_i and the DP release it is computed from.
PRIOR = {"prior.log_prior", "prior.counts", "prior.noise"}

def digits_batch(n=7, tasks=False):
    x = torch.rand(n, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (n,))
    if tasks:
        y = torch.stack([y, y % 2, (y >= 5).long()], dim=1)
        y[1, 0] = y[4, 2] = MISSING  # unlabelled tasks contribute nothing
    return x, y


def _unused(bank: str, expert: int, dispatch: str) -> tuple[str, int | None]:
    """Where the starved expert's per-sample gradient lives: (parameter, index on dim 1)."""
    if dispatch == "dense":
        return f"{bank}.{expert}.fc1.weight", None
    return f"{bank}.fc1.weight", expert


def moe_case(gate="linear", dispatch="dense"):
    model = build_model("moe", hidden_dim=16, expert_hidden_dim=8, gate=gate, dispatch=dispatch,
                        **AUX)
    return (model, digits_batch(), lambda m: _starve(m.moe.gate, 3),
            _unused("moe.local_experts", 1, dispatch))


def lmoe_case(gate="linear", dispatch="dense"):
    model = build_model("lmoe", expert_hidden_dim=8, gate=gate, dispatch=dispatch, **AUX)
    return (model, digits_batch(), lambda m: _starve(m.moe.gate, 3),
            _unused("moe.local_experts", 1, dispatch))


def hmoe_case(gate="linear", dispatch="dense"):
    model = build_model("hmoe", hidden_dim=16, expert_hidden_dim=8, num_groups=2,
                        experts_per_group=2, num_local_experts=2, group_top_k=2, top_k=1,
                        gate=gate, dispatch=dispatch, **AUX)
    return (model, digits_batch(), lambda m: _starve(m.moe.expert_gates[0], 1),
            _unused("moe.groups.0", 1, dispatch))


def mtmoe_case(gate="linear", dispatch="dense"):
    model = build_model("mtmoe", hidden_dim=16, expert_hidden_dim=8, gate=gate,
                        dispatch=dispatch, **AUX)

    def starve(m):
        for g in m.moe.gates:
            _starve(g, 2)
    return model, digits_batch(tasks=True), starve, _unused("moe.local_experts", 0, dispatch)


def tmoe_case(phase, gate="linear", dispatch="dense"):
    model = build_model("tmoe", hidden_dim=16, expert_hidden_dim=8, num_heads=2, num_layers=1,
                        seq_len=8, vocab_size=32, num_classes=4, gate=gate, dispatch=dispatch,
                        **AUX)
    model.set_phase(phase)
    model.requires_grad_(True)  # every tensor, the idle head too (set_phase freezes it)
    x = torch.randint(0, 32, (5, 8))
    y = torch.randint(0, 32, (5, 8)) if phase == "pretrain" else torch.randint(0, 4, (5,))
    return (model, (x, y), lambda m: _starve(m.blocks[0].moe.gate, 3),
            _unused("blocks.0.moe.local_experts", 1, dispatch))


def _starve(router, expert):
    """Make ``router`` never pick ``expert``: it receives no token in the batch."""
    with torch.no_grad():
        if router.kind == "linear":
            router.proj.bias[expert] = -50.0
        else:
            router.keys.weight[expert] = -50.0 * router.query.bias.sign()
            router.query.weight.zero_()


CASES = {
    "moe": moe_case, "lmoe": lmoe_case, "hmoe": hmoe_case, "mtmoe": mtmoe_case,
    "tmoe-pretrain": lambda *a: tmoe_case("pretrain", *a),
    "tmoe-finetune": lambda *a: tmoe_case("finetune", *a),
}
DISPATCHES = ["dense", "sparse"]


def naive_per_sample_grads(model, x, y):
    """The oracle: backprop each sample alone, with no Opacus anywhere."""
    grads = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, x[i : i + 1], y[i : i + 1]).sum().backward()
        grads.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return grads


def opacus_grad_samples(model, x, y, mode="hooks"):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                           force_functorch=mode == "functorch")
    per_sample_loss(gsm, x, y).mean().backward()
    out = {n.removeprefix("_module."): p.grad_sample.detach().clone()
           for n, p in gsm.named_parameters()}
    gsm._close()
    return out


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("gate", ["linear", "attention"])
@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_grads_match_naive_loop_with_an_unused_expert(name, gate, dispatch):
    model, (x, y), starve, (starved_name, index) = CASES[name](gate, dispatch)
    model = model.double()
    if x.is_floating_point():
        x = x.double()
    starve(model)
    oracle = naive_per_sample_grads(model, x, y)
    samples = opacus_grad_samples(model, x, y)
    assert set(samples) == {n for n, _ in model.named_parameters()}
    for param, gs in samples.items():
        expected = torch.stack([g[param] for g in oracle])
        assert gs.shape == expected.shape, param
        assert (gs - expected).abs().max() < 1e-5, param
    starved = samples[starved_name] if index is None else samples[starved_name][:, index]
    assert starved.abs().max() == 0  # present, and exactly zero


@pytest.mark.parametrize("name", ["moe", "lmoe", "hmoe", "mtmoe"])
def test_functorch_mode_agrees_too(name):
    model, (x, y), _, _ = CASES[name]()
    model, x = model.double(), x.double()
    hooks = opacus_grad_samples(model, x, y)
    functorch = opacus_grad_samples(model, x, y, "functorch")
    for param in hooks:
        assert (hooks[param] - functorch[param]).abs().max() < 1e-8, param


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("name", list(CASES))
def test_changing_one_sample_changes_no_other_samples_loss_or_gradient(name, dispatch):
    model, (x, y), _, _ = CASES[name]("linear", dispatch)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    x2 = x.clone()
    x2[0] = (x2[0] + 3) if x.is_floating_point() else (x2[0] + 5) % 32
    losses = per_sample_loss(model, x, y).detach()
    losses2 = per_sample_loss(model, x2, y).detach()
    assert not torch.allclose(losses[0], losses2[0])
    assert torch.allclose(losses[1:], losses2[1:], atol=1e-12)
    a, b = opacus_grad_samples(model, x, y), opacus_grad_samples(model, x2, y)
    for param in a:
        assert torch.allclose(a[param][1:], b[param][1:], atol=1e-10), param


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("name", list(CASES))
def test_global_only_ignores_local_experts(name, dispatch):
    model, (x, y), _, _ = CASES[name]("linear", dispatch)
    model.eval()
    if name.startswith("tmoe"):
        model.set_phase("finetune")

    def out():
        o, _ = model(x.float() if x.is_floating_point() else x)
        return torch.cat([t.flatten() for t in (o[0] if isinstance(o, tuple) else [o])])

    set_use_local(model, False)
    before = out()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if tensor_roles(model)[n] is Role.LOCAL and "log_vars" not in n:
                p.add_(torch.randn_like(p))
    assert torch.allclose(before, out())
    set_use_local(model, True)
    assert not torch.allclose(before, out())


def _roles(model):
    roles = tensor_roles(model)
    return ({k for k, r in roles.items() if r is Role.LOCAL},
            {k for k, r in roles.items() if r is Role.GATE}, roles)


def test_roles_of_the_flat_moe():
    local, gate, roles = _roles(build_model("moe", num_local_experts=3))
    assert local == {f"moe.local_experts.{i}.{l}.{p}" for i in range(3) for l in ("fc1", "fc2")
                     for p in ("weight", "bias")} | PRIOR  # the label prior
    assert gate == {"moe.gate.proj.weight", "moe.gate.proj.bias"}
    assert roles["trunk.weight"] is roles["head.bias"] is roles["moe.shared_experts.0.fc1.weight"] \
        is Role.SHARED


def test_roles_of_the_hierarchical_moe_with_attention_gates():
    local, gate, roles = _roles(build_model("hmoe", gate="attention", num_groups=2,
                                            experts_per_group=2, num_local_experts=2,
                                            expert_depth=3))
    router = ("query.weight", "query.bias", "keys.weight")
    assert local == {k for k in roles if k.startswith("moe.local_experts.")} | {
        f"moe.local_gate.{p}" for p in router} | PRIOR  # the personal router, the label prior
    assert "moe.local_experts.1.hidden.1.weight" in local  # deep experts: 3 layers
    assert gate == {f"moe.{g}.{p}" for g in ("group_gate", "expert_gates.0", "expert_gates.1")
                    for p in router}
    assert roles["moe.groups.1.0.fc2.bias"] is Role.SHARED


def test_roles_of_the_multitask_moe():
    local, gate, roles = _roles(build_model("mtmoe"))
    assert local == {f"moe.local_experts.{i}.{l}.{p}" for i in range(2) for l in ("fc1", "fc2")
                     for p in ("weight", "bias")} | {"log_vars.weight"}
    assert gate == {f"moe.gates.{t}.proj.{p}" for t in range(3) for p in ("weight", "bias")}
    assert {k for k in roles if k.startswith("heads.")} == {
        f"heads.{t}.{p}" for t in range(3) for p in ("weight", "bias")}


def test_roles_of_the_transformer_moe():
    local, gate, roles = _roles(build_model("tmoe", num_layers=2))
    assert local == {f"blocks.{b}.moe.local_experts.{i}.{l}.{p}" for b in range(2)
                     for i in range(2) for l in ("fc1", "fc2") for p in ("weight", "bias")}
    assert gate == {f"blocks.{b}.moe.gate.proj.{p}" for b in range(2) for p in ("weight", "bias")}
    shared = {k for k, r in roles.items() if r is Role.SHARED}
    assert {"blocks.0.moe.always_on.0.fc1.weight", "lm_head.weight", "cls_head.weight"} <= shared


def test_clipped_and_summed_gradient_matches_naive():
    model, (x, y), starve, _ = moe_case()
    model, x = model.double(), x.double()
    starve(model)
    clip = 0.05  # small enough that every sample is clipped
    oracle = naive_per_sample_grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    norms = torch.stack([torch.sqrt(sum((g[n] ** 2).sum() for n in names)) for g in oracle])
    assert (norms > clip).all()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {n: sum(f * g[n] for f, g in zip(factors, oracle, strict=True)) / len(x)
                for n in names}
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=clip, expected_batch_size=len(x))
    per_sample_loss(gsm, x, y).mean().backward()
    opt.step()
    for n, p in gsm.named_parameters():
        assert (p.grad - expected[n.removeprefix("_module.")]).abs().max() < 1e-7, n
    gsm._close()


def _to_sparse_layout(state: dict) -> dict:
    """A dense model's state dict with each bank's experts stacked as a sparse bank's."""
    banks: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        # a bank entry: <bank path>.<expert index>.<layer...>.<weight|bias>, not always-on
        idx = next((i for i, p in enumerate(parts) if p.isdigit()
                    and (parts[i - 1].endswith("experts") or parts[i - 2] == "groups")
                    and "always_on" not in parts[i - 1]), None)
        if idx is None:
            out[key] = value
            continue
        target = ".".join(parts[:idx] + parts[idx + 1:])
        banks.setdefault(target, {})[int(parts[idx])] = value.T if key.endswith("weight") \
            else value
    for target, experts in banks.items():
        out[target] = torch.stack([experts[e] for e in sorted(experts)])
    return out


@pytest.mark.parametrize("name", ["moe", "lmoe", "hmoe", "mtmoe", "tmoe-pretrain"])
def test_sparse_dispatch_computes_what_dense_dispatch_computes(name):
    """Same parameters (re-laid out), same outputs: dispatch changes cost, not the model."""
    dense, (x, _), _, _ = CASES[name]("linear", "dense")
    sparse, _, _, _ = CASES[name]("linear", "sparse")
    sparse.load_state_dict(_to_sparse_layout(dense.state_dict()))
    dense, sparse = dense.double().eval(), sparse.double().eval()
    out_d, aux_d = dense(x)
    out_s, aux_s = sparse(x)

    def flat(o):
        return torch.cat([t.flatten() for t in o[0]]) if isinstance(o, tuple) else o.flatten()

    assert torch.allclose(flat(out_d), flat(out_s), atol=1e-5)
    assert torch.allclose(aux_d, aux_s, atol=1e-6)
