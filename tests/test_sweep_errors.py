"""Bad input to `tunelab sweep` / `tunelab recommend`: one line `error: ...` on stderr, exit code 2, no
traceback, and nothing on disk created or changed (the folder hashes the same before and after)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, run_cli_output
from tunelab.hpsearch.store import ResultsStore

GRID_CSV = "config,dataset,score,train.lr\nc1,a,0.9,1e-4\nc2,a,0.5,5e-4\n"


def _digest(path: Path) -> str:
    return "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` with its sha256: what a failed command must not change."""
    return {str(path.relative_to(folder)): _digest(path) for path in sorted(folder.rglob("*"))}


def _error_line(capsys, folder: Path, args: list[str]) -> str:
    """Run a command that must fail; check the README's promise and return its one error line."""
    before = _tree(folder)
    code, stderr = run_cli(capsys, *args)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert _tree(folder) == before, "the failed command changed files on disk"
    return lines[0]


def _tunelab_db(path: Path, trials: int = 1) -> Path:
    with ResultsStore(path) as store:
        for i in range(trials):
            store.record(f"c{i}", {"train": {"lr": 1e-4}, "padding": "x" * 500}, "add", "loss", 1.0)
    return path


def _not_sqlite(path: Path) -> Path:
    path.write_text("config,dataset,score\n")
    return path


def _truncated(path: Path) -> Path:
    data = _tunelab_db(path.with_name("whole.sqlite"), trials=200).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _other_sqlite(path: Path) -> Path:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    return path


def _empty(path: Path) -> Path:
    path.touch()
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_not_sqlite, "is not a tunelab results database (SQLite: file is not a database)"),
        (_truncated, "is not a tunelab results database (SQLite: database disk image is malformed)"),
        (_other_sqlite, "is not a tunelab results database (it has no 'trials' table)"),
        (Path, "--db: file not found"),  # missing: and no empty database may be created
        (_folder, "is a folder, not a file"),
    ],
)
def test_recommend_db_that_is_no_results_database(tmp_path, capsys, make, message):
    db = make(tmp_path / "results.sqlite")
    line = _error_line(capsys, tmp_path, ["recommend", "--db", str(db)])
    assert message in line and str(db) in line
    assert "`tunelab sweep` writes" in line  # what to pass instead


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.csv", b"config,dataset,score\nc1,caf\xe9,0.9\n", "latin1.csv:2: not UTF-8 text (byte 0xe9)"),
        ("cells.csv", b"config,dataset,score\nc1,a,0.9,7\n", "cells.csv:2: more cells than the header's 3"),
        ("semicolon.csv", b"config;dataset;score\nc1;a;0.9\n", "looks separated by ';'"),
        ("blank.csv", b"config,dataset,score\n,a,0.9\n", "blank.csv (row 2): empty config or dataset"),
        ("broken.parquet", b"PAR1 not parquet", "broken.parquet: cannot read as parquet"),
    ],
)
def test_recommend_unreadable_results_table(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    line = _error_line(capsys, tmp_path, ["recommend", "--results", str(tmp_path / name)])
    assert message in line


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--json", "{file}/ranking.json"], "--json {file}/ranking.json: {file} is a file, not a folder"),
        (["--json", "{tmp}"], "--json {tmp} is a folder; give a file path"),
        (["--write-config", "{file}"], "--write-config {file} is a file, not a folder"),
        (["--out", "{file}/plots"], "--out {file}/plots: {file} is a file, not a folder"),
        # a config that is no train config is found before the plot, JSON or any YAML is written
        (
            ["--results", "{extra}", "--json", "{tmp}/r.json", "--write-config", "{tmp}/cfg"],
            "unknown key 'notes'",
        ),
    ],
)
def test_recommend_outputs_checked_before_any_work(tmp_path, capsys, options, message):
    (tmp_path / "grid.csv").write_text(GRID_CSV)
    (tmp_path / "extra.csv").write_text("config,dataset,score,notes\nc1,a,0.9,fine\n")
    (tmp_path / "file").write_text("not a folder")
    paths = {"tmp": tmp_path, "file": tmp_path / "file", "extra": tmp_path / "extra.csv"}
    source = [] if "--results" in options else ["--results", str(tmp_path / "grid.csv")]
    args = ["recommend", *source, *(option.format(**paths) for option in options)]
    assert message.format(**paths) in _error_line(capsys, tmp_path, args)


