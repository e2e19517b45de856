"""`tunelab sweep` and `tunelab recommend` end to end on the tiny model: a sweep killed and resumed,
failed trials, the Ray executor on 2 local workers, recommend without torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import check_source, load_config
from tunelab.errors import DatasetNotFound, RunInterrupted, TunelabError
from tunelab.hpsearch.executors import trial_log
from tunelab.hpsearch.spec import expand, load_spec
from tunelab.hpsearch.store import ResultsStore
from tunelab.rundir import RunDir

ADD = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(2)]
REVERSE = [{"prompt": f"reverse {word}:", "completion": word[::-1]} for word in ("abc", "tune", "lab", "xyz")]
BAD = [*ADD[:3], {"prompt": "a row without its completion"}]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _spec(tmp: Path, model_dir: str, datasets: dict[str, tuple[list[dict], str]]) -> Path:
    """Two LoRA configs (lr) × `datasets` {name: (rows, metric)}, 2 optimizer steps each."""
    spec = {
        "base": {
            "model": model_dir,
            "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
            "data": {"max_length": 64},
            "train": {"max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0, "log_steps": 1},
        },
        "grid": {"train.lr": [1.0e-3, 1.0e-2]},
        "datasets": [
            {"name": name, "train": _jsonl(tmp / f"{name}.jsonl", rows), "eval": str(tmp / f"{name}.jsonl"),
             "metric": metric}
            for name, (rows, metric) in datasets.items()
        ],
    }  # fmt: skip
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(db: Path) -> dict[tuple[str, str], dict]:
    with ResultsStore(db) as store:
        return {(row["dataset"], row["config_id"]): row for row in store.rows()}


def _recorded(db: Path) -> int:
    """Trials in a database a running sweep writes; 0 until it exists with its table (a read between the
    file's creation and its table's gets 'no trials table')."""
    try:
        return len(_rows(db)) if db.is_file() else 0
    except TunelabError:
        return 0


def _process_list() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# one torch thread per trial: other work may share the cores, and oversubscribed torch threads run
# many times slower
TRIAL_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sweep_command(spec: Path, db: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "tunelab", "sweep", str(spec), "--db", str(db), *options]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_model_dir):
    """A sweep of 2 configs × (add, rev, bad) killed with SIGKILL once 3 trials are recorded, then re-run.
    bad's data does not load: once one trial on it fails, the other is skipped."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = _spec(
        tmp, tiny_model_dir, {"add": (ADD, "exact_match"), "rev": (REVERSE, "loss"), "bad": (BAD, "loss")}
    )
    db = tmp / "results.sqlite"
    sweep = subprocess.Popen(
        _sweep_command(spec, db), env=TRIAL_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while _recorded(db) < 3:
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before 3 trials"
        time.sleep(0.2)
    sweep.send_signal(signal.SIGKILL)  # mid-way through the 4th trial
    sweep.wait()
    # its watcher looks every second, but needs the GIL, which a C call (an import, a tokenizer) can hold
    # for seconds on 2 busy cores
    orphan_ended = _wait_until(lambda: str(tmp) not in _process_list(), seconds=20)
    before = _rows(db)
    logs = {key: (tmp / "results-runs" / key[0] / f"{key[1]}-s42.log").stat().st_mtime_ns for key in before}
    resumed = subprocess.run(
        _sweep_command(spec, db), env=TRIAL_ENV, capture_output=True, text=True, timeout=300
    )
    after = _rows(db)
    return {"tmp": tmp, "db": db, "before": before, "logs": logs, "after": after, "resumed": resumed,
            "orphan_ended": orphan_ended}  # fmt: skip


def test_killed_sweep_resumes_without_rerunning_finished_trials(killed_and_resumed):
    before, after = killed_and_resumed["before"], killed_and_resumed["after"]
    assert len(before) == 3 and len(after) == 5  # bad's second trial skipped
    finished = [key for key, row in before.items() if row["status"] == "done"]
    assert len(finished) == 2
    for key in finished:  # the same row, the same run: not trained again
        assert after[key] == before[key]
        log = killed_and_resumed["tmp"] / "results-runs" / key[0] / f"{key[1]}-s42.log"
        assert log.stat().st_mtime_ns == killed_and_resumed["logs"][key]
    (failed_before,) = [key for key, row in before.items() if row["status"] == "failed"]
    assert after[failed_before]["duration_s"] != before[failed_before]["duration_s"]  # failed: tried again
    resumed = killed_and_resumed["resumed"]
    assert "6 trials, 2 already done, 4 to run" in resumed.stderr
    assert "done 4, failed 1, remaining 0" in resumed.stderr
    assert "the data of bad did not load; skipping its other trial on this data: fix what the error says" in (
        " ".join(resumed.stderr.split())
    )
    started = [line for line in resumed.stderr.splitlines() if line.startswith("started ")]
    assert len(started) == 3  # each trial that runs says so, and where its log is
    assert all(line.endswith("-s42.log") and "train.lr=" in line for line in started)


def test_killed_sweep_leaves_no_orphan_trial(killed_and_resumed):
    """The trial in flight when the sweep was killed ends with it (the trial process watches its parent)."""
    assert killed_and_resumed["orphan_ended"]


def test_failed_trials_are_recorded_and_the_others_finish(killed_and_resumed):
    after, resumed = killed_and_resumed["after"], killed_and_resumed["resumed"]
    assert resumed.returncode == 1 and "1 of 3 trials failed" in resumed.stderr
    for (dataset, _), row in after.items():
        if dataset == "bad":
            assert row["status"] == "failed" and row["score"] is None
            assert "has no 'completion' field" in row["error"]
        else:
            assert row["status"] == "done" and row["score"] is not None
            assert row["duration_s"] > 0 and row["peak_memory_bytes"] > 0 and row["finished_at"]
    # each trial's run and its ready-to-train config are kept under the sweep's work dir
    _, config_id = next(key for key in after if key[0] == "add")
    run_config = load_config(killed_and_resumed["tmp"] / "results-runs" / "add" / f"{config_id}-s42.yaml")
    assert run_config.output_dir.endswith(f"results-runs/add/{config_id}-s42")
    assert (Path(run_config.output_dir) / "final").is_dir()


def test_recommend_from_db_imports_no_torch(killed_and_resumed):
    tmp, db = killed_and_resumed["tmp"], killed_and_resumed["db"]
    script = textwrap.dedent(f"""
        import sys
        from tunelab.cli import app
        for args in (["--db", {str(db)!r}, "--json", {str(tmp / "ranking.json")!r},
                      "--write-config", {str(tmp / "configs")!r}],
                     ["--model", "llama-3-8b", "--method", "lora"]):
            try:
                app(["recommend", *args])
            except SystemExit as exit:
                assert not exit.code, exit.code
        assert "torch" not in sys.modules, "recommend imported torch"
    """)
    wide = {**os.environ, "COLUMNS": "200"}  # no wrapped table cells
    done = subprocess.run(
        [sys.executable, "-c", script], env=wide, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "CBS ranking of results.sqlite (2 configs x 3 datasets)" in done.stdout
    assert "train.lr" in done.stdout  # the swept key, shown for each config
    assert "no config covers:" in done.stdout and "bad" in done.stdout.split("no config covers:")[1]
    assert "5e-05" in done.stdout and "arXiv 2407.18990" in done.stdout  # the published Llama-3-8B LoRA
    ranking = json.loads((tmp / "ranking.json").read_text())
    assert set(ranking) == {"tau", "datasets", "ranking", "top_k_curve", "held_out_curve"}
    assert [entry["rank"] for entry in ranking["ranking"]] == [1, 2]
    first = ranking["ranking"][0]
    expected_keys = {"config", "covers", "mean_normalized", "covered_total", "coverage", "hyperparameters"}
    assert expected_keys <= set(first)
    covered = sorted(name for entry in ranking["ranking"] for name in entry["covers"])
    assert covered in (["add", "rev"], ["rev"])  # on add, exact match may be 0 for both configs
    assert len(ranking["top_k_curve"]) == 2 and ranking["top_k_curve"][1] >= ranking["top_k_curve"][0]
    assert (tmp / "results-coverage.png").stat().st_size > 0
    written = load_config(tmp / "configs" / f"cbs-1-{first['config']}.yaml")
    assert written.train.lr == first["hyperparameters"]["train.lr"]
    assert written.model == load_config(tmp / "results-runs" / "add" / f"{first['config']}-s42.yaml").model


def test_ray_executor_on_two_local_workers(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    spec = _spec(tmp_path, tiny_model_dir, {"add": (ADD, "exact_match")})
    # data paths relative to the sweep's working directory, though Ray runs trials elsewhere
    spec.write_text(spec.read_text().replace(f"{tmp_path}/add.jsonl", "add.jsonl"))
    done = subprocess.run(
        _sweep_command(
            spec, Path("ray.sqlite"), "--executor", "ray", "--max-parallel", "2", "--cpus-per-trial", "1"
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    started = [line for line in done.stderr.splitlines() if line.startswith("started add ")]
    assert len(started) == 2 and all(line.endswith("-s42.log") for line in started), done.stderr
    rows = list(_rows(tmp_path / "ray.sqlite").values())
    assert [row["status"] for row in rows] == ["done", "done"], [row["error"] for row in rows]
    first, second = sorted(rows, key=lambda row: row["started_at"])
    assert second["started_at"] < first["finished_at"]  # both workers ran at once
    for row in rows:  # Ray runs a trial in a directory of its own; its run still lands in the sweep's
        assert (tmp_path / "ray-runs" / "add" / f"{row['config_id']}-s{row['seed']}" / "final").is_dir()


def test_recommend_results_table(tmp_path):
    table = tmp_path / "grid.csv"
    table.write_text(
        "config,dataset,score,metric,train.lr,method.name,method.r\n"
        "c1,a,0.90,exact_match,1e-4,lora,8\nc1,b,2.0,loss,1e-4,lora,8\n"
        "c2,a,0.50,exact_match,5e-4,lora,16\nc2,b,1.0,loss,5e-4,lora,16\n"
    )
    result = CliRunner().invoke(
        app, ["recommend", "--results", str(table), "--top", "1", "--write-config", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    # each covers one dataset; c2 is first by mean s/best: (0.5 / 0.9 + 1) / 2 > (1 + 1.0 / 2.0) / 2
    assert "top-K covers" in result.output and "1/2" in result.output  # --top 1: the first row only
    written = load_config(tmp_path / "out" / "cbs-1-c2.yaml")
    assert (written.train.lr, written.method.r) == (5e-4, 16)
    assert not (tmp_path / "out" / "cbs-2-c1.yaml").exists()  # --top 1
    assert not (tmp_path / "grid-lr.png").exists()  # each arm tried one lr: no curve to draw


def test_recommend_names_an_arm_whose_best_lr_is_at_an_edge_and_plots_score_against_lr(tmp_path):
    table = tmp_path / "grid.csv"
    rows = [  # lora: best at its highest lr, 1e-3; full: best at its middle lr, 3e-5
        ("l1", 1e-4, "lora", 1.2), ("l2", 3e-4, "lora", 1.1), ("l3", 1e-3, "lora", 1.0),
        ("f1", 1e-5, "full", 1.3), ("f2", 3e-5, "full", 1.05), ("f3", 1e-4, "full", 1.15),
    ]  # fmt: skip
    table.write_text(
        "config,dataset,score,metric,train.lr,method.name\n"
        + "".join(f"{config},a,{loss},loss,{lr},{method}\n" for config, lr, method, loss in rows)
    )
    result = CliRunner().invoke(app, ["recommend", "--results", str(table), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # as one line, whatever the terminal's width
    note = "note: lora is best at the highest lr it tried (0.0001, 0.0003, 0.001); its best may lie higher"
    assert note in output and "note: full" not in output
    assert "learning-rate curves: " in output
    assert (tmp_path / "out" / "grid-lr.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recommend"], "give one of"),
        (["recommend", "--model", "llama-3-8b"], "need both --model"),
        (["recommend", "--db", "nowhere.sqlite"], "file not found"),
        (["sweep", "SPEC", "--address", "ray://head:10001"], "--address is for --executor ray"),
        (["sweep", "SPEC_ACCURACY"], "metric accuracy, which sweep trials do not compute"),
    ],
)
def test_errors(tmp_path, args, message):
    datasets = "datasets: [{name: a, train: a.jsonl, eval: a.jsonl, metric: METRIC}]\n"
    (tmp_path / "spec.yaml").write_text(datasets.replace("METRIC", "loss"))
    (tmp_path / "accuracy.yaml").write_text(datasets.replace("METRIC", "accuracy"))
    paths = {"SPEC": str(tmp_path / "spec.yaml"), "SPEC_ACCURACY": str(tmp_path / "accuracy.yaml")}
    result = CliRunner().invoke(app, [paths.get(arg, arg) for arg in args])
    assert isinstance(result.exception, TunelabError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "spec.sqlite").exists()  # nothing ran


def test_dylora_ranks_and_seeds_become_rows_that_recommend_ranks_and_cross_validates(
    tmp_path, tiny_model_dir
):
    from typer.testing import CliRunner

    from tunelab.cli import app

    spec = {
        "base": {
            "model": tiny_model_dir,
            "method": {"name": "dylora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"max_length": 64},
            "train": {"max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0, "lr": 1e-2},
        },
        "datasets": [
            {"name": name, "train": _jsonl(tmp_path / f"{name}.jsonl", rows),
             "eval": str(tmp_path / f"{name}.jsonl"), "metric": "loss"}
            for name, rows in (("add", ADD), ("rev", REVERSE))
        ],
        "seeds": [1, 2],
        "ranks": [1, 4],
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    # each seed's trial tells itself apart, and says its score at each rank
    done = [line for line in result.output.splitlines() if " done " in line]
    scores = r"\(seed (\d)\): loss at rank 1 \d+\.\d{4}, 4 \d+\.\d{4} "
    assert {re.search(scores, line)[1] for line in done} == {"1", "2"}
    with ResultsStore(tmp_path / "sweep.sqlite") as store:
        rows = store.rows()
    # 2 trainings per dataset (seeds), each evaluated at 2 ranks: a row per rank, an id per rank
    assert len(rows) == 8 and {row["status"] for row in rows} == {"done"}
    by_rank = {row["rank"]: row["config_id"] for row in rows}
    assert set(by_rank) == {1, 4} and len(set(by_rank.values())) == 2
    assert all(row["config_id"] == by_rank[row["rank"]] and row["test_score"] > 0 for row in rows)
    assert all(row["config"]["method"]["rank"] == row["rank"] for row in rows)

    out = tmp_path / "recommend.json"
    configs = tmp_path / "configs"
    result = runner.invoke(
        app,
        ["recommend", "--db", str(tmp_path / "sweep.sqlite"), "--cross-validate", "--json", str(out),
         "--write-config", str(configs), "--top", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "start from config" in result.output and "held-out dataset" in result.output
    assert "dev: each dataset's eval set, where configs are chosen; test: its test set" in result.output
    assert "each arm at its best config" in result.output
    ranking = json.loads(out.read_text())
    assert len(ranking["held_out_curve"]) == 2 and ranking["held_out_curve"][-1] == pytest.approx(1.0)
    first = ranking["ranking"][0]
    assert first["seeds"] == {"add": 2, "rev": 2} and set(first["test"]) == {"add", "rev"}
    written = configs / f"cbs-1-{first['config']}.yaml"
    assert f"--rank {first['hyperparameters']['method.rank']}" in written.read_text().splitlines()[0]
    assert load_config(written).method.name == "dylora"  # method.rank is not a config key
    # two datasets: no data of the sweep's is the user's, and no default dataset is trained silently
    assert load_config(written).data.train == str(written.parent / "YOUR_DATA.jsonl")
    with pytest.raises(DatasetNotFound, match=r"is the placeholder `tunelab recommend --write-config`"):
        check_source(load_config(written).data.train)  # what training it as written says
    assert f"next: tunelab train {written} data.train=PATH/TO/your_data.jsonl" in result.output.replace(
        "\n", ""
    )


def test_confirm_seeds_train_each_arms_best_config_again(tmp_path, tiny_model_dir):
    path = _spec(tmp_path, tiny_model_dir, {"add": (ADD, "loss"), "rev": (REVERSE, "loss")})
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "seeds": [1], "confirm_seeds": [2]}))
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    with ResultsStore(tmp_path / "sweep.sqlite") as store:
        rows = store.rows()
    # one arm (LoRA; the lr is what it tunes): its best config has the highest mean over datasets of
    # best dev loss / its dev loss, worked out here from the seed-1 rows
    loss = {(row["config_id"], row["dataset"]): row["score"] for row in rows if row["seed"] == 1}
    configs, datasets = {c for c, _ in loss}, {d for _, d in loss}
    best_loss = {d: min(loss[c, d] for c in configs) for d in datasets}
    best = max(configs, key=lambda c: sum(best_loss[d] / loss[c, d] for d in datasets))
    assert sorted((row["config_id"], row["dataset"]) for row in rows if row["seed"] == 2) == [
        (best, "add"),
        (best, "rev"),
    ]
    assert "confirm each arm's best config with seeds 2: 2 trials, 0 already done, 2 to run" in result.output

    again = runner.invoke(app, ["sweep", str(path)])  # resumed: nothing left to train
    assert again.exit_code == 0 and "2 trials, 2 already done, 0 to run" in again.output
    result = runner.invoke(app, ["recommend", "--db", str(tmp_path / "sweep.sqlite")], env={"COLUMNS": "200"})
    lora_row = next(line for line in result.output.splitlines() if line.startswith("│ lora "))
    assert f"{best} train.lr=" in lora_row and re.search(r"│\s+2 │\s+±", lora_row)  # 2 seeds, their spread
    assert "provisional" not in result.output

    # the same sweep with one confirmation trial, or one grid trial, taken out of its database or failed
    # (without the first, the arm's best may change, and with it the trials confirming it: 0 or 1 of 2 done)
    partial = tmp_path / "partial"
    partial.mkdir()
    spec_copy, db_copy = shutil.copy(path, partial / "sweep.yaml"), partial / "sweep.sqlite"
    other_grid, three_done = (
        f"seed = 1 AND dataset = 'rev' AND config_id != '{best}'",
        f"3 of the 4 trials of {spec_copy} are done",
    )
    for change, expected in (
        ("DELETE FROM trials WHERE seed = 2 AND dataset = 'add'", f"the grid of {spec_copy} is done; "),
        (f"DELETE FROM trials WHERE {other_grid}", f"{three_done} ("),
        (f"UPDATE trials SET status = 'failed' WHERE {other_grid}", f"{three_done}, 1 failed ("),
    ):
        shutil.copy(tmp_path / "sweep.sqlite", db_copy)
        db = sqlite3.connect(db_copy)
        with db:
            db.execute(change)
        db.close()  # its write-ahead log folded in and gone before the next copy
        result = runner.invoke(app, ["recommend", "--db", str(db_copy)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        output = " ".join(result.output.split())  # wrapping aside
        assert "(2 configs x 2 datasets; provisional, the sweep is not finished)" in output
        assert f"provisional: {expected}" in output
        assert f"tunelab sweep {spec_copy} runs what is missing or failed" in output
        # the ranked config's result on rev is gone, deleted or failed: said, once, as the status is
        covering_nothing = "1 result of the ranked configs missing (failed or not run; a dylora trial gives"
        assert (covering_nothing in output) == ("rev" in change)
        confirming = re.search(
            r"(\d) of the 2 trials confirming each arm's best with more seeds (\w+) done", output
        )
        assert bool(confirming) == ("seed = 2" in change)
        if confirming:  # the verb agrees with the count
            assert confirming[2] == {"0": "are", "1": "is"}[confirming[1]]
    # the spec's grid narrowed after the sweep ran: the database's other config is ranked, and said to be
    shutil.copy(tmp_path / "sweep.sqlite", db_copy)
    narrowed = {**yaml.safe_load(path.read_text()), "grid": {"train.lr": spec["grid"]["train.lr"][:1]}}
    spec_copy.write_text(yaml.safe_dump(narrowed))
    result = runner.invoke(app, ["recommend", "--db", str(db_copy)], env={"COLUMNS": "200"})
    assert "(2 configs x 2 datasets" in result.output
    assert f"1 of the configs in {db_copy} is not in {spec_copy} (ranked too)" in " ".join(
        result.output.split()
    )
    # a spec beside the database that is not its sweep's: how much ran is not known
    spec_copy.write_text(yaml.safe_dump({**spec, "grid": {"train.lr": [0.5]}}))
    result = runner.invoke(app, ["recommend", "--db", str(db_copy)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "provisional" not in result.output
    assert f"note: no trial of {spec_copy} is in {db_copy}" in " ".join(result.output.split())
    spec_copy.write_text("grid: {train.lr: [1]}\n")
    result = runner.invoke(app, ["recommend", "--db", str(db_copy)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "provisional" not in result.output
    assert f"note: {spec_copy} does not load (" in " ".join(result.output.split())


def test_confirmation_follows_an_arms_best_config_as_new_seeds_move_it(tmp_path, tiny_model_dir, monkeypatch):
    """The confirm loop on made-up dev losses (the trial runner is replaced; nothing trains): lr 1e-3 is
    the best on seed 1, its seed 2 is poor, so lr 1e-2 becomes the arm's best and is confirmed too; then
    the best (1e-2, mean 1.15 against 1.5) has every seed and the sweep ends."""
    from tunelab.hpsearch import commands
    from tunelab.hpsearch.executors import TrialResult

    dev_loss = {(1e-3, 1): 1.0, (1e-2, 1): 1.2, (1e-3, 2): 2.0, (1e-2, 2): 1.1}
    trained = []

    def made_up_results(trials, work_dir, on_result, max_parallel, on_start=None, processes=None):
        for trial in trials:
            trained.append((trial.config["train"]["lr"], trial.seed))
            loss = dev_loss[trained[-1]]
            row = {"rank": None, "score": loss, "test_score": loss}
            on_result(trial, TrialResult(score=loss, rows=[row], step_time_s=0.1))

    monkeypatch.setattr(commands, "run_local", made_up_results)
    path = _spec(tmp_path, tiny_model_dir, {"add": (ADD, "loss")})
    spec = {**yaml.safe_load(path.read_text()), "seeds": [1], "confirm_seeds": [2]}
    spec["datasets"][0]["columns"] = {"prompt": "question", "completion": "answer"}  # how its file reads
    data = tmp_path / "add.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text(
        "".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows)
    )
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 0, result.output
    assert trained == [(1e-3, 1), (1e-2, 1), (1e-3, 2), (1e-2, 2)]
    assert "2 trials and 2 confirmations done" in result.output
    # a config written from a one-dataset sweep trains what its trials trained: that data, a trial's seed
    db, configs = tmp_path / "sweep.sqlite", tmp_path / "configs"
    result = CliRunner().invoke(
        app, ["recommend", "--db", str(db), "--top", "1", "--write-config", str(configs)]
    )
    assert result.exit_code == 0, result.output
    (written,) = configs.glob("cbs-1-*.yaml")
    assert f"next: tunelab train {written}\n" in result.output
    first_line = written.read_text().splitlines()[0]
    assert first_line.startswith("# ranked 1 by CBS in sweep.sqlite (covers add); trains on the sweep's")
    assert first_line.endswith(
        "; train.max_steps 2 as the sweep's trials; set train.eval_steps to evaluate on data.eval while "
        "training, or run tunelab eval RUN after"
    )
    config = load_config(written)
    assert (config.train.lr, config.data.train) == (1e-2, str(tmp_path / "add.jsonl"))
    assert config.data.columns == {"prompt": "question", "completion": "answer"}
    assert config.train.seed in (1, 2)  # as one of its trials, not the default


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_trial_starts_only_after_the_one_it_replaces_is_recorded(tmp_path, monkeypatch, parallel):
    """With trials that end at once (the trial runner is replaced; nothing trains), the worker thread
    used to start the next trial while this thread was still recording the last: "started B" came
    before "done A". Now each start follows the result it waits for."""
    from tunelab.hpsearch import executors

    events = []
    monkeypatch.setattr(
        executors, "run_trial_process", lambda trial, *_, **__: executors.TrialResult(score=1.0)
    )
    trials = expand(load_spec(_trials_spec(tmp_path, "tiny", [1, 2, 3, 4, 5])[0]))
    executors.run_local(
        trials,
        tmp_path / "runs",
        on_result=lambda trial, result: events.append(("done", trial.run_name)),
        max_parallel=parallel,
        on_start=lambda trial, log: events.append(("started", trial.run_name)),
    )
    names = [trial.run_name for trial in trials]
    starts = [event for event in events if event[0] == "started"]
    assert starts == [("started", name) for name in names]  # in order, each once
    for index, name in enumerate(names[parallel:]):  # the trial after the first `parallel` ones waits
        assert events.index(("started", name)) > [i for i, e in enumerate(events) if e[0] == "done"][index]

    # stopped while recording the first result: no trial starts after it
    processes, started = executors.TrialProcesses(), []
    executors.run_local(
        trials,
        tmp_path / "runs",
        on_result=lambda trial, result: processes.stop(),
        max_parallel=parallel,
        on_start=lambda trial, log: started.append(trial.run_name),
        processes=processes,
    )
    assert started == names[:parallel]


def _trials_spec(tmp: Path, model_dir: str, steps: list[int], **train: Any) -> tuple[Path, list[Path]]:
    """A sweep of one LoRA trial per entry of `steps` (its max_steps) on `add`, with `train` settings, and
    their run folders in the order the sweep runs them."""
    path = _spec(tmp, model_dir, {"add": (ADD, "loss")})
    spec = yaml.safe_load(path.read_text())
    spec["grid"] = {"train.max_steps": steps}
    spec["base"]["train"].update(train)
    path.write_text(yaml.safe_dump(spec))
    return path, [Path(f"{tmp}/sweep-runs/add/{trial.run_name}") for trial in expand(load_spec(path))]


def _steps_logged(run: Path) -> list[int]:
    return [record["step"] for record in RunDir(run).metrics() if "loss" in record]


def test_a_sweep_whose_output_reader_is_gone_stops_as_at_sigterm(tmp_path, tiny_model_dir):
    """`tunelab sweep spec 2>&1 | head`, head exited: the next print raised BrokenPipeError in the sweep,
    which died without passing the stop on to its trials; now it stops as at SIGTERM (exit 130)."""
    spec, (run, _) = _trials_spec(tmp_path, tiny_model_dir, [2, 3])
    db = tmp_path / "sweep.sqlite"
    sweep = subprocess.Popen(
        _sweep_command(spec, db), env=TRIAL_ENV, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    sweep.stderr.readline()  # its first line (the note that add has no test set); then the reader goes
    sweep.stderr.close()
    assert sweep.wait(timeout=120) == 130
    assert not trial_log(run).exists() and not db.exists()  # found at its next line: no trial started


# how a stopped trial resumes does not depend on the signal that stopped it: resumed once; the group
# SIGTERM case runs two trials at once, both of which must save a checkpoint
@pytest.mark.parametrize(
    "stop, parallel, then_resume",
    [
        ("ctrl-c", 1, True),
        ("sigterm to the sweep alone", 1, False),
        ("sigterm to its process group", 2, False),
    ],
)
def test_a_stopped_sweep_resumes_its_running_trial_from_a_checkpoint(
    tmp_path, tiny_model_dir, stop, parallel, then_resume
):
    steps = 300
    spec, runs = _trials_spec(tmp_path, tiny_model_dir, [steps + i for i in range(parallel)] + [2])
    (*running, queued), run = runs, runs[0]
    db = tmp_path / "sweep.sqlite"
    # a session of its own: the signals go to the sweep and its trial, not to the test runner
    sweep = subprocess.Popen(
        _sweep_command(spec, db, "--max-parallel", str(parallel)),
        env=TRIAL_ENV,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    training = lambda: all(len(_steps_logged(r)) >= 3 for r in running)  # noqa: E731
    assert _wait_until(lambda: training() or sweep.poll() is not None, seconds=120)
    if then_resume:  # the same sweep started again meanwhile would train the same trials: refused
        again = CliRunner().invoke(app, ["sweep", str(spec), "--db", str(db)])
        assert f"is in use by another tunelab sweep (pid {sweep.pid})" in str(again.exception)
    if stop == "sigterm to the sweep alone":
        sweep.send_signal(signal.SIGTERM)
    else:  # what a terminal's Ctrl-C, or a scheduler's SIGTERM, does
        os.killpg(sweep.pid, signal.SIGINT if stop == "ctrl-c" else signal.SIGTERM)
    stderr = sweep.communicate(timeout=120)[1]
    assert str(tmp_path) not in _process_list()  # the sweep ended after its trials, not before
    assert sweep.returncode == 130, stderr[-2000:]
    lr = load_config(run.with_name(f"{run.name}.yaml")).train.lr
    what = (
        f"{run.name.rsplit('-s', 1)[0]} (train.max_steps={steps} train.lr={lr}, seed 42)"  # what varies, lr
    )
    assert f"started add {what}" in stderr
    assert "stopping: no new trial starts, and each running trial saves a checkpoint" in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"sweep stopped; its finished trials are in {db}.")
    for each in running:
        last = _steps_logged(each)[-1]
        assert 3 <= last < steps and RunDir(each).latest_checkpoint().name == f"checkpoint-{last}"
    assert not trial_log(queued).exists()  # the next trial did not start
    assert not db.exists()  # no trial finished, so no database was created
    if not then_resume:
        return

    stopped_at = _steps_logged(run)[-1]
    first_attempt = json.loads(run.with_name(f"{run.name}.attempts.json").read_text())
    assert first_attempt["duration_s"] > 0 and first_attempt["peak_memory_bytes"] > 0
    resumed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    resumed = CliRunner().invoke(app, ["sweep", str(spec), "--db", str(db)])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    checkpoint = run / "checkpoints" / f"checkpoint-{stopped_at}"
    started = f"{what}, resuming from {checkpoint.name}"
    assert f"{started}: log" in " ".join(resumed.output.split())
    # the log keeps the stopped attempt's lines, and says where it stopped, above the next attempt's
    stopped, resuming = trial_log(run).read_text().split("\n--- attempt started ")
    assert f"interrupted at step {stopped_at}" in stopped and f"resuming from {checkpoint}" in resuming
    assert _steps_logged(run) == list(range(1, steps + 1))
    rows = _rows(db)
    assert [row["status"] for row in rows.values()] == ["done", "done"]
    # the resumed trial's row counts both attempts: it started before the resume, and took longer than
    # the first attempt alone; the record of earlier attempts is gone once the row is written
    (row,) = [row for (_, config_id), row in rows.items() if run.name.startswith(config_id)]
    assert row["started_at"] == first_attempt["started_at"] < resumed_at
    assert row["duration_s"] > first_attempt["duration_s"]
    assert row["peak_memory_bytes"] >= first_attempt["peak_memory_bytes"]
    assert not run.with_name(f"{run.name}.attempts.json").exists()


def test_a_trained_trial_that_was_not_recorded_is_evaluated_without_training_again(tmp_path, tiny_model_dir):
    spec, (run,) = _trials_spec(tmp_path, tiny_model_dir, [2])
    db = tmp_path / "sweep.sqlite"
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(spec)]).exit_code == 0
    (first,) = _rows(db).values()
    trained = (run / "final" / "trained.safetensors").stat().st_mtime_ns
    db.unlink()  # as if the sweep had stopped between the trial's training and its result
    assert runner.invoke(app, ["sweep", str(spec)]).exit_code == 0
    (again,) = _rows(db).values()
    assert (run / "final" / "trained.safetensors").stat().st_mtime_ns == trained
    assert "nothing to resume" in trial_log(run).read_text()
    assert (again["score"], again["test_score"]) == (first["score"], first["test_score"])


def test_results_on_data_since_edited_run_again(tmp_path, tiny_model_dir, monkeypatch):
    """A sweep re-run after its data file changed kept the old scores as done: now its trials run again."""
    spec, (run,) = _trials_spec(tmp_path, tiny_model_dir, [1])
    db = tmp_path / "sweep.sqlite"
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(spec)]).exit_code == 0
    (first,) = _rows(db).values()
    trained = (run / "final" / "trained.safetensors").read_bytes()
    again = runner.invoke(app, ["sweep", str(spec)])
    assert "1 trial, 1 already done, 0 to run" in again.output  # the same data: nothing to run
    assert "note: add has no test set: the eval rows are split in two by a fixed seed" in " ".join(
        again.output.split()
    )
    with open(tmp_path / "add.jsonl", "a") as data:  # a row added, as a user fixes their data
        data.write(json.dumps({"prompt": "3+3=", "completion": "6"}) + "\n")
    # before the sweep runs again, its result is not one to recommend from
    stale = runner.invoke(app, ["recommend", "--db", str(db)], env={"COLUMNS": "200"})
    assert " ".join(stale.output.split()) == (
        f"note: 1 result in {db} ran on data of add since edited: left out of the ranking; tunelab sweep "
        f"{spec} runs them again"
    )
    assert str(stale.exception) == f"every result in {db} ran on data since edited; run tunelab sweep {spec}"
    edited = runner.invoke(app, ["sweep", str(spec)])
    assert edited.exit_code == 0, edited.output
    output = " ".join(edited.output.split())
    assert "note: the data of add changed since 1 of its trials ran: they run again" in output
    assert "1 trial, 0 already done, 1 to run" in output
    (second,) = _rows(db).values()
    assert second["data_sha256"] != first["data_sha256"] and second["finished_at"] >= first["finished_at"]
    log = trial_log(run).read_text()
    assert log.count("--- attempt started") == 1
    # trained again, not only evaluated: the finished run in the trial's folder trained on the old data
    assert "the data changed since this trial's run trained: starting it over" in log
    assert "nothing to resume" not in log and (run / "final" / "trained.safetensors").read_bytes() != trained
    assert runner.invoke(app, ["recommend", "--db", str(db)]).exit_code == 0
    # a trial stopped as it starts over, before its training, leaves no old run under the new data's name
    import tunelab.train
    from tunelab.hpsearch.spec import data_fingerprint
    from tunelab.hpsearch.trial import data_marker, run_trial

    def stopped(*args, **kwargs):
        raise RunInterrupted("stopped")

    with open(tmp_path / "add.jsonl", "a") as data:  # edited once more
        data.write(json.dumps({"prompt": "4+4=", "completion": "8"}) + "\n")
    edited_data = data_fingerprint(load_spec(spec).datasets[0])
    with monkeypatch.context() as patched:
        patched.setattr(tunelab.train, "train", stopped)
        with pytest.raises(RunInterrupted):
            run_trial(run.with_name(f"{run.name}.yaml"), "loss", {"data_sha256": edited_data})
    assert not (run / "final").exists() and data_marker(run).read_text() == edited_data


def test_recommend_run_from_another_folder_does_not_call_the_data_edited(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A spec's data paths are read from the working directory: from elsewhere its files are not found,
    which is not the data having changed (its results were all left out as 'since edited')."""
    from tunelab.hpsearch import commands
    from tunelab.hpsearch.executors import TrialResult

    def made_up_results(trials, work_dir, on_result, max_parallel, on_start=None, processes=None):
        for trial in trials:
            row = {"rank": None, "score": trial.config["train"]["lr"], "test_score": 1.0}
            on_result(trial, TrialResult(score=row["score"], rows=[row], step_time_s=0.1))

    monkeypatch.setattr(commands, "run_local", made_up_results)
    monkeypatch.chdir(tmp_path)
    path = _spec(tmp_path, tiny_model_dir, {"add": (ADD, "loss")})
    spec = yaml.safe_load(path.read_text())
    spec["datasets"] = [{"name": "add", "train": "add.jsonl", "holdout": 0.5, "metric": "loss"}]
    path.write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(path)]).exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = runner.invoke(app, ["recommend", "--db", str(tmp_path / "sweep.sqlite")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "since edited" not in result.output and "(2 configs x 1 dataset)" in result.output


def test_results_on_edited_data_of_configs_the_spec_dropped_are_not_promised_a_rerun(
    tmp_path, tiny_model_dir, monkeypatch
):
    """recommend said `tunelab sweep` would run them again; the sweep runs only what its spec lists."""
    from tunelab.hpsearch import commands
    from tunelab.hpsearch.executors import TrialResult

    def made_up_results(trials, work_dir, on_result, max_parallel, on_start=None, processes=None):
        for trial in trials:
            row = {"rank": None, "score": trial.config["train"]["lr"], "test_score": 1.0}
            on_result(trial, TrialResult(score=row["score"], rows=[row], step_time_s=0.1))

    monkeypatch.setattr(commands, "run_local", made_up_results)
    path, db = _spec(tmp_path, tiny_model_dir, {"add": (ADD, "loss")}), tmp_path / "sweep.sqlite"
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(path)]).exit_code == 0  # lr 1e-3 and 1e-2
    with open(tmp_path / "add.jsonl", "a") as data:
        data.write(json.dumps({"prompt": "3+3=", "completion": "6"}) + "\n")
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "grid": {"train.lr": [1.0e-3, 3.0e-3]}}))  # 1e-2 dropped
    assert runner.invoke(app, ["sweep", str(path)]).exit_code == 0  # 1e-3 again, 3e-3 new
    result = runner.invoke(app, ["recommend", "--db", str(db)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert (
        f"note: 1 result in {db} ran on data of add since edited: left out of the ranking; 1 is of configs "
        f"{path} no longer lists, which it does not run"
    ) in output
    assert "(2 configs x 1 dataset" in output and "not in" not in output  # the stale config is not ranked


def test_an_eval_set_of_one_row_is_a_data_error_not_a_crash_nor_a_score(tmp_path, tiny_model_dir):
    """One eval row leaves the test half empty: exact match divided by zero, a loss of 0.0 was stored. (The
    sweep refuses a file of one row before any trial: here the second row's prompt fills max_length, so
    only the trial, tokenizing, finds one usable row.)"""
    spec, (run,) = _trials_spec(tmp_path, tiny_model_dir, [1])
    one_row = _jsonl(tmp_path / "one.jsonl", [ADD[0], {"prompt": "1+1= " * 100, "completion": "2"}])
    spec.write_text(spec.read_text().replace(str(tmp_path / "add.jsonl") + "\n", one_row + "\n", 1))
    assert yaml.safe_load(spec.read_text())["datasets"][0]["eval"] == one_row
    result = CliRunner().invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 1
    (row,) = _rows(tmp_path / "sweep.sqlite").values()
    assert row["status"] == "failed" and row["score"] is None
    assert row["error"] == (
        f"{one_row}: 1 usable eval row cannot be split into dev and test halves; give at least 2, or the "
        "dataset a test set of its own (test:)"
    )
    assert "Traceback" not in trial_log(run).read_text()


def test_a_trial_whose_checkpoint_does_not_load_starts_over(tmp_path, tiny_model_dir):
    spec, (run,) = _trials_spec(tmp_path, tiny_model_dir, [4], save_steps=2)
    runner = CliRunner()
    assert runner.invoke(app, ["sweep", str(spec)]).exit_code == 0
    # as if stopped after step 4's checkpoint, and that checkpoint then damaged on disk
    shutil.rmtree(run / "final")
    (tmp_path / "sweep.sqlite").unlink()
    checkpoint = RunDir(run).latest_checkpoint()
    for weights in checkpoint.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    result = runner.invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 0, result.output
    log = trial_log(run).read_text()
    assert f"resuming from {checkpoint}" in log and "starting this trial over" in log
    assert _steps_logged(run) == [1, 2, 3, 4] and (run / "final").is_dir()
    assert [row["status"] for row in _rows(tmp_path / "sweep.sqlite").values()] == ["done"]
