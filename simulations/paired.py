"""Comparisons an experiment's tables leave to the reader, as markdown tables.

``--axis AXIS --base A --variant B``: the change from ``AXIS = A`` to ``AXIS = B`` in mean
(and worst-decile) personalised accuracy, **paired by seed** within every setting of the
other axes (the seed also fixes the split, so pairing removes the split-to-split spread),
mean ± std over seeds, in points, and its mean over all settings::

    python -m simulations.paired runs/select_federation --axis label-prior-shrinkage \\
        --base none --variant federation

and its mean per ε when the grid has that axis; ``--where AXIS=VALUE`` (repeatable) keeps
only the runs with that axis value first (``--where method=fedmoe``).

``--against OTHER``: the same grid run twice, in ``out`` and in the folder OTHER (before and
after a code change: a grid's noise draws follow its run ids, so the two runs of a
setting and seed differ by the change alone), paired as ``--axis`` pairs its values::

    python -m simulations.paired runs/before --against runs/after

``--gaps``: per setting of the other axes (split, ε), the gap of ``fedmoe`` to the best
other method — mean over seeds of fedmoe minus the highest mean of the others — in mean
and worst-decile personalised accuracy, the best method named (the goal of issue 13)::

    python -m simulations.paired runs/full --gaps

with ``--also OTHER`` (repeatable), the other methods of the folder OTHER — a grid with
the same axes, e.g. its baselines run another way — count as more methods, named
``METHOD@FOLDER`` (OTHER's own fedmoe runs are left out)::

    python -m simulations.paired runs/full --gaps --also runs/full_centred
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.report import epsilon_label, mean_std

MEAN, WORST = "personalized_accuracy", "personalized_accuracy_worst_decile"


def _axes(rows: list[dict[str, Any]]) -> list[str]:
    return [c.removeprefix("axis:") for c in rows[0] if c.startswith("axis:")] if rows else []


def _setting(row: dict[str, Any], axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row[f"axis:{a}"]) for a in axes)


def paired_table(rows: list[dict[str, Any]], axis: str, base: str, variant: str) -> str:
    """The markdown table of ``--axis``: one line per setting of the other axes.

    Raises
    ------
    ValueError
        If ``axis`` is not an axis of the grid, or a value has no runs.
    """
    axes = _axes(rows)
    if axis not in axes:
        raise ValueError(f"{axis!r} is not an axis of this grid; its axes: {axes}")
    others = [a for a in axes if a != axis]
    runs: dict[tuple[str, ...], dict[str, dict[int, dict]]] = {}
    for row in rows:
        runs.setdefault(_setting(row, others), {}).setdefault(
            str(row[f"axis:{axis}"]), {})[int(row["seed"])] = row
    lines = [f"| {' | '.join(others)} | {base} | {variant} | Δ (points) | Δ worst decile | seeds |",
             "|---" * (len(others) + 5) + "|"]
    every, by_epsilon = [], {}
    for setting, by_value in runs.items():
        if base not in by_value or variant not in by_value:
            raise ValueError(f"setting {setting}: no runs with {axis} = {base!r} and "
                             f"{variant!r} both (have {sorted(by_value)})")
        a, b = by_value[base], by_value[variant]
        seeds = sorted(set(a) & set(b))
        delta = [100 * (float(b[s][MEAN]) - float(a[s][MEAN])) for s in seeds]
        worst = [100 * (float(b[s][WORST]) - float(a[s][WORST])) for s in seeds]
        every += delta
        if "target-epsilon" in others:
            by_epsilon.setdefault(setting[others.index("target-epsilon")], []).extend(delta)
        (dm, ds), (wm, ws) = mean_std(delta), mean_std(worst)
        cells = [epsilon_label(float(v)) if o == "target-epsilon" else v
                 for o, v in zip(others, setting, strict=True)]
        lines.append(f"| {' | '.join(cells)} | {_mean(a, seeds)} | {_mean(b, seeds)} | "
                     f"{dm:+.1f} ± {ds:.1f} | {wm:+.1f} ± {ws:.1f} | {len(seeds)} |")
    lines.append("")
    lines.append(f"Mean Δ over the {len(runs)} settings: {statistics.fmean(every):+.2f} points "
                 f"(mean personalised accuracy, paired by seed).")
    if len(by_epsilon) > 1:
        lines.append("Mean Δ per ε (its settings' seed pairs): " + ", ".join(
            f"ε = {epsilon_label(float(e))}: {statistics.fmean(d):+.2f}"
            for e, d in by_epsilon.items()) + ".")
    return "\n".join(lines)


def where(rows: list[dict[str, Any]], conditions: Sequence[str]) -> list[dict[str, Any]]:
    """The rows whose axis value label matches every ``AXIS=VALUE`` of ``conditions``.

    Raises
    ------
    ValueError
        For a condition without ``=``, an axis the grid does not have, or one that keeps
        no row (the values there are listed).
    """
    axes = _axes(rows)
    for condition in conditions:
        axis, sep, value = condition.partition("=")
        if not sep:
            raise ValueError(f"--where {condition!r}: write AXIS=VALUE, e.g. method=fedmoe")
        if axis not in axes:
            raise ValueError(f"--where {condition!r}: {axis!r} is not an axis of this grid; "
                             f"its axes: {axes}")
        kept = [r for r in rows if str(r[f"axis:{axis}"]) == value]
        if not kept:
            values = sorted({str(r[f"axis:{axis}"]) for r in rows})
            raise ValueError(f"--where {condition!r}: no run has {axis} = {value!r}; its "
                             f"values: {values}")
        rows = kept
    return rows


def against(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two folders' rows of one grid as one grid with the axis ``code`` = ``before`` or
    ``after`` (for :func:`paired_table`)."""
    return [{**row, "axis:code": label} for label, rows in (("before", before), ("after", after))
            for row in rows]


