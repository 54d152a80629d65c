"""Tables and plots of an experiment grid (:mod:`simulations.experiment`).

Rows are grouped by *setting* (the values of every grid axis other than ``method`` and
``target-epsilon``; seeds are averaged), then shown per method (rows) and ε (columns) as
mean ± std over seeds. ε=∞ is a non-private run and is labelled so everywhere.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmoe.config import METHODS
from fedmoe.reporting import legend

#: (column, title, format) of the report's tables, one table per setting each.
TABLES = (
    ("personalized_accuracy", "Mean personalised accuracy", "{:.3f}"),
    ("personalized_accuracy_worst_decile", "Worst-decile personalised accuracy "
     "(mean of the worst ⌈10 %⌉ of clients)", "{:.3f}"),
    ("global_accuracy", "Global-only accuracy (without local tensors; – where the method "
     "has no global model)", "{:.3f}"),
    ("upload_bytes_per_client_round", "Bytes uploaded per client per round (serialised "
     "update)", "{:,.0f}"),
    ("download_bytes_per_client_round", "Bytes downloaded per client per round (serialised "
     "global tensors, train and evaluate messages)", "{:,.0f}"),
    ("wall_seconds", "Wall time per run (s)", "{:.1f}"),
)
NON_PRIVATE = "∞ (non-private)"
ACCURACY_PLOT, ROUNDS_PLOT, SPREAD_PLOT = ("accuracy_vs_epsilon.png", "accuracy_per_round.png",
                                           "client_spread.png")
#: Settings drawn per plot (more would be unreadable; the tables have them all).
MAX_PLOTTED_SETTINGS = 6


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def epsilon_label(eps: float) -> str:
    return NON_PRIVATE if math.isinf(eps) else f"{eps:g}"


#: A grid axis of bundles with this name labels the table rows instead of ``method`` (e.g.
#: two settings of one method side by side: ``variant = [{name = "fedavg-linear", ...}]``).
ROW_AXIS = "variant"


def _setting(row: dict[str, Any], axes: Sequence[str]) -> str:
    parts = [f"{a}={row[f'axis:{a}']}" for a in axes
             if a not in ("method", "target-epsilon", ROW_AXIS) and f"axis:{a}" in row]
    return ", ".join(parts) or "all runs"


def _label(row: dict[str, Any]) -> str:
    """A row's label in the tables: its ``variant`` bundle's name, else its method."""
    return row.get(f"axis:{ROW_AXIS}") or row["method"]


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    """Row labels in order: the registry's methods first, then variants as they appear."""
    present = list(dict.fromkeys(_label(r) for r in rows))
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def _epsilons(rows: list[dict[str, Any]]) -> list[float]:
    """ε values, ∞ (non-private) first, then descending."""
    return sorted({float(r["target-epsilon"]) for r in rows}, key=lambda e: -e)


