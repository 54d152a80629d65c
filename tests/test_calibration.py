"""``python -m simulations.calibration``: a finished grid's learned score scale against
the one fitted post hoc to the same scores (the measurement behind ``score-scale``)."""

import torch

from fedmoe.cli import main as fedmoe_main
from simulations.calibration import main

GRID = """
[experiment]
clients = 3
seeds = [1]

[base]
num-server-rounds = 2
method = "fedmoe"
partitioner = "dirichlet"
dirichlet-alpha = 0.3

[grid]
score-scale = [false, true]
target-epsilon = [8.0]
"""


def test_learned_and_fitted_scales_of_a_finished_grid(tmp_path, capsys):
    (tmp_path / "g.toml").write_text(GRID)
    assert fedmoe_main(["experiment", str(tmp_path / "g.toml"), "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    threads = torch.get_num_threads()  # the command runs single-threaded
    try:
        assert main([str(tmp_path / "o")]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| score-scale | target-epsilon | learned s | fitted s |")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert set(rows) == {"false", "true"}
    assert rows["false"][2] == "1.00"  # no scale learned without one
    learned, fitted = float(rows["true"][2]), float(rows["true"][3])
    assert learned != 1.0 and fitted > 0
    assert all(0 <= float(v) <= 1 for v in rows["true"][4:7])
    assert main([str(tmp_path / "o"), "--axis", "score-scale=none"]) == 2  # nothing matches
    torch.set_num_threads(threads)
