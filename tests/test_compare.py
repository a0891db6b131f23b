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