def also(rows: list[dict[str, Any]], other: list[dict[str, Any]], name: str,
         method: str = "fedmoe") -> list[dict[str, Any]]:
    """``rows`` and the runs of ``other`` that are not ``method``'s, those renamed
    ``METHOD@name`` (for :func:`gaps_table`: more methods to compare against).

    Raises
    ------
    ValueError
        If ``other``'s axes are not ``rows``'.
    """
    if _axes(other) != _axes(rows):
        raise ValueError(f"--also {name}: its axes {_axes(other)} are not this grid's "
                         f"{_axes(rows)}")
    return rows + [{**r, "method": f"{r['method']}@{name}",
                    "axis:method": f"{r['axis:method']}@{name}"}
                   for r in other if r["method"] != method]


def _mean(runs: dict[int, dict], seeds: Sequence[int]) -> str:
    return (f"{statistics.fmean(float(runs[s][MEAN]) for s in seeds):.3f} "
            f"({statistics.fmean(float(runs[s][WORST]) for s in seeds):.3f})")


def gaps_table(rows: list[dict[str, Any]], method: str = "fedmoe") -> str:
    """The gap of ``method`` to the best other method per setting (split, ε).

    Raises
    ------
    ValueError
        If the grid has no ``method`` axis or no runs of ``method``.
    """
    axes = _axes(rows)
    if "method" not in axes:
        raise ValueError(f"the grid has no 'method' axis (its axes: {axes})")
    others = [a for a in axes if a != "method"]
    cells: dict[tuple[str, ...], dict[str, list[dict]]] = {}
    for row in rows:
        cells.setdefault(_setting(row, others), {}).setdefault(row["method"], []).append(row)
    lines = [f"| {' | '.join(others)} | {method} | best other | gap (points) | "
             "gap worst decile |", "|---" * (len(others) + 4) + "|"]
    for setting, by_method in cells.items():
        if method not in by_method:
            raise ValueError(f"setting {setting}: no {method} runs")
        ours = _means(by_method[method])
        rest = {m: _means(r) for m, r in by_method.items() if m != method}
        best = max(rest, key=lambda m: rest[m][0])
        best_worst = max(v[1] for v in rest.values())
        shown = [epsilon_label(float(v)) if o == "target-epsilon" else v
                 for o, v in zip(others, setting, strict=True)]
        lines.append(f"| {' | '.join(shown)} | {ours[0]:.3f} ({ours[1]:.3f}) | {best} "
                     f"{rest[best][0]:.3f} | {100 * (ours[0] - rest[best][0]):+.1f} | "
                     f"{100 * (ours[1] - best_worst):+.1f} |")
    return "\n".join(lines)


def _means(runs: list[dict]) -> tuple[float, float]:
    return (statistics.fmean(float(r[MEAN]) for r in runs),
            statistics.fmean(float(r[WORST]) for r in runs))


def main(argv: list[str] | None = None) -> int:
    from simulations.experiment import CSV, read_csv

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="an experiment folder (with results.csv)")
    parser.add_argument("--axis", help="the axis whose two values are compared")
    parser.add_argument("--base", help="the value compared against")
    parser.add_argument("--variant", help="the value compared")
    parser.add_argument("--against", type=Path, metavar="OTHER",
                        help="another folder of the same grid (after a code change)")
    parser.add_argument("--gaps", action="store_true",
                        help="fedmoe against the best other method per setting")
    parser.add_argument("--also", action="append", default=[], type=Path, metavar="OTHER",
                        help="with --gaps: the other methods of this folder too "
                             "(repeatable), named METHOD@FOLDER")
    parser.add_argument("--where", action="append", default=[], metavar="AXIS=VALUE",
                        help="only the runs with this axis value (repeatable), e.g. "
                             "method=fedmoe")
    args = parser.parse_args(argv)
    if not (args.out / CSV).is_file():
        print(f"error: {args.out / CSV} does not exist (run fedmoe experiment first)",
              file=sys.stderr)
        return 2
    rows = read_csv(args.out / CSV)
    if args.against is not None:
        if not (args.against / CSV).is_file():
            print(f"error: {args.against / CSV} does not exist", file=sys.stderr)
            return 2
        rows = against(rows, read_csv(args.against / CSV))
    if args.also and not args.gaps:
        parser.error("--also goes with --gaps")
    for other in args.also:
        if not (other / CSV).is_file():
            print(f"error: {other / CSV} does not exist", file=sys.stderr)
            return 2
    try:
        for other in args.also:
            rows = also(rows, read_csv(other / CSV), other.name)
        rows = where(rows, args.where)
        if args.against is not None:
            print(f"before: {args.out}, after: {args.against}\n")
            print(paired_table(rows, "code", "before", "after"))
        elif args.gaps:
            print(gaps_table(rows))
        elif args.axis and args.base and args.variant:
            print(paired_table(rows, args.axis, args.base, args.variant))
        else:
            parser.error("give --gaps, or --axis with --base and --variant")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