def _failed_trials_only(path: Path) -> Path:
    with ResultsStore(path) as store:
        store.record(
            "c0", {"train": {"lr": 1e-4}}, "add", "loss", None, status="failed", error="add.jsonl:3: bad"
        )
    return path


@pytest.mark.parametrize("spec_beside", [False, True])
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (Path, "--db: file not found: {db}"),
        (_empty, "{db} holds no trials yet; run `tunelab sweep` first"),
        (
            _failed_trials_only,
            "no trial in {db} has finished; the latest failed with: add.jsonl:3: bad; fix that, then run ",
        ),
    ],
)
def test_recommend_a_sweep_that_has_no_finished_trial_says_so(tmp_path, capsys, spec_beside, make, message):
    """No config to start from (not a ranking of nothing but failures), and how to go on."""
    db = make(tmp_path / "grid.sqlite")
    if spec_beside:  # as `tunelab sweep grid.yaml` names its database: the fix is to run that
        (tmp_path / "grid.yaml").write_text("datasets: []\n")
        message = {
            Path: "--db {db} does not exist yet: no trial of {spec} has finished; run tunelab sweep {spec}",
            _empty: "{db} holds no trials yet; run tunelab sweep {spec}",
        }.get(make, message + "tunelab sweep {spec}")
    line = _error_line(capsys, tmp_path, ["recommend", "--db", str(db)])
    assert message.format(db=db, spec=tmp_path / "grid.yaml") in line


def test_a_config_whose_every_trial_failed_is_marked_in_the_ranking(tmp_path, capsys):
    db = _failed_trials_only(tmp_path / "grid.sqlite")  # c0 failed
    with ResultsStore(db) as store:
        store.record("c1", {"train": {"lr": 1e-3}}, "add", "loss", 1.5, test_score=1.6)
    code, out, err = run_cli_output(capsys, "recommend", "--db", str(db))
    assert code == 0, err
    rows = {line.split()[3]: line for line in out.splitlines() if line.startswith(("│ 1 ", "│ 2 "))}
    assert "(every trial failed)" in rows["c0"] and "failed" not in rows["c1"]
    # test s/best, the last column: a failed config has none, rather than a score of 0
    assert rows["c0"].split("│")[-2].strip() == "-" and rows["c1"].split("│")[-2].strip() == "1.000"


@pytest.mark.parametrize("make", [Path, _empty, _failed_trials_only])
def test_recommend_while_a_sweep_runs_into_the_database_says_to_wait_for_it(tmp_path, capsys, make):
    """Not "run tunelab sweep", which the running sweep's lock refuses."""
    from tunelab.rundir import sweep_lock

    db, spec = make(tmp_path / "grid.sqlite"), tmp_path / "grid.yaml"
    spec.write_text("datasets: []\n")
    with sweep_lock(tmp_path / "grid-runs"):
        line = _error_line(capsys, tmp_path, ["recommend", "--db", str(db)])
    pid = os.getpid()
    waiting = f"recommend again once the tunelab sweep running into it (pid {pid}) has finished a trial"
    assert line.endswith(waiting) and "run tunelab sweep" not in line
    line = _error_line(capsys, tmp_path, ["recommend", "--db", str(db)])  # once it has ended
    assert line.endswith(f"run tunelab sweep {spec}")


@contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only: a read-only bind mount over it as root (whom file modes do not stop), else its
    mode; skips the test where neither works."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    try:
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", folder]).returncode:
            pytest.skip("cannot make a read-only folder here (needs a bind mount as root)")
        yield
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=True)


