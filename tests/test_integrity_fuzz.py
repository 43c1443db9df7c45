"""Property-based tests (hypothesis) of the preference loaders and the score-file readers over random
bytes, random encodings and random truncations: every outcome is a correct load or an error that names
the file, never a traceback (issue 15)."""

from __future__ import annotations

import codecs
import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefprune.data import PreferenceDataset, PreferencePair, load_preferences
from prefprune.scorefile import read_score_table, write_scores

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DATA_EXTS = [".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz"]
SCORE_EXTS = [".parquet", ".jsonl", ".csv"]
HOW = ["random", "truncate", "flip", "enc"]


def _valid_data_bytes(ext: str) -> bytes:
    pairs = [PreferencePair(f"id{i}", f"Q {i} café?", f" yes {i}", f" no {i}", meta={}) for i in range(4)]
    ds = PreferenceDataset(pairs, schema="prompt_chosen_rejected", source="fuzz")
    return ds.to_bytes(Path("x" + ext))


class _Result:
    def __init__(self, n: int):
        rng = np.random.default_rng(n)
        m = rng.normal(size=n)
        self.ids = [f"p{i}" for i in range(n)]
        self.columns = {"influence": rng.normal(size=n), "grad_cos": rng.uniform(-1, 1, n),
                        "train_loss": np.logaddexp(0, -m), "margin": m}
        self.metadata = {"format": "prefprune.scores/1"}


_SCORE_CACHE: dict[str, bytes] = {}


def _valid_score_bytes(ext: str) -> tuple[bytes, bytes]:
    if ext not in _SCORE_CACHE:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"s{ext}"
            write_scores(_Result(6), p)
            _SCORE_CACHE[ext] = p.read_bytes()
            _SCORE_CACHE[ext + ".json"] = Path(str(p) + ".json").read_bytes()
    return _SCORE_CACHE[ext], _SCORE_CACHE[ext + ".json"]


def _mutate(data: bytes, how: str, draw) -> bytes:
    """Random bytes, a truncation, flipped bytes, or the text re-encoded (with or without a BOM)."""
    if how == "random":
        return draw(st.binary(max_size=300))
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            if out:
                out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    enc = draw(st.sampled_from(["utf-16", "utf-16-le", "latin-1", "cp1252", "utf-8-sig", "utf-32"]))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    out = text.encode(enc, "replace")
    if enc == "utf-16-le" and draw(st.booleans()):
        out = codecs.BOM_UTF16_LE + out
    return out


def _named_error(path: Path, fn) -> object:
    try:
        return fn()
    except (ValueError, FileNotFoundError) as e:
        assert str(path) in str(e) or path.name in str(e), f"error does not name the file: {e!r}"
        return e


@pytest.mark.slow
@SETTINGS
@given(data=st.data(), ext=st.sampled_from(DATA_EXTS), how=st.sampled_from(HOW))
def test_loaders_load_or_name_the_file(data, ext, how):
    raw = _mutate(_valid_data_bytes(ext), how, data.draw)
    if ext.endswith(".gz") and data.draw(st.booleans()):
        raw = gzip.compress(raw, mtime=0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{ext}"
        path.write_bytes(raw)
        out = _named_error(path, lambda: load_preferences(path))
        if isinstance(out, PreferenceDataset):
            assert len(out) >= 1
            for p in out:  # a load is a correct load: text that is valid and writable again
                for text in (p.id, p.prompt, p.chosen, p.rejected):
                    text.encode("utf-8")
            out.to_bytes(Path(d) / f"again{ext}")


@pytest.mark.slow
@SETTINGS
@given(data=st.data(), ext=st.sampled_from(SCORE_EXTS), how=st.sampled_from(HOW),
       sidecar=st.sampled_from(["kept", "none", "mutated"]))
def test_score_readers_load_or_name_the_file(data, ext, how, sidecar):
    good, side = _valid_score_bytes(ext)
    raw = _mutate(good, how, data.draw)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"s{ext}"
        path.write_bytes(raw)
        side_path = Path(str(path) + ".json")
        if sidecar == "kept":
            side_path.write_bytes(side)
        elif sidecar == "mutated":
            side_path.write_bytes(_mutate(side, data.draw(st.sampled_from(["random", "truncate", "flip"])),
                                          data.draw))
        out = _named_error(path, lambda: read_score_table(path))
        if sidecar == "kept" and raw != good:
            # With its sidecar, any change to the score file is caught by the content hash.
            assert isinstance(out, ValueError), "a changed score file was read as valid"
        if not isinstance(out, Exception):
            assert len(out.ids) == len(set(out.ids)) >= 1
            for name, col in out.columns.items():
                assert not np.isinf(col).any(), name
            if "grad_cos" in out.columns:
                assert (np.abs(out.columns["grad_cos"][~np.isnan(out.columns["grad_cos"])]) <= 1 + 1e-9).all()
            if sidecar == "kept":
                np.testing.assert_array_equal(out.column("influence"), _Result(6).columns["influence"])


def test_unmutated_files_load():
    with tempfile.TemporaryDirectory() as d:
        for ext in DATA_EXTS:
            p = Path(d) / f"ok{ext}"
            p.write_bytes(_valid_data_bytes(ext))
            assert load_preferences(p).ids == [f"id{i}" for i in range(4)]
        for ext in SCORE_EXTS:
            p = Path(d) / f"s{ext}"
            good, side = _valid_score_bytes(ext)
            p.write_bytes(good)
            Path(str(p) + ".json").write_bytes(side)
            assert read_score_table(p).ids == [f"p{i}" for i in range(6)]
    assert json.loads(_valid_score_bytes(".csv")[1])["content"]["rows"] == 6


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
