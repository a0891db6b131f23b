"""Reusing finished runs: only when they were trained with the same config."""
from __future__ import annotations

import dataclasses
import json

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
    config = json.loads((run / "config.json").read_text()) | {"epochs": 3}
    summary = json.loads((run / "metrics.json").read_text()) | {"diverged": "loss became nan at epoch 2, step 5"}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.json").write_text(json.dumps(summary))
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("a diverged run was trained again"))
    assert compare.run_compare(base, ["bp"], 1, tmp_path, resume=True).results["bp"] == [summary]
