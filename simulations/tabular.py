"""Write two public tabular data sets as users' own CSV files, with a bounds file each.

scikit-learn's breast-cancer (569 rows, 30 features, 2 classes) and wine (178 rows, 13
features, 3 classes) ship with scikit-learn (nothing is downloaded). Their features are
measurements on very different scales (an area up to 2,501, a concavity up to 0.43; proline
up to 1,680, hue up to 1.7): the kind of file a hospital or lab would bring, and the case
``feature-bounds`` is for. The bounds file of each (``feature,low,high``) gives every
column a range a domain expert could state without the data: the data's own minimum and
maximum rounded outward to one significant figure (2,501 -> 3,000; 0.0 stays 0). That the
ranges are derived from the data is a stand-in for that knowledge, not a DP method.

    python -m simulations.tabular runs/tabular
    # -> runs/tabular/{cancer,wine}.csv and {cancer,wine}_bounds.csv
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np


def outward(value: float, up: bool) -> float:
    """``value`` rounded away from the data to one significant figure (0 stays 0)."""
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(value)))
    digits = (math.ceil if up else math.floor)(value / 10.0 ** exponent)
    return float(f"{digits}e{exponent}")  # read as decimal: -6e-1 is -0.6, not -0.6000…01


def write(name: str, x: np.ndarray, y: np.ndarray, out: Path) -> None:
    """``out/NAME.csv`` (columns f0.., label) and ``out/NAME_bounds.csv``."""
    names = [f"f{j}" for j in range(x.shape[1])]
    with (out / f"{name}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, "label"])
        for row, label in zip(x, y):
            w.writerow([*(f"{v:.6g}" for v in row), int(label)])
    with (out / f"{name}_bounds.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["feature", "low", "high"])
        for j, n in enumerate(names):
            w.writerow([n, f"{outward(float(x[:, j].min()), False):g}",
                        f"{outward(float(x[:, j].max()), True):g}"])


def main(argv: list[str] | None = None) -> int:
    from sklearn.datasets import load_breast_cancer, load_wine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the CSV and bounds files")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    for name, loader in (("cancer", load_breast_cancer), ("wine", load_wine)):
        data = loader()
        write(name, data.data, data.target, out)
        print(f"{out / name}.csv: {data.data.shape[0]} rows, {data.data.shape[1]} features; "
              f"bounds {out / name}_bounds.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
