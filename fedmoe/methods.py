"""Methods: what a run trains and which of its tensors leave the client.

A method is a model builder plus a role assignment (:mod:`fedmoe.roles`); the ClientApp and
the ServerApp never look at the method's name. They build the run's model with
:func:`method_model` and exchange exactly its ``shared`` and ``gate`` tensors, so

| method   | model                                 | sent to the server    | kept on the client |
|----------|---------------------------------------|-----------------------|--------------------|
| `fedmoe` | the run's ``model`` (MoE family)      | shared + gate         | local experts      |
| `fedavg` | MLP in -> ``mlp-width`` -> classes    | everything            | nothing            |
| `fedper` | the same MLP                          | body (first layer)    | head               |
| `local`  | the same MLP                          | nothing (no arrays)   | everything         |

Every method trains with the same DP-SGD (all trainable tensors clipped and noised
together), the same accountant and the same ledgers; only what is aggregated differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.compression import Codec
from fedmoe.config import ADDED_KEYS, METHODS, FedMoEConfig
from fedmoe.models import model_for, unigram_prior_applies
from fedmoe.models.centre import CentreFold, FeatureCentre
from fedmoe.models.prior import label_priors
from fedmoe.models.tasks import Classification
from fedmoe.roles import Role, set_role

#: Input features and classes of the data sets the MLP baselines train on (digits 8x8
#: images and the generated ``synthetic`` set share them).
MLP_IN, MLP_CLASSES = 64, 10


class MLPClassifier(nn.Module):
    """The baselines' dense classifier: x (B, in) -> ReLU(body) (B, width) -> head (B, C),
    or with ``width`` 0 a linear classifier x (B, in) -> head (B, C) (no body); with
    ``centring`` the inputs are first centred, x - μ, by the same learned mean as
    ``lmoe``'s (:class:`~fedmoe.models.centre.FeatureCentre`; its role is the method's:
    aggregated for ``fedavg`` and ``fedper``, the client's own for ``local``).

    Returns ``(logits, aux)`` like every fedmoe model, ``aux`` (B,) the centring's loss
    (value 0) or zeros (no router). Roles are set by the method (:data:`METHOD_SPECS`),
    not here.
    """

    task = Classification()

    def __init__(self, in_features: int, width: int, num_classes: int,
                 centring: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, width) if width else None
        self.head = nn.Linear(width or in_features, num_classes)
        # registered last: the other tensors keep their parameter order (and noise draws)
        self.centre = FeatureCentre(in_features) if centring else None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not hasattr(self, "centre"):  # pickled before the centring existed: none
            self.centre = None

    @property
    def centre_reader(self) -> str:
        """The layer that reads the centred input (:class:`~fedmoe.models.centre.CentreFold`)."""
        return "head" if self.body is None else "body"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centring = x.new_zeros(x.shape[0])  # (B,)
        if self.centre is not None:
            x, centring = self.centre.centred(x)  # (B, in), (B,): value 0, trains μ
        h = x if self.body is None else F.relu(self.body(x))  # (B, width or in)
        return self.head(h), centring  # (B, C), (B,)


def _mlp(config: FedMoEConfig) -> MLPClassifier:
    return MLPClassifier(config.num_features or MLP_IN, config.mlp_width,
                         config.num_classes or MLP_CLASSES, mlp_centred(config))


def mlp_centred(config: FedMoEConfig) -> bool:
    """Whether a baseline's MLP centres its inputs: ``feature-centring`` and
    ``mlp-centring`` both on (a run recorded before ``mlp-centring`` existed reads it as
    false: its baseline never centred, :data:`fedmoe.config.ADDED_KEYS`)."""
    return config.feature_centring and config.mlp_centring


def _all(role: Role) -> Callable[[nn.Module], None]:
    def assign(model: nn.Module) -> None:
        set_role(model, role)
    return assign


def _personal_head(model: nn.Module) -> None:
    set_role(model, Role.SHARED)
    set_role(model.head, Role.LOCAL)


def _own_roles(model: nn.Module) -> None:
    """fedmoe's models tag their parts themselves (routers, local experts)."""


@dataclass(frozen=True)
class MethodSpec:
    """A method: its model builder and its role assignment.

    ``global_only`` says whether "global-only accuracy" (the model without its local
    tensors) means anything: for ``fedper`` and ``local`` the local part is the head or the
    whole model, so the figure is left out of reports.
    """

    name: str
    build: Callable[[FedMoEConfig, int], nn.Module]
    assign_roles: Callable[[nn.Module], None]
    global_only: bool
    summary: str


