"""``fedmoe`` command line.

- ``fedmoe simulate [--clients K] [--rounds R] [--out DIR] [--run-config "key=value ..."]``
  runs a federation in Flower's simulation engine;
- ``fedmoe budget DIR [--json]`` prints the privacy ledger of a run folder (the server's,
  every client) or of a client's state directory (its own);
- ``fedmoe clean`` removes what a killed ``fedmoe simulate`` left behind (its Ray
  processes, its clients' state in the temp dir), found by its recorded ids only.

- ``fedmoe export RUN_DIR --client ID --out FILE [--int8] [--prune F] [--distill H]`` writes
  a client's personalised model for inference, optionally compressed
  (:mod:`fedmoe.export`), and prints its size, latency and accuracy against the
  uncompressed model.

Exit codes: 0 done, 2 bad input (reported before anything starts), 130 Ctrl-C.
- ``fedmoe experiment GRID.toml --out DIR [--jobs N]`` runs a grid of federations
  (methods × ε × partitioners × seeds × any key; :mod:`simulations.experiment`), resumably,
  into ``DIR/results.csv``, ``DIR/report.md`` and plots.

Every run-config key of :class:`fedmoe.config.FedMoEConfig` can be set with
``--run-config``, in Flower's own syntax; the config is validated before anything starts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

from fedmoe.config import ConfigError, FedMoEConfig
from fedmoe.privacy import LEDGER_FILE, LedgerBook, LedgerError


#: Flower's own pattern for one ``key=value`` token of ``--run-config``
#: (``flwr.common.config.parse_config_args``); text it does not match, Flower drops.
_TOKEN = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_overrides(items: list[str] | None) -> dict:
    """Flower's ``--run-config`` syntax (``'k1=v1 k2="text"'`` or a TOML file), flattened.

    Every token must be a ``key=value`` pair Flower reads: Flower's parser silently drops
    the rest (``target-epsilon=``, a stray word), which would run with defaults.

    Raises
    ------
    ConfigError
        Naming the token that is not a ``key=value`` pair, or why the text does not parse.
    """
    from flwr.common.config import parse_config_args

    seen: dict[str, str] = {}
    for item in items or []:
        if item.endswith(".toml"):
            if not Path(item).expanduser().is_file():
                raise ConfigError(f"--run-config {item!r}: no such TOML file")
            continue
        leftover = _TOKEN.sub(" ", item).split()
        if leftover:
            raise ConfigError(
                f"--run-config {item!r}: cannot read {' '.join(map(repr, leftover))}; every "
                "token must be key=value with a value (e.g. \"target-epsilon=3.0 "
                "model='hmoe'\"; quote strings, no spaces around '=')"
            )
        for match in _TOKEN.finditer(item):
            key, value = match.groups()
            _check_token(item, key, value)
            if key in seen:
                raise ConfigError(f"--run-config: {key} is given twice ({key}={seen[key]} and "
                                  f"{key}={value}); give it once")
            seen[key] = value
    try:
        return parse_config_args(items)
    except Exception as err:  # click.ClickException or a TOML error: say what to fix
        message = getattr(err, "message", None) or str(err)
        raise ConfigError(f"cannot parse --run-config {items!r}: {message}") from err


def _check_token(item: str, key: str, value: str) -> None:
    """One ``key=value`` token must be a TOML value Flower accepts (bool, int, float, string)."""
    try:
        tomllib.loads(f"{key} = {value}")
    except tomllib.TOMLDecodeError:
        hint = (f" (strings need quotes: {key}='{value}')"
                if value.replace("-", "").replace("_", "").isalnum() else "")
        raise ConfigError(
            f"--run-config {item!r}: cannot read {key}={value}{hint}; a value is a bool, int, "
            "float or quoted string"
        ) from None


def build_config(args: argparse.Namespace) -> FedMoEConfig:
    """The run config from ``--run-config`` and the shortcut flags.

    ``--rounds R`` is ``num-server-rounds=R`` and ``--out DIR`` is ``run-dir='DIR'``; giving
    both forms with different values is refused (neither silently wins).
    """
    overrides = parse_overrides(args.run_config)
    for flag, key, value in (("--rounds", "num-server-rounds", args.rounds),
                             ("--out", "run-dir", args.out)):
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            raise ConfigError(
                f"{flag} {value} and {key}={overrides[key]!r} in --run-config disagree; "
                f"give one of them"
            )
        overrides[key] = value
    return FedMoEConfig.from_run_config(overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate a federation on this machine")
    sim.add_argument("--clients", type=int, default=10, help="virtual clients (default: 10)")
    sim.add_argument("--rounds", type=int, default=None, help="= num-server-rounds")
    sim.add_argument("--out", default=None, help="run folder (= run-dir); default runs/<time>")
    sim.add_argument("--run-config", action="append", default=None, metavar="'K=V ...'",
                     help="override run-config keys (Flower syntax); repeatable")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    bud = sub.add_parser("budget", help="print the privacy spend recorded in a ledger")
    bud.add_argument("dir", type=Path, help="a run folder, or a client's state-dir")
    bud.add_argument("--json", action="store_true",
                     help="machine-readable: per client its δ, accountant and DP history")
    sub.add_parser("clean", help="end processes and move client state left by a killed "
                   "fedmoe simulate (found by its recorded ids only)")
    exp = sub.add_parser("experiment", help="run a grid of federations (resumable) and "
                                            "write results.csv, report.md and plots")
    exp.add_argument("grid", type=Path, help="grid file (TOML), e.g. simulations/grids/smoke.toml")
    exp.add_argument("--out", type=Path, required=True,
                     help="results folder; re-running with the same folder skips finished runs")
    exp.add_argument("--jobs", type=int, default=None,
                     help="worker processes (default: the grid's [experiment] jobs, else 1)")
    ex = sub.add_parser("export", help="write a client's personalised model for inference, "
                                       "optionally compressed, with its size/latency/accuracy")
    ex.add_argument("run_dir", type=Path, help="a finished run folder")
    ex.add_argument("--client", required=True, help="client id, e.g. partition-0")
    ex.add_argument("--out", type=Path, required=True, help="the export file to write")
    ex.add_argument("--int8", action="store_true",
                    help="int8 post-training dynamic quantisation of every Linear layer")
    ex.add_argument("--prune", type=float, default=0.0, metavar="F",
                    help="magnitude-prune this share of the Linear weights, in [0, 1)")
    ex.add_argument("--distill", type=int, default=0, metavar="H",
                    help="distil into a dense student with H hidden units, trained on the "
                         "client's own data WITHOUT DP: the file must stay with the client")
    ex.add_argument("--num-partitions", type=int, default=None,
                    help="clients in the run (default: client folders in the run folder)")
    ex.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)

    if args.command == "export":
        return export(args)
    if args.command == "experiment":
        return experiment(args.grid, args.out, jobs=args.jobs)
    if args.command == "budget":
        return budget(args.dir, as_json=args.json)
    if args.command == "clean":
        return clean()
    return simulate(args)


def simulate(args: argparse.Namespace) -> int:
    """``fedmoe simulate``: 0 when done, 2 for bad input (nothing started), 130 on Ctrl-C."""
    from simulations.runner import SimulationInterrupted, run

    try:
        config = build_config(args)
        run(config, args.clients, verbose=args.verbose)
    except (ConfigError, LedgerError) as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    except SimulationInterrupted as err:
        rounds = len(err.results["rounds"])
        print(f"fedmoe: interrupted; report of the {rounds} finished round(s): "
              f"{err.results_path}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fedmoe: interrupted", file=sys.stderr)
        return 130
    return 0


def clean() -> int:
    """``fedmoe clean``: remove what killed ``fedmoe simulate`` runs left behind."""
    from simulations.leftovers import clean_leftovers

    lines = clean_leftovers()
    for line in lines:
        print(line)
    if not lines:
        print("nothing left behind by killed runs")
    return 0


def experiment(grid_file: Path, out: Path, *, jobs: int | None = None) -> int:
    """Validate the whole grid, then run what is not finished yet in ``out``."""
    from simulations.experiment import GridRunError, load_grid, run_grid

    try:
        if jobs is not None and jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
        grid = load_grid(grid_file)
    except ConfigError as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    try:
        run_grid(grid, out, jobs=jobs)
    except GridRunError as err:
        print(f"fedmoe: error: {err}\nresults of the other runs: {out / 'results.csv'}",
              file=sys.stderr)
        return 1
    print(f"results: {out / 'results.csv'} · report: {out / 'report.md'}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``fedmoe export``: 0 done, 2 for a run folder, client or option that cannot work."""
    from dataclasses import asdict

    from fedmoe.export import ExportError, export_client

    try:
        results = export_client(args.run_dir, args.client, args.out,
                                num_partitions=args.num_partitions, int8=args.int8,
                                prune=args.prune, distill_hidden=args.distill)
    except ExportError as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(m) for m in results], indent=2))
        return 0
    base = results[0]
    print(f"{args.out}: {results[-1].name} model of {args.client}")
    for m in results:
        print(f"  {m.name:<24} {m.param_bytes:>9,} B of tensors ({base.param_bytes / m.param_bytes:.2f}× "
              f"smaller), {m.nonzero:,}/{m.parameters:,} non-zero, {m.latency_us:8.1f} µs/example "
              f"(speed-up {base.latency_us / m.latency_us:.2f}×), accuracy {m.accuracy:.3f} "
              f"(agrees with the uncompressed model on {m.agreement:.1%})")
    if args.distill:
        print("  note: the student was trained on this client's data without DP; the file is "
              "not covered by the privacy guarantee and must stay with the client")
    return 0


