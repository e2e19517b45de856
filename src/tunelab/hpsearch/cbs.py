"""Coverage-based search (CBS, Halfon et al. 2024): rank configurations so the first few cover many datasets.

Everything here is a pure function over a score matrix `scores` of shape (configs, datasets):
float, NaN for a missing or failed trial, oriented so that higher is better (see `orient`).

- best(d) = the highest score on dataset d; normalized(c, d) = s(c, d) / best(d) ∈ [0, 1].
- c covers d when s(c, d) ≥ (1 − τ)·best(d), i.e. normalized(c, d) ≥ 1 − τ.
- A dataset whose best score is ≤ 0 (or that has no score at all) has no meaningful ratio: nobody
  covers it and every config's normalized score on it is 0. A missing trial also counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tunelab.errors import TunelabError

# Absorbs float rounding, so a score exactly at (1 − τ)·best covers (1.045 / 1.1 < 0.95 in floats).
_COVER_TOLERANCE = 1e-12


def _check_matrix(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        raise TunelabError(f"scores must be a (configs, datasets) matrix; got shape {scores.shape}")
    return scores


def orient(scores: np.ndarray, higher_is_better: np.ndarray) -> np.ndarray:
    """Scores where higher is better: lower-is-better columns (loss, perplexity) become 1 / s.

    With 1 / loss the coverage rule reads loss(c, d) ≤ min_loss(d) / (1 − τ), and the normalized
    score is min_loss(d) / loss(c, d) ∈ (0, 1]. That needs positive values, so a lower-is-better
    score ≤ 0 is an error. NaN stays NaN.
    """
    scores = _check_matrix(scores)
    higher_is_better = np.asarray(higher_is_better, dtype=bool)
    if higher_is_better.shape != (scores.shape[1],):
        raise TunelabError(
            f"higher_is_better needs one flag per dataset ({scores.shape[1]}); got {higher_is_better.shape}"
        )
    lower = scores[:, ~higher_is_better]
    if np.any(lower <= 0):  # NaN compares False
        raise TunelabError("a lower-is-better score (loss, perplexity) is <= 0; CBS needs positive values")
    oriented = scores.copy()
    oriented[:, ~higher_is_better] = 1.0 / lower
    return oriented


def normalized(scores: np.ndarray) -> np.ndarray:
    """s(c, d) / best(d); 0 for missing trials and for datasets whose best score is ≤ 0 or missing."""
    scores = _check_matrix(scores)
    present = ~np.isnan(scores)
    best = np.max(np.where(present, scores, -np.inf), axis=0)
    usable = present & (best > 0)
    safe_best = np.where(best > 0, best, 1.0)
    # A score below 0 on a dataset with a positive best is worse than nothing: clip to 0 like a missing trial.
    return np.where(usable, np.clip(scores / safe_best, 0.0, None), 0.0)


def coverage(scores: np.ndarray, tau: float = 0.05) -> np.ndarray:
    """covers[c, d] = s(c, d) ≥ (1 − τ)·best(d); τ in [0, 1)."""
    if not 0 <= tau < 1:
        raise TunelabError(f"tau must be in [0, 1) (fraction of the best score one may lose); got {tau}")
    return normalized(scores) >= (1 - tau) - _COVER_TOLERANCE


def coverage_by_rank(scores: np.ndarray, k0: int) -> np.ndarray:
    """covers[c, d] = rank of c within d ≤ k0, rank = 1 + number of configs strictly better (ties share it).

    Missing trials cover nothing and do not push anyone's rank down.
    """
    if k0 < 1:
        raise TunelabError(f"k0 must be >= 1 (the rank up to which a config covers a dataset); got {k0}")
    scores = _check_matrix(scores)
    present = ~np.isnan(scores)
    filled = np.where(present, scores, -np.inf)
    ascending = np.sort(filled, axis=0)
    n_configs = scores.shape[0]
    covers = np.zeros(scores.shape, dtype=bool)
    for d in range(scores.shape[1]):
        strictly_better = n_configs - np.searchsorted(ascending[:, d], filled[:, d], side="right")
        covers[:, d] = present[:, d] & (strictly_better < k0)
    return covers


@dataclass(frozen=True)
class RankedConfig:
    config: int  # row index in the score matrix
    newly_covered: tuple[int, ...]  # dataset indices this config covers that earlier ones did not
    mean_normalized: float  # mean of s/best over all datasets, missing = 0
    covered_total: int  # datasets covered by this config and every config before it


def cbs_rank(scores: np.ndarray, tau: float = 0.05, covers: np.ndarray | None = None) -> list[RankedConfig]:
    """Greedy coverage ranking of every config (row).

    Each step picks the config covering the most not-yet-covered datasets; ties go to the higher mean
    normalized score, then to the lower index. Once nothing new can be covered, the remaining configs
    follow by mean normalized score (then index). `covers` replaces the τ rule (e.g. coverage_by_rank).
    """
    scores = _check_matrix(scores)
    covers = coverage(scores, tau) if covers is None else np.asarray(covers, dtype=bool)
    if covers.shape != scores.shape:
        raise TunelabError(f"covers has shape {covers.shape}; it must match scores {scores.shape}")
    mean_norm = normalized(scores).mean(axis=1)
    n_configs = scores.shape[0]
    covers_int = covers.astype(np.int64)
    uncovered = covers.any(axis=0)
    picked = np.zeros(n_configs, dtype=bool)
    ranking: list[RankedConfig] = []
    covered_total = 0
    while uncovered.any():
        gains = covers_int @ uncovered.astype(np.int64)
        gains[picked] = -1
        # lexsort sorts by the last key first: most gain, then highest mean, then lowest index.
        best = int(np.lexsort((np.arange(n_configs), -mean_norm, -gains))[0])
        # An uncovered dataset is coverable and its coverers are all unpicked, so `best` gains >= 1.
        new = np.flatnonzero(covers[best] & uncovered)
        uncovered[new] = False
        picked[best] = True
        covered_total += new.size
        ranking.append(RankedConfig(best, tuple(new.tolist()), float(mean_norm[best]), covered_total))
    rest = np.flatnonzero(~picked)
    rest = rest[np.argsort(-mean_norm[rest], kind="stable")]  # stable: equal means keep index order
    ranking.extend(RankedConfig(int(c), (), float(mean_norm[c]), covered_total) for c in rest)
    return ranking


def top_k_curve(scores: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """curve[K − 1] = mean over datasets of the best s/best among the first K configs of `order`.

    Missing trials and uncoverable datasets count as 0, so the curve reaches 1 only when every
    dataset has a positive best score.
    """
    order = np.asarray(order, dtype=np.int64)
    norm = normalized(scores)[order]
    return np.maximum.accumulate(norm, axis=0).mean(axis=1)


def held_out_curve(scores: np.ndarray, tau: float = 0.05) -> np.ndarray:
    """Leave-one-dataset-out transfer of a CBS ranking: curve[K − 1] = the mean over datasets d of the
    best s/best on d among the first K configs of the ranking built *without* d.

    Compared with `top_k_curve` of the full ranking (which has seen every dataset), it says how close
    the top-K recommendation gets on a dataset that played no part in choosing it.
    """
    scores = _check_matrix(scores)
    if scores.shape[1] < 2:
        raise TunelabError("cross-validation leaves one dataset out: it needs results on 2 or more datasets")
    curves = [
        top_k_curve(scores[:, [d]], [entry.config for entry in cbs_rank(np.delete(scores, d, axis=1), tau)])
        for d in range(scores.shape[1])
    ]
    return np.mean(curves, axis=0)
