"""Parameter roles: the single place that decides what may leave a client.

Every parameter (and buffer) of a fedmoe model has exactly one :class:`Role`:

- ``shared``: trunk, shared experts, heads — aggregated by the server;
- ``gate``: the router — aggregated by the server;
- ``local``: personal experts — never leave the client.

A model declares roles by tagging sub-modules with :func:`set_role`; a tensor takes the
role of its nearest tagged ancestor. :func:`split_state_dict` and :func:`merge_state_dict`
are the only functions that cut a state dict by role or put one back together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

import torch
from torch import nn

_ROLE_ATTR = "_fedmoe_role"
# Opacus' GradSampleModule stores the wrapped model as `_module` and prefixes keys with it.
_OPACUS_PREFIX = "_module."


class Role(StrEnum):
    SHARED = "shared"
    GATE = "gate"
    LOCAL = "local"


#: The roles a client sends to, and receives from, the server.
FEDERATED_ROLES: frozenset[Role] = frozenset({Role.SHARED, Role.GATE})


class RoleError(ValueError):
    """A state dict does not fit the model's roles (missing, unexpected or misshaped keys)."""


def set_role(module: nn.Module, role: Role) -> nn.Module:
    """Tag ``module`` (and everything below it without a tag of its own) with ``role``."""
    setattr(module, _ROLE_ATTR, Role(role))
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside an Opacus ``GradSampleModule`` (or the model itself)."""
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model


def strip_opacus_prefix(key: str) -> str:
    while key.startswith(_OPACUS_PREFIX):
        key = key[len(_OPACUS_PREFIX):]
    return key


def tensor_roles(model: nn.Module) -> dict[str, Role]:
    """Map every state-dict key of ``model`` to its role.

    Raises
    ------
    RoleError
        If a tensor has no tagged ancestor (a model must tag its root or each part).
    """
    model = unwrap(model)
    module_role: dict[str, Role | None] = {}
    for name, module in model.named_modules():
        own = getattr(module, _ROLE_ATTR, None)
        parent = module_role.get(name.rpartition(".")[0]) if name else None
        module_role[name] = own if own is not None else parent
    roles: dict[str, Role] = {}
    for key in model.state_dict():
        owner = key.rpartition(".")[0]
        role = module_role.get(owner)
        if role is None:
            raise RoleError(
                f"tensor '{key}' has no role; tag its module (or the model root) with "
                "fedmoe.roles.set_role"
            )
        roles[key] = role
    return roles


def split_state_dict(
    model: nn.Module, roles: Iterable[Role] = FEDERATED_ROLES
) -> dict[str, torch.Tensor]:
    """The detached tensors of ``model`` whose role is in ``roles``, keys without Opacus prefix."""
    wanted = {Role(r) for r in roles}
    by_key = tensor_roles(model)
    state = unwrap(model).state_dict()
    return {k: t.detach().clone() for k, t in state.items() if by_key[k] in wanted}


def merge_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    roles: Iterable[Role] = FEDERATED_ROLES,
) -> None:
    """Load exactly the tensors of ``roles`` into ``model``, checking keys and shapes.

    Raises
    ------
    RoleError
        If ``state`` lacks a key of those roles, carries a key of another role (a ``local``
        tensor from outside is always refused) or an unknown key, or a shape differs.
    """
    wanted = {Role(r) for r in roles}
    target = unwrap(model)
    by_key = tensor_roles(target)
    incoming = {strip_opacus_prefix(k): v for k, v in state.items()}
    expected = {k for k, r in by_key.items() if r in wanted}
    missing = sorted(expected - incoming.keys())
    foreign = sorted(k for k in incoming if k not in expected)
    if missing or foreign:
        raise RoleError(
            f"state dict does not match roles {sorted(r.value for r in wanted)}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {foreign[:5]}{'…' if len(foreign) > 5 else ''}"
        )
    current = target.state_dict()
    for k in expected:
        if tuple(incoming[k].shape) != tuple(current[k].shape):
            raise RoleError(
                f"tensor '{k}' has shape {tuple(incoming[k].shape)}, the model expects "
                f"{tuple(current[k].shape)}; client and server must build the same model config"
            )
    target.load_state_dict({k: torch.as_tensor(incoming[k]) for k in expected}, strict=False)
