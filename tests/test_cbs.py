"""CBS over small score matrices whose rankings are worked out by hand in the comments."""

import numpy as np
import pytest

from tunelab.errors import TunelabError
from tunelab.hpsearch.cbs import (
    RankedConfig,
    cbs_rank,
    coverage,
    coverage_by_rank,
    normalized,
    orient,
    top_k_curve,
)

NAN = np.nan

# best = 1.0 everywhere; with tau = 0.05 a config covers a dataset when its score is >= 0.95.
# covers: c0 {d0}, c1 {d1}, c2 {d1, d2}, c3 {d0, d2}
# means:  c0 1.7/3, c1 2.0/3, c2 2.46/3, c3 2.13/3
SCORES = np.array(
    [
        [1.00, 0.50, 0.20],
        [0.90, 1.00, 0.10],
        [0.50, 0.96, 1.00],
        [0.97, 0.20, 0.96],
    ]
)


def test_greedy_ranking_by_hand():
    ranking = cbs_rank(SCORES, tau=0.05)
    # step 1: c2 and c3 both cover 2 -> c2 has the higher mean; step 2: only d0 left, c0 and c3
    # cover it -> c3 (mean 0.71 > 0.57); then the rest by mean: c1 (0.67), c0 (0.57).
    assert [entry.config for entry in ranking] == [2, 3, 1, 0]
    assert ranking[0] == RankedConfig(2, (1, 2), pytest.approx(2.46 / 3), 2)
    assert ranking[1] == RankedConfig(3, (0,), pytest.approx(2.13 / 3), 3)
    assert ranking[2] == RankedConfig(1, (), pytest.approx(2.0 / 3), 3)
    assert ranking[3] == RankedConfig(0, (), pytest.approx(1.7 / 3), 3)


def test_top_k_curve_by_hand():
    curve = top_k_curve(SCORES, [2, 3, 1, 0])
    # K=1: c2 -> (0.5 + 0.96 + 1) / 3; K=2: + c3 -> (0.97 + 0.96 + 1) / 3; K=3: + c1 -> (0.97 + 1 + 1) / 3
    np.testing.assert_allclose(curve, [2.46 / 3, 2.93 / 3, 2.97 / 3, 1.0])


def test_gain_and_mean_ties_go_to_the_lower_index():
    scores = np.array([[1.0, 0.5], [1.0, 0.5], [0.5, 1.0]])
    # c0 and c1 are identical: c0 first; then c2 covers d1; c1 covers nothing new and comes last.
    assert [entry.config for entry in cbs_rank(scores)] == [0, 2, 1]
    # after coverage, equal means are ordered by index
    scores = np.array([[0.1, 0.1], [1.0, 1.0], [0.1, 0.1], [0.3, 0.3], [0.1, 0.1]])
    assert [entry.config for entry in cbs_rank(scores)] == [1, 3, 0, 2, 4]


def test_missing_trials_cover_nothing_and_count_as_zero():
    scores = np.array([[NAN, 1.0], [0.8, 0.6]])
    # best = (0.8, 1.0): c0 covers d1 only, mean (0 + 1) / 2 = 0.5; c1 covers d0 only, mean (1 + 0.6) / 2
    assert coverage(scores).tolist() == [[False, True], [True, False]]
    ranking = cbs_rank(scores)
    assert [(entry.config, entry.newly_covered) for entry in ranking] == [(1, (0,)), (0, (1,))]
    assert ranking[0].mean_normalized == pytest.approx(0.8)
    assert ranking[1].mean_normalized == pytest.approx(0.5)
    np.testing.assert_allclose(top_k_curve(scores, [0, 1]), [0.5, 1.0])