@pytest.mark.parametrize("sweep_running", [False, True])
def test_recommend_reads_a_database_in_a_folder_it_cannot_write(tmp_path, capsys, sweep_running):
    """A sweep's database on a read-only mount, or in a colleague's folder: SQLite cannot create the
    shared-memory file it reads a WAL database through. While a sweep still writes it (or one was killed),
    its latest results are in the write-ahead log beside it, which must be read too."""
    shared = tmp_path / "shared"
    shared.mkdir()
    store = ResultsStore(shared / "grid.sqlite")
    store.record("c0", {"train": {"lr": 1e-4}}, "add", "loss", 1.5)
    if not sweep_running:
        store.close()
    try:
        assert (shared / "grid.sqlite-wal").exists() == sweep_running
        with _read_only(shared):
            assert not os.access(shared, os.W_OK)
            code, out, err = run_cli_output(
                capsys, "recommend", "--db", str(shared / "grid.sqlite"), "--out", str(tmp_path)
            )
            # without --out the plots have nowhere to go: the tables show all the same
            plotless = run_cli_output(capsys, "recommend", "--db", str(shared / "grid.sqlite"))
    finally:
        store.close()
    assert code == 0, err
    assert "c0" in out and "coverage curve: " in out
    assert plotless[0] == 0 and "c0" in plotless[1] and "coverage curve" not in plotless[1]
    assert f"plots not drawn: cannot write in {shared}; give --out DIR to draw them there" in " ".join(
        plotless[1].split()
    )


def test_recommend_never_replaces_a_written_config_that_was_edited(tmp_path, capsys):
    (tmp_path / "grid.csv").write_text(GRID_CSV)
    args = ["recommend", "--results", str(tmp_path / "grid.csv"), "--write-config", str(tmp_path / "cfg")]
    for _ in range(2):  # the same recommendation again: the same files, written again
        assert run_cli(capsys, *args)[0] == 0
    written = tmp_path / "cfg" / "cbs-1-c1.yaml"
    written.write_text(
        written.read_text().replace("YOUR_DATA.jsonl", "data/mine.jsonl")
    )  # as its comment says
    line = _error_line(capsys, tmp_path, args)
    assert line == (
        f"error: --write-config: {written} exists and differs from the config recommend writes (edited, or "
        "from another recommendation); move it, or choose another --write-config folder"
    )
    # another sweep's recommendation beside it: written, and the earlier configs named
    (tmp_path / "other.csv").write_text(GRID_CSV.replace("c1", "c3").replace("c2", "c4"))
    code, out, _ = run_cli_output(capsys, *args[:2], str(tmp_path / "other.csv"), *args[3:])
    assert code == 0
    earlier = "2 config(s) of an earlier recommendation (cbs-1-c1.yaml, cbs-2-c2.yaml)"
    assert f"note: {tmp_path / 'cfg'} also holds {earlier}" in " ".join(out.split())


def test_recommend_creates_missing_output_folders(tmp_path, capsys):
    (tmp_path / "grid.csv").write_text(GRID_CSV)
    new = tmp_path / "new" / "deeper"
    args = ["--json", str(new / "r.json"), "--write-config", str(new / "cfg"), "--out", str(new / "plots")]
    code, stderr = run_cli(capsys, "recommend", "--results", str(tmp_path / "grid.csv"), *args)
    assert code == 0, stderr
    assert (new / "r.json").is_file() and (new / "plots" / "grid-coverage.png").is_file()
    assert sorted(path.name for path in (new / "cfg").iterdir()) == ["cbs-1-c1.yaml", "cbs-2-c2.yaml"]


def _no_trials(monkeypatch) -> None:
    from tunelab.hpsearch import commands

    def no_trials(*args, **kwargs):  # a check that let the sweep through fails fast, without training
        raise AssertionError("the sweep started its trials")

    monkeypatch.setattr(commands, "run_local", no_trials)
    monkeypatch.setattr(commands, "run_ray", no_trials)


