"""The run folder: ``results.json`` (the record of a run), ``progress.png`` and
``privacy.png`` (its plots), next to the server's privacy ledger ``ledger.sqlite``.

``results.json`` layout::

    run_id            Flower's id of the run (a client without a state-dir keeps its
                      state in ``<temp>/fedmoe-state/run-<run_id>/<client>``)
    config            the validated run config (kebab-case keys)
    inputs            run-config key -> SHA-256 of the data or bounds file it names, when
                      the run started (:func:`fedmoe.data.files.input_fingerprints`);
                      ``fedmoe export`` refuses files that changed since
    excluded[]        client (or node-<id> where its query failed), reason: every client
                      that got no more rounds (refused, budget spent, unusable ledger,
                      failed query)
    privacy           mode ("dp", or "non-private" for target-epsilon = inf: ε=∞, no
                      clipping, no noise, no ledger), delta_rule, stopped (why training stopped early, or null),
                      clients[] (:func:`privacy_rows`: per client its plan — n, δ, q, steps
                      per round, σ, rounds its budget allows — and its spend from the
                      server's ledger: rounds, ε spent, ε left), excluded[] (client,
                      reason: every client or node that was refused further rounds)
    rounds[]          round, sampled, rejected (client: reason of every dropped train
                      reply), failures (counts of dropped train replies: error, timeout,
                      invalid), aggregated (false: fewer than min-train-replies valid
                      replies, the global model stayed), mismatches, clients[] (client,
                      epsilon, client_epsilon where it differs, personalized_accuracy,
                      global_accuracy, num_examples, num_test_examples, upload_bytes /
                      download_bytes: serialised bytes of the model update in its train
                      reply / in the train and evaluate messages sent to it that round,
                      :func:`fedmoe.records.update_bytes`, update_norm: L2 norm of its
                      update), and the round's means / max ε (null: ε=∞)

Every ``epsilon`` is the server's ledger's (ε spent after that round); ``client_epsilon``
is what the client reported, present only where it differs (relative 1e-6).
    final             personalized_accuracy_mean, global_accuracy_mean, epsilon_max,
                      clients[] (each client's latest evaluation, with ``epsilon`` its
                      ledger's spend at the end: rounds charged after that evaluation
                      — interrupted, or not evaluated — count)
    wall_seconds
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmoe.config import FedMoEConfig
from fedmoe.privacy import ClientPlan, LedgerBook
from fedmoe.privacy.ledger import client_sort_key
from fedmoe.storage import write_atomic

RESULTS, PLOT, PRIVACY_PLOT, USAGE_PLOT = ("results.json", "progress.png", "privacy.png",
                                          "usage.png")
NON_PRIVATE = "non-private"
#: How a non-private run is labelled in every table and plot.
NON_PRIVATE_LABEL = "ε=∞ (non-private: no clipping, no noise)"
DELTA_RULE = ("target-delta (refused for a client unless < 1/n), or if 0, per client the "
              "largest power of ten <= 1/(10 n) for its train set size n, capped at 1e-3 "
              "(delta < 1/n is necessary, not sufficient: Dwork & Roth 2014, sec. 2.3)")
#: Relative difference between a client's reported ε and the server's that is shown.
EPSILON_TOLERANCE = 1e-6


def resolve_run_dir(config: FedMoEConfig) -> Path:
    """``config.run_dir``, or a fresh ``runs/<timestamp>`` when it is empty."""
    if config.run_dir:
        return Path(config.run_dir)
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_run_folder(run_dir: Path) -> None:
    """Before a run into ``run_dir``: its server ledger, if any, must verify (opened
    read-only, nothing written), and a folder with results of earlier rounds must still
    have the ledger that recorded their spend.

    Raises
    ------
    LedgerError
        Naming the file and the problem.
    """
    from fedmoe.privacy import LEDGER_FILE, LedgerError

    path = run_dir / LEDGER_FILE
    if path.exists():
        LedgerBook(path, read_only=True).close()
    elif (run_dir / RESULTS).exists():
        raise LedgerError(
            f"{run_dir}: holds {RESULTS} of an earlier run but no {LEDGER_FILE}: the spend "
            "it recorded is gone. Restore the ledger from a backup, or use a new run-dir")


def privacy_rows(book: LedgerBook, plans: Mapping[str, ClientPlan] | None = None) -> list[dict]:
    """Per client of ``book``: its spend (rounds taken, ε spent and left) and the DP
    parameters of its latest round, merged with its plan for the run when given."""
    rows = []
    for client in book.clients():
        ledger = book.get(client)
        trajectory = book.trajectory(client)
        spent = trajectory[-1][1] if trajectory else 0.0
        last = ledger.entries[-1] if ledger.entries else None
        row = {
            "client": client,
            # distinct rounds: a client's first round may charge a label histogram too
            "rounds": len({r for r, _ in trajectory if r > 0}),
            "prior_rounds": sum(1 for r, _ in trajectory if r == 0),
            "epsilon": spent,
            "budget": ledger.budget,
            "epsilon_left": max(0.0, ledger.budget - spent),
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "noise_multiplier": last.noise_multiplier if last else None,
            "sample_rate": last.sample_rate if last else None,
            "steps": last.steps if last else None,
        }
        plan = (plans or {}).get(client)
        if plan is not None:
            row |= {"num_train": plan.num_train, "noise_multiplier": plan.noise_multiplier,
                    "pretrain_noise_multiplier": plan.pretrain_noise,
                    "sample_rate": plan.sample_rate, "steps": plan.steps,
                    "rounds_allowed": plan.rounds_allowed}
        rows.append(row)
    return rows


def build_results(
    config: FedMoEConfig,
    history: Sequence[Any],
    wall_seconds: float,
    *,
    privacy: list[dict],
    stopped: str | None = None,
    run_id: int | None = None,
    excluded: Mapping[str, str] | None = None,
    inputs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Turn the strategy's per-round history into the ``results.json`` document.

    ``excluded``: client (or ``node-<id>``) -> why it took no (further) part; ``inputs``:
    the fingerprints of the files the run config names."""
    rounds, latest = [], {}
    for rec in history:
        clients = []
        for cid in sorted(set(rec.train) | set(rec.evaluate), key=client_sort_key):
            train, ev = rec.train.get(cid), rec.evaluate.get(cid)
            reported = ev.epsilon if ev else train.epsilon
            spent = rec.epsilon.get(cid, 0.0) if config.private else math.inf
            row = {
                "client": cid,
                "epsilon": spent,
                **({} if math.isclose(spent, reported, rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9)
                   else {"client_epsilon": reported}),
                "personalized_accuracy": ev.personalized_accuracy if ev else None,
                "global_accuracy": ev.global_accuracy if ev else None,
                "personalized_loss": ev.personalized_loss if ev else None,
                "global_loss": ev.global_loss if ev else None,
                "num_examples": train.num_examples if train else latest.get(cid, {}).get("num_examples"),
                "num_test_examples": ev.num_examples if ev else None,
                "upload_bytes": rec.upload_bytes.get(cid),
                "update_norm": rec.update_norms.get(cid),
                "download_bytes": rec.download_bytes.get(cid),
                **rec.details.get(cid, {}),
            }
            clients.append(row)
            if ev:
                latest[cid] = row
        rounds.append({
            "round": rec.server_round,
            "phase": rec.phase,
            "sampled": rec.sampled,
            "rejected": list(rec.rejected),
            "failures": dict(rec.failures),
            "aggregated": rec.aggregated,
            "mismatches": {c: {"server": s, "client": r} for c, (s, r) in rec.mismatches.items()},
            "clients": clients,
            **_summary(clients),
            # every client the ledger charged, also one that never replied (a round lost
            # to an interrupt is charged and has no client rows)
            **({"epsilon_max": max(rec.epsilon.values())} if config.private and rec.epsilon
               else {}),
        })
    # a client's latest evaluation may predate its last charge (a round interrupted after
    # the charge, or trained but not evaluated): its final ε is its ledger's spend now
    now = {p["client"]: p["epsilon"] for p in privacy} if config.private else {}
    final_clients = [_spent_now(latest[c], now) for c in sorted(latest, key=client_sort_key)]
    return {
        "run_id": run_id,
        "config": config.to_run_config(),
        "inputs": dict(inputs or {}),
        "privacy": {"mode": "dp" if config.private else NON_PRIVATE,
                    "delta_rule": DELTA_RULE, "stopped": stopped, "clients": privacy},
        "excluded": [{"client": c, "reason": why}
                     for c, why in sorted((excluded or {}).items(),
                                          key=lambda item: client_sort_key(item[0]))],
        "rounds": rounds,
        "final": {**_summary(final_clients), "clients": final_clients},
        "wall_seconds": round(wall_seconds, 2),
    }


