"""The run folder: ``results.json`` (the record of a run) and ``progress.png`` (its plot).

``results.json`` layout::

    config            the validated run config (kebab-case keys)
    noise_multiplier  σ planned for the run
    rounds[]          round, sampled, rejected, clients[] (client, epsilon,
                      personalized_accuracy, global_accuracy, num_examples,
                      num_test_examples, train_loss), and the round's means / max ε
    final             personalized_accuracy_mean, global_accuracy_mean, epsilon_max,
                      clients[] (each client's latest evaluation)
    wall_seconds
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmoe.config import FedMoEConfig
from fedmoe.privacy.ledger import write_atomic

RESULTS, PLOT = "results.json", "progress.png"


def resolve_run_dir(config: FedMoEConfig) -> Path:
    """``config.run_dir``, or a fresh ``runs/<timestamp>`` when it is empty."""
    if config.run_dir:
        return Path(config.run_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def build_results(
    config: FedMoEConfig, noise_multiplier: float, history: Sequence[Any], wall_seconds: float
) -> dict[str, Any]:
    """Turn the strategy's per-round history into the ``results.json`` document."""
    rounds, latest = [], {}
    for rec in history:
        clients = []
        for pid in sorted(set(rec.train) | set(rec.evaluate)):
            train, ev = rec.train.get(pid), rec.evaluate.get(pid)
            row = {
                "client": pid,
                "epsilon": ev.epsilon if ev else train.epsilon,
                "personalized_accuracy": ev.personalized_accuracy if ev else None,
                "global_accuracy": ev.global_accuracy if ev else None,
                "num_examples": train.num_examples if train else latest.get(pid, {}).get("num_examples"),
                "num_test_examples": ev.num_examples if ev else None,
                "train_loss": train.train_loss if train else None,
            }
            clients.append(row)
            if ev:
                latest[pid] = row
        rounds.append({
            "round": rec.server_round,
            "sampled": rec.sampled,
            "rejected": list(rec.rejected),
            "clients": clients,
            **_summary(clients),
        })
    final_clients = [latest[p] for p in sorted(latest)]
    return {
        "config": config.to_run_config(),
        "noise_multiplier": noise_multiplier,
        "rounds": rounds,
        "final": {**_summary(final_clients), "clients": final_clients},
        "wall_seconds": round(wall_seconds, 2),
    }


def _summary(clients: list[dict]) -> dict[str, float | None]:
    evaluated = [c for c in clients if c["personalized_accuracy"] is not None]

    def mean(key: str) -> float | None:
        return sum(c[key] for c in evaluated) / len(evaluated) if evaluated else None

    return {
        "personalized_accuracy_mean": mean("personalized_accuracy"),
        "global_accuracy_mean": mean("global_accuracy"),
        "epsilon_max": max((c["epsilon"] for c in clients), default=0.0),
    }


def write_run_folder(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` and ``progress.png`` under ``run_dir``; return the JSON path."""
    path = run_dir / RESULTS
    write_atomic(path, json.dumps(_json_safe(results), indent=2, allow_nan=False).encode())
    plot_progress(results, run_dir / PLOT)
    return path


def _json_safe(value: Any) -> Any:
    """NaN/inf (e.g. the loss of a round of empty batches) become null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def plot_progress(results: dict[str, Any], path: Path) -> None:
    """Mean personalised / global accuracy and max ε per round, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in results["rounds"] if r["personalized_accuracy_mean"] is not None]
    x = [r["round"] for r in rows]
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(x, [r["personalized_accuracy_mean"] for r in rows], "o-", label="personalised")
    ax_acc.plot(x, [r["global_accuracy_mean"] for r in rows], "s--", label="global-only")
    ax_acc.set(xlabel="round", ylabel="mean test accuracy", ylim=(0, 1), title="Accuracy")
    ax_acc.legend()
    ax_eps.plot(x, [r["epsilon_max"] for r in rows], "o-", color="tab:red")
    target = results["config"]["target-epsilon"]
    if math.isfinite(target):
        ax_eps.axhline(target, color="grey", linestyle=":", label=f"budget ε={target:g}")
        ax_eps.legend()
    ax_eps.set(xlabel="round", ylabel="ε spent (max over clients)", title="Privacy")
    for ax in (ax_acc, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