def _without_ray(monkeypatch) -> None:
    """Ray as if not installed (it is in the dev environment)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )


@pytest.mark.parametrize(
    ("train", "options", "message"),
    [
        (
            "{tmp}/missing.jsonl",
            [],
            "{spec}: dataset 'add' train: dataset not found: '{tmp}/missing.jsonl' is neither a file, a "
            "folder, a hub id (owner/name) nor",
        ),
        ("{tmp}/rows.txt", [], "{spec}: dataset 'add' train: {tmp}/rows.txt: unsupported file type '.txt'"),
        ("addition:val", [], "{spec}: dataset 'add' train: dataset 'addition:val': unknown split 'val'"),
        ("addition:train", ["--executor", "ray"], "pip install 'tunelab[ray]'"),
        (
            "addition:train",
            ["--db", "{tmp}/other.sqlite"],
            "other.sqlite is not a tunelab results database (it has no 'trials' table); give --db a new file",
        ),
        ("addition:train", ["--db", "{tmp}/rows.txt/r.sqlite"], "rows.txt is a file, not a folder"),
        ("addition:train", ["--db", "{tmp}/taken.sqlite"], "runs folder {tmp}/taken-runs is a file"),
    ],
)
def test_sweep_fails_before_writing_anything(tmp_path, monkeypatch, capsys, train, options, message):
    _no_trials(monkeypatch)
    _without_ray(monkeypatch)
    (tmp_path / "rows.txt").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (tmp_path / "taken-runs").write_text("a file where the runs folder would go")
    _other_sqlite(tmp_path / "other.sqlite")
    spec = tmp_path / "sweep.yaml"
    paths = {"tmp": tmp_path, "spec": spec}
    dataset = {"name": "add", "train": train.format(**paths), "eval": "addition:eval", "metric": "loss"}
    spec.write_text(yaml.safe_dump({"grid": {"train.lr": [1e-4, 1e-3]}, "datasets": [dataset]}))
    args = ["sweep", str(spec), *(option.format(**paths) for option in options)]
    line = _error_line(capsys, tmp_path, args)  # no database, no runs folder, no trial
    assert message.format(**paths) in line


@pytest.mark.parametrize("model", ["./modles/tiny", "smollm2-13m", "models/tinny"])
def test_a_mistyped_model_stops_the_sweep_before_its_trials(tmp_path, monkeypatch, capsys, model):
    """Also a name that could be a hub id (models/tinny beside models/tiny), when no hub can be reached."""
    from huggingface_hub import constants

    from tunelab.hpsearch import commands

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(commands, "run_local", lambda *args, **kwargs: pytest.fail("a trial started"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    spec = tmp_path / "sweep.yaml"
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    spec.write_text(
        yaml.safe_dump({"base": {"model": model}, "grid": {"train.lr": [1e-4]}, "datasets": [dataset]})
    )
    line = _error_line(capsys, tmp_path, ["sweep", str(spec)])  # nothing written
    assert line.startswith(f"error: {spec}: model not found: {model}") and "did you mean" in line


def test_a_model_written_relative_to_the_spec_says_models_are_read_from_the_working_directory(
    tmp_path, monkeypatch, capsys
):
    """A train config's model path, which worked next to it, fails in a sweep spec: say why, and what
    works. (Datasets are read from beside the spec, as a train config's are: below.)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "sweeps").mkdir()
    spec = Path("sweeps/sweep.yaml")
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    spec.write_text(yaml.safe_dump({"base": {"model": "../models/tiny"}, "datasets": [dataset]}))
    line = _error_line(capsys, tmp_path, ["sweep", str(spec)])
    assert line.endswith(
        "; paths in a spec are relative to the working directory, not the spec: use models/tiny"
    )


def test_a_specs_datasets_are_read_from_its_folder_or_else_the_working_directory(
    tmp_path, monkeypatch, capsys
):
    """As a train config's paths are; a spec written for the working directory (as before) still works."""
    from tunelab.hpsearch.spec import load_spec

    _no_trials(monkeypatch)
    (tmp_path / "sweeps" / "data").mkdir(parents=True)
    (tmp_path / "sweeps" / "data" / "add.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n' * 4)
    (tmp_path / "other.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n' * 4)
    spec = tmp_path / "sweeps" / "sweep.yaml"
    datasets = [
        {"name": "add", "train": "data/add.jsonl", "holdout": 0.5, "metric": "loss"},
        {"name": "other", "train": "other.jsonl", "eval": "addition:eval", "metric": "loss"},
    ]
    spec.write_text(yaml.safe_dump({"base": {"model": "smollm2-135m"}, "datasets": datasets}))
    monkeypatch.chdir(tmp_path)
    loaded = load_spec("sweeps/sweep.yaml")
    assert [(d.train, d.eval) for d in loaded.datasets] == [
        (str(tmp_path / "sweeps" / "data" / "add.jsonl"), None),
        ("other.jsonl", "addition:eval"),
    ]
    with pytest.raises(AssertionError, match="the sweep started its trials"):  # every check passed
        run_cli(capsys, "sweep", "sweeps/sweep.yaml")


def test_sweep_checks_its_confirmation_seeds_before_the_grid(tmp_path, monkeypatch, capsys):
    from tunelab.hpsearch import commands

    def no_trials(*args, **kwargs):
        raise AssertionError("the sweep started its trials")

    monkeypatch.setattr(commands, "run_local", no_trials)
    spec = tmp_path / "sweep.yaml"
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    # 42 is the default train.seed, which every grid point already trains with
    spec.write_text(
        yaml.safe_dump({"grid": {"train.lr": [1e-4]}, "confirm_seeds": [42], "datasets": [dataset]})
    )
    line = _error_line(capsys, tmp_path, ["sweep", str(spec)])
    assert "'confirm_seeds' lists seed 42, the train.seed every point already trains with" in line


def test_sweep_creates_its_database_with_the_first_result(tmp_path, monkeypatch, capsys):
    """No empty database before a trial finished (a sweep stopped earlier leaves none); resume still works."""
    from tunelab.hpsearch import commands
    from tunelab.hpsearch.executors import TrialResult

    spec = tmp_path / "sweep.yaml"
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    spec.write_text(yaml.safe_dump({"grid": {"train.lr": [1e-4, 1e-3]}, "datasets": [dataset]}))
    started: list[int] = []

    def fake_run_local(trials, work_dir, on_result, max_parallel, on_start=None, processes=None):
        if not started:  # the first run: nothing written before the first result
            assert not (tmp_path / "sweep.sqlite").exists()
        trials = list(trials)
        started.append(len(trials))
        for trial in trials:
            row = {"rank": None, "score": 1.0, "test_score": 1.0}
            on_result(trial, TrialResult(score=1.0, rows=[row], duration_s=0.1))

    monkeypatch.setattr(commands, "run_local", fake_run_local)
    for _ in range(2):
        code, stderr = run_cli(capsys, "sweep", str(spec))
        assert code == 0, stderr
    assert started == [2, 0]  # the second run found both trials done
    with ResultsStore(tmp_path / "sweep.sqlite", read_only=True) as store:
        assert [row["status"] for row in store.rows()] == ["done", "done"]


@pytest.mark.parametrize("parallel", [1, 2])
def test_trials_on_data_that_did_not_load_are_skipped(tmp_path, monkeypatch, capsys, parallel):
    """Every trial on the same model and data would load the model, then fail on the data the same way."""
    from tunelab.hpsearch import commands
    from tunelab.hpsearch.executors import TrialResult

    spec = tmp_path / "sweep.yaml"
    datasets = [
        {"name": name, "train": f"{name}:train", "eval": f"{name}:eval", "metric": "loss"}
        for name in ("addition", "reverse")
    ]
    spec.write_text(yaml.safe_dump({"grid": {"train.lr": [1e-4, 3e-4, 1e-3]}, "datasets": datasets}))
    ran = []

    def made_up_run_local(trials, work_dir, on_result, max_parallel, on_start=None, processes=None):
        queue, running = iter(trials), []  # `parallel` trials at once, as run_local runs them
        running += [trial for _, trial in zip(range(parallel), queue, strict=False)]
        for trial in running:
            on_start(trial, work_dir / f"{trial.run_name}.log")
        while running:  # addition's trials finish first: reverse's second starts before its first ends
            trial = next((each for each in running if each.dataset == "addition"), running[0])
            running.remove(trial)
            ran.append(trial.dataset)
            if trial.dataset == "reverse":
                on_result(trial, TrialResult(error="reverse:train row 3: bad", data_error=True))
            else:
                on_result(
                    trial, TrialResult(score=1.0, rows=[{"rank": None, "score": 1.0, "test_score": 1.0}])
                )
            following = next(queue, None)
            if following is not None:
                on_start(following, work_dir / f"{following.run_name}.log")
                running.append(following)

    monkeypatch.setattr(commands, "run_local", made_up_run_local)
    code, stderr = run_cli(capsys, "sweep", str(spec), "--max-parallel", str(parallel))
    stderr = " ".join(stderr.split())
    assert code == 1
    # with 2 at once, reverse's second trial had started before its first failed: only the third is skipped
    assert ran.count("reverse") == parallel and ran.count("addition") == 3
    others = "its other trial" if parallel == 2 else "its 2 other trials"
    assert (
        f"the data of reverse did not load; skipping {others} on this data: fix what the error says" in stderr
    )
    skipped = 3 - parallel
    assert f"done 3, failed {parallel}, remaining 0" in stderr
    told = f"{parallel} of {3 + parallel} trials failed, and {skipped} more on the same data were skipped"
    assert told in stderr


def test_a_finished_trial_is_not_trained_again_for_a_logging_key(tmp_path, monkeypatch, capsys):
    """Config ids hold every key: adding log_steps to the base re-ran every trial, to the same scores."""
    from tunelab.hpsearch import commands
    from tunelab.hpsearch.executors import TrialResult

    trained = []

    def made_up_run_local(trials, work_dir, on_result, max_parallel, on_start=None, processes=None):
        for trial in trials:
            trained.append(trial.config["train"]["lr"])
            on_result(trial, TrialResult(score=1.0, rows=[{"rank": None, "score": 1.0, "test_score": 1.0}]))

    monkeypatch.setattr(commands, "run_local", made_up_run_local)
    spec = tmp_path / "sweep.yaml"
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    sweep = {"base": {"train": {"max_steps": 5}}, "grid": {"train.lr": [1e-4]}, "datasets": [dataset]}
    spec.write_text(yaml.safe_dump(sweep))
    assert run_cli(capsys, "sweep", str(spec))[0] == 0
    sweep["base"]["train"] |= {"log_steps": 1, "save_steps": 2}
    sweep["base"]["train"] |= {"gradient_checkpointing": True, "gradient_checkpointing_every": 2}
    spec.write_text(yaml.safe_dump(sweep))
    line = _error_line(capsys, tmp_path, ["sweep", str(spec)])
    assert line == (
        f"error: {spec}: finished trials would train again only because train.gradient_checkpointing "
        "auto -> True, train.gradient_checkpointing_every 1 -> 2, train.log_steps 10 -> 1, "
        "train.save_steps 0 -> 2 changed; these keys change what a run logs, saves or "
        "holds in memory, not what it learns: set them back to keep the finished results, or give this "
        "sweep another --db"
    )
    sweep["grid"]["train.lr"].append(3e-4)  # a new trial next to the old one: the check is about the old
    sweep["base"]["train"] = {"max_steps": 5}
    spec.write_text(yaml.safe_dump(sweep))
    assert run_cli(capsys, "sweep", str(spec))[0] == 0
    sweep["base"]["train"]["max_steps"] = 6  # a change of what is learned: every trial trains again
    spec.write_text(yaml.safe_dump(sweep))
    assert run_cli(capsys, "sweep", str(spec))[0] == 0
    assert trained == [1e-4, 3e-4, 1e-4, 3e-4]


def test_tables_printed_into_a_pipe_keep_each_row_on_one_line(monkeypatch):
    """rich wraps at 80 columns off a terminal: a ranking's hyperparameters column came out in 7-letter
    fragments in a log file."""
    import io
    import sys

    from tunelab.console import PIPED_WIDTH, stdout_console

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.delenv("COLUMNS", raising=False)
    assert stdout_console().width == PIPED_WIDTH
    monkeypatch.setenv("COLUMNS", "100")  # the user's own width wins
    assert stdout_console().width == 100


def test_a_trial_start_says_whether_it_evaluates_resumes_or_trains_anew(tmp_path, capsys):
    """What the trial process will do with the run it finds: a finished run on today's data is only
    evaluated, but a run on other data (a data file edited since) is trained anew."""
    from dataclasses import replace

    from tunelab.config import dump_config, validate
    from tunelab.hpsearch.commands import SweepProgress
    from tunelab.hpsearch.spec import Trial
    from tunelab.hpsearch.trial import data_marker

    trial = Trial("c0", "add", "loss", validate({}).model_dump(mode="json"), 1, data_sha256="today")
    run = tmp_path / "add" / "c0-s1"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(validate({})))
    log = run.with_name("c0-s1.log")
    progress = SweepProgress("sweep", [trial], 0, 1)
    for recorded, expected in [
        ("today", ", trained: evaluating: log"),
        ("before", ", its run trained on other"),
    ]:
        data_marker(run).write_text(recorded)
        capsys.readouterr()
        progress.start(trial, log)
        assert expected in " ".join(capsys.readouterr().err.split())
    progress.start(replace(trial, data_sha256=None), log)  # built-in data: no fingerprint, never stale
    assert "trained: evaluating" in capsys.readouterr().err


def test_a_mistyped_database_name_is_told_the_database_beside_it(tmp_path, capsys):
    """Not "no trial has finished; run tunelab sweep": the sweep's database is there, under its name."""
    (tmp_path / "grid.yaml").write_text("datasets: []\n")
    _empty(tmp_path / "grid.sqlite")
    code, err = run_cli(capsys, "recommend", "--db", str(tmp_path / "grid.sqllite"))
    assert code == 2 and f"did you mean {tmp_path / 'grid.sqlite'}?" in err


def test_a_datasets_rows_are_read_before_any_trial(tmp_path, monkeypatch, capsys):
    """A column mapping that names no column, or too few eval rows to split into dev and test, is found
    before the first trial, not when that dataset's first trial runs (after the others': hours)."""
    _no_trials(monkeypatch)
    csv = tmp_path / "qa.csv"
    csv.write_text("question,answer\n" + "".join(f"{a}+1?,{a + 1}\n" for a in range(10)))
    columns = {"instruction": "question", "output": "answer"}
    first = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    spec = tmp_path / "sweep.yaml"
    for qa, message in [
        (
            {"columns": {**columns, "instruction": "quesiton"}, "eval": str(csv)},
            f"{spec}: dataset 'qa': {csv}:1, its header: data.columns.instruction names column 'quesiton', "
            "which the data does not have (its columns: question, answer)",
        ),
        (
            {"columns": columns, "holdout": 0.05},
            f"{spec}: dataset 'qa': {csv} (data.holdout=0.05): 1 usable eval row cannot be split into dev "
            "and test halves; give at least 2, or the dataset a test set of its own (test:)",
        ),
    ]:
        dataset = {"name": "qa", "train": str(csv), "metric": "loss", **qa}
        spec.write_text(yaml.safe_dump({"grid": {"train.lr": [1e-4]}, "datasets": [first, dataset]}))
        assert message in _error_line(capsys, tmp_path, ["sweep", str(spec)])


def test_a_database_ranks_each_dataset_by_one_metric(tmp_path, monkeypatch, capsys):
    """A spec scoring a dataset by another metric than the database's results is refused before any
    trial; a database that has both already (from an older tunelab) says which rows to remove."""
    _no_trials(monkeypatch)
    db = tmp_path / "sweep.sqlite"
    with ResultsStore(db) as store:
        for i in range(3):
            store.record(f"c{i}", {"train": {"lr": 1e-4 * (i + 1)}}, "add", "loss", 1.0 + i)
    spec = tmp_path / "sweep.yaml"
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "exact_match"}
    spec.write_text(yaml.safe_dump({"grid": {"train.lr": [1e-4]}, "datasets": [dataset]}))
    assert (
        f"error: {db}: dataset 'add' has results there scored by loss, and this spec scores it by "
        "exact_match; recommend ranks a dataset by one metric: use metric: loss, name the dataset otherwise, "
        "or give this sweep another --db"
    ) == _error_line(capsys, tmp_path, ["sweep", str(spec)])
    with ResultsStore(db) as store:
        store.record("c9", {"train": {"lr": 1e-2}}, "add", "exact_match", 0.5)
    assert (
        f"{db}: dataset 'add' has results scored by loss (3 trials) and exact_match (1 trial), and a dataset "
        f"is ranked by one metric; remove the others' rows, e.g. sqlite3 {db} \"DELETE FROM trials WHERE "
        "dataset = 'add' AND metric = 'exact_match'\""
    ) in _error_line(capsys, tmp_path, ["recommend", "--db", str(db)])


def test_a_sweep_says_at_its_start_that_results_of_configs_not_in_its_spec_stay(
    tmp_path, monkeypatch, capsys
):
    _no_trials(monkeypatch)
    db = tmp_path / "sweep.sqlite"
    with ResultsStore(db) as store:
        store.record("c0", {"train": {"lr": 1e-4, "max_steps": 4}}, "add", "loss", 1.0)
    spec = tmp_path / "sweep.yaml"
    dataset = {"name": "add", "train": "addition:train", "eval": "addition:eval", "metric": "loss"}
    spec.write_text(yaml.safe_dump({"grid": {"train.lr": [1e-4]}, "datasets": [dataset]}))
    with pytest.raises(AssertionError, match="the sweep started its trials"):
        run_cli(capsys, "sweep", str(spec))
    assert (
        f"note: {db} holds finished results of 1 config this spec does not have (an earlier version of it, "
        "or another spec); they stay, and tunelab recommend ranks them beside this spec's, saying how many"
    ) in " ".join(capsys.readouterr().err.split())
