"""The fedmoe model family, built by name: ``build_model("hmoe", top_k=1)``.

| name    | model                                   | data           | task                       |
|---------|-----------------------------------------|----------------|----------------------------|
| `moe`   | flat top-k MoE classifier               | digits         | classification             |
| `lmoe`  | linear scores + top-k MoE over the scores | digits       | classification             |
| `hmoe`  | deep MoE, hierarchical (2-level) gating | digits         | classification             |
| `mtmoe` | multi-gate multi-task MoE               | digits (3 tasks) | multi-task, uncertainty-weighted |
| `tmoe`  | Transformer with MoE feed-forward blocks | Python stdlib source | next-token pretraining, then classification |

Every model's forward returns ``(outputs, aux)`` with ``aux`` (B,) its per-sample router
losses, and names its task in ``model.task`` (:mod:`fedmoe.models.tasks`). Use
:func:`fedmoe.models.layers.set_use_local` to score a model without its local experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from fedmoe.config import EMBEDDED_SHAPE, FedMoEConfig
from fedmoe.models.experts import Expert
from fedmoe.models.hmoe import HierarchicalMoEClassifier, HMoEConfig
from fedmoe.models.layers import (
    HierarchicalMoE,
    MultiGateMoE,
    Router,
    TopKMoE,
    expert_usage,
    per_sample_balance_loss,
    set_use_local,
)
from fedmoe.models.moe import LMoEConfig, LogitMoEClassifier, MoEClassifier, MoEConfig
from fedmoe.models.mtmoe import DIGIT_TASKS, MTMoEConfig, MultiTaskMoE
from fedmoe.models.tmoe import TMoEConfig, TransformerMoE

#: name -> (config dataclass, model class).
MODELS: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {
    "moe": (MoEConfig, MoEClassifier),
    "lmoe": (LMoEConfig, LogitMoEClassifier),
    "hmoe": (HMoEConfig, HierarchicalMoEClassifier),
    "mtmoe": (MTMoEConfig, MultiTaskMoE),
    "tmoe": (TMoEConfig, TransformerMoE),
}


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build the model ``name`` from its config dataclass with keyword ``overrides``.

    Raises
    ------
    ValueError
        For an unknown model name, an override its config does not have, or a bad value.
    """
    return MODELS[_known(name)][1](model_config(name, **overrides))


def model_config(name: str, **overrides: Any) -> Any:
    """The model's config dataclass with ``overrides`` (validated; cheap, builds no model)."""
    config_cls = MODELS[_known(name)][0]
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"model '{name}' has no option(s) {unknown}; valid: {sorted(valid)}")
    return config_cls(**overrides)


def _known(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; available: {sorted(MODELS)}")
    return name


def run_overrides(config: FedMoEConfig) -> dict[str, Any]:
    """The run config's keyword overrides for its model's config dataclass (the one place
    that maps run-config keys onto model shapes)."""
    common = {
        "hidden_dim": config.hidden_dim,
        "num_local_experts": config.num_local_experts,
        "top_k": config.top_k,
        "gate": config.gate,
        "dispatch": config.expert_dispatch,
        "balance_coef": config.balance_coef,
        "z_loss_coef": config.z_loss_coef,
    }
    if config.model in ("moe", "lmoe", "hmoe"):  # the data's shape; 0 = digits' 64 and 10
        common |= {"in_features": config.num_features or EMBEDDED_SHAPE[0],
                   "num_classes": config.num_classes or EMBEDDED_SHAPE[1],
                   # the scale calibrates scores to a prior: none without one
                   "score_scale": config.score_scale and config.label_prior_share > 0}
    if config.model == "moe":
        return common | {"num_shared_experts": config.num_shared_experts}
    if config.expert_hidden_dim:  # 0 = the model config's own default
        common["expert_hidden_dim"] = config.expert_hidden_dim
    if config.model == "lmoe":  # no trunk width: the experts work on the class scores
        del common["hidden_dim"]
        return common | {"num_shared_experts": config.num_shared_experts,
                         "feature_centring": config.feature_centring}
    if config.model == "hmoe":
        return common | {"num_groups": config.num_groups,
                         "experts_per_group": config.num_shared_experts,
                         "group_top_k": config.group_top_k, "expert_depth": config.expert_depth}
    if config.model == "mtmoe":
        return common | {"num_shared_experts": config.num_shared_experts, "tasks": DIGIT_TASKS}
    return common | {"num_shared_experts": config.num_shared_experts,
                     "num_always_on_experts": config.num_always_on_experts,
                     "num_layers": config.num_layers, "num_heads": config.num_heads,
                     "seq_len": config.seq_len,
                     "unigram_prior": config.unigram_prior and unigram_prior_applies(config)}


def unigram_prior_applies(config: FedMoEConfig) -> bool:
    """Whether ``unigram-prior`` decides anything: ``tmoe`` with pretraining rounds (the
    histogram is released in one) and a ``label-prior-share`` to release it with."""
    return (config.model == "tmoe" and config.pretrain_rounds > 0
            and config.label_prior_share > 0)


def model_for(config: FedMoEConfig, server_round: int = 1) -> nn.Module:
    """The run's model (server and clients build the same one), set up for the training
    phase of ``server_round`` (``tmoe``: pretraining or fine-tuning)."""
    model = build_model(config.model, **run_overrides(config))
    if config.model == "tmoe":
        model.set_phase(config.phase(server_round))
    return model


__all__ = [
    "MODELS", "build_model", "model_config", "model_for", "run_overrides", "Expert", "Router",
    "TopKMoE", "HierarchicalMoE", "MultiGateMoE", "per_sample_balance_loss", "set_use_local",
    "expert_usage", "MoEClassifier", "MoEConfig", "LogitMoEClassifier", "LMoEConfig",
    "HierarchicalMoEClassifier", "HMoEConfig",
    "MultiTaskMoE", "MTMoEConfig", "TransformerMoE", "TMoEConfig",
]
