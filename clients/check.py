"""``fedmoe deploy check``: what a data holder runs before it starts its SuperNode.

It finds out here and now, on the data holder's machine, what the node's first query of a
run would: the node config parses; the node's data loads and fits the run (the ClientApp's
own loader, with its checks and messages); the state dir is usable and its ledger verifies
and agrees with the node's pinned δ and accountant; the pinned δ is below 1/n; and the
plan the server would make for the node — σ, q, steps per round, the rounds its budget
pays for, ε after the run — computed by the server's own planning
(:meth:`server.strategy.FedMoE.plan_new_client`) on a scratch ledger. Nothing is sent,
and nothing in the state dir is created or changed.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings as warnings_module
from dataclasses import dataclass, field
from pathlib import Path

from clients.app import Refusal, describe_client
from clients.state import ClientStore
from fedmoe.config import ConfigError, FedMoEConfig, NodeSettings
from fedmoe.data import DataScaleWarning, load_client_data, load_node_data, with_data_shape
from fedmoe.privacy import ClientPlan, LedgerBook
from fedmoe.privacy.accountant import epsilon
from fedmoe.privacy.label_prior import prior_segment


@dataclass(frozen=True)
class NodeCheck:
    """What :func:`check_node` found. ``spent``: ε the node's ledger has recorded (0 for
    none); ``plan``: the server's plan for this run, or None with ``excluded`` saying why
    the server would give the node no round; ``planned_rounds``: the run's
    ``num-server-rounds``; ``warnings``: what would work but should not be left so."""

    client: str
    num_train: int
    num_test: int
    state_dir: Path | None
    spent: float
    plan: ClientPlan | None
    excluded: str | None
    planned_rounds: int
    warnings: list[str] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        """Rounds of this run the node would train: the planned ones its budget pays for."""
        if self.plan is None or self.excluded:
            return 0
        return min(self.plan.rounds_allowed, self.planned_rounds)

    def epsilon_after(self) -> float:
        """ε the node's ledger would show after this run's :attr:`rounds` (its earlier
        spend and its label histogram included); ``inf`` for a non-private plan."""
        if self.plan is None or self.rounds == 0:
            return self.spent
        if not self.plan.private:
            return math.inf
        history = list(self.plan.prior)
        if self.plan.prior_noise:
            history.append(prior_segment(self.plan.prior_noise))
        history += self.plan.segments(self.rounds)
        return epsilon(history, self.plan.delta, self.plan.accountant)


def check_node(config: FedMoEConfig, node: NodeSettings) -> NodeCheck:
    """Check ``node`` (its ``--node-config``) against the run ``config`` the coordinator
    will start, as the node's first query would; see the module docstring.

    Raises
    ------
    ConfigError
        If the node's data cannot be used (:class:`~fedmoe.data.files.DataFileError` names
        the file and the fix), or its state dir is a file or cannot be written.
    clients.app.Refusal
        What the node would reply instead of taking part: a ledger that does not verify or
        is pinned to another δ or accountant, a pinned δ not below 1/n.
    """
    warnings = []
    if node.data_path:
        config = with_data_shape(config)
        with warnings_module.catch_warnings():  # said once below, as a line of the report
            warnings_module.simplefilter("ignore", DataScaleWarning)
            data = load_node_data(config, node.data_path, node.label_column)
        warnings += _scale_warning(config, node)
    else:
        warnings.append("no data-path: the node would train on partition "
                        f"{node.partition_id} of {node.num_partitions} of the run's built-in "
                        f"data set {config.dataset!r} (a demonstration); give the node its "
                        "own file with data-path")
        data = load_client_data(config, node.partition_id, node.num_partitions, config.phase(1))
    with tempfile.TemporaryDirectory(prefix="fedmoe-check-") as scratch:
        if node.state_dir:
            root = Path(node.state_dir).expanduser()
            _check_writable(root)
        else:
            root = Path(scratch) / "state"
            warnings.append("no state-dir: the node would keep its ledger and local experts "
                            "in a per-run temporary folder, so its budget would start afresh "
                            "every run; set state-dir to a folder that persists")
        info = describe_client(node, ClientStore(root), config, data)
        from server.strategy import FedMoE  # the server's planning, on a scratch ledger

        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # its log lines say what the report says
        try:
            with LedgerBook(Path(scratch) / "server-ledger.sqlite") as book:
                strategy = FedMoE(config, book=book)
                strategy.plan_new_client(info)
        finally:
            flwr_log.setLevel(level)
        ledger = ClientStore(root).ledger(  # verified by describe_client just now
            node.client, private=math.isfinite(node.budget(config.target_epsilon)))
        spent = ledger.spent() if ledger else 0.0
    plan = strategy.plans.get(info.client)
    if plan is not None and plan.private and not (node.delta and node.accountant):
        warnings.append(f"delta and accountant are not both pinned in the node config: this "
                        f"run would plan the node at δ={plan.delta:g}, {plan.accountant!r}; "
                        f"pin them (delta={plan.delta:g} accountant='{plan.accountant}') so "
                        "that no later run can plan its ledger at others")
    return NodeCheck(info.client, info.num_train, info.num_test,
                     Path(node.state_dir).expanduser() if node.state_dir else None, spent,
                     plan, strategy.excluded.get(info.client),
                     config.num_server_rounds, warnings)


def _scale_warning(config: FedMoEConfig, node: NodeSettings) -> list[str]:
    """The data-scale warning the SuperNode would log: features far beyond unit scale
    without ``feature-bounds``, or bounds that clip many of a feature's values."""
    from fedmoe.data.files import infer_spec, load_file, scale_warning

    spec = infer_spec(node.data_path)
    warning = scale_warning(spec, load_file(spec, node.label_column or config.label_column),
                            config.feature_bounds)
    return [warning] if warning else []


def _check_writable(root: Path) -> None:
    """``root`` must be a folder this process can write into, or creatable: a probe file
    is written and removed where it exists; nothing is created where it does not.

    Raises
    ------
    ConfigError
        Naming the folder and the fix.
    """
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"state-dir {root}: {existing} is a file, not a folder; choose "
                          "another state-dir")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fedmoe-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"state-dir {root}: cannot write in {existing} ({err.strerror}); "
                          "give the SuperNode's user write access or choose another "
                          "state-dir") from None
