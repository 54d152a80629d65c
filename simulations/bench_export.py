"""Benchmark: ``fedmoe export`` compressions against the uncompressed personalised model.

For every client of every finished run folder under ``RUNS`` (e.g. ``runs/export/runs``
from ``fedmoe experiment simulations/grids/export.toml --out runs/export``), export its
personalised model as int8, magnitude-pruned (50 %), and a distilled dense student of
each ``--student`` width; print per compression the mean over clients of

- the tensor bytes ratio (float32 / compressed) and the non-zero share,
- the latency speed-up per example (one example at a time, one thread),
- the accuracy on the client's own test split and its change from the uncompressed model
  (points, mean ± std over clients), and the prediction agreement.

Usage::

    python -m simulations.bench_export runs/export/runs [--student 16 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fedmoe.export import GLOBAL_MODEL, LOCAL_FILE, export_client


def _clients(run: Path) -> list[str]:
    return sorted({p.parent.name for p in (run / "clients").rglob(LOCAL_FILE)},
                  key=lambda c: int(c.rsplit("-", 1)[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="folder of run folders (or one run folder)")
    parser.add_argument("--student", type=int, nargs="+", default=[16, 32],
                        help="student hidden widths (default: 16 32)")
    parser.add_argument("--prune", type=float, default=0.5)
    args = parser.parse_args(argv)
    runs = sorted(p.parent for p in args.runs.rglob(GLOBAL_MODEL))
    variants = {"int8": {"int8": True}, f"pruned-{args.prune:g}": {"prune": args.prune},
                **{f"student-{h}": {"distill_hidden": h} for h in args.student},
                **{f"student-{h}+int8": {"distill_hidden": h, "int8": True}
                   for h in args.student[:1]}}
    rows: dict[str, list[tuple]] = {name: [] for name in variants}
    base_acc = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            for client in _clients(run):
                for name, options in variants.items():
                    base, ours = export_client(run, client, Path(tmp) / "m.pt", **options)
                    rows[name].append((base.param_bytes / ours.param_bytes,
                                       ours.nonzero / ours.parameters,
                                       base.latency_us / ours.latency_us,
                                       ours.accuracy, 100 * (ours.accuracy - base.accuracy),
                                       ours.agreement, base.latency_us))
                base_acc.append(base.accuracy)
    print(f"{len(runs)} run(s), {len(base_acc)} clients; uncompressed personalised accuracy "
          f"{statistics.mean(base_acc):.3f}")
    print("| export | tensor bytes ÷ | non-zero | speed-up per example | accuracy | "
          "Δ accuracy (points) | agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, values in rows.items():
        cols = list(zip(*values, strict=True))
        m = [statistics.mean(c) for c in cols]
        sd = statistics.stdev(cols[4]) if len(values) > 1 else 0.0
        print(f"| {name} | {m[0]:.2f}× | {m[1]:.0%} | {m[2]:.1f}× | {m[3]:.3f} | "
              f"{m[4]:+.1f} ± {sd:.1f} | {m[5]:.1%} |")
    print(f"(uncompressed latency: median {statistics.median(v[6] for v in rows['int8']):.0f} "
          "µs per example)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
