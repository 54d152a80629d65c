"""Benchmark: ``fedmoe export`` compressions against the uncompressed personalised model.

For every client of every finished run folder under ``RUNS`` (e.g. ``runs/export/runs``
from ``fedmoe experiment simulations/grids/export.toml --out runs/export``), export its
personalised model as int8, magnitude-pruned (50 %), and a distilled dense student of
each ``--student`` width; print per compression the mean over clients of

- the tensor bytes (``Measurement.param_bytes``: every byte needed to rebuild the
  tensors) against the float32 model's, their ratio (and the worst client's), and the
  non-zero share,
- the latency speed-up per example (one example at a time, one thread),
- the accuracy on the client's own test split and its change from the uncompressed model
  (points, mean ± std over clients), and the prediction agreement.

``--by KEY ...`` prints one table per value of those run-config keys (e.g. ``--by model``
for ``simulations/grids/export_models.toml``); ``--variants`` keeps only some exports.

Usage::

    python -m simulations.bench_export runs/export/runs [--student 16 32]
    python -m simulations.bench_export runs/export_models/runs --variants int8 \\
        --by model expert-noise-limit
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedmoe.export import GLOBAL_MODEL, LOCAL_FILE, export_client


def _clients(run: Path) -> list[str]:
    return sorted({p.parent.name for p in (run / "clients").rglob(LOCAL_FILE)},
                  key=lambda c: int(c.rsplit("-", 1)[1]))


def _groups(runs: list[Path], keys: list[str]) -> dict[str, list[Path]]:
    """Run folders by the values of ``keys`` in their run config (one group without keys)."""
    groups: dict[str, list[Path]] = {}
    for run in runs:
        config = json.loads((run / "results.json").read_text())["config"]
        missing = [k for k in keys if k not in config]
        if missing:
            raise SystemExit(f"bench_export: --by {', '.join(missing)}: not a run-config key of "
                             f"{run}")
        label = ", ".join(f"{k}={config[k]}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


def _table(runs: list[Path], variants: dict[str, dict], tmp: Path) -> None:
    rows: dict[str, list[tuple]] = {name: [] for name in variants}
    base_acc = []
    for run in runs:
        for client in _clients(run):
            for name, options in variants.items():
                base, ours = export_client(run, client, tmp / "m.pt", **options)
                rows[name].append((base.param_bytes / ours.param_bytes,
                                   ours.nonzero / ours.parameters,
                                   base.latency_us / ours.latency_us,
                                   ours.accuracy, 100 * (ours.accuracy - base.accuracy),
                                   ours.agreement, base.latency_us,
                                   ours.param_bytes, base.param_bytes))
            base_acc.append(base.accuracy)
    print(f"{len(runs)} run(s), {len(base_acc)} clients; uncompressed personalised accuracy "
          f"{statistics.mean(base_acc):.3f}")
    print("| export | tensor bytes | float32 ÷ it (worst client) | non-zero | "
          "speed-up per example | accuracy | Δ accuracy (points) | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name, values in rows.items():
        cols = list(zip(*values, strict=True))
        m = [statistics.mean(c) for c in cols]
        sd = statistics.stdev(cols[4]) if len(values) > 1 else 0.0
        print(f"| {name} | {m[7]:,.0f} of {m[8]:,.0f} | {m[0]:.2f}× ({min(cols[0]):.2f}×) | "
              f"{m[1]:.0%} | {m[2]:.1f}× | {m[3]:.3f} | {m[4]:+.1f} ± {sd:.1f} | {m[5]:.1%} |")
    first = next(iter(rows.values()))
    print(f"(uncompressed latency: median {statistics.median(v[6] for v in first):.0f} "
          "µs per example)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="folder of run folders (or one run folder)")
    parser.add_argument("--student", type=int, nargs="+", default=[16, 32],
                        help="student hidden widths (default: 16 32)")
    parser.add_argument("--prune", type=float, default=0.5)
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="only these exports (names as in the table, e.g. int8)")
    parser.add_argument("--by", nargs="+", default=[], metavar="KEY",
                        help="one table per value of these run-config keys (e.g. model)")
    args = parser.parse_args(argv)
    runs = sorted(p.parent for p in args.runs.rglob(GLOBAL_MODEL))
    if not runs:
        parser.error(f"no finished run folder (with {GLOBAL_MODEL}) under {args.runs}")
    variants = {"int8": {"int8": True}, f"pruned-{args.prune:g}": {"prune": args.prune},
                **{f"student-{h}": {"distill_hidden": h} for h in args.student},
                **{f"student-{h}+int8": {"distill_hidden": h, "int8": True}
                   for h in args.student[:1]}}
    if args.variants:
        unknown = sorted(set(args.variants) - variants.keys())
        if unknown:
            parser.error(f"unknown --variants {', '.join(unknown)}; choose from "
                         f"{', '.join(variants)}")
        variants = {name: variants[name] for name in args.variants}
    groups = _groups(runs, args.by)
    with tempfile.TemporaryDirectory() as tmp:
        for label, members in groups.items():
            if len(groups) > 1:
                print(f"\n{label}")
            _table(members, variants, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
