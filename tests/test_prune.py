"""Pruning selection, score-file reading and noise-detection metrics against brute-force references."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from prefprune.data import PreferenceDataset, PreferencePair, load_preferences
from prefprune.metrics import detection_auc, mean_std, precision_at_k
from prefprune.prune import (
    ScoreTable,
    check_ids_match,
    n_to_select,
    prune_dataset,
    prune_file,
    read_score_table,
    select_pairs,
)


def _dataset(n: int = 40, *, flipped: set[int] = frozenset()) -> PreferenceDataset:
    pairs = [
        PreferencePair(
            id=f"p{i:03d}",
            prompt=f"Question {i}?",
            chosen=f" good answer {i}",
            rejected=f" bad {i}",
            meta={"flipped": True} if i in flipped else {},
        )
        for i in range(n)
    ]
    return PreferenceDataset(pairs, schema="prompt_chosen_rejected", source="test")


def _table(ds: PreferenceDataset, seed: int = 0) -> ScoreTable:
    rng = np.random.default_rng(seed)
    n = len(ds)
    ids = ds.ids[::-1]  # a score file need not be in dataset order
    return ScoreTable(
        ids=ids,
        columns={
            "influence": rng.normal(size=n),
            "grad_dot": rng.normal(size=n),
            "grad_cos": rng.uniform(-1, 1, n),
            "train_loss": rng.exponential(size=n),
            "margin": rng.normal(size=n),
        },
    )


def _brute_auc(susp: np.ndarray, y: np.ndarray) -> float:
    pos, neg = susp[y], susp[~y]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("n", [1, 7, 97])
def test_auc_matches_pairwise_count(n):
    rng = np.random.default_rng(n)
    s = np.round(rng.normal(size=n), 1)  # rounding makes ties, which count one half
    y = rng.uniform(size=n) < 0.3
    if n == 1:
        assert math.isnan(detection_auc(s, y, higher_is_suspect=True))
        return
    y[0], y[1] = True, False
    for high in (True, False):
        ref = _brute_auc(s if high else -s, y)
        got = detection_auc(s, y, higher_is_suspect=high)
        assert abs(got - ref) < 1e-12, (got, ref)


def test_auc_extremes_and_precision():
    s = np.array([0.1, 0.2, 5.0, 6.0, 0.3])
    y = np.array([False, False, True, True, False])
    assert detection_auc(s, y, higher_is_suspect=True) == 1.0
    assert detection_auc(s, y, higher_is_suspect=False) == 0.0
    assert precision_at_k(s, y, k=2, higher_is_suspect=True) == 1.0
    assert precision_at_k(s, y, k=4, higher_is_suspect=True) == 0.5
    assert precision_at_k(s, y, k=2, higher_is_suspect=False) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(s, y, k=0, higher_is_suspect=True)
    with pytest.raises(ValueError, match="finite"):
        detection_auc([0.0, float("nan")], [True, False], higher_is_suspect=True)
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_n_to_select_and_fraction_errors():
    assert n_to_select(40, 0.1) == 4
    assert n_to_select(30, 0.05) == 2  # 1.5 rounds up
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            n_to_select(40, bad)
    with pytest.raises(ValueError, match="selects 0 pairs"):
        n_to_select(5, 0.05)


def test_select_directions_against_sorting():
    ds = _dataset(40)
    table = _table(ds)
    for col in ("influence", "grad_dot", "grad_cos", "margin", "train_loss"):
        vals = dict(zip(table.ids, table.column(col), strict=True))
        ranked = sorted(ds.ids, key=lambda i: vals[i])  # ascending; no ties in continuous draws
        low, high = set(ranked[:4]), set(ranked[-4:])
        col_vals = [vals[i] for i in ds.ids]
        harmful = set(select_pairs(ds.ids, col_vals, method=col, fraction=0.1).ids)
        helpful = set(select_pairs(ds.ids, col_vals, method=col, fraction=0.1, mode="helpful").ids)
        if col == "train_loss":
            assert harmful == high and helpful == low, col
        else:
            assert harmful == low and helpful == high, col


def test_ties_broken_by_id_not_row_order():
    ids = ["d", "b", "c", "a"]
    sel = select_pairs(ids, [0.0, 0.0, 1.0, 0.0], method="influence", fraction=0.5)
    assert sel.ids == ("a", "b")
    sel2 = select_pairs(ids[::-1], [0.0, 1.0, 0.0, 0.0], method="influence", fraction=0.5)
    assert sel2.ids == ("a", "b")


def test_prune_dataset_excludes_exactly_selection():
    ds = _dataset(40)
    table = _table(ds)
    for method in ("influence", "train_loss", "random"):
        pruned, sel = prune_dataset(ds, table, method=method, fraction=0.2, seed=3)
        assert len(sel.ids) == 8 and len(set(sel.ids)) == 8
        assert set(pruned.ids) == set(ds.ids) - set(sel.ids)
        assert pruned.ids == [i for i in ds.ids if i not in set(sel.ids)]  # order kept
        kept, sel_k = prune_dataset(ds, table, method=method, fraction=0.2, seed=3, keep=True)
        assert set(kept.ids) == set(sel_k.ids) == set(sel.ids)
    r1 = prune_dataset(ds, None, method="random", fraction=0.2, seed=1)[1].ids
    r2 = prune_dataset(ds, None, method="random", fraction=0.2, seed=1)[1].ids
    r3 = prune_dataset(ds, None, method="random", fraction=0.2, seed=2)[1].ids
    assert r1 == r2 and r1 != r3


def test_bad_inputs():
    ds = _dataset(20)
    table = _table(ds)
    with pytest.raises(ValueError, match="unknown score column 'bogus'"):
        prune_dataset(ds, table, method="bogus", fraction=0.1)
    with pytest.raises(ValueError, match="mode must be"):
        prune_dataset(ds, table, method="influence", fraction=0.1, mode="worst")
    other = ScoreTable(
        ids=[f"x{i}" for i in range(20)], columns={"influence": np.zeros(20)}, source="s.jsonl"
    )
    with pytest.raises(ValueError, match=r"s.jsonl does not match the dataset.*20 dataset ids have no score"):
        prune_dataset(ds, other, method="influence", fraction=0.1)
    short = ScoreTable(ids=ds.ids[:-1], columns={"influence": np.zeros(19)}, source="s2")
    with pytest.raises(ValueError, match=r"1 dataset ids have no score \(e.g. \['p019'\]\)"):
        check_ids_match(ds.ids, short)
    nan = ScoreTable(ids=ds.ids, columns={"influence": np.r_[np.zeros(19), np.nan]})
    with pytest.raises(ValueError, match="non-finite.*'p019'"):
        prune_dataset(ds, nan, method="influence", fraction=0.1)
    with pytest.raises(ValueError, match="duplicate id"):
        ScoreTable(ids=["a", "a"], columns={"influence": [0.0, 1.0]})


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_read_score_table_formats(tmp_path, ext):
    ds = _dataset(12)
    table = _table(ds)
    path = tmp_path / f"scores{ext}"
    rows = [{"id": i, **{k: float(v[j]) for k, v in table.columns.items()}} for j, i in enumerate(table.ids)]
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".csv":
        cols = list(rows[0])
        lines = [",".join(cols)] + [",".join(repr(r[c]) if c != "id" else r[c] for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    (tmp_path / f"scores{ext}.json").write_text(json.dumps({"curvature": "ggn", "damping": 1.0}))
    got = read_score_table(path)
    assert got.ids == table.ids
    for k, v in table.columns.items():
        np.testing.assert_allclose(got.column(k), v, rtol=0, atol=0)
    assert got.metadata == {"curvature": "ggn", "damping": 1.0}


def test_read_score_table_errors(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": "a", "influence": 1.0}\n{"id": "b", "influence": "x"}\n')
    with pytest.raises(ValueError, match=r"row 2, column 'influence': not a number: 'x'"):
        read_score_table(p)
    p.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        read_score_table(p)
    q = tmp_path / "s.txt"
    q.write_text("x")
    with pytest.raises(ValueError, match="unsupported score file extension"):
        read_score_table(q)


def test_prune_file_roundtrip(tmp_path):
    ds = _dataset(30, flipped={0, 1, 2})
    data = tmp_path / "data.jsonl"
    ds.save(data)
    loaded = load_preferences(data)
    # Scores: the three flipped pairs get the lowest influence.
    infl = {i: (-10.0 - j if j < 3 else float(j)) for j, i in enumerate(loaded.ids)}
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": i, "influence": v}) + "\n" for i, v in infl.items()))
    out = tmp_path / "out" / "pruned.jsonl"
    summary = prune_file(data, scores, out, method="influence", fraction=0.1)
    pruned = load_preferences(out)
    removed = (tmp_path / "out" / "pruned.jsonl.removed.txt").read_text().split()
    assert summary["n_removed"] == 3 and summary["n_output"] == 27
    assert set(removed) == {loaded.ids[0], loaded.ids[1], loaded.ids[2]}
    assert removed[0] == loaded.ids[2]  # most suspect (lowest influence) first
    assert set(pruned.ids) == set(loaded.ids) - set(removed)
    assert pruned.schema == loaded.schema
    first = next(p for p in pruned if p.id == loaded.ids[5])
    assert first.prompt == loaded.pairs[5].prompt and first.chosen == loaded.pairs[5].chosen
    with pytest.raises(ValueError, match="no score column 'grad_dot'"):
        prune_file(data, scores, out, method="grad_dot", fraction=0.1)


def test_prune_cli(tmp_path, capsys):
    from prefprune.cli import main

    ds = _dataset(20)
    data = tmp_path / "d.jsonl"
    ds.save(data)
    ids = load_preferences(data).ids
    scores = tmp_path / "s.csv"
    scores.write_text("id,train_loss\n" + "".join(f"{i},{k}\n" for k, i in enumerate(ids)))
    out = tmp_path / "p.parquet"
    assert (
        main(
            [
                "prune",
                "--data",
                str(data),
                "--scores",
                str(scores),
                "--by",
                "train_loss",
                "--fraction",
                "0.1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert set(load_preferences(out).ids) == set(ids[:-2])  # the two highest losses are gone
    assert (tmp_path / "p.parquet.removed.txt").read_text().split() == [ids[-1], ids[-2]]
    assert (
        main(
            [
                "prune",
                "--data",
                str(data),
                "--scores",
                str(scores),
                "--by",
                "train_loss",
                "--fraction",
                "1.5",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "--fraction must be in the open interval (0, 1), got 1.5" in capsys.readouterr().err
    assert (
        main(["prune", "--data", str(data), "--by", "influence", "--fraction", "0.1", "--output", str(out)])
        == 2
    )
    assert "--by influence needs --scores" in capsys.readouterr().err
