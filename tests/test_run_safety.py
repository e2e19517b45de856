"""Nothing lost: --overwrite only replaces a tunelab run, runs are self-contained and locked, a finished run
resumed is left alone, Ctrl-C saves a resumable checkpoint, unwritable outputs fail before any work."""

from __future__ import annotations

import errno
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

from conftest import assert_one_line_error, run_cli, run_cli_output, tiny_config, tree_digest
from tunelab.config import dump_config
from tunelab.rundir import RunDir, checkpoint_step, rank_curve_file, trained_weights
from tunelab.train import StopOnSignal, train


def _config_file(tmp_path, model_dir, data, out, **overrides):
    config = tiny_config(model_dir, data, out, **overrides)
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(dump_config(config))
    return path, config


@pytest.fixture()
def finished_run(tmp_path, tiny_model_dir, qa_jsonl):
    path, config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "runs" / "done")
    return path, train(config).run_dir


def test_overwrite_never_deletes_what_tunelab_did_not_write(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    path, _ = _config_file(tmp_path, tiny_model_dir, qa_jsonl, mine)
    before = tree_digest(mine)
    code, err = run_cli(capsys, "train", str(path), "--overwrite")
    assert_one_line_error(code, err, "is not a tunelab run", "notes.txt")
    assert "--overwrite" not in err  # the fix for a non-run folder is another folder, not a flag
    assert tree_digest(mine) == before


def test_overwrite_replaces_a_run_but_not_files_added_to_it(capsys, finished_run):
    path, run_dir = finished_run
    (run_dir / "my-export").mkdir()
    code, err = run_cli(capsys, "train", str(path), "--overwrite")
    assert_one_line_error(code, err, "files tunelab did not write", "my-export")
    shutil.rmtree(run_dir / "my-export")
    (run_dir / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')  # to see it replaced
    code, err = run_cli(capsys, "train", str(path), "--overwrite")
    assert code == 0, err
    assert '"step": 999' not in (run_dir / "metrics.jsonl").read_text()


def test_resuming_a_finished_run_changes_nothing(capsys, finished_run):
    path, run_dir = finished_run
    before = tree_digest(run_dir)
    code, err = run_cli(capsys, "train", str(run_dir), "--resume")  # a run folder is accepted too
    assert code == 0 and "is finished" in err and "nothing changed" in err
    code, err = run_cli(capsys, "train", str(path), "--resume")
    assert code == 0 and "is finished" in err
    assert tree_digest(run_dir) == before


def test_a_second_training_into_a_locked_run_fails(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    out = tmp_path / "busy"
    path, _ = _config_file(tmp_path, tiny_model_dir, qa_jsonl, out)
    with RunDir(out).lock():  # what a first `tunelab train` holds for its whole run
        code, err = run_cli(capsys, "train", str(path))
    assert_one_line_error(code, err, "in use by another tunelab process", f"pid {os.getpid()}")
    assert RunDir(out).entries() == [], "the folder the lock created is removed with it"


def test_unwritable_outputs_fail_before_any_work(tmp_path, capsys, tiny_model_dir, qa_jsonl, finished_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path, _ = _config_file(tmp_path, tiny_model_dir, qa_jsonl, blocker / "run")
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line_error(code, err, "cannot write to output directory")
    code, err = run_cli(capsys, "train", str(path), f"output_dir={blocker}")
    assert_one_line_error(code, err, f"output directory {blocker} is a file; set output_dir=")
    _, run_dir = finished_run
    code, err = run_cli(capsys, "eval", str(run_dir), "--json", str(blocker / "eval.json"))
    assert_one_line_error(code, err, "a-file is a file, not a folder")
    code, err = run_cli(capsys, "export", str(run_dir), "--format", "peft", "--out", str(blocker))
    assert_one_line_error(code, err, "is a file")
    code, err = run_cli(capsys, "eval", str(run_dir), "--json", str(tmp_path / "new" / "eval.json"))
    assert code == 0 and (tmp_path / "new" / "eval.json").is_file(), err
    # where root may write by access() but not in fact (/sys): found by a real write, before the work
    code, err = run_cli(capsys, "eval", str(run_dir), "--json", "/sys/eval.json")
    assert_one_line_error(code, err, "--json /sys/eval.json: cannot write in /sys")


def test_a_mistyped_input_is_reported_before_the_output_folder(tmp_path, capsys, finished_run):
    path, run_dir = finished_run  # its output_dir holds a run: the typo, not that, is the error to see
    before = tree_digest(run_dir)
    code, err = run_cli(capsys, "train", str(path), f"data.train={tmp_path / 'qa.jsonll'}")
    assert_one_line_error(code, err, "dataset not found", f"did you mean {tmp_path / 'qa.jsonl'}?")
    code, err = run_cli(capsys, "train", str(path), "model=smollm2-13m", "--overwrite")
    assert_one_line_error(code, err, "did you mean smollm2-135m?")
    code, err = run_cli(capsys, "eval", str(run_dir.parent / "dnoe"))  # a mistyped run folder
    assert_one_line_error(
        code, err, f"run folder {run_dir.parent / 'dnoe'} not found; did you mean {run_dir}?"
    )
    assert tree_digest(run_dir) == before


def test_reports_replace_their_own_earlier_output_but_never_a_users_file(
    tmp_path, capsys, monkeypatch, qa_jsonl, finished_run
):
    _, run_dir = finished_run
    data = tmp_path / "data.json"  # a data file in a format tunelab reads, and an eval report's suffix
    data.write_text('[{"instruction": "Add 1 and 1.", "output": "2"}]\n')
    answers = tmp_path / "answers.jsonl"
    answers.write_text(Path(qa_jsonl).read_text())
    before = tree_digest(tmp_path)
    code, err = run_cli(capsys, "eval", str(run_dir), "--json", str(data))
    assert_one_line_error(code, err, f"--json {data} exists and tunelab did not write it")
    code, err = run_cli(capsys, "generate", str(run_dir), "--prompt", "hi", "--out", str(answers))
    assert_one_line_error(code, err, f"--out {answers} exists and tunelab did not write it")
    assert tree_digest(tmp_path) == before
    for _ in range(2):  # the second run replaces the first one's output
        assert run_cli(capsys, "eval", str(run_dir), "--json", str(tmp_path / "eval.json"))[0] == 0
        generate = ("generate", str(run_dir), "--prompt", "hi", "--max-new-tokens", "2")
        assert run_cli(capsys, *generate, "--out", str(tmp_path / "gen.jsonl"))[0] == 0
    # a write that fails after the checks passed still ends in one line: a disk that filled up (write()
    # names no file), or a place the checks could not tell from a writable one
    (tmp_path / "eval.json").write_text("")  # empty: nothing to lose, so it may be replaced
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", lambda *args, **kwargs: (_ for _ in ()).throw(full))
    code, err = run_cli(capsys, "eval", str(run_dir), "--json", str(tmp_path / "eval.json"))
    assert_one_line_error(code, err, "error: the disk is full (", "No space left on device", "free some")
    monkeypatch.undo()
    monkeypatch.setattr("tunelab.rundir.check_writable", lambda *args, **kwargs: None)
    code, err = run_cli(capsys, "eval", str(run_dir), "--json", "/sys/eval.json")
    assert_one_line_error(code, err, "error: /sys/eval.json: ")


def test_a_moved_run_is_self_contained(tmp_path, capsys, monkeypatch, tiny_model_dir, qa_jsonl):
    """Relative paths resolve against the config's folder and are saved absolute; eval and export of
    a moved run work from any working directory and act on the folder they are given."""
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "model")
    shutil.copy(qa_jsonl, project / "qa.jsonl")
    (project / "run.yaml").write_text(
        "model: model\nmethod: {name: lora, r: 4}\ndata: {train: qa.jsonl, eval: qa.jsonl, max_length: 64}\n"
        f"train: {{max_steps: 4, batch_size: 8}}\noutput_dir: {tmp_path / 'runs' / 'a'}\n"
    )
    monkeypatch.chdir(tmp_path)  # not the config's folder
    code, err = run_cli(capsys, "train", "project/run.yaml")
    assert code == 0, err
    saved = (tmp_path / "runs" / "a" / "config.yaml").read_text()
    assert f"model: {project / 'model'}" in saved and f"train: {project / 'qa.jsonl'}" in saved
    shutil.move(tmp_path / "runs" / "a", tmp_path / "elsewhere")
    monkeypatch.chdir(project)
    code, err = run_cli(capsys, "eval", str(tmp_path / "elsewhere"), "--json", "e.json")
    assert code == 0, err
    code, err = run_cli(capsys, "export", str(tmp_path / "elsewhere"), "--format", "peft", "--out", "adapter")
    assert code == 0 and (project / "adapter" / "adapter_config.json").is_file(), err
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained("adapter")  # as the export's "load it:" line says: base found


def test_a_run_saves_its_local_model_folder_absolute(tmp_path, monkeypatch, tiny_model_dir, qa_jsonl):
    monkeypatch.chdir(Path(tiny_model_dir).parent)  # the model named relative to where you are
    run_dir = train(tiny_config(Path(tiny_model_dir).name, qa_jsonl, tmp_path / "run")).run_dir
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == str(
        Path(tiny_model_dir).resolve()
    )


def _training_after_steps(config_path: Path, run: RunDir, steps: int) -> subprocess.Popen:
    """`tunelab train CONFIG` in a process of its own, once it has logged `steps` losses (stderr piped)."""
    # a new session: SIGINT reaches Python even where the test runner's job control ignores it
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", str(config_path)],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if sum("loss" in record for record in run.metrics()) >= steps:
            break
        time.sleep(0.01)
    return process


def test_sigint_saves_a_checkpoint_and_a_moved_copy_resumes_to_the_same_weights(
    tmp_path, tiny_model_dir, qa_jsonl, capsys
):
    steps = 60
    settings = {"train.max_steps": steps, "method.dropout": 0.1, "train.lr": 1e-2}
    _, straight = _config_file(tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "straight", **settings)
    reference = load_file(train(straight).run_dir / "final" / "trained.safetensors")

    path, config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "stopped", **settings)
    run = RunDir(config.resolved_output_dir())
    process = _training_after_steps(path, run, 3)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith(
        f"resume with: tunelab train {run.config_file} --resume"
    )
    stopped_at = int(last.split()[3].rstrip(";"))
    assert 3 <= stopped_at < steps and not run.final_dir.exists()
    assert run.latest_checkpoint().name == f"checkpoint-{stopped_at}"

    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.path, copy.path)
    original = tree_digest(run.path)
    code, err = run_cli(capsys, "train", str(copy.config_file), "--resume")
    assert code == 0, err
    assert tree_digest(run.path) == original, "resuming the copy must not touch the original"
    got = load_file(copy.final_dir / "trained.safetensors")
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_reader_of_its_output_gone_stops_a_run_with_a_checkpoint(tmp_path, tiny_model_dir, qa_jsonl):
    """`tunelab train ... 2>&1 | head`: once head had exited, the next print raised BrokenPipeError and
    the run died, its steps since the last checkpoint lost; now it stops as at Ctrl-C."""
    overrides = {"train.max_steps": 100000, "train.log_steps": 1}
    path, config = _config_file(tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "piped", **overrides)
    run = RunDir(config.resolved_output_dir())
    process = _training_after_steps(path, run, 2)
    process.stderr.close()
    assert process.wait(timeout=120) == 130
    stopped_at = checkpoint_step(run.latest_checkpoint())
    assert stopped_at >= 2 and not run.final_dir.exists()
    assert stopped_at == max(record["step"] for record in run.metrics() if "loss" in record)


def test_a_second_ctrl_c_aborts_and_says_how_to_resume(tmp_path, tiny_model_dir, qa_jsonl):
    path, config = _config_file(
        tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "aborted", **{"train.max_steps": 100000}
    )
    run = RunDir(config.resolved_output_dir())
    process = _training_after_steps(path, run, 2)
    process.send_signal(signal.SIGINT)
    shown = []  # the second once the first is being handled: it saves a checkpoint, which takes longer
    while not shown or "stopping after this step" not in shown[-1]:
        shown.append(process.stderr.readline())
        assert shown[-1], "".join(shown)  # the process ended first
    process.send_signal(signal.SIGINT)
    stderr = "".join(shown) + process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("aborted; the steps after ") and last.endswith(
        f"are lost; resume with: tunelab train {run.config_file} --resume"
    ), last


def test_a_second_sigterm_still_waits_for_the_checkpoint_and_a_second_ctrl_c_does_not():
    """A trial of a sweep stopped by SIGTERM may get one from the sweep as well as its own."""
    stop = StopOnSignal()
    with stop.installed():
        try:
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)  # handled before the next one: two pending signals run the handler once
        except KeyboardInterrupt:
            pytest.fail("a second SIGTERM stopped at once")
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_a_stopped_run_is_evaluated_and_exported_from_its_checkpoints(
    tmp_path, capsys, monkeypatch, tiny_model_dir, qa_jsonl
):
    config = tiny_config(
        tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.max_steps": 8, "train.save_steps": 4}
    )
    run = RunDir(train(config).run_dir)
    code, err = run_cli(capsys, "eval", str(run.path), "--json", str(tmp_path / "final.json"))
    assert code == 0, err
    shutil.rmtree(run.final_dir)  # as a run stopped after its step-8 checkpoint leaves it
    before = tree_digest(run.path)
    checkpoint = run.checkpoints_dir / "checkpoint-8"
    assert_one_line_error(
        *run_cli(capsys, "eval", str(run.path)),
        "has no finished model (final/)",
        f"or use it as far as it got: give {checkpoint} instead",
    )
    code, err = run_cli(capsys, "eval", str(checkpoint), "--json", str(tmp_path / "checkpoint.json"))
    assert code == 0, err
    final, at_checkpoint = (
        json.loads((tmp_path / f"{name}.json").read_text()) for name in ("final", "checkpoint")
    )
    assert at_checkpoint["loss"] == final["loss"]  # the same weights: step 8 is the last
    code, err = run_cli(
        capsys,
        "export",
        str(run.checkpoints_dir / "checkpoint-4"),
        "--format",
        "peft",
        "--out",
        str(tmp_path / "exp"),
    )
    assert code == 0, err
    assert (tmp_path / "exp" / "adapter_model.safetensors").is_file()
    monkeypatch.chdir(checkpoint)  # the checkpoint named from inside it
    assert run_cli(capsys, "eval", ".", "--limit", "2")[0] == 0
    assert tree_digest(run.path) == before  # none of them wrote into the run
    # a checkpoint's rank plot has a name of its own, which --overwrite counts as the run's
    weights = trained_weights(checkpoint)[1]
    assert rank_curve_file(run, weights) == run.path / "rank_curve-checkpoint-8.png"
    rank_curve_file(run, weights).write_bytes(b"png")
    (run.path / "checkpoint-8.png").write_bytes(b"mine")
    assert run.foreign_entries() == ["checkpoint-8.png"]
    (checkpoint / "COMPLETE").unlink()  # cut short while it was saved
    assert_one_line_error(
        *run_cli(capsys, "eval", str(checkpoint)),
        "checkpoint-8 was not written completely (no COMPLETE marker); use ",
        "checkpoint-4",
    )
    # a checkpoint that never was is not "not written completely"
    assert_one_line_error(
        *run_cli(capsys, "eval", str(run.checkpoints_dir / "checkpoint-99")),
        "checkpoint-99 not found (this run saved steps 4); use ",  # checkpoint-8 is incomplete
    )


