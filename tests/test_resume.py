"""Crash safety: a run killed with SIGKILL and resumed ends with the same weights as an
uninterrupted run; NaN losses stop the run; checkpoints are only used when complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from tunelab.config import RunConfig, dump_config
from tunelab.errors import TunelabError
from tunelab.rundir import COMPLETE_MARKER, RunDir, mark_complete
from tunelab.train import _check_resumable, train

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
    "dylora": {"name": "dylora", "r": 6, "alpha": 8, "dropout": 0.1},
    "spiel": {"name": "spiel", "num_tunable": 3000, "reselection_steps": 6, "accumulation_steps": 2},
}
STEPS, SAVE_EVERY = 30, 5


def _config_file(tmp_path, model_dir, data, name, method):
    config = tiny_config(
        model_dir,
        data,
        tmp_path / name,
        method=method,
        **{
            "train.max_steps": STEPS,
            "train.save_steps": SAVE_EVERY,
            "train.keep_checkpoints": 2,  # old checkpoints go while the killed run saves new ones
            "train.batch_size": 16,
            "train.lr": 1e-2,
        },
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_config(config))
    return path, config


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return [sys.executable, "-m", "tunelab", *args], env


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, qa_jsonl, method):
    _, reference_config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, "straight", METHODS[method])
    reference = load_file(train(reference_config).run_dir / "final" / "trained.safetensors")

    path, config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, "killed", METHODS[method])
    run_dir = config.resolved_output_dir()
    command, env = _cli("train", str(path), cwd=tmp_path)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while RunDir(run_dir).latest_checkpoint() is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "final").exists(), "the run finished before it could be killed"
    killed_at = RunDir(run_dir).latest_checkpoint()
    assert killed_at is not None
    with open(run_dir / "metrics.jsonl", "a") as metrics:  # a kill can land mid-line, too
        metrics.write('{"step": 99, "loss": 1.2')
    # and mid-save: checkpoints written in part (no marker), one holding a file of the user's too
    written = (killed_at / COMPLETE_MARKER).read_text().split()
    # every file the checkpoint was written with is one removal knows of
    assert written == sorted(p.name for p in killed_at.iterdir() if p.name != COMPLETE_MARKER)
    step = int(killed_at.name.removeprefix("checkpoint-"))
    for later, files in ((step + 3, written[:2]), (step + 4, [written[0], "notes.txt"])):
        (run_dir / "checkpoints" / f"checkpoint-{later}").mkdir()
        for name in files:
            (run_dir / "checkpoints" / f"checkpoint-{later}" / name).write_text("cut short")

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = load_file(run_dir / "final" / "trained.safetensors")
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [record["step"] for record in RunDir(run_dir).metrics() if "loss" in record]
    assert steps == list(range(1, STEPS + 1))  # no step logged twice after the resume
    said = resumed.stdout + resumed.stderr
    assert f"removed checkpoint-{step + 3}: written in part when the run was stopped" in said
    assert f"left in place, in checkpoints written in part: checkpoint-{step + 4}/notes.txt" in said
    assert not (run_dir / "checkpoints" / f"checkpoint-{step + 3}").exists()
    assert [p.name for p in (run_dir / "checkpoints" / f"checkpoint-{step + 4}").iterdir()] == ["notes.txt"]
    resumed_steps = f"{STEPS - step} step{'s' * (STEPS - step != 1)} (steps {step + 1}-{STEPS}, resumed)"
    assert f"trained {resumed_steps} in " in said  # not all STEPS


def test_a_metrics_line_still_being_written_is_not_read(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": 2.25}\n{"step": 3, "lo'
    )
    assert RunDir(tmp_path).metrics() == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    RunDir(tmp_path).truncate_metrics(last_step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'
    assert RunDir(tmp_path / "not-started").metrics() == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(
        TunelabError, match=r"metrics\.jsonl:2: not a JSON record \(the file was edited or dam"
    ):
        RunDir(tmp_path).metrics()


def test_incomplete_checkpoints_are_ignored(tmp_path):
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-5" / COMPLETE_MARKER).touch()
    (tmp_path / "checkpoints" / "checkpoint-10").mkdir()  # killed while saving
    assert RunDir(tmp_path).latest_checkpoint().name == "checkpoint-5"


def test_a_users_copy_of_a_checkpoint_is_not_one(tmp_path):
    for name in (
        "checkpoint-5",
        "checkpoint-5 copy",
        "checkpoint-9.bak",
        "checkpoint-²",
    ):  # copies, odd names
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / COMPLETE_MARKER).touch()
    run = RunDir(tmp_path)
    assert run.latest_checkpoint().name == "checkpoint-5"  # and no crash on the copies' names
    assert run.foreign_entries() == [
        f"checkpoints/{name}" for name in ("checkpoint-5 copy", "checkpoint-9.bak", "checkpoint-²")
    ]


def _checkpoint(run_dir, name, files=("trained.safetensors", "optimizer.pt")):
    folder = run_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_text("x")
    mark_complete(folder)
    return folder


def test_removing_old_checkpoints_leaves_what_tunelab_did_not_write(tmp_path):
    for step in (5, 10, 15, 20):
        _checkpoint(tmp_path, f"checkpoint-{step}")
    (tmp_path / "checkpoints" / "checkpoint-10" / "notes.txt").write_text("mine")  # added later
    _checkpoint(tmp_path, "checkpoint-5 copy")
    _checkpoint(tmp_path, "checkpoint-05")  # a copy too: the Trainer writes no leading zero
    elsewhere = _checkpoint(tmp_path / "elsewhere", "checkpoint-1")
    (tmp_path / "checkpoints" / "checkpoint-1").symlink_to(elsewhere)
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir()  # unfinished: the Trainer may still be writing
    (_checkpoint(tmp_path, "checkpoint-3") / COMPLETE_MARKER).write_text("")  # an older tunelab's marker

    left = RunDir(tmp_path).remove_old_checkpoints(keep=2)

    assert left == [
        "checkpoint-3 (from an older tunelab: which files are its own is unknown)",
        "checkpoint-10/notes.txt",
    ]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [
        "checkpoint-05", "checkpoint-1", "checkpoint-10", "checkpoint-15", "checkpoint-2", "checkpoint-20",
        "checkpoint-3", "checkpoint-5 copy",
    ]  # fmt: skip
    assert len(list((tmp_path / "checkpoints" / "checkpoint-3").iterdir())) == 3  # untouched
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "checkpoint-10").iterdir()) == ["notes.txt"]
    linked = sorted(p.name for p in elsewhere.iterdir())
    assert linked == [COMPLETE_MARKER, "optimizer.pt", "trained.safetensors"]
    assert RunDir(tmp_path).latest_checkpoint().name == "checkpoint-20"


def test_keep_checkpoints_keeps_the_newest(tmp_path, tiny_model_dir, qa_jsonl):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "run",
        **{"train.max_steps": 20, "train.save_steps": 5, "train.keep_checkpoints": 2},
    )
    run = RunDir(train(config).run_dir)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["checkpoint-15", "checkpoint-20"]


def test_resume_refuses_a_different_config_but_not_fewer_checkpoints(
    tmp_path, tiny_model_dir, qa_jsonl, monkeypatch
):
    path, config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, "run", METHODS["lora"])
    run_dir = config.resolved_output_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    changed = config.model_copy(deep=True)
    changed.train.keep_checkpoints = 1  # the disk is filling up
    changed.train.gradient_checkpointing, changed.train.gradient_checkpointing_every = True, 2  # memory is
    _check_resumable(changed, RunDir(run_dir))
    # the same model folder written relative to where you are is the same model
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    _check_resumable(changed.model_copy(update={"model": Path(tiny_model_dir).name}), RunDir(run_dir))
    changed.train.lr = 0.5
    changed.train.batch_size = 3
    with pytest.raises(
        TunelabError, match=r"\(train.batch_size 3 here, 16 in the run, train.lr 0.5 here, 0.01 "
    ):
        train(changed, resume=True)


def test_a_run_saved_before_a_key_existed_resumes(tmp_path, tiny_model_dir, qa_jsonl):
    path, config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, "run", METHODS["lora"])
    run_dir = config.resolved_output_dir()
    run_dir.mkdir(parents=True)
    saved = yaml.safe_load(dump_config(config))
    del saved["train"]["group_by_length"]  # as a tunelab from before that key wrote it
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resumable(config, RunDir(run_dir))  # the default fills in: nothing differs
    text = (run_dir / "config.yaml").read_text().replace("batch_size:", "batchsize:")  # edited by hand
    (run_dir / "config.yaml").write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "batchsize:" in row)
    with pytest.raises(TunelabError, match=rf"config.yaml:{line}: unknown key 'train.batchsize'"):
        _check_resumable(config, RunDir(run_dir))


def test_a_run_resumes_from_its_data_moved_refuses_other_rows_and_warns_of_edited_ones(
    tmp_path, tiny_model_dir, qa_jsonl, capsys
):
    config = tiny_config(
        tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.max_steps": 6, "train.save_steps": 3}
    )
    run = RunDir(train(config).run_dir)
    record = json.loads(run.data_file.read_text())  # data.eval is the same file
    assert record["data.train"] == record["data.eval"] and record["data.train"]["rows"] == 64
    rows = qa_jsonl.read_text()

    def on(data: Path) -> RunConfig:
        return config.model_copy(
            update={"data": config.data.model_copy(update={"train": str(data), "eval": str(data)})}
        )

    def stop_at_step_3() -> None:
        shutil.rmtree(run.final_dir)
        shutil.rmtree(run.checkpoints_dir / "checkpoint-6")
        capsys.readouterr()

    # edited where it is: resumed, with a warning
    qa_jsonl.write_text(rows.replace('"Q: 7+7="', '"Q: 7 + 7 ="'))
    stop_at_step_3()
    train(config, resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: data.train ({qa_jsonl}) has changed since the run started (rows edited)" in err
    assert run.is_finished()

    # moved: the error says how to give its new place; there, the same rows resume
    qa_jsonl.write_text(rows)
    moved = qa_jsonl.rename(tmp_path / "elsewhere.jsonl")
    stop_at_step_3()
    with pytest.raises(
        TunelabError, match=r"qa.jsonl' is neither .* moved: data.train=NEWPATH on the command"
    ):
        train(config, resume=True)
    train(on(moved), resume=True)
    err = " ".join(capsys.readouterr().err.split())
    assert f"resuming with data.train {moved}: the rows the run started with, moved from {qa_jsonl} (" in err
    assert "warning" not in err and run.is_finished()
    stop_at_step_3()
    train(on(moved), resume=True)  # as config.yaml now says: where the data is
    assert run.is_finished() and "resuming with data" not in capsys.readouterr().err

    # other rows elsewhere: refused; a mistyped new path: said as such
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(rows.splitlines(keepends=True)[:-1]))
    stop_at_step_3()
    with pytest.raises(TunelabError) as refused:
        train(on(fewer), resume=True)
    assert str(refused.value).endswith(
        f"(data.eval {fewer} here, {moved} in the run (other rows: 63 rows now, 64 then), data.train {fewer} "
        f"here, {moved} in the run (other rows: 63 rows now, 64 then)); resume with the run's data where it "
        "had it, or train anew (another output_dir, or --overwrite)"
    )
    no_eval = on(moved).model_copy(update={"data": on(moved).data.model_copy(update={"eval": None})})
    with pytest.raises(TunelabError, match=rf"\(data.eval None here, {moved} in the run\); resume with the"):
        train(no_eval, resume=True)
    with pytest.raises(TunelabError, match="dataset not found: .*elsewher.jsonl"):
        train(on(tmp_path / "elsewher.jsonl"), resume=True)
    # a file that does not read as the run's data did: other data, said with why
    other = tmp_path / "other.jsonl"
    other.write_text("question,answer\nQ: 1+1=,2\n")
    with pytest.raises(TunelabError) as refused:
        train(on(other), resume=True)
    assert f"data.train {other} here, {moved} in the run (other data: " in str(refused.value)
    assert f"{other}:1: invalid JSON" in str(refused.value)


def test_nan_loss_stops_with_a_clear_error(tmp_path, tiny_model_dir, qa_jsonl):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "nan",
        method={"name": "full"},
        **{"train.lr": 1e30, "train.max_steps": 20, "train.save_steps": 1, "train.max_grad_norm": 0.0},
    )
    with pytest.raises(
        TunelabError, match=r"(the loss became (nan|inf)|the weights became inf/NaN) at step \d+"
    ):
        train(config)
    run_dir = tmp_path / "nan"
    assert not (run_dir / "final").exists()
    last = RunDir(run_dir).latest_checkpoint()
    if last is not None:  # every kept checkpoint holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(last / "trained.safetensors").values())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 1e30