def test_dataset_without_a_positive_best_is_covered_by_nobody():
    scores = np.array([[1.0, NAN, 0.0], [0.5, NAN, 0.0]])
    np.testing.assert_array_equal(normalized(scores), [[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert not coverage(scores)[:, 1:].any()
    ranking = cbs_rank(scores)
    assert [(entry.config, entry.covered_total) for entry in ranking] == [(0, 1), (1, 1)]
    # the curve stops at 1/3: two of three datasets can never contribute
    np.testing.assert_allclose(top_k_curve(scores, [0, 1]), [1 / 3, 1 / 3])


def test_negative_score_counts_as_zero():
    assert normalized(np.array([[2.0], [-1.0]])).tolist() == [[1.0], [0.0]]


def test_nothing_coverable_ranks_by_mean():
    scores = np.array([[0.0, -1.0], [NAN, NAN]])
    ranked = [(entry.config, entry.newly_covered, entry.covered_total) for entry in cbs_rank(scores)]
    assert ranked == [(0, (), 0), (1, (), 0)]


def test_tau_boundary_is_inclusive():
    # 1.045 = (1 - 0.05) * 1.1 exactly in decimal; in floats 1.045 / 1.1 < 0.95
    scores = np.array([[1.1], [1.045], [1.0449]])
    assert coverage(scores, tau=0.05)[:, 0].tolist() == [True, True, False]
    scores = np.array([[80.0], [76.0], [75.99]])
    assert coverage(scores, tau=0.05)[:, 0].tolist() == [True, True, False]


def test_tau_zero_covers_only_the_best_and_its_ties():
    scores = np.array([[0.7], [0.7], [0.6999]])
    assert coverage(scores, tau=0.0)[:, 0].tolist() == [True, True, False]


@pytest.mark.parametrize("tau", [-0.1, 1.0, 1.5])
def test_tau_out_of_range(tau):
    with pytest.raises(TunelabError, match="tau"):
        coverage(SCORES, tau)


def test_lower_is_better_uses_the_loss_ratio():
    losses = np.array([[1.0, 0.5], [1.05, 0.9], [1.0 / 0.95, 0.5], [1.2, NAN]])
    oriented = orient(losses, np.array([False, True]))
    # normalized = min_loss / loss on the loss column; the accuracy column is untouched
    np.testing.assert_allclose(normalized(oriented)[:, 0], [1.0, 1.0 / 1.05, 0.95, 1.0 / 1.2])
    np.testing.assert_allclose(oriented[:, 1], losses[:, 1])
    # covered when loss <= 1.0 / (1 - 0.05) = 1.0526...: c0, c1 and c2 (exactly at the boundary)
    assert coverage(oriented, tau=0.05)[:, 0].tolist() == [True, True, True, False]


def test_orient_rejects_non_positive_loss_and_wrong_shape():
    with pytest.raises(TunelabError, match="<= 0"):
        orient(np.array([[0.0], [1.0]]), np.array([False]))
    with pytest.raises(TunelabError, match="one flag per dataset"):
        orient(np.ones((2, 2)), np.array([True]))
    # a non-positive *accuracy* is fine
    assert orient(np.array([[0.0]]), np.array([True])).tolist() == [[0.0]]


def test_coverage_by_rank_ties_share_a_rank():
    scores = np.array([[0.9], [0.8], [0.8], [0.5], [NAN]])
    # ranks 1, 2, 2, 4; the missing trial covers nothing
    assert coverage_by_rank(scores, 1)[:, 0].tolist() == [True, False, False, False, False]
    assert coverage_by_rank(scores, 2)[:, 0].tolist() == [True, True, True, False, False]
    assert coverage_by_rank(scores, 3)[:, 0].tolist() == [True, True, True, False, False]
    assert coverage_by_rank(scores, 4)[:, 0].tolist() == [True, True, True, True, False]
    with pytest.raises(TunelabError, match="k0"):
        coverage_by_rank(scores, 0)


def test_cbs_with_rank_coverage():
    # with k0 = 2: c0 covers {d0, d1} (ranks 1, 2); c1 {d1} (rank 1); c2 {d0, d2}; c3 {d2}
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.9, 0.2], [0.8, 0.05, 0.9], [0.3, 0.2, 0.8]])
    covers = coverage_by_rank(scores, 2)
    assert covers.tolist() == [
        [True, True, False],
        [False, True, False],
        [True, False, True],
        [False, False, True],
    ]
    # best = 0.9 everywhere, so mean = row sum / 2.7: c0 0.667, c1 0.444, c2 0.648, c3 0.481
    # step 1: c0 and c2 gain 2 -> c0; step 2: d2 is left, c2 and c3 cover it -> c2; rest by mean: c3, c1
    ranked = [(entry.config, entry.newly_covered) for entry in cbs_rank(scores, covers=covers)]
    assert ranked == [(0, (0, 1)), (2, (2,)), (3, ()), (1, ())]
    with pytest.raises(TunelabError, match="shape"):
        cbs_rank(scores, covers=covers[:, :2])


