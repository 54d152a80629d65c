"""Benchmark: framework overhead and memory of a simulated federation as clients grow.

For each number of simulated clients (default 10, 100, 1,000) one fresh process runs a
federation in the in-process engine (:mod:`simulations.inline`) on the generated
``synthetic`` data set, ``--per-client`` examples per client, with about ``--sampled``
clients trained and evaluated per round. It reports

- wall time of the federation, and the time spent inside the client handlers (query,
  train, evaluate: data loading, model building, DP-SGD, scoring);
- framework overhead = wall / client time (1.0 would be no overhead at all);
- the server's own time: wall − client time (planning, accounting, ledgers, aggregation);
- peak RSS of the process (the only process: the clients run in it), and the size of the
  clients' state on disk (every client's ledger and local experts live there, not in RAM).

``--engine flower`` runs the same federation through Flower's simulation engine (Ray) for
comparison; it reports wall time only (Ray's worker processes are not children of this one,
and their handler time is not visible here).

Run ``python -m simulations.bench_scale --write docs/benchmarks.md`` to (re)write the table
between its markers in that file.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def measure(clients: int, *, sampled: int, rounds: int, per_client: int, method: str,
            engine: str, threads: int) -> dict[str, Any]:
    """One federation in this process; returns its figures (call in a fresh process)."""
    import logging

    import torch

    import server.app  # noqa: F401  (imported before silencing: importing Flower sets its log level)
    from fedmoe.config import FedMoEConfig

    torch.set_num_threads(threads)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    fraction = min(1.0, sampled / clients)
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-scale-") as tmp:
        config = FedMoEConfig(
            method=method, dataset="synthetic", synthetic_samples=per_client * clients,
            partitioner="iid", num_server_rounds=rounds, fraction_train=fraction,
            fraction_evaluate=fraction, run_dir=str(Path(tmp) / "run"), seed=1,
        )
        start = time.perf_counter()
        if engine == "inline":
            from simulations.inline import run_inline

            run = run_inline(config, clients)
            wall, client = run.wall_seconds, run.client_time
            seconds = {k: round(v, 2) for k, v in client.seconds.items()}
            total, messages = client.total, client.messages
        else:
            from simulations.experiment import _run_flower

            _run_flower(config, clients)
            wall, seconds, total, messages = time.perf_counter() - start, {}, None, {}
        state = sum(p.stat().st_size for p in (Path(tmp) / "run").rglob("*") if p.is_file())
        state_dirs = sum(1 for _ in (Path(tmp) / "run" / "clients").glob("*")) \
            if (Path(tmp) / "run" / "clients").is_dir() else 0
    return {
        "clients": clients, "sampled": int(clients * fraction), "rounds": rounds,
        "per_client": per_client, "method": method, "engine": engine,
        "wall_s": round(wall, 2), "client_s": None if total is None else round(total, 2),
        "client_s_by_kind": seconds, "messages": messages,
        "overhead": None if not total else round(wall / total, 2),
        "server_s": None if total is None else round(wall - total, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "state_on_disk_mb": round(state / 2**20, 2), "client_state_dirs": state_dirs,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| clients | sampled/round | engine | wall (s) | client handlers (s) | overhead "
             "(wall / client) | server (s) | peak RSS (MB) | state on disk (MB, client dirs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        return "–" if value is None else f"{value:{spec}}{suffix}"

    for r in rows:
        lines.append(
            f"| {r['clients']:,} | {r['sampled']} | {r['engine']} | {r['wall_s']:.1f} | "
            f"{fmt(r['client_s'], '.1f')} | {fmt(r['overhead'], '.2f', '×')} | "
            f"{fmt(r['server_s'], '.1f')} | {r['peak_rss_mb']:.0f} | "
            f"{r['state_on_disk_mb']:.1f} ({r['client_state_dirs']:,}) |")
    return "\n".join(lines)


BEGIN, END = "<!-- bench-scale:begin -->", "<!-- bench-scale:end -->"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between this benchmark's markers in ``path`` (appended the first time),
    leaving the rest of the file as it is."""
    content = path.read_text() if path.exists() else ""
    if BEGIN in content and END in content:
        head, rest = content.split(BEGIN, 1)
        content = head + BEGIN + "\n" + text + END + rest.split(END, 1)[1]
    else:
        content = content.rstrip("\n") + f"\n\n{BEGIN}\n{text}{END}\n"
    path.write_text(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10, help="clients per round (≈)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=200,
                        help="synthetic examples per client (80 %% train)")
    parser.add_argument("--method", default="fedmoe")
    parser.add_argument("--engine", choices=("inline", "flower"), default="inline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--write", type=Path, default=None,
                        help="append the table and the command to this markdown file")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = dict(sampled=args.sampled, rounds=args.rounds, per_client=args.per_client,
                   method=args.method, engine=args.engine, threads=args.threads)
    if args.child is not None:
        print(json.dumps(measure(args.child, **options)))
        return 0
    rows = []
    for clients in args.clients:  # a fresh process each: clean peak RSS, no warm caches
        cmd = [sys.executable, "-m", "simulations.bench_scale", "--child", str(clients),
               "--sampled", str(args.sampled), "--rounds", str(args.rounds),
               "--per-client", str(args.per_client), "--method", args.method,
               "--engine", args.engine, "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    if args.write:
        command = "python -m simulations.bench_scale " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a)
        write_section(args.write, f"`{command}` on {platform.machine()}, {args.threads} "
                                  f"torch thread(s), {time.strftime('%Y-%m-%d')}:\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
