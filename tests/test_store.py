"""The SQLite results store and the results-table reader, down to the score matrix CBS ranks."""

import math

import numpy as np
import pytest

from tunelab.errors import TunelabError
from tunelab.hpsearch.cbs import cbs_rank, orient
from tunelab.hpsearch.store import ResultsStore, load_results_table

CONFIG_A = {"train": {"lr": 1e-4}}
CONFIG_B = {"train": {"lr": 2e-4}}


def filled_store(path):
    store = ResultsStore(path)
    store.record("a", CONFIG_A, "add", "exact_match", 0.9, duration_s=12.5, peak_memory_bytes=1024)
    store.record("a", CONFIG_A, "rev", "loss", 2.0)
    store.record("b", CONFIG_B, "add", "exact_match", None, status="failed", error="CUDA out of memory")
    store.record("b", CONFIG_B, "rev", "loss", 1.5)
    return store


def test_finished_only_for_done_trials(tmp_path):
    with filled_store(tmp_path / "results.sqlite") as store:
        assert store.finished(["a"], "add", 0)
        assert not store.finished(["b"], "add", 0)  # failed: run it again
        assert not store.finished(["c"], "add", 0)  # never run


def test_score_matrix_failed_is_missing(tmp_path):
    with filled_store(tmp_path / "results.sqlite") as store:
        matrix = store.score_matrix()
    assert matrix.config_ids == ["a", "b"]
    assert matrix.datasets == ["add", "rev"]
    np.testing.assert_array_equal(matrix.scores, [[0.9, 2.0], [np.nan, 1.5]])
    assert matrix.higher_is_better.tolist() == [True, False]
    assert matrix.configs == {"a": CONFIG_A, "b": CONFIG_B}


def test_rows_keep_every_column_and_survive_reopening(tmp_path):
    path = tmp_path / "results.sqlite"
    filled_store(path).close()
    with ResultsStore(path) as store:
        rows = store.rows()
    assert [(row["config_id"], row["dataset"], row["status"]) for row in rows] == [
        ("a", "add", "done"), ("a", "rev", "done"), ("b", "add", "failed"), ("b", "rev", "done"),
    ]  # fmt: skip
    first, failed = rows[0], rows[2]
    assert (first["score"], first["duration_s"], first["peak_memory_bytes"]) == (0.9, 12.5, 1024)
    assert first["config"] == CONFIG_A and first["finished_at"]
    assert (failed["score"], failed["error"]) == (None, "CUDA out of memory")


def test_retry_replaces_the_failed_trial_in_place(tmp_path):
    with filled_store(tmp_path / "results.sqlite") as store:
        store.record("b", CONFIG_B, "add", "exact_match", 0.95)
        assert store.finished(["b"], "add", 0)
        assert len(store.rows()) == 4
        matrix = store.score_matrix()
    assert matrix.config_ids == ["a", "b"]  # order of first appearance is kept
    np.testing.assert_array_equal(matrix.scores, [[0.9, 2.0], [0.95, 1.5]])