def test_held_out_curve_ranks_without_the_dataset_it_scores():
    from tunelab.hpsearch.cbs import held_out_curve

    # three configs, three datasets; each config is best on one dataset
    scores = np.array([[1.0, 0.5, 0.8], [0.6, 1.0, 0.5], [0.9, 0.9, 1.0]])
    # worked out by hand at tau = 0.1 (covers: s/best >= 0.9; after coverage, by mean s/best):
    #   without d0: c2 covers d1 and d2, then c1 (mean .75), c0 (.65); on d0: 0.9, 0.9, 1.0
    #   without d1: c2 covers d0 and d2, then c0 (.9), c1 (.55); on d1: 0.9, 0.9, 1.0
    #   without d2: c2 covers d0 and d1, then c1 (.8), c0 (.75); on d2: 1.0, 1.0, 1.0
    curve = held_out_curve(scores, tau=0.1)
    np.testing.assert_allclose(curve, [(0.9 + 0.9 + 1.0) / 3, (0.9 + 0.9 + 1.0) / 3, 1.0])


def test_arms_split_a_method_by_what_varies_in_it_except_lr_and_rank():
    from tunelab.hpsearch.ranking import arms, best_per_arm

    def entry(config: str, mean: float, **hyperparameters) -> dict:
        return {"config": config, "mean_normalized": mean, "hyperparameters": hyperparameters}

    entries = [
        entry("a", 0.9, **{"method.name": "lora", "method.r": 8, "train.lr": 1e-3}),
        entry("b", 0.8, **{"method.name": "lora", "method.r": 8, "train.lr": 3e-3}),
        entry("c", 0.7, **{"method.name": "lora", "method.r": 8, "quantization": "nf4", "train.lr": 1e-3}),
        entry("d", 0.6, **{"method.name": "lora", "method.r": 16, "quantization": "nf4", "train.lr": 1e-3}),
        entry(
            "e", 0.5, **{"method.name": "dylora", "quantization": "nf4", "method.rank": 4, "train.lr": 1e-3}
        ),
        entry(
            "f", 0.8, **{"method.name": "dylora", "quantization": "nf4", "method.rank": 8, "train.lr": 1e-3}
        ),
        entry("g", 0.4, **{"method.name": "spiel", "method.regrowth": "ag", "train.weight_decay": 0.0}),
        entry("h", 0.3, **{"method.name": "spiel", "method.regrowth": "ag", "train.weight_decay": 3.0}),
        entry("i", 0.2, **{"method.name": "spiel", "method.regrowth": "ma", "train.weight_decay": 0.0}),
    ]
    grouped = arms(entries)
    assert {label: [e["config"] for e in group] for label, group in grouped.items()} == {
        "lora": ["a", "b"],  # lr is what an arm tunes
        "nf4 lora r=8": ["c"],  # r varies within nf4 lora, so it names the arm
        "nf4 lora r=16": ["d"],
        "nf4 dylora": ["e", "f"],  # an evaluated rank is tuned like the lr
        "spiel-ag weight_decay=0.0": ["g"],
        "spiel-ag weight_decay=3.0": ["h"],
        "spiel-ma": ["i"],  # regrowth names the method; wd does not vary within spiel-ma
    }
    assert {label: best["config"] for label, best in best_per_arm(grouped).items()}["nf4 dylora"] == "f"
    assert best_per_arm(grouped)["lora"]["config"] == "a"


