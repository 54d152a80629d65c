"""Benchmark: the cost of a DP-SGD step on a top-k MoE layer, per expert layout and Opacus mode.

    python -m simulations.bench_dp [--steps 20] [--repeats 3] [--configs large,small]
                                   [--write docs/benchmarks.md]

For each configuration (``large``: B=64, T=64, d=128, hidden 512, 8 experts, top-2 — about
1.06 M parameters; ``small``: B=32, T=16, d=64, hidden 128, 4 experts, top-2) it times one
optimiser step — forward, backward, per-sample clipping, noise, update — of a single
:class:`fedmoe.models.layers.TopKMoE` with the per-sample router losses on:

- non-private, dense and sparse dispatch (plain SGD);
- DP-SGD, dense dispatch × Opacus hooks / functorch / ghost clipping;
- DP-SGD, sparse dispatch × hooks / ghost clipping (functorch cannot handle dispatched rows);
- DP-SGD with fedmoe's one-backward book-keeping clipping, dense and sparse.

Each measurement runs in its own process: the median step time over ``--steps`` steps
after 3 warm-up steps, and the peak resident memory above what the process held before the
first step. Every layout is measured in ``--repeats`` such processes, in rounds (each round
measures every layout once, so a machine that slows down or speeds up during the run
affects all layouts alike). The table shows the median over the rounds; the ratio divides
by non-private sparse dispatch, and its range is the lowest and highest per-round ratio,
each against the non-private step of the same round.

A second table times one client's DP round (10 steps, q=0.1, the model's own data) of each
fedmoe model at its defaults for every dispatch × mode: the pair that ``auto`` picks
(:data:`fedmoe.config.FASTEST`) should be the fastest there. A script, not a test: figures
depend on the machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = {
    "large": {"batch": 64, "tokens": 64, "dim": 128, "hidden": 512, "experts": 8, "top_k": 2},
    "small": {"batch": 32, "tokens": 16, "dim": 64, "hidden": 128, "experts": 4, "top_k": 2},
}
#: (label, dispatch, mode); mode None = non-private.
LAYOUTS = [
    ("non-private", "dense", None),
    ("non-private", "sparse", None),
    ("DP", "dense", "hooks"),
    ("DP", "dense", "functorch"),
    ("DP", "dense", "ghost"),
    ("DP", "dense", "bookkeeping"),
    ("DP", "sparse", "hooks"),
    ("DP", "sparse", "ghost"),
    ("DP", "sparse", "bookkeeping"),
]


@dataclass(frozen=True)
class Measurement:
    """One layout over all rounds: per-round median step times and peak memories."""

    config: str
    label: str
    dispatch: str
    mode: str | None
    params: int
    step_ms: tuple[float, ...]
    peak_mb: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def median_mb(self) -> float:
        return statistics.median(self.peak_mb)


def _measure(config: str, dispatch: str, mode: str | None, steps: int) -> tuple[int, float, float]:
    """In a fresh process: (parameters, median step ms, peak MB above the pre-step baseline)."""
    import warnings

    import torch
    from torch import nn

    from fedmoe.models.layers import TopKMoE

    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    shape = CONFIGS[config]
    torch.manual_seed(0)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = TopKMoE(shape["dim"], shape["hidden"], shape["experts"], 0,
                               shape["top_k"], dispatch=dispatch, balance_coef=0.01,
                               z_loss_coef=0.001)

        def forward(self, x):
            return self.moe(x)

    class Criterion:
        """Per-sample loss (B,): squared error to the target plus the router losses."""

        reduction = "mean"

        def __call__(self, output, target):
            y, aux = output
            per_sample = ((y - target) ** 2).flatten(1).mean(-1) + aux
            return per_sample if self.reduction == "none" else per_sample.mean()

    model = Layer()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(shape["batch"], shape["tokens"], shape["dim"])
    target = torch.randn_like(x)
    criterion = Criterion()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0,
              "expected_batch_size": shape["batch"]}

    if mode is None:
        def step() -> None:
            sgd.zero_grad(set_to_none=True)
            criterion(model(x), target).backward()
            sgd.step()
    elif mode in ("hooks", "functorch"):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                               force_functorch=mode == "functorch")
        opt = DPOptimizer(sgd, **kwargs)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            criterion(gsm(x), target).backward()
            opt.step()
    elif mode == "bookkeeping":
        from fedmoe.privacy.bookkeeping import BookKeeping

        engine = BookKeeping(model, max_grad_norm=1.0, noise_multiplier=1.0,
                             expected_batch_size=shape["batch"], learning_rate=0.01,
                             generator=torch.Generator().manual_seed(0))
        criterion.reduction = "none"

        def step() -> None:
            engine.step(lambda m: criterion(m(x), target), len(x))
    else:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0,
            use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(sgd, loss_reduction="mean", **kwargs)
        dp_loss = DPLossFastGradientClipping(gsm, opt, criterion, loss_reduction="mean")

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            dp_loss(gsm(x), target).backward()
            opt.step()

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        step()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    return params, statistics.median(times), peak / 1024.0  # ru_maxrss is in KB on Linux


def _child(queue, *args) -> None:
    try:
        queue.put(_measure(*args))
    except Exception as err:  # report, do not hang the parent
        queue.put(err)


def measure(config: str, dispatch: str, mode: str | None, steps: int) -> tuple[int, float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, config, dispatch, mode, steps))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, Exception):
        raise RuntimeError(f"{config} {dispatch} {mode}: {result!r}") from result
    return result


def run(configs: list[str], steps: int, repeats: int) -> list[Measurement]:
    """Every layout of every config, ``repeats`` rounds, one fresh process per measurement."""
    found: dict[tuple, list[tuple[int, float, float]]] = {}
    for round_ in range(1, repeats + 1):
        for config in configs:
            for label, dispatch, mode in LAYOUTS:
                params, ms, mb = measure(config, dispatch, mode, steps)
                found.setdefault((config, label, dispatch, mode), []).append((params, ms, mb))
                print(f"round {round_}/{repeats} {config:6} {label:11} {dispatch:6} "
                      f"{mode or '-':11} {ms:9.1f} ms {mb:8.1f} MB", flush=True)
    return [Measurement(config, label, dispatch, mode, runs[0][0],
                        tuple(r[1] for r in runs), tuple(r[2] for r in runs))
            for (config, label, dispatch, mode), runs in found.items()]


def model_rounds(repeats: int = 5) -> str:
    """Median wall time of one client's 10-step DP round per model × dispatch × mode."""
    import warnings

    from fedmoe.config import DISPATCHES, FASTEST, GRAD_SAMPLE_MODES, FedMoEConfig
    from fedmoe.data import load_client_data
    from fedmoe.models import model_for
    from fedmoe.training import train_dp_round

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    lines = ["| model | dispatch | Opacus mode | one DP round, 10 steps (ms) | auto picks |",
             "|---|---|---|---|---|"]
    for model in FASTEST:
        for dispatch in DISPATCHES:
            for mode in GRAD_SAMPLE_MODES:
                config = FedMoEConfig(model=model, dispatch=dispatch, grad_sample_mode=mode)
                data = load_client_data(config, 0, 10, config.phase(1))
                times = []
                try:
                    for _ in range(repeats):
                        net = model_for(config)
                        start = time.perf_counter()
                        train_dp_round(net, data.train, steps=10, sample_rate=0.1,
                                       noise_multiplier=1.0, max_grad_norm=1.0,
                                       learning_rate=0.5, grad_sample_mode=mode)
                        times.append((time.perf_counter() - start) * 1000)
                except ValueError:  # book-keeping does not cover this model's layers
                    lines.append(f"| {model} | {dispatch} | {mode} | not supported | |")
                    continue
                chosen = "✓" if FASTEST[model] == (dispatch, mode) else ""
                lines.append(f"| {model} | {dispatch} | {mode} | "
                             f"{statistics.median(times):.0f} | {chosen} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def table(rows: list[Measurement]) -> str:
    lines = ["| config | params | run | dispatch | Opacus mode | median step (ms) | "
             "× non-private sparse | per round | peak memory above baseline (MB) | × |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r.config for r in rows):
        mine = [r for r in rows if r.config == config]
        ref = next(r for r in mine if r.mode is None and r.dispatch == "sparse")
        for r in mine:
            per_round = [ms / base for ms, base in zip(r.step_ms, ref.step_ms, strict=True)]
            mem_ratio = f"{r.median_mb / ref.median_mb:.1f}" if ref.median_mb > 1 else "–"
            lines.append(
                f"| {config} | {r.params:,} | {r.label} | {r.dispatch} | {r.mode or '–'} | "
                f"{r.median_ms:.1f} | {r.median_ms / ref.median_ms:.2f} | "
                f"{min(per_round):.2f}–{max(per_round):.2f} | {r.median_mb:.0f} | "
                f"{mem_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, each measuring every layout in fresh processes (default: 3)")
    parser.add_argument("--configs", default="large,small", help="comma-separated: large,small")
    parser.add_argument("--write", type=Path, default=None, help="write the table (markdown)")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    rows = run(configs, args.steps, args.repeats)
    text = table(rows)
    print(text)
    rounds = model_rounds()
    if args.write:
        import torch

        header = (f"Measured with `python -m simulations.bench_dp --steps {args.steps} "
                  f"--repeats {args.repeats} --write {args.write}` on {platform.machine()}, {torch.get_num_threads()} torch "
                  f"threads, torch {torch.__version__}.\n\n")
        args.write.write_text(_PREAMBLE + header + text + "\n\n" + _ROUNDS + rounds + "\n")
        print(f"written to {args.write}")
    return 0


_PREAMBLE = """# DP-SGD step cost of a top-k MoE layer

One optimiser step (forward, backward, per-sample clipping, noise, update) of a single
`TopKMoE` layer on (B, T, d) token inputs, router losses on. "dense" runs every expert on
every token; "sparse" computes only routed tokens with fedmoe's registered grad sampler
and ghost-norm sampler (`fedmoe/models/experts.py`); "bookkeeping" is fedmoe's
one-backward clipping (`fedmoe/privacy/bookkeeping.py`). Each layout is measured in a fresh
process, once per round; the table gives the median over the rounds. The ratio divides by
non-private sparse dispatch; "per round" is the lowest and highest ratio against the
non-private step of the same round. On these 2-core virtual machines the same step varies
by up to ±15 % from one process to the next, and a round in which something else ran is
an outlier in "per round", not in the median. Regenerate with the command below.

"""


_ROUNDS = """## One client's DP round per model (what `dispatch = auto`, `grad-sample-mode = auto` pick)

Median of 5 rounds of 10 DP-SGD steps (q = 0.1) on client 0 of 10, each model at its
defaults. The digits models are tiny (one token per example, 4 experts of hidden size 64):
routing overhead outweighs the saved expert compute, so dense dispatch wins, and
book-keeping's single backward pass halves the round. `tmoe` (64 tokens per example,
embeddings, LayerNorms, attention): book-keeping also wins (its LayerNorms' per-sample
gradients are materialised, which is cheap); ghost clipping loses (its second backward
pass runs through attention, LayerNorm and embeddings too). For `tmoe` dense and sparse
book-keeping are within noise of each other at 4 experts; `auto` picks sparse, whose
expert cost grows with top-k rather than with the number of experts.

"""


if __name__ == "__main__":
    raise SystemExit(main())