def budget(folder: Path, *, as_json: bool = False) -> int:
    """Print the ledger in ``folder``: a table, or JSON from which anyone can recompute ε."""
    from fedmoe.reporting import privacy_rows

    path = folder / LEDGER_FILE
    if not path.is_file():
        print(f"fedmoe: error: no {LEDGER_FILE} in {folder}; pass a run folder (e.g. "
              "runs/<time>) or a client's state-dir", file=sys.stderr)
        return 2
    try:
        with LedgerBook(path, read_only=True) as book:  # reading never writes
            if as_json:
                ledgers = [book.get(c).to_dict(c) for c in book.clients()]
                print(json.dumps(ledgers, indent=2))
                return 0
            rows = privacy_rows(book)
    except LedgerError as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Privacy ledger {path}")
    for col in ("client", "rounds", "ε spent", "ε left", "budget", "δ", "accountant", "σ", "q",
                "steps"):
        table.add_column(col, justify="right")
    for r in rows:
        last = r["noise_multiplier"] is not None
        table.add_row(
            r["client"], str(r["rounds"] + r["prior_rounds"]), f"{r['epsilon']:.3f}",
            f"{r['epsilon_left']:.3f}", f"{r['budget']:g}", f"{r['delta']:g}", r["accountant"],
            f"{r['noise_multiplier']:.4f}" if last else "-",
            f"{r['sample_rate']:g}" if last else "-", str(r["steps"]) if last else "-",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