def _spent_now(row: dict[str, Any], now: Mapping[str, float]) -> dict[str, Any]:
    """``row`` (a client's latest evaluation) with ``epsilon`` = ``now[client]``, the
    server's ledger's spend at the end of the run, where it has moved on; the client's own
    ε of that evaluation (``client_epsilon``) then compares two different rounds and goes."""
    spent = now.get(row["client"])
    if spent is None or math.isclose(spent, row["epsilon"], rel_tol=1e-12, abs_tol=1e-12):
        return row
    return {k: v for k, v in row.items() if k != "client_epsilon"} | {"epsilon": spent}


#: Per-client metrics whose mean over clients each round and the final summary report.
MEANS = ("personalized_accuracy", "global_accuracy", "personalized-perplexity",
         "global-perplexity", "unigram-perplexity")


def _summary(clients: list[dict]) -> dict[str, Any]:
    evaluated = [c for c in clients if c["personalized_accuracy"] is not None]
    summary: dict[str, Any] = {}
    for key in MEANS:
        values = [c[key] for c in evaluated if c.get(key) is not None]
        if values or key.endswith("accuracy"):
            summary[f"{key.replace('-', '_')}_mean"] = (sum(values) / len(values)
                                                        if values else None)
    tasks = sorted({k for c in evaluated for k in c if k.startswith("personalized-task-")})
    for key in tasks:
        values = [c[key] for c in evaluated if key in c]
        summary[f"{key.replace('-', '_')}_mean"] = sum(values) / len(values)
    usage = [c["expert-usage"] for c in evaluated if c.get("expert-usage")]
    if usage and all(len(u) == len(usage[0]) for u in usage):
        summary["expert_usage_mean"] = [sum(col) / len(usage) for col in zip(*usage, strict=True)]
    summary["epsilon_max"] = max((c["epsilon"] for c in clients), default=0.0)
    return summary