METHOD_SPECS: dict[str, MethodSpec] = {
    "fedmoe": MethodSpec("fedmoe", model_for, _own_roles, True,
                         "the MoE model; shared experts, trunk, head and gate aggregated, "
                         "local experts kept"),
    "fedavg": MethodSpec("fedavg", lambda c, r: _mlp(c), _all(Role.SHARED), True,
                         "dense MLP, fully aggregated"),
    "fedper": MethodSpec("fedper", lambda c, r: _mlp(c), _personal_head, False,
                         "dense MLP, body aggregated, personal head"),
    "local": MethodSpec("local", lambda c, r: _mlp(c), _all(Role.LOCAL), False,
                        "dense MLP trained alone; nothing leaves the client"),
}


#: Run-config keys only fedmoe's MoE models read — their shape, experts, router, expert
#: switch, label prior and score scale. The MLP baselines (every method but ``fedmoe``)
#: build, train and report the same whatever these say (tests/test_experiment.py runs a
#: baseline with every one of them changed), so a baseline run's identity leaves them out.
MOE_MODEL_KEYS = frozenset({
    "gate", "dispatch", "hidden-dim", "expert-hidden-dim", "num-shared-experts",
    "num-local-experts", "top-k", "balance-coef", "z-loss-coef", "local-pull",
    "expert-noise-limit", "num-groups", "group-top-k", "expert-depth", "num-layers",
    "num-heads", "num-always-on-experts", "label-prior-share", "label-prior-shrinkage",
    "score-scale", "unigram-prior",
})
#: Run-config keys only ``tmoe`` reads.
TMOE_KEYS = frozenset({"unigram-prior"})
#: Run-config keys only ``lmoe`` and the MLP baselines read (the other MoE models have no
#: feature centring).
CENTRING_KEYS = frozenset({"feature-centring", "centring-fold"})
#: Run-config keys read only where the inputs are centred (a run centring nothing has
#: nothing to fold: its id, and a resume's comparison of configs, leave them out).
FOLD_KEYS = frozenset({"centring-fold"})
#: Run-config keys only the MLP baselines read (fedmoe's models ignore them).
MLP_KEYS = frozenset({"mlp-centring"})


#: Run-config keys added after seeded grids had been recorded: at the value that means "as
#: before the key existed" (:data:`fedmoe.config.ADDED_KEYS`) they are left out of
#: :func:`result_keys`, so a run recorded before keeps its id (and its noise draws, which
#: a grid seeds from the id). ``score-scale`` predates this rule and stays in every id;
#: every key added since is neutral by construction (a key added to ``ADDED_KEYS`` and
#: forgotten here changed every id: ``pretrain-share`` once re-drew the noise of every grid).
ID_NEUTRAL_KEYS = tuple(key for key in ADDED_KEYS if key != "score-scale")
#: Run-config keys that change only what the server evaluates and releases as the run's
#: model (``ema-decay``: the average is computed from the global models, training
#: continues from the last one) — except where :func:`noise_keys` says otherwise. Two runs
#: that differ only in these train the same trajectory; a grid seeds both with the same DP
#: noise, so their difference is the key's effect alone.
RELEASE_ONLY_KEYS = ("ema-decay",)
#: Run-config keys left out of a run's noise id although they change its trajectory
#: (``centring-fold``: it draws nothing), so that a grid gives the runs with and without
#: one the same DP noise draws and their difference is the key's effect alone (and a run
#: of today's default is paired with one recorded before the key existed).
NOISE_NEUTRAL_KEYS = ("centring-fold",)


def unread_keys(config: FedMoEConfig) -> frozenset[str]:
    """The run-config keys ``config``'s method and model do not read (:data:`MOE_MODEL_KEYS`
    for a baseline, :data:`TMOE_KEYS` for a model other than ``tmoe`` and for a ``tmoe``
    without pretraining rounds or label-prior share, where the unigram prior is off,
    :data:`CENTRING_KEYS` for a fedmoe model other than ``lmoe``, :data:`MLP_KEYS` for
    ``fedmoe``, :data:`FOLD_KEYS` for a run that centres nothing)."""
    baseline = config.method != "fedmoe"
    centred = mlp_centred(config) if baseline else (
        config.model == "lmoe" and config.feature_centring)
    return (MOE_MODEL_KEYS if baseline else MLP_KEYS) | (
        frozenset() if unigram_prior_applies(config) else TMOE_KEYS) | (
        frozenset() if baseline or config.model == "lmoe" else CENTRING_KEYS) | (
        frozenset() if centred else FOLD_KEYS)