def test_scores_by_lr_and_the_arms_whose_best_lr_is_at_an_edge_of_what_they_tried():
    from tunelab.hpsearch.ranking import best_lr_at_grid_edge, scores_by_lr

    def entry(mean: float, lr: float | None, rank: int | None = None) -> dict:
        return {"mean_normalized": mean, "hyperparameters": {"train.lr": lr, "method.rank": rank}}

    groups = {
        "lora": [entry(0.8, 1e-3), entry(0.9, 1e-4), entry(1.0, 3e-4)],  # bracketed
        "dylora": [  # its best rank at each lr: 0.7 at 1e-4, 0.95 at 1e-3
            entry(0.6, 1e-4, 1), entry(0.7, 1e-4, 8), entry(0.95, 1e-3, 8), entry(0.5, 1e-3, 1)
        ],
        "full": [entry(0.9, 3e-5), entry(0.7, 1e-5), entry(0.8, 1e-4)],  # scores out of lr order
        "spiel": [entry(0.9, 1e-4)],  # one lr: no edge to speak of
        "table": [entry(0.9, None)],  # no lr recorded
    }  # fmt: skip
    curves = scores_by_lr(groups)
    assert curves == {
        "lora": [(1e-4, 0.9), (3e-4, 1.0), (1e-3, 0.8)],
        "dylora": [(1e-4, 0.7), (1e-3, 0.95)],
        "full": [(1e-5, 0.7), (3e-5, 0.9), (1e-4, 0.8)],
        "spiel": [(1e-4, 0.9)],
    }
    curves["low"] = [(1e-5, 0.9), (1e-4, 0.8)]
    curves["tied"] = [(1e-5, 0.9), (1e-4, 0.9), (1e-3, 0.5)]  # as good inside the grid: bracketed
    assert best_lr_at_grid_edge(curves) == {"dylora": "highest", "low": "lowest"}


def test_varying_keys_leave_out_a_key_one_method_sets_at_one_value():
    from tunelab.hpsearch.ranking import varying_keys

    configs = [
        {"method.name": "lora", "method.r": 8, "method.alpha": 16, "train.lr": 1e-3},
        {"method.name": "lora", "method.r": 16, "method.alpha": 16, "train.lr": 1e-3},
        {"method.name": "spiel", "method.accumulation_steps": 5, "train.lr": 1e-4},
    ]
    assert varying_keys(configs) == ["method.name", "method.r", "train.lr"]


def test_usual_values_name_a_majority_once_but_never_the_method_or_the_tuned_keys():
    from tunelab.hpsearch.ranking import usual_values

    configs = [
        {"method.name": "lora", "train.lr": 1e-3, "train.max_grad_norm": 1.0, "train.weight_decay": 0.0},
        {"method.name": "lora", "train.lr": 1e-3, "train.max_grad_norm": 1.0, "train.weight_decay": 0.1},
        {"method.name": "lora", "train.lr": 1e-4, "train.max_grad_norm": 0.0, "train.weight_decay": 0.2},
        {"method.name": "spiel", "train.lr": 1e-3, "train.max_grad_norm": 1.0, "train.weight_decay": 0.2},
    ]
    keys = ["method.name", "train.lr", "train.max_grad_norm", "train.weight_decay"]
    # lr 1e-3 is 3 of 4 but a tuned key; weight_decay's 0.2 is 2 of 4, not more than half
    assert usual_values(configs, keys) == {"train.max_grad_norm": 1.0}
