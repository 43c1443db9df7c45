"""What a load says about the records it did not keep: hints that name the CLI flag and YAML key, and one
summary line per kind (bad records, duplicates) instead of a line per record (issue 23)."""

from __future__ import annotations

import json
import logging

import pytest

from prefprune.cli import main
from prefprune.data import load_preferences


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _records(n_good: int, n_empty: int, n_dup: int) -> list[dict]:
    good = [{"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(n_good)]
    empty = [{"prompt": f"e{i}", "chosen": "", "rejected": " no"} for i in range(n_empty)]
    return good + empty + [dict(good[i]) for i in range(n_dup)]


def test_bad_record_hint_names_the_flag_and_the_yaml_key(tmp_path):
    """Pins: the error for a bad record tells a CLI or YAML user how to skip it (it used to name only the
    Python keyword ``skip_bad=True``)."""
    path = _write(tmp_path / "d.jsonl", _records(3, 1, 0))
    with pytest.raises(ValueError) as err:
        load_preferences(path)
    msg = str(err.value)
    assert "d.jsonl: line 4, field 'chosen'" in msg, msg
    assert "--skip-bad" in msg and "--data.skip-bad" in msg and "data.skip_bad: true" in msg, msg


def test_score_takes_skip_bad(tmp_path, capsys):
    """Pins: `prefprune score` reads data but had no --skip-bad flag, so the hint's flag was refused there."""
    path = _write(tmp_path / "d.jsonl", _records(3, 1, 0))
    code = main(["score", "--model", str(tmp_path / "absent"), "--train", str(path), "--val", str(path),
                 "--output", str(tmp_path / "s.jsonl"), "--skip-bad"])
    err = capsys.readouterr().err
    assert "Unrecognized" not in err and "unrecognized" not in err, err
    assert code == 2 and "absent" in err, err  # it got past parsing and stopped on the missing model


def test_skipped_and_duplicate_records_are_summarised_once(tmp_path, caplog):
    """Pins: 12 skipped records give one warning line (count, the first five positions, the reason), not a
    line each; and dropped exact duplicates are logged (they used to be dropped without a word)."""
    path = _write(tmp_path / "d.jsonl", _records(10, 12, 3))
    with caplog.at_level(logging.WARNING, logger="prefprune"):
        ds = load_preferences(path, skip_bad=True)
    assert (len(ds), ds.stats["skipped_bad"], ds.stats["dropped_duplicate"]) == (10, 12, 3)
    lines = [r.getMessage() for r in caplog.records]
    bad = [m for m in lines if "bad record" in m]
    assert len(bad) == 1, lines
    assert "skipped 12 bad record(s) of 25" in bad[0] and "line 11, field 'chosen'" in bad[0], bad
    assert "line 15, field 'chosen'" in bad[0] and "line 16," not in bad[0] and "and 7 more" in bad[0], bad
    dup = [m for m in lines if "exact duplicate" in m]
    assert len(dup) == 1 and "dropped 3 exact duplicate pair(s)" in dup[0], lines
    assert "line 23 repeats line 1" in dup[0], dup
