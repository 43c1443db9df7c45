"""Reading preference records from files (JSON lines, JSON, CSV, parquet; gzip) and from the hub.

Each reader yields ``(record number, record)``, or ``(number, BadRecord)`` for a record it could not
read, so the caller can report file and line or skip it.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from prefprune._io import recover_commit
from prefprune.data.schemas import BadRecord, detect_schema

__all__ = ["FORMATS", "RecordStream", "format_of", "open_records"]

FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")


def format_of(path: Path) -> str:
    name = path.name.lower()
    for ext in FORMATS:
        if name.endswith(ext):
            return ext.removesuffix(".gz").lstrip(".")
    raise ValueError(f"{path}: unsupported file extension; expected one of {', '.join(FORMATS)}")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    return data


# Each reader yields (record number, record or an Exception describing why it could not be read).
RecordStream = Iterator[tuple[int, "Mapping[str, Any] | Exception"]]


class _Record(dict):
    """A JSON object that remembers the first key given twice in it or in an object inside it."""

    duplicate: str | None = None


def _inner_duplicate(value: Any) -> str | None:
    if isinstance(value, _Record):
        return value.duplicate
    if isinstance(value, list):
        return next((d for d in map(_inner_duplicate, value) if d is not None), None)
    return None


def _json_object(pairs: list[tuple[str, Any]]) -> _Record:
    # `json` keeps the last of two equal keys without a word; a record with two "chosen" is ambiguous.
    rec = _Record()
    for key, value in pairs:
        if rec.duplicate is None:
            if key in rec:
                rec.duplicate = key
            elif (inner := _inner_duplicate(value)) is not None:
                rec.duplicate = f"{key}.{inner}"
        rec[key] = value
    return rec


def _duplicate_key(rec: Any) -> BadRecord | None:
    dup = _inner_duplicate(rec)
    if dup is None:
        return None
    return BadRecord(dup, f"field {dup!r} is given twice in the record; keep one")


def _jsonl_records(data: bytes, path: Path) -> RecordStream:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, BadRecord("", f"non-UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start} of the line")
            continue
        try:
            rec = json.loads(line, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            yield lineno, BadRecord("", f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        yield lineno, _duplicate_key(rec) or rec


def _json_records(data: bytes, path: Path, split: str) -> RecordStream:
    text = data.decode("utf-8", "surrogateescape")
    try:
        doc = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Many ".json" files on the hub are JSON lines; `datasets` reads both, so do we.
            yield from _jsonl_records(data, path)
            return
        raise ValueError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, Mapping) and detect_schema(doc) is not None:
        doc = [doc]  # a file holding one record
    if isinstance(doc, Mapping):
        for key in (split, "data", "rows", "records"):
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
        else:
            raise ValueError(
                f"{path}: a JSON object must hold the records in a list under {split!r} or 'data'; "
                f"found keys {sorted(doc)[:10]}"
            )
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(doc).__name__}")
    for num, rec in enumerate(doc, start=1):
        yield num, _duplicate_key(rec) or rec


def _csv_value(key: str, value: str | None) -> Any:
    if value is None:
        return None
    v = value.strip()
    if v[:1] in ("{", "[") and key in ("info", "summaries", "extra", "meta"):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise BadRecord(key, f"field {key!r} holds malformed JSON ({e.msg})") from None
    return value


def _csv_records(data: bytes, path: Path) -> RecordStream:
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        raise ValueError(f"{path}: line 1: malformed CSV header ({e})") from None
    dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if dup is not None:
        raise ValueError(
            f"{path}: line 1: column {dup!r} appears twice in the header (columns {header[:12]}); keep one"
        )
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
        lineno = reader.line_num
        try:
            rec: dict[str, Any] = {}
            for key, value in row.items():
                if key is None:
                    raise BadRecord("", f"more cells than the {len(reader.fieldnames or [])} header columns")
                val = _csv_value(key, value)
                # Dotted headers ("info.post", "summaries.0.text") describe nested fields.
                parts = key.split(".")
                node: Any = rec
                for part, nxt in zip(parts[:-1], parts[1:], strict=False):
                    if isinstance(node, dict):
                        node = node.setdefault(part, [] if nxt.isdigit() else {})
                    else:
                        idx = int(part)
                        while len(node) <= idx:
                            node.append([] if nxt.isdigit() else {})
                        node = node[idx]
                last = parts[-1]
                if isinstance(node, list):
                    idx = int(last)
                    while len(node) <= idx:
                        node.append(None)
                    node[idx] = val
                else:
                    node[last] = val
            yield lineno, rec
        except BadRecord as e:
            yield lineno, e


def _parquet_records(path: Path) -> RecordStream:
    try:
        # Page checksums are verified where the writer stored them (prefprune writes them).
        rows = pq.read_table(path, page_checksum_verification=True).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files (and bad UTF-8 names)
        raise ValueError(f"{path}: cannot read parquet file ({type(e).__name__}: {e})") from None
    yield from enumerate(rows, start=1)


def _hub_records(source: str, name: str | None, split: str) -> RecordStream:
    import datasets  # lazy: importing datasets takes seconds, and only hub sources need it

    ds = datasets.load_dataset(source, name, split=split)
    yield from enumerate(ds, start=1)


def _looks_like_path(source: str) -> bool:
    """Hub ids look like ``owner/name``; anything path-like or with a data-file extension is a local file."""
    s = source.lower()
    return s.startswith((".", "/", "~")) or any(s.endswith(ext) for ext in FORMATS)


_MODEL_FILES = ("config.json", "adapter_config.json", "prefprune.json", "tokenizer_config.json")
_WEIGHT_SUFFIXES = (".safetensors",)


def _check_data_folder(path: Path) -> None:
    """A local folder goes to `datasets.load_dataset`: it must hold data files of one format, and not be a
    model folder (whose JSON files `datasets` would try to read as records)."""
    files = [f for f in sorted(path.rglob("*")) if f.is_file() and not f.name.startswith(".")]
    model = [f.name for f in files if f.name in _MODEL_FILES or f.suffix in _WEIGHT_SUFFIXES]
    if model:
        raise ValueError(
            f"{path}: a model folder ({', '.join(sorted(set(model))[:4])}), not preference data; give the "
            "data file (.jsonl, .json, .csv, .parquet) or a folder holding only data files"
        )
    kinds: dict[str, list[str]] = {}
    for f in files:
        name = f.name.lower()
        ext = ".arrow" if name.endswith(".arrow") else next((e for e in FORMATS if name.endswith(e)), None)
        if ext is not None:
            kinds.setdefault(ext.removesuffix(".gz"), []).append(str(f.relative_to(path)))
    if ".arrow" in kinds:  # a saved Arrow dataset: its JSON files are metadata (dataset_info, state)
        kinds.pop(".json", None)
    if len(kinds) > 1:
        shown = "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in sorted(kinds.items()))
        raise ValueError(
            f"{path}: the folder mixes data formats ({shown}); `datasets` would read one kind and ignore the "
            "others. Give one file, or a folder of one format"
        )
    if kinds:
        return
    shown = ", ".join(str(f.relative_to(path)) for f in files[:5]) or "nothing"
    raise ValueError(
        f"{path}: the folder holds no preference data file ({', '.join(FORMATS)}); found: {shown}"
    )


def _folder_records(path: Path, name: str | None, split: str) -> RecordStream:
    """`datasets.load_dataset` of a local folder, its errors named with the folder."""
    import datasets

    try:
        ds = datasets.load_dataset(str(path), name, split=split)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        cause = e.__cause__ or e
        raise ValueError(f"{path}: `datasets` cannot read the folder as a dataset ({type(cause).__name__}: "
                         f"{str(cause)[:300]})") from None
    yield from enumerate(ds, start=1)


def open_records(source: str, *, split: str, name: str | None) -> tuple[RecordStream, str, str]:
    """The record stream of a local file, a local dataset folder or a hub id.

    Returns:
        ``(stream, unit, where)``: unit is ``"line"`` for line-based files (JSON lines, CSV) and
        ``"record"`` otherwise; where names the source in messages.

    Raises:
        FileNotFoundError: ``source`` looks like a local file but does not exist.
        ValueError: an empty or unreadable file.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        _check_data_folder(path)
        return _folder_records(path, name, split), "record", str(path)
    if not path.is_file() and not _looks_like_path(source):
        where = source if name is None else f"{source} ({name}, {split})"
        return _hub_records(source, name, split), "record", where
    if not path.is_file():
        raise FileNotFoundError(f"no such preference file: {source!r}")
    fmt = format_of(path)
    recover_commit(path)  # a pruned file whose write was interrupted after its commit point
    if fmt == "parquet":
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty")
        return _parquet_records(path), "record", str(path)
    data = _read_bytes(path)
    # A byte-order mark (spreadsheet exports) is no part of the first field's name: strip it in every format.
    data = data.removeprefix(codecs.BOM_UTF8)
    if not data.strip():
        raise ValueError(f"{path}: file is empty")
    if fmt == "jsonl":
        return _jsonl_records(data, path), "line", str(path)
    if fmt == "json":
        return _json_records(data, path, split), "record", str(path)
    return _csv_records(data, path), "line", str(path)