def test_record_rejects_bad_input(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        with pytest.raises(TunelabError, match="without a score"):
            store.record("a", CONFIG_A, "add", "exact_match", None)
        with pytest.raises(TunelabError, match="without a score"):
            store.record("a", CONFIG_A, "add", "exact_match", math.nan)
        with pytest.raises(TunelabError, match="unknown metric 'bleu'"):
            store.record("a", CONFIG_A, "add", "bleu", 0.5)
        with pytest.raises(TunelabError, match="status"):
            store.record("a", CONFIG_A, "add", "exact_match", 0.5, status="running")
        assert store.rows() == []


def test_store_to_cbs(tmp_path):
    with filled_store(tmp_path / "results.sqlite") as store:
        matrix = store.score_matrix()
    oriented = orient(matrix.scores, matrix.higher_is_better)
    # add: only a has a score; rev: b has the lower loss, a's 2.0 > 1.5 / 0.95 covers nothing
    ranking = cbs_rank(oriented)
    assert [(matrix.config_ids[entry.config], entry.newly_covered) for entry in ranking] == [
        ("a", (0,)),
        ("b", (1,)),
    ]


def test_results_table_csv(tmp_path):
    path = tmp_path / "grid.csv"
    path.write_text(
        "config,dataset,score,metric,lr,r,scheduler\n"
        "c1,sst2,0.91,exact_match,1e-4,8,cosine\n"
        "c1,xsum,2.5,loss,1e-4,8,cosine\n"
        "c2,sst2,,exact_match,5e-5,16,linear\n"
        "c2,xsum,2.25,loss,5e-5,16,linear\n"
        "c3,xsum,3.0,loss,1e-5,16,linear\n"
    )
    matrix = load_results_table(path)
    assert matrix.config_ids == ["c1", "c2", "c3"]
    assert matrix.datasets == ["sst2", "xsum"]
    np.testing.assert_array_equal(matrix.scores, [[0.91, 2.5], [np.nan, 2.25], [np.nan, 3.0]])
    assert matrix.higher_is_better.tolist() == [True, False]
    assert matrix.configs["c1"] == {"lr": 1e-4, "r": 8, "scheduler": "cosine"}
    assert matrix.configs["c3"] == {"lr": 1e-5, "r": 16, "scheduler": "linear"}


def test_results_table_direction_column_and_default(tmp_path):
    path = tmp_path / "grid.csv"
    path.write_text("config,dataset,score,higher_is_better\nc1,a,1.0,false\nc1,b,0.5,true\n")
    assert load_results_table(path).higher_is_better.tolist() == [False, True]
    path.write_text("config,dataset,score\nc1,a,1.0\nc1,b,0.5\n")
    assert load_results_table(path).higher_is_better.tolist() == [True, True]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("config,dataset\nc1,a\n", "missing column(s) score"),
        ("config,dataset,score\nc1,a,1\nc1,a,2\n", "(row 3): config 'c1' appears twice for dataset 'a'"),
        ("config,dataset,score\nc1,a,high\n", "score 'high' is not a number"),
        ("config,dataset,score,metric\nc1,a,1,bleu\n", "unknown metric 'bleu'"),
        (
            "config,dataset,score,metric\nc1,a,1,loss\nc2,a,1,exact_match\n",
            "mixes higher- and lower-is-better",
        ),
        ("config,dataset,score,higher_is_better\nc1,a,1,yes\n", "higher_is_better is 'yes'"),
        ("config,dataset,score,lr\nc1,a,1,0.1\nc1,b,1,0.2\n", "config 'c1' has different hyperparameters"),
        ("config,dataset,score\n", "no rows"),
    ],
)
def test_results_table_errors(tmp_path, text, message):
    path = tmp_path / "grid.csv"
    path.write_text(text)
    with pytest.raises(TunelabError, match="grid.csv") as caught:
        load_results_table(path)
    assert message in str(caught.value)


def test_results_table_unknown_format_and_missing_file(tmp_path):
    path = tmp_path / "grid.xlsx"
    path.write_text("")
    with pytest.raises(TunelabError, match="use .csv or .parquet"):
        load_results_table(path)
    with pytest.raises(TunelabError, match="not found"):
        load_results_table(tmp_path / "nothing.csv")


def test_results_table_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"config": ["c1", "c1"], "dataset": ["a", "b"], "score": [0.5, None], "r": [8, 8]})
    path = tmp_path / "grid.parquet"
    pyarrow.parquet.write_table(table, path)
    matrix = load_results_table(path)
    np.testing.assert_array_equal(matrix.scores, [[0.5, np.nan]])
    assert matrix.configs == {"c1": {"r": 8}}


