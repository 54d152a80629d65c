"""One ``tmoe`` federation in this process, summarised per round (how its defaults were chosen).

``python -m simulations.tmoe_run CLIENTS RUN_DIR key=value ...`` runs ``model = "tmoe"``
with the given run-config keys through :func:`simulations.inline.run_inline` (the real
ServerApp logic and ClientApp, as ``fedmoe experiment`` does) and prints one line per round:

- pretraining: how many clients' personalised perplexity is below their own unigram
  baseline, the mean personalised, global-only and unigram perplexity, then each client's
  ``personalised/unigram`` perplexity;
- fine-tuning: the mean personalised and global-only accuracy.

The clients of a round run concurrently (one thread each, one torch thread per process):
the same computations as the sequential in-process engine, except that clients seeding
torch's global generator at the same time may draw their local initialisation in another
order; on the shared 2-core machine under a load of ~15 a 20-round run takes about 10
minutes instead of hours (torch's intra-op threads spin against each other there).
The same lines are written to ``RUN_DIR.txt``; the run folder holds ``results.json``.
Values are read as int, float, ``true``/``false``, else as strings (quotes stripped).
docs/results.md (section tmoe) lists the commands behind its figures.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fedmoe.config import FedMoEConfig
from simulations import inline
from simulations.inline import InlineGrid, run_inline


class ConcurrentGrid(InlineGrid):
    """:class:`~simulations.inline.InlineGrid` that delivers a round's messages to all
    their clients at once and waits for every reply (no reply timeout)."""

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201 (as parent)
        messages = list(messages)

        def deliver(msg):  # noqa: ANN001, ANN202
            box: list = []
            self._deliver(msg, box)
            return box

        with ThreadPoolExecutor(max_workers=max(1, len(messages))) as pool:
            return [reply for box in pool.map(deliver, messages) for reply in box]


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text.strip("'\""))


def summarise(results: dict) -> list[str]:
    """One line per round of a ``tmoe`` run's ``results.json`` content."""
    lines = []
    for record in results["rounds"]:
        rows = record["clients"]
        if not rows:
            continue
        if record.get("phase") == "pretrain":
            mine = [c["personalized-perplexity"] for c in rows]
            unigram = [c["unigram-perplexity"] for c in rows]
            glob = [c["global-perplexity"] for c in rows]
            below = sum(p < u for p, u in zip(mine, unigram, strict=True))
            each = " ".join(f"{p:.1f}/{u:.1f}" for p, u in zip(mine, unigram, strict=True))
            lines.append(f"{record['round']} pretrain below={below}/{len(rows)} "
                         f"mean={sum(mine) / len(rows):.2f} global={sum(glob) / len(rows):.2f} "
                         f"unigram={sum(unigram) / len(rows):.2f} | {each}")
        else:
            mine = [c["personalized_accuracy"] for c in rows]
            glob = [c["global_accuracy"] for c in rows]
            lines.append(f"{record['round']} finetune accuracy={sum(mine) / len(rows):.3f} "
                         f"global={sum(glob) / len(rows):.3f}")
    return lines


def main(argv: list[str]) -> None:
    clients, run_dir, tokens = int(argv[0]), argv[1], argv[2:]
    keys = {k.replace("-", "_"): _value(v) for k, v in (t.split("=", 1) for t in tokens)}
    config = FedMoEConfig(model="tmoe", run_dir=run_dir, **keys)
    torch.set_num_threads(1)
    inline.InlineGrid = ConcurrentGrid  # what run_inline builds
    start = time.time()
    lines = summarise(run_inline(config, clients).results)
    lines.append(f"time {time.time() - start:.0f}s {' '.join(tokens)}")
    print("\n".join(lines))
    with open(run_dir.rstrip("/") + ".txt", "w") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