def _by_setting(rows: list[dict[str, Any]], axes: Sequence[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_setting(row, axes), []).append(row)
    return groups


def _cell(rows: list[dict[str, Any]], method: str, eps: float) -> list[dict[str, Any]]:
    return [r for r in rows if _label(r) == method and float(r["target-epsilon"]) == eps]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report_markdown(rows: list[dict[str, Any]], axes: Sequence[str]) -> str:
    """``report.md``: per setting, one table per metric of :data:`TABLES`."""
    lines = ["# Experiment report", "",
             f"{len(rows)} runs. Each entry: mean ± std over seeds (n = seeds). ε is each "
             "client's budget; ε = ∞ is a **non-private** run (plain SGD: no clipping, no "
             f"noise, no ledger). Accuracies are on {scored_on(rows)}.", ""]
    for setting, group in _by_setting(rows, axes).items():
        lines += [f"## {setting}", ""]
        methods, epsilons = _methods(group), _epsilons(group)
        for column, title, fmt in TABLES:
            lines += [f"**{title}**", "",
                      "| method | " + " | ".join(f"ε={epsilon_label(e)}" for e in epsilons)
                      + " |", "|---" * (len(epsilons) + 1) + "|"]
            for method in methods:
                cells = []
                for eps in epsilons:
                    values = [v for r in _cell(group, method, eps)
                              if (v := _float(r.get(column))) is not None]
                    if not values:
                        cells.append("–")
                        continue
                    mean, std = mean_std(values)
                    cells.append(f"{fmt.format(mean)} ± {fmt.format(std)} (n={len(values)})")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_all(rows: list[dict[str, Any]], axes: Sequence[str], out: Path) -> None:
    """Accuracy vs ε per method, accuracy per round, per-client spread (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(_by_setting(rows, axes).items())[:MAX_PLOTTED_SETTINGS]
    epsilons = _epsilons(rows)
    methods = _methods(rows)

    # accuracy vs ε: one panel per setting, one line per method, ε on a categorical axis
    fig, panels = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (setting, group) in zip(panels[0], groups, strict=False):
        for method in methods:
            xs, means, stds = [], [], []
            for i, eps in enumerate(epsilons):
                values = [v for r in _cell(group, method, eps)
                          if (v := _float(r["personalized_accuracy"])) is not None]
                if values:
                    mean, std = mean_std(values)
                    xs.append(i), means.append(mean), stds.append(std)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.set_xticks(range(len(epsilons)), [epsilon_label(e) for e in epsilons], fontsize=8)
        ax.set(xlabel="ε per client", ylabel="mean personalised accuracy", ylim=(0, 1),
               title=setting)
        legend(ax, fontsize="small")
    _save(fig, out / ACCURACY_PLOT)

    # accuracy per round: rows = settings, columns = ε; a line per method (seed mean)
    fig, panels = plt.subplots(len(groups), len(epsilons), squeeze=False,
                               figsize=(3.6 * len(epsilons), 3.0 * len(groups)))
    for row_axes, (setting, group) in zip(panels, groups, strict=False):
        for ax, eps in zip(row_axes, epsilons, strict=True):
            for method in methods:
                curves = [[v for v in json.loads(r["round_accuracy"]) if v is not None]
                          for r in _cell(group, method, eps)]
                curves = [c for c in curves if c]
                if curves:
                    length = min(len(c) for c in curves)
                    ax.plot(range(1, length + 1),
                            [statistics.fmean(c[i] for c in curves) for i in range(length)],
                            marker=".", label=method)
            ax.set(title=f"{setting}\nε={epsilon_label(eps)}", xlabel="round", ylim=(0, 1))
            ax.title.set_fontsize(8)
        row_axes[0].set_ylabel("mean personalised acc.")
        legend(row_axes[0], fontsize="x-small")
    _save(fig, out / ROUNDS_PLOT)

    # per-client spread: final per-client accuracies pooled over seeds, a box per method
    fig, panels = plt.subplots(len(groups), len(epsilons), squeeze=False,
                               figsize=(3.6 * len(epsilons), 3.0 * len(groups)))
    for row_axes, (setting, group) in zip(panels, groups, strict=False):
        for ax, eps in zip(row_axes, epsilons, strict=True):
            data = [[v for r in _cell(group, method, eps) for v in json.loads(r["client_accuracy"])]
                    for method in methods]
            ax.boxplot([d or [math.nan] for d in data], tick_labels=methods)
            ax.set(title=f"{setting}\nε={epsilon_label(eps)}", ylim=(0, 1))
            ax.title.set_fontsize(8)
            ax.tick_params(axis="x", labelsize=7)
        row_axes[0].set_ylabel("per-client accuracy")
    _save(fig, out / SPREAD_PLOT)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


README_BEGIN, README_END = "<!-- experiment-results:begin -->", "<!-- experiment-results:end -->"
#: Where ``--results-md`` puts the report in a page that has these markers (the rest of the
#: page, e.g. how the settings were chosen, is kept).
REPORT_BEGIN, REPORT_END = "<!-- grid-report:begin -->", "<!-- grid-report:end -->"


def summary_table(rows: list[dict[str, Any]], axes: Sequence[str], setting: str | None = None,
                  ) -> str:
    """The mean personalised accuracy table (method × ε) of one setting (default: the
    first), for the README."""
    groups = _by_setting(rows, axes)
    setting = setting or next(iter(groups))
    if setting not in groups:
        raise ValueError(f"no setting {setting!r}; the grid has {list(groups)}")
    report = report_markdown(groups[setting], axes)
    title = f"**{TABLES[0][1]}**"
    table = report.split(title, 1)[1].split("\n\n", 2)[1]
    return (f"{setting}: {TABLES[0][1].lower()} on {scored_on(groups[setting])}, mean ± std "
            f"over seeds.\n\n{table}\n")


def scored_on(rows: list[dict[str, Any]]) -> str:
    """Which split the rows' accuracies were measured on (their ``evaluate-on``)."""
    kinds = {r.get("evaluate-on") or "test" for r in rows}
    if kinds == {"validation"}:
        return ("each client's validation split (held out of its training split; the test "
                "split untouched)")
    if kinds == {"test"}:
        return "each client's own test split"
    return "each client's test or validation split (see the evaluate-on column)"


def splice(path: Path, text: str, begin: str = README_BEGIN, end: str = README_END) -> None:
    """Replace what is between the markers ``begin`` and ``end`` in ``path`` with ``text``.

    Raises
    ------
    ValueError
        If the markers are missing.
    """
    content = path.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{path} has no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    """Rebuild an experiment's report and plots from its ``results.csv``; optionally copy
    the report to a results page and its summary table into the README."""
    import argparse

    from simulations.experiment import CSV, REPORT, read_csv

    parser = argparse.ArgumentParser(description=main.__doc__.split(";")[0])
    parser.add_argument("out", type=Path, help="an experiment folder (with results.csv)")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="also write the report here (e.g. docs/results.md); a page "
                             f"with {REPORT_BEGIN} ... {REPORT_END} markers keeps the rest")
    parser.add_argument("--command", default="",
                        help="the command that produced the grid, quoted in --results-md")
    parser.add_argument("--readme", type=Path, default=None,
                        help="splice the summary table between the README's markers")
    parser.add_argument("--setting", default=None,
                        help="the setting the README table shows (default: the first)")
    args = parser.parse_args(argv)
    rows = read_csv(args.out / CSV)
    axes = [c.removeprefix("axis:") for c in rows[0] if c.startswith("axis:")] if rows else []
    text = report_markdown(rows, axes)
    (args.out / REPORT).write_text(text)
    plot_all(rows, axes, args.out)
    if args.results_md:
        command = f"Produced by `{args.command}`.\n\n" if args.command else ""
        page = text.replace("\n", f"\n\n{command}", 1) if command else text
        if args.results_md.is_file() and REPORT_BEGIN in args.results_md.read_text():
            body = page.split("\n", 1)[1].replace("\n## ", "\n### ")  # under the page's heading
            splice(args.results_md, body, REPORT_BEGIN, REPORT_END)
        else:
            args.results_md.write_text(page)
    if args.readme:
        splice(args.readme, summary_table(rows, axes, args.setting)
               + (f"\nFrom `{args.command}` ([docs/results.md](docs/results.md)).\n"
                  if args.command else ""))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