def result_keys(config: FedMoEConfig) -> dict[str, bool | int | float | str]:
    """The run-config keys that determine a run's result for its method (all of them for
    ``fedmoe``; without :data:`MOE_MODEL_KEYS` for the baselines and :data:`TMOE_KEYS`
    for the other models), less the :data:`ID_NEUTRAL_KEYS` at their "as before" value.

    A baseline's two centring switches are one fact, whether its MLP centres
    (:func:`mlp_centred`), kept as ``feature-centring``: the runs of either switch off
    are one run (the id of a baseline recorded before either key existed)."""
    keys = config.to_run_config()
    for key in unread_keys(config):
        keys.pop(key)
    if config.method != "fedmoe":
        keys["feature-centring"] = mlp_centred(config)
        keys.pop("mlp-centring")
    for key in ID_NEUTRAL_KEYS:
        if key in keys and keys[key] == ADDED_KEYS[key]:
            keys.pop(key)
    return keys


def noise_keys(config: FedMoEConfig) -> dict[str, bool | int | float | str]:
    """:func:`result_keys` less :data:`NOISE_NEUTRAL_KEYS` and :data:`RELEASE_ONLY_KEYS`:
    what determines the run's training trajectory bar the keys that draw nothing, from
    which a grid derives its DP noise seeds.

    ``ema-decay`` stays where the average does reach training: a ``tmoe`` run that
    switches from pretraining to fine-tuning (fine-tuning starts from the averaged
    pretrained model) and a lossy ``download-codec`` (a train message is encoded
    relative to what the client rebuilt from the evaluate message, which carries the
    average)."""
    keys = result_keys(config)
    for key in NOISE_NEUTRAL_KEYS:
        keys.pop(key, None)
    switches = config.phase(1) != config.phase(config.num_server_rounds)
    if switches or not Codec.download(config).lossless:
        return keys
    for key in RELEASE_ONLY_KEYS:
        keys.pop(key, None)
    return keys


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises
    ------
    ValueError
        For an unknown name (the valid ones listed).
    """
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method '{name}'; available: {list(METHOD_SPECS)}")
    return METHOD_SPECS[name]


def method_model(config: FedMoEConfig, server_round: int = 1) -> nn.Module:
    """The run's model for its ``method``, roles assigned (server and clients build the
    same one), set up for the training phase of ``server_round``."""
    spec = method_spec(config.method)
    model = spec.build(config, server_round)
    spec.assign_roles(model)
    return model


def server_centre_fold(config: FedMoEConfig) -> CentreFold | None:
    """The fold the server applies after each aggregation (``centring-fold``): the run's
    model's :class:`~fedmoe.models.centre.CentreFold` where its centre and reader are
    both ``shared`` (``lmoe``, ``fedavg``, ``fedper`` centred); None where the option is
    off, nothing is centred or the centre is the client's own (``local`` folds on the
    client: :func:`fedmoe.models.centre.end_local_round`). Builds the model under a forked
    RNG, so the caller's random state is untouched."""
    if not config.centring_fold:
        return None
    with torch.random.fork_rng():
        model = method_model(config)
    fold = CentreFold.of(model)
    return fold if fold is not None and fold.role(model) == Role.SHARED else None


def label_prior_spec(config: FedMoEConfig) -> tuple[int, bool]:
    """(classes, per window) of the run's personal label prior: its model has one
    (:class:`~fedmoe.models.prior.LabelPrior`) and ``label-prior-share`` is above 0; else
    (0, False). ``per window``: its histogram counts windows of targets (``tmoe``)."""
    if config.label_prior_share <= 0:
        return 0, False
    priors = label_priors(method_model(config))
    return (len(priors[0].log_prior), priors[0].per_window) if priors else (0, False)


def label_prior_classes(config: FedMoEConfig) -> int:
    """The classes of the run's personal label prior (:func:`label_prior_spec`); 0 if none."""
    return label_prior_spec(config)[0]


def has_label_prior(config: FedMoEConfig) -> bool:
    """Whether the run trains a personal label prior (:func:`label_prior_classes` > 0)."""
    return label_prior_classes(config) > 0
