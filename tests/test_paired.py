"""``python -m simulations.paired``: paired-by-seed differences and gaps to the best other
method, checked on rows whose answers are worked out by hand."""

import pytest

from simulations.paired import gaps_table, main, paired_table


def _row(split, eps, seed, accuracy, worst, **axes):
    row = {"axis:split": split, "axis:target-epsilon": str(eps)}
    row |= {f"axis:{k}": v for k, v in axes.items()}
    return row | {"seed": str(seed), "method": axes.get("method", "fedmoe"),
                  "personalized_accuracy": str(accuracy),
                  "personalized_accuracy_worst_decile": str(worst)}


def test_paired_differences_are_per_seed_and_averaged_over_settings():
    rows = [_row("iid", 8.0, 1, 0.80, 0.6, shrink="a"), _row("iid", 8.0, 1, 0.83, 0.7, shrink="b"),
            _row("iid", 8.0, 2, 0.90, 0.8, shrink="a"), _row("iid", 8.0, 2, 0.91, 0.9, shrink="b"),
            _row("iid", 1.0, 1, 0.50, 0.3, shrink="a"), _row("iid", 1.0, 1, 0.40, 0.3, shrink="b")]
    text = paired_table(rows, "shrink", "a", "b")
    lines = text.splitlines()
    assert lines[2] == "| iid | 8 | 0.850 (0.700) | 0.870 (0.800) | +2.0 ± 1.4 | +10.0 ± 0.0 | 2 |"
    assert lines[3] == "| iid | 1 | 0.500 (0.300) | 0.400 (0.300) | -10.0 ± 0.0 | +0.0 ± 0.0 | 1 |"
    assert "Mean Δ over the 2 settings: -2.00 points" in text  # (3 + 1 - 10) / 3 seeds-pairs
    assert "ε = 8: +2.00, ε = 1: -10.00." in text  # (3 + 1) / 2 and -10 / 1
    with pytest.raises(ValueError, match="not an axis"):
        paired_table(rows, "seedless", "a", "b")
    with pytest.raises(ValueError, match="both"):
        paired_table(rows, "shrink", "a", "c")


def test_gaps_name_the_best_other_method_and_the_best_worst_decile():
    rows = [_row("iid", 8.0, 1, 0.90, 0.80, method="fedmoe"),
            _row("iid", 8.0, 1, 0.92, 0.70, method="fedavg"),
            _row("iid", 8.0, 1, 0.85, 0.85, method="local")]
    lines = gaps_table(rows).splitlines()
    assert lines[2] == "| iid | 8 | 0.900 (0.800) | fedavg 0.920 | -2.0 | -5.0 |"


def test_where_keeps_the_runs_of_one_axis_value_and_names_a_bad_one(tmp_path, capsys):
    from simulations.experiment import CSV, write_csv
    from simulations.paired import where

    rows = [_row("iid", 8.0, 1, 0.80, 0.6, method="fedmoe", ema="0"),
            _row("iid", 8.0, 1, 0.84, 0.6, method="fedmoe", ema="0.5"),
            _row("iid", 8.0, 1, 0.70, 0.5, method="fedavg", ema="0"),
            _row("iid", 8.0, 1, 0.60, 0.5, method="fedavg", ema="0.5")]
    assert where(rows, ["method=fedavg"]) == rows[2:]
    assert where(rows, ["method=fedmoe", "ema=0.5"]) == [rows[1]]
    for bad, match in [("method", "write AXIS=VALUE"), ("seed=1", "not an axis"),
                       ("method=fedper", r"its values: \['fedavg', 'fedmoe'\]")]:
        with pytest.raises(ValueError, match=match):
            where(rows, [bad])
    write_csv(tmp_path / CSV, rows)
    assert main([str(tmp_path), "--axis", "ema", "--base", "0", "--variant", "0.5",
                 "--where", "method=fedmoe"]) == 0
    assert "Mean Δ over the 1 settings: +4.00 points" in capsys.readouterr().out
    assert main([str(tmp_path), "--gaps", "--where", "method=local"]) == 2
    assert "no run has method = 'local'" in capsys.readouterr().err


def test_the_command_needs_a_results_csv(tmp_path, capsys):
    assert main([str(tmp_path), "--gaps"]) == 2
    assert "results.csv" in capsys.readouterr().err


def test_against_pairs_two_folders_of_one_grid_by_setting_and_seed(tmp_path, capsys):
    from simulations.experiment import CSV, write_csv

    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    write_csv(before / CSV, [_row("iid", 8.0, 1, 0.80, 0.6), _row("iid", 8.0, 2, 0.90, 0.7),
                             _row("iid", 1.0, 1, 0.50, 0.3)])
    write_csv(after / CSV, [_row("iid", 8.0, 2, 0.93, 0.7), _row("iid", 8.0, 1, 0.81, 0.8),
                            _row("iid", 1.0, 1, 0.40, 0.3)])
    assert main([str(before), "--against", str(after), "--where", "split=iid"]) == 0
    out = capsys.readouterr().out
    assert "| iid | 8 | 0.850 (0.650) | 0.870 (0.750) | +2.0 ± 1.4 | +10.0 ± 14.1 | 2 |" in out
    assert "Mean Δ over the 2 settings: -2.00 points" in out  # (1 + 3 - 10) / 3 seed pairs
    assert main([str(before), "--against", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gaps_also_count_another_folders_baselines_not_its_fedmoe(tmp_path, capsys):
    from simulations.experiment import CSV, write_csv

    plain, centred = tmp_path / "plain", tmp_path / "centred"
    plain.mkdir()
    centred.mkdir()
    write_csv(plain / CSV, [_row("iid", 8.0, 1, 0.90, 0.80, method="fedmoe"),
                            _row("iid", 8.0, 1, 0.88, 0.70, method="fedavg"),
                            _row("iid", 1.0, 1, 0.70, 0.50, method="fedmoe"),
                            _row("iid", 1.0, 1, 0.60, 0.55, method="fedavg")])
    write_csv(centred / CSV, [_row("iid", 8.0, 1, 0.99, 0.99, method="fedmoe"),  # not counted
                              _row("iid", 8.0, 1, 0.93, 0.75, method="fedavg"),
                              _row("iid", 1.0, 1, 0.55, 0.40, method="fedavg")])
    assert main([str(plain), "--gaps", "--also", str(centred)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| iid | 8 | 0.900 (0.800) | fedavg@centred 0.930 | -3.0 | +5.0 |"
    assert lines[3] == "| iid | 1 | 0.700 (0.500) | fedavg 0.600 | +10.0 | -5.0 |"
    write_csv(centred / CSV, [{**_row("iid", 8.0, 1, 0.9, 0.8, method="fedavg"), "axis:q": "1"}])
    assert main([str(plain), "--gaps", "--also", str(centred)]) == 2
    assert "are not this grid's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(plain), "--also", str(centred)])  # --also goes with --gaps
