"""The DP benchmark script's bookkeeping (not its timings, which depend on the machine):
per-round ratios pair each layout with the non-private step of the same round, and bad
arguments are refused before anything runs."""

import pytest

from simulations.bench_dp import Measurement, main, table


def row(label, dispatch, mode, steps, peaks):
    return Measurement("large", label, dispatch, mode, 1000, tuple(steps), tuple(peaks))


def test_table_reports_the_median_and_the_per_round_ratio_range():
    rows = [row("non-private", "sparse", None, [40.0, 50.0, 44.0], [100, 120, 110]),
            row("DP", "sparse", "bookkeeping", [52.0, 55.0, 66.0], [150, 170, 160])]
    text = table(rows).splitlines()
    dp = next(line for line in text if "bookkeeping" in line)
    cells = [c.strip() for c in dp.strip("|").split("|")]
    # median step 55.0; 55 / 44 = 1.25; per round 52/40 = 1.30, 55/50 = 1.10, 66/44 = 1.50
    assert cells[5:10] == ["55.0", "1.25", "1.10–1.50", "160", "1.5"]
    base = [c.strip() for c in next(line for line in text if "| non-private |" in line)
            .strip("|").split("|")]
    assert base[5:8] == ["44.0", "1.00", "1.00–1.00"]


@pytest.mark.parametrize("argv", [["--configs", "huge"], ["--repeats", "0"], ["--steps", "0"]])
def test_bad_arguments_are_refused_before_measuring(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "huge" in capsys.readouterr().err or argv[0] != "--configs"
