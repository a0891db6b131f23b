"""Reusing finished runs: only when they were trained with the same config."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ftprop.compare import _same_run
from ftprop.train import TrainConfig


def test_same_run_compares_configs_and_defaults_fields_added_later(tmp_path):
    cfg = TrainConfig(hidden="32", epochs=2, out=str(tmp_path))
    saved = dataclasses.asdict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert _same_run(tmp_path, dataclasses.replace(cfg, progress=False, out="elsewhere"))
    assert not _same_run(tmp_path, dataclasses.replace(cfg, lr=0.5))
    assert not _same_run(tmp_path, dataclasses.replace(cfg, epochs=3))
    assert _same_run(tmp_path, dataclasses.replace(cfg, epochs=3), ignore=("epochs",))
    del saved["seed"]  # a run written before a field existed was trained with its default
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert _same_run(tmp_path, cfg) and not _same_run(tmp_path, dataclasses.replace(cfg, seed=1))
    assert not _same_run(tmp_path / "missing", cfg)


def test_resume_reuses_a_run_that_diverged_instead_of_training_it_again(tmp_path, tiny, monkeypatch):
    import pytest

    from ftprop import compare

    base = TrainConfig(hidden="16", epochs=3, progress=False)
    compare.run_compare(dataclasses.replace(base, epochs=1), ["bp"], 1, tmp_path, resume=True)
    run = tmp_path / "bp-seed0"  # make it the record of a 3-epoch run that diverged in its second epoch
    config = json.loads((run / "config.json").read_text()) | {"epochs": 3, "machine": "another box"}
    summary = json.loads((run / "metrics.json").read_text()) | {"diverged": "loss became nan at epoch 2, step 5"}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(summary))
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("a diverged run was trained again"))
    reused = compare.run_compare(base, ["bp"], 1, tmp_path, resume=True)
    assert reused.results["bp"] == [summary]
    # the table names where the reused run was made, apart from the machine timing the step now
    assert reused.machines == ["another box"]
    assert "Runs made on: another box (1 run)." in (tmp_path / "table.md").read_text()


def _summary(acc: float, seconds: float) -> dict:
    return {"test_accuracy": acc, "best_val_accuracy": acc, "seconds_per_epoch": seconds, "diverged": None}


def _cost(ratio: float | None) -> dict:
    return {"flops_per_sample": 2e6, "peak_memory_bytes": 2**20, "ratio_to_bp": ratio, "rounds": 5,
            "steps_per_round": 10, "repeats": 3, "ratio_range": None if ratio in (None, 1.0) else (1.01, 1.12)}


def test_table_takes_time_over_bp_from_the_side_by_side_steps_not_from_the_runs_wall_time():
    """Runs reused from another session, or run beside other jobs, may differ 4x in wall time at equal work: the
    table's ratio must come from the benchmark that timed the rules together."""
    from ftprop.report import compare_table

    results = {"bp": [_summary(0.97, 10.0)], "ftp": [_summary(0.96, 40.0)]}
    table = compare_table(results, {"bp": _cost(1.0), "ftp": _cost(1.07)})
    header, _, bp_row, ftp_row = table.split("\n\n")[0].splitlines()
    assert "step time / BP" in header and "s / epoch (median, as run)" in header
    assert "| 40.00 | 1.070 (1.010-1.120) |" in ftp_row and "4.00" not in ftp_row and "| 10.00 | 1.000 |" in bp_row
    assert "side by side" in table.split("\n\n")[1] and "3 set(s) of fresh models" in table
    assert "5 rounds of 10 steps" in table
    untimed = compare_table(results, {"bp": _cost(None), "ftp": _cost(None)})
    assert "/ BP" in untimed and "step time / BP" not in untimed and "4.00" not in untimed
    assert "side by side" not in untimed


def test_compare_times_the_rules_side_by_side_except_under_simulated_hardware(tmp_path, tiny):
    from ftprop import compare

    base = TrainConfig(hidden="16", epochs=1, progress=False)
    timed = compare.run_compare(base, ["bp", "ftp"], 1, tmp_path / "float", resume=True)
    assert timed.costs["ftp"]["rounds"] == compare.TIMING_ROUNDS and timed.costs["ftp"]["ratio_to_bp"] > 0
    assert timed.costs["ftp"]["repeats"] == compare.TIMING_REPEATS
    assert "step time / BP" in timed.table()
    quantized = compare.run_compare(dataclasses.replace(base, quant="w8a8"), ["bp", "ftp"], 1, tmp_path / "q",
                                    resume=True)
    assert quantized.costs["ftp"]["ratio_to_bp"] is None and "step time / BP" not in quantized.table()


def test_resume_after_an_interrupted_rerun_with_another_config_trains_that_config(tmp_path, tiny, monkeypatch):
    """A rerun at lr 0.02 interrupted in its first epoch once left its config beside the lr 0.01 run's metrics.json,
    and the next `--resume` reported the lr 0.01 result as the lr 0.02 one."""
    import importlib

    import pytest

    from ftprop import compare

    train_mod = importlib.import_module("ftprop.train")
    base = TrainConfig(hidden="16", epochs=1, progress=False)
    old = compare.run_compare(base, ["bp"], 1, tmp_path, resume=True).results["bp"][0]
    real_evaluate = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compare.run_compare(dataclasses.replace(base, lr=0.02), ["bp"], 1, tmp_path, resume=True)
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    new = compare.run_compare(dataclasses.replace(base, lr=0.02), ["bp"], 1, tmp_path, resume=True).results["bp"][0]
    fresh = compare.run_compare(dataclasses.replace(base, lr=0.02), ["bp"], 1, tmp_path / "fresh").results["bp"][0]
    assert new["test_accuracy"] == fresh["test_accuracy"] != old["test_accuracy"]


