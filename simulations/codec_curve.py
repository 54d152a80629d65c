"""Accuracy against upload bytes for an update-codec grid (``simulations/grids/codecs.toml``).

Reads ``DIR/results.csv`` of ``fedmoe experiment simulations/grids/codecs.toml --out DIR``,
prints a markdown table per ``variant`` (mean ± std over seeds of the mean personalised
accuracy, its change from ``none`` paired by seed, bytes uploaded and downloaded per client
per round and the reduction against ``none``) and draws the accuracy-vs-bytes curve::

    python -m simulations.codec_curve runs/codecs --plot docs/results/codecs_accuracy_vs_bytes.png
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def table(rows: list[dict[str, str]]) -> tuple[list[str], list[tuple[str, float, float, float]]]:
    """Markdown lines and (variant, mean upload bytes, mean accuracy, std) points."""
    by: dict[str, dict[int, dict[str, str]]] = {}
    for row in rows:
        by.setdefault(row["axis:variant"], {})[int(row["seed"])] = row
    base = by["none"]
    base_up = statistics.mean(float(r["upload_bytes_per_client_round"]) for r in base.values())
    lines = ["| upload / download codec | mean personalised accuracy | Δ vs none (points, "
             "paired by seed) | upload B / client / round | ÷ | download B / client / round |",
             "|---|---|---|---|---|---|"]
    points = []
    for name, runs in by.items():
        acc = [float(r["personalized_accuracy"]) for r in runs.values()]
        delta = [100 * (float(runs[s]["personalized_accuracy"])
                        - float(base[s]["personalized_accuracy"])) for s in runs if s in base]
        up = statistics.mean(float(r["upload_bytes_per_client_round"]) for r in runs.values())
        down = statistics.mean(float(r["download_bytes_per_client_round"])
                               for r in runs.values())
        first = next(iter(runs.values()))
        codec = f"{first['upload-codec']} / {first['download-codec']}" + (
            f" (f = {float(first['codec-topk-fraction']):g})"
            if "topk" in (first["upload-codec"], first["download-codec"]) else "")
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        dsd = statistics.stdev(delta) if len(delta) > 1 else 0.0
        lines.append(f"| {codec} | {statistics.mean(acc):.3f} ± {sd:.3f} | "
                     f"{statistics.mean(delta):+.1f} ± {dsd:.1f} | {up:,.0f} | "
                     f"{base_up / up:.1f}× | {down:,.0f} |")
        points.append((name, up, statistics.mean(acc), sd))
    return lines, points


def plot(points: list[tuple[str, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, up, acc, sd in points:
        ax.errorbar([up], [acc], yerr=[sd], fmt="o", capsize=3)
        ax.annotate(name, (up, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("bytes uploaded per client per round (serialised)")
    ax.set_ylabel("mean personalised accuracy (± std, 3 seeds)")
    ax.set_title("Update codecs, lmoe on digits, ε = 8")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="the experiment's --out folder")
    parser.add_argument("--plot", type=Path, default=None, help="write the curve here (PNG)")
    args = parser.parse_args(argv)
    with open(args.dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines, points = table(rows)
    print("\n".join(lines))
    if args.plot:
        plot(points, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
