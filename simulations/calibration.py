"""How well a finished grid's personalised scores are calibrated to their label prior.

``python -m simulations.calibration OUT [--axis KEY=VALUE ...]`` reads the finished
``fedmoe`` runs of ``fedmoe experiment ... --out OUT`` (label-prior models) and prints, per
setting (the grid's axes but the seed), mean over seeds of

- ``learned s``: the score scale the run learned (``score-scale = true``; 1 without one);
- ``fitted s``: the one scale of the final shared scores (before the prior) that minimises
  the cross-entropy of ``s · scores + log π_i`` on the clients' *training* data, pooled
  over the run's clients — what a perfectly trained scale would be;
- the mean personalised accuracy on each client's evaluation split (``evaluate-on``) with
  the scale the run predicts with, with s = 1, and with the fitted s.

This is the measurement behind ``score-scale`` (docs/results.md, section 3.4): DP-SGD's
scores are too flat for a weight-1 prior at small noise and too sharp at large noise.
Reads only: every run folder is left as it was.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fedmoe.config import FedMoEConfig, NodeSettings
from fedmoe.data import load_client_data
from fedmoe.export import personalised_model
from fedmoe.methods import has_label_prior
from fedmoe.models.prior import ScoreScale, label_priors


def _scale(model: torch.nn.Module) -> ScoreScale | None:
    """The model's learned score scale (None for a model without one)."""
    return next((m for m in model.modules() if isinstance(m, ScoreScale)), None)


def _scores(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared scores before the scale and prior (B, C), and the prior log π (C,)."""
    prior = label_priors(model)[0]
    scale = _scale(model)
    saved = prior.log_prior.clone(), None if scale is None else scale.log_scale.detach().clone()
    with torch.no_grad():
        prior.log_prior.zero_()
        if scale is not None:
            scale.log_scale.zero_()
        scores = model(x)
        prior.log_prior.copy_(saved[0])
        if scale is not None:
            scale.log_scale.copy_(saved[1])
    return scores, saved[0]


def run_calibration(run_dir: Path, clients: int) -> dict[str, float]:
    """One finished run's learned and fitted scales and accuracies (module docstring)."""
    train, evaluation, learned = [], [], 1.0
    for c in range(clients):
        config, model = personalised_model(run_dir, f"partition-{c}",
                                           NodeSettings(partition_id=c, num_partitions=clients))
        scale = _scale(model)
        learned = scale.scale if scale is not None else 1.0
        data = load_client_data(config, c, clients, config.phase(config.num_server_rounds))
        for split, out in ((data.train, train), (data.test, evaluation)):
            scores, log_prior = _scores(model, split.tensors[0].float())
            out.append((scores, log_prior.expand_as(scores), split.tensors[1]))
    z, lp, y = (torch.cat([t[i] for t in train]) for i in range(3))
    theta = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(theta.exp() * z + lp, y)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = float(theta.detach().exp())

    def accuracy(s: float) -> float:
        return statistics.mean(float(((s * z + lp).argmax(-1) == y).float().mean())
                               for z, lp, y in evaluation)

    return {"learned": learned, "fitted": fitted, "acc": accuracy(learned),
            "acc_s1": accuracy(1.0), "acc_fitted": accuracy(fitted)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="an experiment folder (results.csv, runs/)")
    parser.add_argument("--axis", action="append", default=[], metavar="KEY=VALUE",
                        help="only runs whose axis KEY has this value (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with open(args.out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = dict(a.split("=", 1) for a in args.axis)
    axes = [k for k in (rows[0] if rows else {}) if k.startswith("axis:")]
    settings: dict[tuple, list[dict[str, float]]] = {}
    for row in rows:
        if row.get("method") != "fedmoe" or any(row.get(f"axis:{k}") != v
                                                for k, v in wanted.items()):
            continue
        config = json.loads((args.out / "runs" / row["run"] / "results.json").read_text())
        if not label_priors_in(config):
            continue
        key = tuple(row[a] for a in axes)
        settings.setdefault(key, []).append(
            run_calibration(args.out / "runs" / row["run"], int(row["clients"])))
    if not settings:
        print(f"no finished fedmoe runs with a label prior in {args.out}", file=sys.stderr)
        return 2
    names = [a.removeprefix("axis:") for a in axes]
    print("| " + " | ".join(names) + " | learned s | fitted s | accuracy | with s = 1 | "
          "with fitted s | runs |")
    print("|" + "---|" * (len(names) + 6))
    for key, runs in settings.items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        print("| " + " | ".join(key) + f" | {mean['learned']:.2f} | {mean['fitted']:.2f} | "
              f"{mean['acc']:.3f} | {mean['acc_s1']:.3f} | {mean['acc_fitted']:.3f} | "
              f"{len(runs)} |")
    return 0


def label_priors_in(results: dict) -> bool:
    """Whether a run's recorded config trains a label-prior model."""
    return has_label_prior(FedMoEConfig.from_recorded(results["config"]))


if __name__ == "__main__":
    sys.exit(main())