def test_seeds_are_averaged_with_their_spread_and_test_scores_and_costs(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.record("a", CONFIG_A, "add", "exact_match", 0.6, seed=1, test_score=0.5, step_time_s=2.0)
        store.record("a", CONFIG_A, "add", "exact_match", 0.8, seed=2, test_score=0.7, step_time_s=4.0)
        store.record("b", CONFIG_B, "add", "exact_match", 0.9, seed=1, test_score=0.4, peak_memory_bytes=7)
        store.record("b", CONFIG_B, "add", "exact_match", None, seed=2, status="failed")
        assert store.finished(["a"], "add", 2) and not store.finished(["a", "b"], "add", 2)
        matrix = store.score_matrix()
    np.testing.assert_allclose(matrix.scores[:, 0], [0.7, 0.9])  # b: the failed seed left out
    np.testing.assert_allclose(matrix.test_scores[:, 0], [0.6, 0.4])
    # sample standard deviation: |0.8 - 0.6| / sqrt(2) for two seeds; 0 for one
    np.testing.assert_allclose(matrix.spread[:, 0], [0.2 / 2**0.5, 0.0])
    np.testing.assert_allclose(matrix.test_spread[:, 0], [0.2 / 2**0.5, 0.0])
    np.testing.assert_allclose(matrix.seeds[:, 0], [2, 1])
    assert matrix.costs == {
        "a": {"step_time_s": 3.0, "peak_memory_bytes": None},
        "b": {"step_time_s": None, "peak_memory_bytes": 7},
    }


def test_a_database_of_an_earlier_tunelab_is_named_as_such(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE trials (config_id TEXT, config_json TEXT, dataset TEXT, score REAL)")
    with pytest.raises(TunelabError, match="written by an earlier tunelab .* sweep again into a new --db"):
        ResultsStore(path, read_only=True)


def test_a_database_from_before_data_fingerprints_is_read_as_is_and_migrated_when_written(tmp_path):
    """The committed comparison databases have no data_sha256 column: reading them must not write them,
    and an older tunelab must still read one that a sweep has migrated."""
    import hashlib
    import sqlite3

    db = tmp_path / "old.sqlite"
    with ResultsStore(db) as store:
        store.record("c1", {"train": {"lr": 1e-4}}, "add", "loss", 1.5, data_sha256="abc")
    with sqlite3.connect(db) as conn:  # the schema as it was: no data_sha256
        conn.execute("ALTER TABLE trials DROP COLUMN data_sha256")
    conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with ResultsStore(db, read_only=True) as store:
        (row,) = store.rows()
        assert row["data_sha256"] is None and store.finished(["c1"], "add", 0, data_sha256="new")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    for _ in range(2):  # migrated by the first opening to write; the second finds the column there
        with ResultsStore(db) as store:
            store.record("c2", {"train": {"lr": 3e-4}}, "add", "loss", 1.2, data_sha256="new")
    with sqlite3.connect(db) as conn:  # an older tunelab's explicit columns still read it
        assert conn.execute("SELECT config_id, score FROM trials ORDER BY rowid").fetchall() == [
            ("c1", 1.5),
            ("c2", 1.2),
        ]
    conn.close()
    with ResultsStore(db, read_only=True) as store:
        assert [row["data_sha256"] for row in store.rows()] == [None, "new"]
        assert store.finished(["c1"], "add", 0, data_sha256="new")  # no fingerprint: taken as today's
        assert not store.finished(["c2"], "add", 0, data_sha256="edited")


def test_score_matrix_leaves_out_results_on_data_since_edited(tmp_path):
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.record("a", CONFIG_A, "add", "loss", 1.0, data_sha256="old")
        store.record("b", CONFIG_B, "add", "loss", 2.0, data_sha256="new")
        store.record("b", CONFIG_B, "rev", "loss", 3.0)  # no fingerprint (built-in data): today's
        everything = store.score_matrix()
        today = store.score_matrix({"add": "new", "rev": "r"})
    np.testing.assert_array_equal(everything.scores, [[1.0, np.nan], [2.0, 3.0]])
    assert today.config_ids == ["b"]
    np.testing.assert_array_equal(today.scores, [[2.0, 3.0]])