def write_run_folder(run_dir: Path, results: dict[str, Any], book: LedgerBook) -> Path:
    """Write ``results.json``, ``progress.png`` and ``privacy.png``; return the JSON path."""
    path = run_dir / RESULTS
    write_atomic(path, json.dumps(_json_safe(results), indent=2, allow_nan=False).encode())
    plot_progress(results, run_dir / PLOT)
    plot_privacy(book, run_dir / PRIVACY_PLOT)
    plot_usage(results, run_dir / USAGE_PLOT)
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


def legend(ax: Any, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` where ``ax`` has labelled artists; nothing where it has none
    (a run stopped in round 1, a panel of a partial grid), which Matplotlib would warn
    about ("No artists with labels found")."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


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
    legend(ax_acc)
    ax_eps.plot(x, [r["epsilon_max"] for r in rows], "o-", color="tab:red")
    target = results["config"]["target-epsilon"]
    if target is not None and math.isfinite(target):
        ax_eps.axhline(target, color="grey", linestyle=":", label=f"budget ε={target:g}")
        legend(ax_eps)
    ax_eps.set(xlabel="round", ylabel="ε spent (max over clients)",
               title="Privacy" if results["privacy"]["mode"] == "dp" else NON_PRIVATE_LABEL)
    for ax in (ax_acc, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_privacy(book: LedgerBook, path: Path) -> None:
    """ε spent per client over rounds (server's ledger), with each client's budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    budgets = set()
    for client in book.clients():
        points = [(r, e) for r, e in book.trajectory(client) if r > 0]
        prior = max((e for r, e in book.trajectory(client) if r == 0), default=0.0)
        if points:
            xs, ys = zip(*[(0, prior), *points], strict=True)
            ax.plot(xs, ys, "o-", markersize=3, linewidth=1, label=client)
        budgets.add(book.get(client).budget)
    for budget in sorted(budgets):
        ax.axhline(budget, color="grey", linestyle=":")
    ax.set(xlabel="round", ylabel="ε spent", title="Privacy spend per client (dotted: budget)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(book.clients()) <= 12:
        legend(ax, fontsize="small", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_usage(results: dict[str, Any], path: Path) -> None:
    """Mean share of routing weight per expert (personalised model, clients' test splits)
    over rounds; nothing is drawn for a run without usage figures."""
    rows = [r for r in results["rounds"] if r.get("expert_usage_mean")]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [r["round"] for r in rows]
    # several MoE layers (or task routers) each sum to 1: show each expert's share of all
    shares = list(zip(*[[u / sum(r["expert_usage_mean"]) for u in r["expert_usage_mean"]]
                        for r in rows], strict=True))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot(x, shares, labels=[f"expert {i}" for i in range(len(shares))])
    ax.set(xlabel="round", ylabel="share of routing weight", ylim=(0, 1),
           title="Expert usage (routing weight, all MoE layers and routers)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(shares) <= 16:
        legend(ax, fontsize="x-small", ncol=4, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
