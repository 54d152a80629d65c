"""``fedmoe`` command line: ``fedmoe simulate [--clients K] [--rounds R] [--out DIR]
[--run-config "key=value ..."]``.

Every run-config key of :class:`fedmoe.config.FedMoEConfig` can be set with
``--run-config``, in Flower's own syntax; the config is validated before anything starts.
"""

from __future__ import annotations

import argparse
import sys

from fedmoe.config import ConfigError, FedMoEConfig


def parse_overrides(items: list[str] | None) -> dict:
    """Flower's ``--run-config`` syntax (``'k1=v1 k2="text"'`` or a TOML file), flattened."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args(items)
    except Exception as err:  # click.ClickException or a TOML error: say what to fix
        message = getattr(err, "message", None) or str(err)
        raise ConfigError(f"cannot parse --run-config {items!r}: {message}") from err


def build_config(args: argparse.Namespace) -> FedMoEConfig:
    overrides = parse_overrides(args.run_config)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    if args.out is not None:
        overrides["run-dir"] = args.out
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
    args = parser.parse_args(argv)

    try:
        config = build_config(args)
        from simulations.runner import run

        run(config, args.clients, verbose=args.verbose)
    except ConfigError as err:
        print(f"fedmoe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
