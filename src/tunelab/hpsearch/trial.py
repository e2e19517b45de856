"""One sweep trial, run in its own process: train a config, evaluate it on its eval set, write a result JSON.

    python -m tunelab.hpsearch.trial CONFIG.yaml METRIC RESULT.json

RESULT.json holds {"score", "metrics", "peak_memory_bytes"} on success, {"error"} on failure. The
executor (tunelab.hpsearch.executors) starts this process and records the result; it never trains
in its own process, so a crash or an out-of-memory kill of one trial leaves the sweep running.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def run_trial(config_path: Path, metric: str) -> dict[str, Any]:
    """Train `config_path` (replacing a leftover run in its output_dir) and score it on its data.eval."""
    # torch comes in here, not at import: the sweep and recommend commands import this module
    from tunelab.config import load_config
    from tunelab.data import eval_dataset
    from tunelab.evaluate import evaluate_ranks
    from tunelab.reporting import peak_memory_bytes
    from tunelab.train import train

    config = load_config(config_path)
    built = train(config, overwrite=True).tuned
    dataset = eval_dataset(config.data, built.tokenizer, limit=config.data.eval_limit)
    metrics = evaluate_ranks(built, dataset, None, with_exact_match=metric == "exact_match")[0]
    return {"score": metrics[metric], "metrics": metrics, "peak_memory_bytes": peak_memory_bytes()}


def _exit_with_parent() -> None:
    """End this process when the sweep that started it dies (e.g. kill -9), so no orphan keeps training
    into a run directory that the resumed sweep runs again."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def main(argv: list[str]) -> int:
    config_path, metric, result_path = Path(argv[0]), argv[1], Path(argv[2])
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        result = run_trial(config_path, metric)
    except Exception as exc:  # any failure is the trial's result, recorded with its message
        traceback.print_exc()
        message = str(exc) if isinstance(exc, TunelabError) else f"{type(exc).__name__}: {exc}"
        result = {"error": message}
    # write then rename: the executor never reads half a file
    partial = result_path.with_name(result_path.name + ".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, result_path)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
