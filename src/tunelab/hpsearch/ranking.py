"""A CBS ranking of recorded sweep results: the pure functions of cbs.py applied to a ScoreMatrix,
with each ranked config's hyperparameters and dataset names (what `recommend` prints and writes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab.config import flatten
from tunelab.hpsearch.cbs import cbs_rank, orient, top_k_curve
from tunelab.hpsearch.spec import PLACEMENT_KEYS
from tunelab.hpsearch.store import ScoreMatrix


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A config as flat dotted keys, without the keys that only place a trial."""
    return {key: value for key, value in flatten(config).items() if key not in PLACEMENT_KEYS}


@dataclass
class Ranking:
    tau: float
    datasets: list[str]
    entries: list[dict[str, Any]]  # in CBS order: config id, covers, coverage, scores, hyperparameters
    top_k_curve: list[float]  # mean over datasets of the best normalized score among the top K
    uncovered: list[str]  # datasets no config covers (no positive score recorded)
    missing_trials: int  # missing or failed trials, counted as covering nothing

    def as_json(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "datasets": self.datasets,
            "ranking": self.entries,
            "top_k_curve": self.top_k_curve,
        }


def rank_matrix(matrix: ScoreMatrix, tau: float) -> Ranking:
    oriented = orient(matrix.scores, matrix.higher_is_better)
    ranked = cbs_rank(oriented, tau)
    curve = top_k_curve(oriented, [entry.config for entry in ranked])
    entries = [
        {
            "rank": rank,
            "config": matrix.config_ids[entry.config],
            "covers": [matrix.datasets[d] for d in entry.newly_covered],
            "covered_total": entry.covered_total,
            "coverage": entry.covered_total / len(matrix.datasets),
            "mean_normalized": entry.mean_normalized,
            "top_k": float(curve[rank - 1]),
            "hyperparameters": hyperparameters(matrix.configs[matrix.config_ids[entry.config]]),
        }
        for rank, entry in enumerate(ranked, start=1)
    ]
    return Ranking(
        tau=tau,
        datasets=list(matrix.datasets),
        entries=entries,
        top_k_curve=curve.tolist(),
        uncovered=[name for j, name in enumerate(matrix.datasets) if not np.any(oriented[:, j] > 0)],
        missing_trials=int(np.isnan(matrix.scores).sum()),
    )