def test_a_users_config_yaml_does_not_make_a_folder_a_run(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "config.yaml").write_text("database:\n  host: x\n")
    (theirs / "metrics.jsonl").write_text("mine\n")
    (theirs / "checkpoints" / "model.pt").write_text("precious")
    path, _ = _config_file(tmp_path, tiny_model_dir, qa_jsonl, theirs)
    before = tree_digest(theirs)
    code, err = run_cli(capsys, "train", str(path), "--overwrite")
    assert_one_line_error(code, err, "is not a tunelab run")
    code, err = run_cli(capsys, "eval", str(theirs))
    assert_one_line_error(code, err, "is not a tunelab run directory")
    assert tree_digest(theirs) == before and not (theirs / ".tunelab.lock").exists()


def test_overwrite_refuses_files_added_inside_final_or_checkpoints(capsys, finished_run):
    path, run_dir = finished_run
    (run_dir / "final" / "NOTES.md").write_text("what I found")
    code, err = run_cli(capsys, "train", str(path), "--overwrite")
    assert_one_line_error(code, err, "files tunelab did not write", "final/NOTES.md")
    assert (run_dir / "final" / "NOTES.md").read_text() == "what I found"


def test_damaged_run_files_are_one_line_and_change_nothing(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    path, config = _config_file(
        tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.save_steps": 4}
    )
    run = RunDir(train(config).run_dir)
    code, err = run_cli(capsys, "eval", str(run.path), "--json", str(run.config_file))
    assert_one_line_error(code, err, "exists and tunelab did not write it")
    weights = run.final_dir / "trained.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    code, err = run_cli(capsys, "eval", str(run.path))
    assert_one_line_error(code, err, f"cannot read {weights}", "damaged")
    shutil.rmtree(run.final_dir)
    last = run.latest_checkpoint() / "trained.safetensors"
    last.write_bytes(last.read_bytes()[:1000])
    before = {k: v for k, v in tree_digest(run.path).items() if k != ".tunelab.lock"}
    code, err = run_cli(capsys, "train", str(run.path), "--resume")
    assert code == 2 and f"cannot read {last}" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert {k: v for k, v in tree_digest(run.path).items() if k != ".tunelab.lock"} == before


def test_a_model_missing_weights_is_refused(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tensors = load_file(model / "model.safetensors")
    dropped = next(name for name in tensors if "q_proj" in name)
    kept = {name: tensor for name, tensor in tensors.items() if name != dropped}
    save_file(kept, model / "model.safetensors", {"format": "pt"})
    path, _ = _config_file(tmp_path, str(model), qa_jsonl, tmp_path / "run")
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line_error(code, err, "lacks 1 weight(s)", dropped)


def test_a_checkpoint_that_does_not_load_stops_resume_with_one_line_and_nothing_changed(
    tmp_path, tiny_model_dir, qa_jsonl, capsys
):
    path, config = _config_file(
        tmp_path, tiny_model_dir, qa_jsonl, tmp_path / "run", **{"train.max_steps": 4, "train.save_steps": 2}
    )
    run = RunDir(train(config).run_dir)
    shutil.rmtree(
        run.final_dir
    )  # as if stopped after step 2's checkpoint (the last step's loads no optimizer)
    shutil.rmtree(run.checkpoints_dir / "checkpoint-4")
    checkpoint = run.latest_checkpoint()
    (checkpoint / "optimizer.pt").write_bytes(b"not a torch file")
    before = tree_digest(run.path)
    code, err = run_cli(capsys, "train", str(path), "--resume")
    progress, last = err.strip().rsplit("\n", 1)  # the lines before the error say what it was doing
    assert_one_line_error(
        code, last, f"--resume: {checkpoint} did not load (UnpicklingError: ", "--overwrite"
    )
    assert "Traceback" not in progress and tree_digest(run.path) == before


def test_a_full_disk_is_one_line_and_leaves_no_partial_export(tmp_path, capsys, finished_run):
    """safetensors reports a full disk in an error of its own, which went out as a traceback."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code, err = run_cli(
            capsys, "export", str(finished_run[1]), "--format", "merged", "--out", str(small / "m")
        )
        assert_one_line_error(code, err, "the disk is full (", "No space left on device", "free some space")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", small], check=True)


def test_a_run_whose_eval_data_moved_is_told_where_it_may_be_and_how_to_give_it(capsys, finished_run):
    _, run_dir = finished_run
    data = run_dir.parent.parent / "qa.jsonl"
    moved = data.parent / "moved" / "qa.jsonl"
    moved.parent.mkdir()
    data.rename(moved)
    code, err = run_cli(capsys, "eval", str(run_dir))
    assert_one_line_error(
        code,
        err,
        f"dataset not found: '{data}'",
        "(the run's data.eval; moved: data.eval=NEWPATH; --data PATH evaluates on another)",
    )
    code, err = run_cli(capsys, "eval", str(run_dir), "--data", str(moved))
    assert code == 0, err


def test_a_bad_eval_file_is_found_before_training(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    """data.eval is read and checked row by row at the start, even with no evaluation during training:
    `tunelab eval` of the run would otherwise fail only after the training."""
    bad = tmp_path / "eval.jsonl"
    bad.write_text(qa_jsonl.read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "no answer"}) + "\n")
    out = tmp_path / "runs" / "r"
    path, _ = _config_file(
        tmp_path, tiny_model_dir, qa_jsonl, out, **{"data.eval": str(bad), "train.eval_steps": 0}
    )
    code, err = run_cli(capsys, "train", str(path))
    assert_one_line_error(code, err, f"{bad}:2: row has no 'completion' field")
    assert not out.exists()


def test_eval_takes_data_settings_for_the_file_it_reads(tmp_path, capsys, finished_run):
    """What a data error advises (data.skip_bad_rows, data.columns) can be given to eval itself."""
    _, run_dir = finished_run
    dolly = tmp_path / "dolly.jsonl"
    rows = [{"instruction": "Add", "context": f"{i} and 1", "response": str(i + 1)} for i in range(3)]
    dolly.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{not json\n")
    code, err = run_cli(capsys, "eval", str(run_dir), "--data", str(dolly))
    assert_one_line_error(code, err, f"{dolly}:4: invalid JSON", "data.skip_bad_rows=true")
    code, err = run_cli(capsys, "eval", str(run_dir), "--data", str(dolly), "data.skip_bad_rows=true")
    assert_one_line_error(
        code, err, "(on the command line: data.columns.output=response data.columns.input=context)"
    )
    settings = ["data.skip_bad_rows=true", "data.columns.output=response", "data.columns.input=context"]
    code, out, err = run_cli_output(capsys, "eval", str(run_dir), "--data", str(dolly), *settings)
    assert code == 0, err
    assert ": 3 examples" in out
    code, err = run_cli(capsys, "eval", str(run_dir), "train.lr=1")
    assert_one_line_error(code, err, "train.lr=1: only data.* settings apply to a trained run")


def test_a_run_whose_base_model_moved_says_where_to_change_it(tmp_path, capsys, finished_run, tiny_model_dir):
    _, run_dir = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config_file = copy / "config.yaml"
    gone = tmp_path / "gone-model"
    config_file.write_text(config_file.read_text().replace(str(Path(tiny_model_dir).resolve()), str(gone)))
    told = f"the base model of this run is gone: {gone} (model: in {config_file})"
    for command in (
        ["eval", str(copy)],
        ["export", str(copy), "--format", "peft", "--out", str(tmp_path / "x")],
    ):
        assert_one_line_error(*run_cli(capsys, *command), told)
    assert_one_line_error(*run_cli(capsys, "train", str(copy), "--resume"), told)


def test_auto_resume_starts_resumes_or_leaves_a_finished_run(tmp_path, capsys, tiny_model_dir, qa_jsonl):
    """One command for a job that may be requeued: it starts the run, resumes it, or leaves it finished."""
    run_dir = tmp_path / "runs" / "job"
    path, _ = _config_file(tmp_path, tiny_model_dir, qa_jsonl, run_dir, **{"train.save_steps": 4})
    code, out, err = run_cli_output(capsys, "train", str(path), "--auto-resume")
    assert code == 0 and "resuming" not in out + err, err
    finished = tree_digest(run_dir)
    code, out, err = run_cli_output(capsys, "train", str(path), "--auto-resume")
    assert code == 0 and "is finished" in out + err and tree_digest(run_dir) == finished

    final = tree_digest(run_dir / "final")
    shutil.rmtree(run_dir / "final")  # as a kill after the last checkpoint leaves it
    last = RunDir(run_dir).latest_checkpoint()
    assert last.name == "checkpoint-12"  # the last step's: nothing is left to train
    code, out, err = run_cli_output(capsys, "train", str(path), "--auto-resume")
    assert code == 0 and f"resuming from {last}" in out + err, err
    # the Trainer would train a 13th step past max_steps 12; the final weights are the last step's
    assert tree_digest(run_dir / "final") == final
    assert RunDir(run_dir).latest_checkpoint() == last
    assert max(record["step"] for record in RunDir(run_dir).metrics() if "step" in record) == 12

    code, err = run_cli(capsys, "train", str(path), "--auto-resume", "train.lr=0.5")
    assert_one_line_error(code, err, "--auto-resume: this config differs from")
    assert (
        "a finished run (train.lr 0.5 here, 0.005 in the run); train it into another output_dir, or " in err
    )
    code, err = run_cli(capsys, "train", str(path), "--auto-resume", "--overwrite")
    assert_one_line_error(code, err, "--auto-resume decides whether to resume by itself; drop --overwrite")

    shutil.rmtree(run_dir / "final")
    shutil.rmtree(RunDir(run_dir).checkpoints_dir)  # as a kill before the first checkpoint leaves it
    code, out, err = run_cli_output(capsys, "train", str(path), "--auto-resume")
    assert code == 0 and "--auto-resume: no complete checkpoint" in out + err, err
