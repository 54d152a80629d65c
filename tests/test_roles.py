import pytest
import torch
from opacus import GradSampleModule

from fedmoe.models import build_model
from fedmoe.roles import Role, RoleError, merge_state_dict, split_state_dict, tensor_roles


def test_every_tensor_has_one_role_and_local_means_local_experts():
    model = build_model("moe", num_local_experts=3)
    roles = tensor_roles(model)
    assert set(roles) == set(model.state_dict())
    local = {k for k, r in roles.items() if r is Role.LOCAL}
    prior = {"prior.log_prior", "prior.counts", "prior.noise"}
    assert local and all(k.startswith("moe.local_experts.") for k in local - prior)
    assert prior <= local  # the personal label prior and the release it comes from (buffers)
    assert {k for k, r in roles.items() if r is Role.GATE} == {"moe.gate.proj.weight", "moe.gate.proj.bias"}


def test_split_merge_round_trip_and_local_experts_stay():
    a, b = build_model("moe"), build_model("moe")
    local_b = split_state_dict(b, {Role.LOCAL})
    merge_state_dict(b, split_state_dict(a))  # shared + gate from a
    for k, v in b.state_dict().items():
        expected = local_b[k] if k in local_b else a.state_dict()[k]
        assert torch.equal(v, expected), k


def test_merge_refuses_local_tensor_and_bad_shape():
    model = build_model("moe")
    state = split_state_dict(model)
    with pytest.raises(RoleError, match="unexpected.*local_experts"):
        merge_state_dict(model, {**state, **split_state_dict(model, {Role.LOCAL})})
    with pytest.raises(RoleError, match="missing"):
        merge_state_dict(model, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(RoleError, match="shape"):
        merge_state_dict(model, {**state, "head.bias": torch.zeros(3)})


def test_opacus_wrapped_model_splits_without_prefix():
    model = build_model("moe")
    gsm = GradSampleModule(model)
    assert split_state_dict(gsm).keys() == split_state_dict(model).keys()
    gsm._close()


def test_untagged_module_is_an_error():
    with pytest.raises(RoleError, match="has no role"):
        tensor_roles(torch.nn.Linear(2, 2))


def test_build_model_validates_overrides():
    with pytest.raises(ValueError, match="no option"):
        build_model("moe", experts=4)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gpt")
