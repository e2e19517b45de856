"""The quickstart as a new user reads it: before and after, the rank table, and a `next:` line that runs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from conftest import run_cli_output, tree_digest
from tunelab.quickstart import DEFAULT_CONFIG


def test_quickstart_prints_its_results_and_a_next_command_that_works(
    tmp_path, capsys, monkeypatch, tiny_model_dir
):
    config = tmp_path / "quickstart.yaml"  # the shipped config (nf4 DyLoRA r16 on gsm8k), on the tiny model
    shipped = DEFAULT_CONFIG.read_text()
    assert "model: smollm2-135m\n" in shipped
    assert "output_dir: runs/quickstart" in shipped
    # in a folder whose name has a space: the printed commands quote it, and run as printed
    shipped = shipped.replace("output_dir: runs/quickstart", f"output_dir: {tmp_path}/my runs/quickstart")
    config.write_text(shipped.replace("model: smollm2-135m\n", f"model: {tiny_model_dir}\n"))
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "my runs" / "quickstart"  # a folder of the user's where the run would go
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("mine")
    before = tree_digest(earlier)

    code, out, err = run_cli_output(
        capsys, "quickstart", "--config", str(config), "--steps", "2", "--eval-examples", "2"
    )
    assert code == 0, err
    run_dir = f"{tmp_path}/my runs/quickstart-2"  # beside the user's folder, which is untouched
    assert tree_digest(earlier) == before
    assert "evaluating the base model on 2 examples of gsm8k:eval" in out
    assert "evaluating the fine-tuned model on 2 examples of gsm8k:eval" in out
    for metric in ("loss", "perplexity", "train time (s)"):
        assert re.search(rf"│\s+{re.escape(metric)}\s+│", out), metric
    assert "exact_match" not in out  # generating answers would take most of the quickstart's time
    # the rank table's title on a line of its own, then one row per rank the adapter was evaluated at
    assert "the same adapter truncated to rank b (gsm8k:eval, 2 examples)\n" in out
    ranks = [int(rank) for rank in re.findall(r"^│\s+(\d+)\s+│\s+[\d.]+\s+│\s+[\d.]+\s+│$", out, re.M)]
    assert ranks == [1, 2, 4, 8, 16]
    best = int(re.search(r"^best rank (\d+), elbow rank \d+; plot: ", out, re.M).group(1))
    assert best in ranks

    next_line = re.search(r"^next: (.*)$", out, re.M).group(1)
    evaluate, export = next_line.split(" | ")
    assert evaluate == f"tunelab eval '{run_dir}' --ranks all --no-exact-match --limit 64"
    assert export == f"tunelab export '{run_dir}' --rank {best} --format peft --out '{run_dir}-peft-r{best}'"
    code, out, err = run_cli_output(capsys, *shlex.split(evaluate)[1:])  # as printed, without "tunelab"
    assert code == 0, err
    assert ": 64 examples" in out and "exact_match" not in out
    code, _, err = run_cli_output(capsys, *shlex.split(export)[1:])
    assert code == 0, err
    assert json.loads(Path(f"{run_dir}-peft-r{best}", "adapter_config.json").read_text())["r"] == best


def test_a_quickstart_of_another_method_prints_its_own_export(tmp_path, capsys, monkeypatch, tiny_model_dir):
    """`--config` of a SpIEL run: no rank table, and the printed export is SpIEL's format, which runs."""
    method = re.search(r"^method: .*$", DEFAULT_CONFIG.read_text(), re.M).group(0)
    shipped = DEFAULT_CONFIG.read_text().replace(method, "method: {name: spiel, density: 0.01}")
    config = tmp_path / "spiel.yaml"
    config.write_text(shipped.replace("model: smollm2-135m\n", f"model: {tiny_model_dir}\n"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli_output(
        capsys, "quickstart", "--config", str(config), "--steps", "2", "--eval-examples", "2"
    )
    assert code == 0, err
    assert "best rank" not in out
    evaluate, export = re.search(r"^next: (.*)$", out, re.M).group(1).split(" | ")
    assert evaluate == "tunelab eval runs/quickstart --no-exact-match --limit 64"
    assert export == "tunelab export runs/quickstart --format spiel --out runs/quickstart-spiel"
    code, out, err = run_cli_output(capsys, *shlex.split(export)[1:])
    assert code == 0, err
    assert Path("runs/quickstart-spiel").is_dir()
    # the quickstart's base is 4-bit: deltas added to the full-precision base are not the model as trained
    assert "(deltas trained on the 4-bit base: --format merged adds them to it as trained)" in out
