"""``fedmoe audit``: one-run privacy audits (:mod:`fedmoe.privacy.audit`) over models × ε,
written to a run folder as ``audit.json``, ``audit.md`` (the table) and ``audit.png``
(claimed ε against the audited lower bound).

Each (model, ε) gets both audits: ``white-box`` (one client's DP-SGD, scored from all its
parameters) and ``server`` (a federation of ``--clients``, scored from the aggregated
shared+gate arrays).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy.audit import (
    AuditResult,
    audit_server_view,
    audit_white_box,
    check_audit,
)

AUDIT_JSON, AUDIT_TABLE, AUDIT_PLOT = "audit.json", "audit.md", "audit.png"
KINDS = ("white-box", "server")


def plan_audits(config: FedMoEConfig, models: Sequence[str], epsilons: Sequence[float], *,
                canaries: int, num_clients: int, breakage: str = "none",
                confidence: float = 0.95) -> list[FedMoEConfig]:
    """One validated config per (model, ε), every audit setting checked; nothing runs and
    nothing is written.

    Raises
    ------
    ConfigError
        For an invalid model or ε (the config's own checks), a non-finite ε, an empty
        list, or an audit setting out of range (:func:`~fedmoe.privacy.audit.check_audit`).
    """
    if not models or not epsilons:
        raise ConfigError("--models and --epsilons need at least one value each")
    configs = []
    for eps in epsilons:
        if not math.isfinite(eps):
            raise ConfigError(f"--epsilons: the audit needs finite ε values, got {eps}")
        for model in models:
            configs.append(config.replace(model=model, target_epsilon=float(eps)))
    for c in configs:
        check_audit(c, canaries=canaries, num_clients=num_clients, breakage=breakage,
                    confidence=confidence)
    return configs


def check_out(run_dir: Path) -> None:
    """The run folder must be writable and hold no earlier audit (never overwritten).

    Raises
    ------
    ConfigError
        Naming the folder and what to do.
    """
    from simulations.runner import check_run_dir

    if (run_dir / AUDIT_JSON).exists():
        raise ConfigError(f"--out {run_dir}: holds an earlier audit ({AUDIT_JSON}); fedmoe does "
                          "not overwrite it: choose another folder")
    check_run_dir(run_dir)


def run_audits(configs: Sequence[FedMoEConfig], *, canaries: int, num_clients: int,
               breakage: str = "none", confidence: float = 0.95,
               kinds: Sequence[str] = KINDS, progress=print) -> list[AuditResult]:
    """Run both audits for every config; ``progress`` gets one line per audit."""
    results = []
    for config in configs:
        for kind in kinds:
            if kind == "white-box":
                result = audit_white_box(config, canaries=canaries, num_partitions=num_clients,
                                         breakage=breakage, confidence=confidence)
            else:
                result = audit_server_view(config, canaries=canaries, num_clients=num_clients,
                                           breakage=breakage, confidence=confidence)
            progress(_line(result))
            results.append(result)
    return results


def _line(r: AuditResult) -> str:
    b = r.bound
    return (f"{r.model:6s} {r.kind:9s} ε claimed {r.claimed_epsilon:6.3f} (target "
            f"{r.target_epsilon:g}) · audited ε ≥ {b.epsilon:.3f} at {b.confidence:.0%} "
            f"({b.correct}/{b.guesses} correct; this audit can show at most {b.ceiling:.2f})"
            + ("" if r.breakage == "none" else f" · BROKEN PIPELINE: {r.breakage}"))


def table(results: Sequence[AuditResult]) -> str:
    """A markdown table: one row per audit."""
    head = ("| model | dispatch | clipping | audit | pipeline | target ε | claimed ε "
            "(accountant) | audited ε ≥ | confidence | correct / guesses | ceiling | δ | σ "
            "| q | steps |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        b = r.bound
        rows.append(
            f"| {r.model} | {r.dispatch} | {r.clipping} | {r.kind} | {r.breakage} | "
            f"{r.target_epsilon:g} | {r.claimed_epsilon:.3f} | **{b.epsilon:.3f}** | "
            f"{b.confidence:.0%} | {b.correct} / {b.guesses} | {b.ceiling:.2f} | {r.delta:g} | "
            f"{r.noise_multiplier:.3f} | {r.sample_rate:g} | {r.rounds}×{r.steps} |")
    return "\n".join(rows) + "\n"


def plot(results: Sequence[AuditResult], path: Path) -> None:
    """Claimed ε (accountant) against the audited lower bound: marker = model, colour =
    pipeline (real or which breakage), filled = white-box, hollow = server view. Above the
    diagonal a bound refutes the claim; the dotted line is the most the audit can show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.5, 5))
    markers = dict(zip(sorted({r.model for r in results}), "osD^vP*X"))
    colours = {"none": "tab:blue", "no-noise": "tab:red", "no-clipping": "tab:purple"}
    for r in results:
        colour = colours[r.breakage]
        ax.scatter(r.claimed_epsilon, r.bound.epsilon, marker=markers[r.model], s=55,
                   color=colour if r.kind == "white-box" else "none", edgecolors=colour)
    top = max([r.claimed_epsilon for r in results] + [r.bound.epsilon for r in results]) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=1)
    ceiling = max(r.bound.ceiling for r in results)
    ax.axhline(ceiling, color="grey", lw=0.8, ls=":")
    handles = [Line2D([], [], ls="--", color="k", label="audited = claimed"),
               Line2D([], [], ls=":", color="grey", label=f"most this audit can show "
                                                          f"({ceiling:.2f})")]
    handles += [Line2D([], [], ls="", marker=m, color="grey", label=model)
                for model, m in markers.items()]
    handles += [Line2D([], [], ls="", marker="s", color=colours[b],
                       label="real pipeline" if b == "none" else f"BROKEN: {b}")
                for b in colours if any(r.breakage == b for r in results)]
    handles += [Line2D([], [], ls="", marker="o", color="k", label="white-box"),
                Line2D([], [], ls="", marker="o", color="k", markerfacecolor="none",
                       label="server view")]
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    ax.set_xlabel("claimed ε (accountant)")
    ax.set_ylabel(f"audited ε lower bound ({results[0].bound.confidence:.0%} confidence)")
    ax.set_title(f"One-run audit, {results[0].bound.canaries} canaries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: Sequence[AuditResult], run_dir: Path) -> None:
    """``audit.json``, ``audit.md`` and ``audit.png`` in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / AUDIT_JSON).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    (run_dir / AUDIT_TABLE).write_text(
        "# One-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023)\n\n"
        "With the stated confidence the run is *not* (ε', δ)-DP for any ε' at or below the "
        "audited bound; a bound above the claimed ε refutes the claim.\n\n" + table(results))
    plot(results, run_dir / AUDIT_PLOT)


def command(args, build_config) -> int:
    """``fedmoe audit`` (:mod:`fedmoe.cli` parses ``args``; ``build_config`` is its run-config
    reader): validate everything, run, write. 0 when done, 2 for bad input (nothing run)."""
    import argparse
    import sys

    import torch

    from fedmoe.privacy import PlanError
    from fedmoe.reporting import resolve_run_dir

    settings = {"canaries": args.canaries, "num_clients": args.clients,
                "breakage": args.broken or "none", "confidence": args.confidence}
    try:
        config = build_config(argparse.Namespace(run_config=args.run_config, rounds=None,
                                                 out=args.out))
        models = args.models.split(",") if args.models else [config.model]
        epsilons = ([_number("--epsilons", e) for e in args.epsilons.split(",")]
                    if args.epsilons else [config.target_epsilon])
        configs = plan_audits(config, models, epsilons, **settings)
        run_dir = resolve_run_dir(config)
        check_out(run_dir)
        torch.set_num_threads(1)  # tiny models: one thread is fastest (docs/architecture.md)
        results = run_audits(configs, **settings)
    except (ConfigError, PlanError) as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    write(results, run_dir)
    print(f"audit: {run_dir / AUDIT_TABLE} · {run_dir / AUDIT_PLOT}")
    return 0


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a number") from None


def load(run_dir: Path) -> list[AuditResult]:
    """The audits of an earlier ``fedmoe audit`` (its ``audit.json``)."""
    from fedmoe.privacy.audit import AuditBound

    rows = json.loads((Path(run_dir) / AUDIT_JSON).read_text())
    return [AuditResult(**{**row, "bound": AuditBound(**row["bound"])}) for row in rows]


if __name__ == "__main__":  # python -m simulations.audit OUT.png RUN_DIR [RUN_DIR ...]
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m simulations.audit OUT.png RUN_DIR [RUN_DIR ...]: one plot "
                 "of the audits in several fedmoe audit run folders")
    plot([r for d in sys.argv[2:] for r in load(Path(d))], Path(sys.argv[1]))