def test_a_rule_config_naming_another_rule_is_refused(tmp_path):
    import pytest

    from ftprop.compare import load_rule_config, rule_config

    table, top = tmp_path / "table.toml", tmp_path / "top.toml"
    table.write_text('lr = 0.02\n[rule]\nname = "dfa"\n')
    top.write_text('lr = 0.02\nrule = "dfa"\n')
    for path in (table, top):
        with pytest.raises(ValueError, match=f"{path} names rule 'dfa', not 'ftp'"):
            load_rule_config(path, "ftp")
        assert rule_config(TrainConfig(), "dfa", load_rule_config(path, "dfa")).lr == 0.02  # its own rule: fine
    with pytest.raises(ValueError, match="names rule 'dfa'"):
        rule_config(TrainConfig(), "ftp", {"rule": "dfa"})


def test_compare_refuses_no_rules_and_a_rule_twice(tmp_path):
    import pytest

    from ftprop.compare import run_compare

    with pytest.raises(ValueError, match="--rules names no rule"):
        run_compare(TrainConfig(), [], 1, tmp_path)
    with pytest.raises(ValueError, match="--rules names bp more than once"):
        run_compare(TrainConfig(), ["bp", "ftp", "bp"], 1, tmp_path)


def test_table_without_a_validation_split_shows_no_best_val():
    from ftprop.report import compare_table

    runs = [_summary(0.9, 1.0) | {"best_val_accuracy": None}, _summary(0.8, 1.0) | {"best_val_accuracy": None}]
    row = compare_table({"bp": runs}).splitlines()[2]
    assert row.startswith("| bp | 85.00 ± 7.07 | - |")


def test_rule_config_options_are_checked_against_their_own_rule(tmp_path):
    """A [rule] table without a name holds the options of the rule it is given for (not of the default rule, FTP)."""
    import pytest

    from ftprop.compare import load_rule_config, repo_rule_configs
    from ftprop.rules import RULES

    assert set(repo_rule_configs(list(RULES))) >= {"pepita", "dfa", "ff"}  # the repository's own configs load
    toml = tmp_path / "pepita.toml"
    toml.write_text("[rule]\nf_scale = 0.05\n")
    assert load_rule_config(toml, "pepita")["rule"] == {"f_scale": 0.05}
    toml.write_text('[rule]\nf_scale = "big"\n')
    with pytest.raises(ValueError, match=f"{toml}: pepita: option f_scale must be a number, got 'big'"):
        load_rule_config(toml, "pepita")


def test_curves_leave_out_diverged_runs_as_the_table_does(tmp_path):
    """A seed that diverged in epoch 2 of 3 cut every seed's curve to one epoch and pulled the plotted mean away from
    the table's mean over the runs that finished; the curves now draw the finished runs, and say one was left out."""
    from ftprop import report

    def run(accs: list[float]) -> list[dict]:
        return [{"epoch": i + 1, "test_accuracy": a, "train_loss": 1.0 / (i + 1)} for i, a in enumerate(accs)]

    histories = {"bp": [run([0.5, 0.6, 0.7]), run([0.5, 0.7, 0.9]), run([0.1])]}
    results = {"bp": [_summary(0.7, 1.0), _summary(0.9, 1.0), {**_summary(0.1, 1.0), "diverged": "loss became nan"}]}
    curve = report.curve_series(histories, results)["bp"]
    assert curve["epochs"] == [1, 2, 3] and curve["label"] == "bp (2 seeds; 1 diverged, not shown)"
    mean, lo, hi = curve["test_accuracy"]
    assert mean[-1] == pytest.approx(80.0) and (lo[-1], hi[-1]) == pytest.approx((70.0, 90.0))
    assert f"{mean[-1]:.2f} ± " in report.compare_table(results)  # the table's mean over the same runs
    assert report.curve_series({"bp": [run([0.1])]}, {"bp": [results["bp"][2]]}) == {}  # all diverged: no curve
    report.plot_curves(histories, tmp_path / "curves.png", "t", results)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_accuracy_cells_show_a_spread_only_over_several_runs():
    """Mean ± sample std over seeds; one run has no spread, and '± 0.00' read as a measured spread of zero."""
    from ftprop import report
    assert report.pct([0.9, 0.92, 0.94]) == "92.00 ± 2.00"
    assert report.pct([0.9608]) == "96.08 (1 run)"
    assert report.spread([0.5, 0.5], digits=4) == "0.5000 ± 0.0000"  # two equal runs: a real zero spread
    assert report.compare_table({"bp": [{"test_accuracy": 0.97, "best_val_accuracy": 0.975, "diverged": False,
                                         "seconds_per_epoch": 1.0}]}).count("97.00 (1 run)") == 1
