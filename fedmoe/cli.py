"""``fedmoe`` command line.

- ``fedmoe simulate [--clients K] [--rounds R] [--out DIR] [--run-config "key=value ..."]``
  runs a federation in Flower's simulation engine; ``fedmoe simulate --resume DIR``
  continues the unfinished run in DIR from its checkpoint, with its config;
- ``fedmoe budget DIR [--json]`` prints the privacy ledger of a run folder (the server's,
  every client) or of a client's state directory (its own);
- ``fedmoe clean`` removes what a killed ``fedmoe simulate`` left behind (its Ray
  processes, its clients' state in the temp dir), found by its recorded ids only.

- ``fedmoe deploy init DIR`` writes a deployment's key material; ``fedmoe deploy check
  --node-config "..." [--run-config "..."]`` checks a SuperNode's node config, data and
  state dir against a run and prints the plan the server would make for it
  (:mod:`clients.check`; nothing is sent).
- ``fedmoe export RUN_DIR --client ID --out FILE [--int8] [--prune F] [--distill H]`` writes
  a client's personalised model for inference, optionally compressed
  (:mod:`fedmoe.export`), and prints its size, latency and accuracy against the
  uncompressed model.

Exit codes: 0 done, 2 bad input (reported before anything starts), 130 Ctrl-C or SIGTERM.
- ``fedmoe experiment GRID.toml --out DIR [--jobs N]`` runs a grid of federations
  (methods × ε × partitioners × seeds × any key; :mod:`simulations.experiment`), resumably,
  into ``DIR/results.csv``, ``DIR/report.md`` and plots.
- ``fedmoe audit [--run-config ...] [--canaries M] [--models a,b] [--epsilons 1,8]``
  audits the DP claim empirically (one-run ε lower bound, :mod:`fedmoe.privacy.audit`)
  into a run folder: ``audit.md``, ``audit.json``, ``audit.png``.

Every run-config key of :class:`fedmoe.config.FedMoEConfig` can be set with
``--run-config``, in Flower's own syntax; the config is validated before anything starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import tomllib
from pathlib import Path

from fedmoe.config import ConfigError, FedMoEConfig, loads_toml
from fedmoe.privacy import LEDGER_FILE, LedgerBook, LedgerError


#: Flower's own pattern for one ``key=value`` token of ``--run-config``
#: (``flwr.common.config.parse_config_args``); text it does not match, Flower drops.
_TOKEN = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_overrides(items: list[str] | None, flag: str = "--run-config") -> dict:
    """Flower's ``--run-config`` syntax (``'k1=v1 k2="text"'`` or a TOML file), flattened;
    ``flag`` names the option in messages (a SuperNode's ``--node-config`` has the same syntax).

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
            path = Path(item).expanduser()
            if not path.is_file():
                raise ConfigError(f"{flag} {item!r}: no such TOML file")
            _check_file(path, flag)
            continue
        leftover = _TOKEN.sub(" ", item).split()
        if leftover:
            raise ConfigError(
                f"{flag} {item!r}: cannot read {' '.join(map(repr, leftover))}; every "
                "token must be key=value with a value (e.g. \"target-epsilon=3.0 "
                "model='hmoe'\"; quote strings, no spaces around '=')"
            )
        for match in _TOKEN.finditer(item):
            key, value = match.groups()
            _check_token(item, key, value, flag)
            if key in seen:
                raise ConfigError(f"{flag}: {key} is given twice ({key}={seen[key]} and "
                                  f"{key}={value}); give it once")
            seen[key] = value
    try:
        return parse_config_args(items)
    except Exception as err:  # click.ClickException or a TOML error: say what to fix
        message = getattr(err, "message", None) or str(err)
        raise ConfigError(f"cannot parse {flag} {items!r}: {message}") from err


def _check_file(path: Path, flag: str) -> None:
    """A ``--run-config`` TOML file must parse, with no number too large for a float
    (Flower would read ``1e400`` as inf: a non-private ``target-epsilon``)."""
    try:
        tables = [k for k, v in loads_toml(path.read_text()).items() if isinstance(v, dict)]
    except ConfigError as err:
        raise ConfigError(f"{flag} {str(path)!r}: {err}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{flag} {str(path)!r}: cannot read it as TOML ({err})") \
            from None
    if tables:
        raise ConfigError(f"{flag} {str(path)!r}: has the table(s) {tables}; a run-config "
                          "file holds its keys at the top level, as `key = value` lines: drop "
                          "the table header (e.g. [tool.flwr.app.config]) and keep its keys")


def _check_token(item: str, key: str, value: str, flag: str) -> None:
    """One ``key=value`` token must be a TOML value Flower accepts (bool, int, float,
    string), and a number that fits a float (``1e400`` would read as inf)."""
    try:
        loads_toml(f"{key} = {value}")
    except ConfigError as err:
        raise ConfigError(f"{flag} {item!r}: {key}={value}: {err}") from None
    except tomllib.TOMLDecodeError:
        hint = (f" (strings need quotes: {key}='{value}')"
                if value.replace("-", "").replace("_", "").isalnum() else "")
        raise ConfigError(
            f"{flag} {item!r}: cannot read {key}={value}{hint}; a value is a bool, int, "
            "float or quoted string"
        ) from None


def build_config(args: argparse.Namespace) -> FedMoEConfig:
    """The run config from ``--run-config`` and the shortcut flags.

    ``--rounds R`` is ``num-server-rounds=R`` and ``--out DIR`` is ``run-dir='DIR'``; giving
    both forms with different values is refused (neither silently wins). With ``--resume
    DIR`` the config is the checkpoint's: any key given must have the checkpoint's value
    (the keys that differ are listed), and ``--clients`` defaults to the run's.
    """
    overrides = parse_overrides(args.run_config)
    resume = getattr(args, "resume", None)
    if resume is not None:
        if args.out is not None and Path(args.out) != Path(resume):
            raise ConfigError(f"--out {args.out} and --resume {resume} disagree; give --resume "
                              "alone")
        args.out = str(resume)
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
    if resume is None:
        return FedMoEConfig.from_run_config(overrides)
    from server.checkpoint import config_differences, differences_message, load_checkpoint

    checkpoint = load_checkpoint(Path(resume))
    given = FedMoEConfig.from_recorded({**checkpoint.config, **overrides, "resume": True})
    differ = config_differences(checkpoint.config, given)
    if differ:
        raise ConfigError(differences_message(resume, differ))
    if args.clients is None:
        args.clients = checkpoint.num_clients
    return given


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate a federation on this machine")
    sim.add_argument("--clients", type=int, default=None,
                     help="virtual clients (default: 10, or the resumed run's)")
    sim.add_argument("--rounds", type=int, default=None, help="= num-server-rounds")
    sim.add_argument("--out", default=None, help="run folder (= run-dir); default runs/<time>")
    sim.add_argument("--run-config", action="append", default=None, metavar="'K=V ...'",
                     help="override run-config keys (Flower syntax); repeatable")
    sim.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue the unfinished run in DIR from its last finished round "
                          "(same config; the keys that differ are refused)")
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
    aud = sub.add_parser("audit", help="one-run privacy audit: an empirical lower bound on ε "
                                       "next to the accountant's, per model and ε")
    aud.add_argument("--run-config", action="append", default=None, metavar="'K=V ...'",
                     help="the run to audit (Flower syntax), as for simulate")
    aud.add_argument("--out", default=None, help="run folder (= run-dir); default runs/<time>")
    aud.add_argument("--canaries", type=int, default=1000, help="canaries M (default: 1000)")
    aud.add_argument("--clients", type=int, default=3,
                     help="clients of the server-view audit (default: 3)")
    aud.add_argument("--models", default=None, help="comma-separated (default: the run's)")
    aud.add_argument("--epsilons", default=None,
                     help="comma-separated target ε values (default: the run's)")
    aud.add_argument("--confidence", type=float, default=0.95, help="(default: 0.95)")
    aud.add_argument("--broken", choices=("no-noise", "no-clipping"), default=None,
                     help="AUDIT ONLY: train with a deliberately broken pipeline (σ=0, or "
                          "no per-sample clipping) to see the audit catch it")
    dep = sub.add_parser("deploy", help="set up a real deployment (docs/deployment.md)")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True)
    ini = dep_sub.add_parser("init", help="create a CA, the SuperLink's TLS certificate, one "
                             "authentication key pair per SuperNode and a flwr connection")
    ini.add_argument("dir", type=Path, help="deployment folder (created if missing)")
    ini.add_argument("--hosts", nargs="+", default=None, metavar="NAME_OR_IP",
                     help="names/IPs the SuperLink is reached at (certificate SANs; the first "
                          "is the connection's address); default: localhost 127.0.0.1")
    ini.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs (default: 3)")
    ini.add_argument("--port", type=int, default=8000,
                     help="the SuperLink's port, for the connection entry (default: 8000)")
    ini.add_argument("--name", default="fedmoe", help="connection name (default: fedmoe)")
    ini.add_argument("--force", action="store_true",
                     help="replace existing key material (a new CA for every node)")
    chk = dep_sub.add_parser("check", help="check a SuperNode's node config and data against "
                             "a run, here and now (the plan the server would make; nothing "
                             "is sent)")
    chk.add_argument("--node-config", required=True, metavar="'K=V ...'",
                     help="the node config the SuperNode will be started with")
    chk.add_argument("--run-config", action="append", default=None, metavar="'K=V ...'",
                     help="the run the coordinator will start (Flower syntax; repeatable), "
                          "e.g. \"dataset='node' num-features=30 num-classes=2\"")
    ex = sub.add_parser("export", help="write a client's personalised model for inference, "
                                       "optionally compressed, with its size/latency/accuracy")
    ex.add_argument("run_dir", type=Path, help="a finished run folder")
    ex.add_argument("--client", required=True, help="client id, e.g. partition-0")
    ex.add_argument("--out", type=Path, required=True, help="the export file to write")
    ex.add_argument("--int8", action="store_true",
                    help="store every floating tensor as int8 (per-tensor scale and zero "
                         "point; each entry within half a step), dequantised at load")
    ex.add_argument("--prune", type=float, default=0.0, metavar="F",
                    help="magnitude-prune this share of the Linear weights, in [0, 1)")
    ex.add_argument("--distill", type=int, default=0, metavar="H",
                    help="distil into a dense student with H hidden units, trained on the "
                         "client's own data WITHOUT DP: the file must stay with the client")
    ex.add_argument("--num-partitions", type=int, default=None,
                    help="clients in the run (default: client folders in the run folder)")
    ex.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    try:
        code = _run_command(args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except BrokenPipeError:  # `fedmoe budget --json | head`: the reader left, not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would report the pipe again at exit
        return 1


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "audit":
        return audit(args)
    if args.command == "deploy":
        return deploy_check(args) if args.deploy_command == "check" else deploy_init(args)
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
    """``fedmoe simulate``: 0 when done, 2 for bad input (nothing started), 130 on Ctrl-C
    or SIGTERM."""
    from fedmoe.storage import RunFolderBusy
    from simulations.runner import SimulationInterrupted, run

    # Outside the run (set-up, the last clean-up) SIGTERM is Ctrl-C too: "interrupted", 130
    term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        config = build_config(args)
        run(config, args.clients or 10, verbose=args.verbose)
    except (ConfigError, LedgerError, RunFolderBusy) as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    except SimulationInterrupted as err:
        rounds = len(err.results["rounds"])
        print(f"fedmoe: interrupted; report of the {rounds} finished round(s): "
              f"{err.results_path}; continue with fedmoe simulate --resume "
              f"{err.results_path.parent}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fedmoe: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, term)
    return 0


def deploy_init(args: argparse.Namespace) -> int:
    """``fedmoe deploy init``: 0 when the key material is written, 2 for bad input."""
    from fedmoe.deploy import init_deployment

    try:
        layout = init_deployment(args.dir, hosts=args.hosts, nodes=args.nodes, port=args.port,
                                 name=args.name, force=args.force)
    except ConfigError as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    print(f"deployment key material in {layout.root}:\n"
          f"  CA certificate      {layout.ca_cert}  (give it to every SuperNode)\n"
          f"  SuperLink TLS       {layout.server_cert}, {layout.server_key}\n"
          f"  SuperNode keys      {layout.node_key(0).parent.parent}/node-<i>/node.key, "
          f"node.pub ({layout.nodes} nodes)\n"
          f"  flwr connection     {layout.connection}  (append to $FLWR_HOME/config.toml)\n"
          "next steps: docs/deployment.md")
    return 0


def deploy_check(args: argparse.Namespace) -> int:
    """``fedmoe deploy check``: 0 when the node can take part in the run, 1 when the server
    would give it no round (the reason printed), 2 for a node config, data file, state dir
    or ledger it would refuse."""
    from clients.app import Refusal
    from clients.check import check_node
    from fedmoe.config import NodeSettings

    if not args.run_config:
        print("fedmoe: warning: no --run-config: checking against fedmoe's default run "
              "(the built-in digits: 64 features, 10 classes); give the run config the "
              "coordinator will start, e.g. --run-config \"dataset='node' num-features=30 "
              "num-classes=2\"", file=sys.stderr)
    try:
        config = FedMoEConfig.from_run_config(parse_overrides(args.run_config))
        node = NodeSettings.from_node_config(parse_overrides([args.node_config],
                                                             "--node-config"))
        found = check_node(config, node)
    except (ConfigError, LedgerError) as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    except Refusal as refusal:
        print(f"fedmoe: error: the node would refuse the run: {refusal.reason}",
              file=sys.stderr)
        return 2
    where = f"state dir {found.state_dir}" if found.state_dir else "no state dir"
    ledger = (f"its ledger has spent ε={found.spent:.3f}" if found.spent
              else "no earlier spend")
    print(f"client {found.client}: {found.num_train} train / {found.num_test} "
          f"{config.evaluate_on} examples; {where}, {ledger} (checked here; nothing sent)")
    for note in [*config.warnings(), *found.warnings]:
        print(f"fedmoe: warning: {note}", file=sys.stderr)
    plan = found.plan
    if found.excluded or plan is None:
        print(f"the server would give this client no round: {found.excluded}")
        return 1
    if not plan.private:
        print(f"plan: non-private (ε=∞), {found.rounds} of {found.planned_rounds} rounds")
        return 0
    histogram = f", label histogram at σ_h={plan.prior_noise:.3f}" if plan.prior_noise else ""
    pretrain = (f" (rounds 1–{plan.pretrain_rounds} at σ={plan.pretrain_noise:.4f})"
                if plan.pretrain_noise else "")
    print(f"plan: δ={plan.delta:g}, q={plan.sample_rate:g}, {plan.steps} DP-SGD steps a round "
          f"at σ={plan.noise_multiplier:.4f}{pretrain}{histogram} ({plan.accountant}); budget "
          f"ε={plan.budget:g} pays for {found.rounds} of the run's {found.planned_rounds} "
          f"rounds; ε after the run {found.epsilon_after():.3f}")
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
    except ConfigError as err:  # a run's inputs (data file, split): before any run started
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    print(f"results: {out / 'results.csv'} · report: {out / 'report.md'}")
    return 0


def audit(args: argparse.Namespace) -> int:
    """``fedmoe audit``: 0 when done, 2 for bad input (nothing run)."""
    from simulations.audit import command

    return command(args, build_config)


def export(args: argparse.Namespace) -> int:
    """``fedmoe export``: 0 done, 2 for a run folder, client or option that cannot work."""
    from dataclasses import asdict

    from fedmoe.export import ExportError, export_client

    try:
        results = export_client(args.run_dir, args.client, args.out,
                                num_partitions=args.num_partitions, int8=args.int8,
                                prune=args.prune, distill_hidden=args.distill)
    except (ExportError, ConfigError) as err:  # ConfigError: the run's data or bounds file
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


def entry() -> None:
    """The ``fedmoe`` command: :func:`main`, then exit without waiting for threads that
    cannot end. After an abort (a second Ctrl-C or SIGTERM) a worker thread of Flower's
    simulation engine can stay blocked on a Ray actor that is gone, and the interpreter
    would wait for it forever at exit; everything fedmoe writes is on disk by then (the
    ledgers and the report are written before :func:`main` returns)."""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
