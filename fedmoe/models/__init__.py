"""The fedmoe model family, built by name: ``build_model("moe-mlp", top_k=1)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from fedmoe.config import FedMoEConfig
from fedmoe.data import dataset_shape
from fedmoe.models.layers import Expert, TopKMoE, per_sample_balance_loss
from fedmoe.models.moe_mlp import MoEMLPClassifier, MoEMLPConfig

#: name -> (config dataclass, model class). Every model's forward returns
#: ``(logits, per_sample_balance_loss)`` and offers ``set_use_local(bool)``.
MODELS: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {
    "moe-mlp": (MoEMLPConfig, MoEMLPClassifier),
}


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build the model ``name`` from its config dataclass with keyword ``overrides``.

    Raises
    ------
    ValueError
        For an unknown model name or an override its config does not have.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; available: {sorted(MODELS)}")
    config_cls, model_cls = MODELS[name]
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"model '{name}' has no option(s) {unknown}; valid: {sorted(valid)}")
    return model_cls(config_cls(**overrides))


def model_for(config: FedMoEConfig) -> nn.Module:
    """The run's model, shaped for its data set (server and clients build the same one)."""
    in_features, num_classes = dataset_shape(config.dataset)
    return build_model(
        config.model, in_features=in_features, num_classes=num_classes, **config.model_overrides()
    )


__all__ = [
    "MODELS", "build_model", "model_for", "Expert", "TopKMoE", "per_sample_balance_loss",
    "MoEMLPClassifier", "MoEMLPConfig",
]
