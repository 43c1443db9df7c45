"""The score file and its sidecar as one unit: writing (atomic, checksummed) and reading (verified).

A score run writes ``SCORES`` (.parquet, .jsonl or .csv: an ``id`` column and one column per score)
and ``SCORES.json`` (the sidecar: settings, solver status, versions). Both are committed together by
`prefprune._io.commit_files`, so a crash leaves the previous pair or the new one. The sidecar's
``content`` entry carries the SHA-256, byte count, row count and columns of the score file; parquet
files also carry page checksums. `read_score_table` verifies both, then checks every value: finite
(NaN = missing), |grad_cos| ≤ 1, train_loss ≥ 0, truncated ∈ {0, 1},
one row per id. Every error names the file, the line or row, and the column.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefprune._io import commit_files, jsonable, output_lock, recover_commit, refuse_overlap, sha256_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "FORMAT",
    "OUTPUT_EXTENSIONS",
    "ScoreTable",
    "check_output_path",
    "encode_per_query",
    "encode_table",
    "is_score_file",
    "per_query_path",
    "read_per_query",
    "read_score_table",
    "read_sidecar",
    "sidecar_path",
    "unit_paths",
    "write_scores",
]

FORMAT = "prefprune.scores/1"
COLUMNS = ("influence", "grad_dot", "grad_cos", "train_loss", "margin", "truncated")
OUTPUT_EXTENSIONS = (".parquet", ".jsonl", ".csv")
_COS_TOL = 1e-9  # a cosine computed in floating point may pass 1 by rounding, never by more


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<score file>.json``."""
    return Path(str(path) + ".json")


def per_query_path(path: str | os.PathLike) -> Path:
    """``<score file>.per_query.safetensors``: the (train × validation) matrix of ``--per-query``."""
    return Path(str(path) + ".per_query.safetensors")


def unit_paths(path: str | os.PathLike, what: str = "the score file") -> dict[str, Path]:
    """Every file of a score file's commit unit, by what it is: the file, its sidecar, its per-query matrix
    (for `prefprune._io.refuse_overlap`: writing over any of them breaks the score file)."""
    return {what: Path(path), f"{what}'s sidecar": sidecar_path(path),
            f"{what}'s per-query matrix": per_query_path(path)}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def is_score_file(path: str | os.PathLike) -> bool:
    """Whether `path` has a sidecar that names the prefprune score format (so replacing it is expected)."""
    try:
        meta = json.loads(sidecar_path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, Mapping) and str(meta.get("format", "")).startswith("prefprune.scores")


def _is_our_per_query(path: Path) -> bool:
    """Whether `path` is a per-query matrix prefprune wrote (its safetensors header says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 -- anything unreadable is not ours
        return False
    return str(meta.get("format", "")).startswith("prefprune.per_query")


def check_output_path(
    path: str | os.PathLike,
    *,
    overwrite: bool = True,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> Path:
    """The output path, checked: known extension, existing folder, not a folder itself, no input.

    The score file is written with its sidecar (and per-query matrix) as one unit (`unit_paths`). An
    existing file of the unit is replaced only when it belongs to an earlier score file (the sidecar is
    in the prefprune format; a per-query matrix says so in its header) or `overwrite` is True; anything
    else there is an error, so a typo cannot destroy unrelated data. No file of the unit may be one of
    `inputs` (what → path), whatever `overwrite` says.
    """
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise ValueError(f"output {str(p)!r}: unknown extension {p.suffix!r}; use one of {OUTPUT_EXTENSIONS}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output {str(p)!r}: folder {str(parent)!r} does not exist")
    unit = unit_paths(p, "--output")
    refuse_overlap(unit, inputs or {})
    for what, f in unit.items():
        if f.is_dir():
            raise ValueError(f"{what} {str(f)!r} is a folder")
    if overwrite:
        return p
    ours = is_score_file(p)
    for what, f in unit.items():
        if not f.exists() or (ours and (f != per_query_path(p) or _is_our_per_query(f))):
            continue
        why = (f"not a prefprune score file (no sidecar {str(sidecar_path(p))!r} in the {FORMAT} format)"
               if f == p else "not part of an earlier prefprune score file")
        raise ValueError(
            f"{what} {str(f)!r} exists and is {why}; pass --overwrite (overwrite=True) to replace it"
        )
    return p


def _json_number(x: float) -> float | None:
    return None if math.isnan(x) else x


def encode_table(ids: Sequence[str], columns: Mapping[str, np.ndarray], suffix: str) -> bytes:
    """The bytes of a score file (`COLUMNS` order; parquet with page checksums)."""
    names = [c for c in COLUMNS if c in columns] + [c for c in columns if c not in COLUMNS]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = [pa.array(list(ids), type=pa.string())]
        for c in names:
            arr = np.asarray(columns[c], dtype=np.float64)
            arrays.append(pa.array(arr.astype(np.int64) if c == "truncated" else arr))
        table = pa.Table.from_arrays(arrays, names=["id", *names])
        sink = io.BytesIO()
        pq.write_table(table, sink, write_page_checksum=True)
        return sink.getvalue()
    if suffix == ".jsonl":
        lines = []
        for r, pid in enumerate(ids):
            rec: dict[str, Any] = {"id": pid}
            for c in names:
                v = float(columns[c][r])
                rec[c] = int(v) if c == "truncated" else _json_number(v)
            lines.append(json.dumps(rec, allow_nan=False))
        return ("\n".join(lines) + "\n").encode()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", *names])
    for r, pid in enumerate(ids):
        row = [pid]
        for c in names:
            v = float(columns[c][r])
            row.append(str(int(v)) if c == "truncated" else ("" if math.isnan(v) else repr(v)))
        w.writerow(row)
    return buf.getvalue().encode()


def encode_per_query(per_query: Mapping[str, Any]) -> bytes:
    """The bytes of a per-query matrix file: one (n_train, n_val) float64 tensor per damping column.

    Args:
        per_query: ``matrix`` (n_train, n_val, L), ``row_ids`` (training pairs), ``col_ids`` (validation
            pairs), ``column_names`` (``influence`` or ``influence@<λ>``, the tensor names) and ``dampings``;
            the ids and dampings go into the safetensors metadata as JSON, so the file describes itself.
    """
    from safetensors.numpy import save

    matrix = np.asarray(per_query["matrix"], dtype=np.float64)
    rows, cols = list(per_query["row_ids"]), list(per_query["col_ids"])
    names = list(per_query["column_names"])
    if matrix.shape != (len(rows), len(cols), len(names)):
        raise ValueError(
            f"per-query matrix shape {matrix.shape} does not match ({len(rows)}, {len(cols)}, {len(names)})"
        )
    tensors = {name: np.ascontiguousarray(matrix[:, :, i]) for i, name in enumerate(names)}
    meta = {
        "format": "prefprune.per_query/1",
        "row_ids": json.dumps([str(i) for i in rows]),
        "col_ids": json.dumps([str(i) for i in cols]),
        "dampings": json.dumps([float(x) for x in per_query["dampings"]]),
        "columns": json.dumps(names),
        "sign_convention": "positive = training pair helps the validation pair",
    }
    return save(tensors, metadata=meta)


def write_scores(result: Any, path: str | os.PathLike, *, overwrite: bool = True,
                 inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Write a score result (`ids`, `columns`, `metadata`, optional `per_query`) as one unit: the score
    file, its sidecar and, with a per-query matrix, ``<path>.per_query.safetensors``.

    The sidecar gets a ``content`` entry (SHA-256, bytes, rows, columns of the score file; the per-query
    file's SHA-256 and bytes, or None) that `read_score_table` and `read_per_query` verify. The files are
    committed together under the output's lock (`prefprune._io.commit_files`): a crash at any moment
    leaves the previous unit or the new one, and a per-query matrix of the previous unit that the new one
    has not is removed with the commit, so no file outlives its unit.

    Args:
        result: a `prefprune.score.ScoreResult` (or anything with `ids`, `columns`, `metadata`).
        path: .parquet, .jsonl or .csv.
        overwrite: also replace existing files of the unit that are not prefprune's (`check_output_path`).
        inputs: files the run read (what → path); no file of the unit may be one of them.
    """
    p = check_output_path(path, overwrite=overwrite, inputs=inputs)
    ids = [str(i) for i in result.ids]
    for r, pid in enumerate(ids):
        if not pid or "\n" in pid or "\r" in pid:
            raise ValueError(f"{p}: row {r + 1}: pair id {pid!r} is empty or holds a line break")
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in result.columns.items()}
    data = encode_table(ids, columns, p.suffix.lower())
    pq = getattr(result, "per_query", None)
    pq_data = encode_per_query(pq) if pq is not None else None
    meta = dict(jsonable(result.metadata, finite=True))
    meta.setdefault("format", FORMAT)
    meta["content"] = {
        "file": p.name,
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "rows": len(ids),
        "columns": ["id", *[c for c in COLUMNS if c in columns], *[c for c in columns if c not in COLUMNS]],
        "per_query": None if pq_data is None else {
            "file": per_query_path(p).name, "sha256": sha256_bytes(pq_data), "bytes": len(pq_data)},
    }
    sidecar = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n"
    files = [(p, data), (sidecar_path(p), sidecar.encode())]
    stale = []
    if pq_data is not None:
        files.append((per_query_path(p), pq_data))
    elif per_query_path(p).exists() and _is_our_per_query(per_query_path(p)):
        stale.append(per_query_path(p))
    with output_lock(p, what="prefprune score"):
        commit_files(files, remove=stale)


def read_per_query(path: str | os.PathLike) -> dict[str, Any]:
    """The per-query matrix of the score file `path`, verified against the score file's sidecar.

    Returns:
        ``matrix`` (n_train, n_val, L) float64, ``row_ids``, ``col_ids``, ``column_names``, ``dampings``.

    Raises:
        ValueError: the sidecar records no per-query matrix, or the file is not the one it records (a
            matrix from another run beside this score file).
    """
    from safetensors.numpy import load

    p = Path(path)
    recover_commit(p)
    meta = read_sidecar(sidecar_path(p))
    want = (meta.get("content") or {}).get("per_query")
    f = per_query_path(p)
    if not isinstance(want, Mapping):
        raise ValueError(f"{sidecar_path(p)}: the score run wrote no per-query matrix (score --per-query)")
    raw = f.read_bytes() if f.is_file() else b""
    if sha256_bytes(raw) != want.get("sha256"):
        raise ValueError(
            f"{f}: not the per-query matrix the sidecar {sidecar_path(p)} records (sha256 "
            f"{sha256_bytes(raw)[:16]}…, the sidecar says {str(want.get('sha256'))[:16]}…); score again"
        )
    from safetensors import safe_open

    with safe_open(str(f), framework="numpy") as fh:
        info = fh.metadata() or {}
    tensors = load(raw)
    names = json.loads(info["columns"]) if "columns" in info else list(tensors)
    return {"matrix": np.stack([tensors[n] for n in names], axis=-1), "row_ids": json.loads(info["row_ids"]),
            "col_ids": json.loads(info["col_ids"]), "column_names": names,
            "dampings": json.loads(info["dampings"])}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class ScoreTable:
    """Per-pair scores: one entry per training pair, columns aligned with `ids`.

    Attributes:
        ids: (n,) pair ids.
        columns: name → (n,) float64 array (influence, grad_dot, grad_cos, train_loss, margin, ...).
        metadata: the score run's settings and solver status (the sidecar JSON), when known.
        source: where the table came from, for error messages.
    """

    ids: list[str]
    columns: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        n = len(self.ids)
        cols = {}
        for name, values in self.columns.items():
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
            if arr.shape[0] != n:
                raise ValueError(f"{self.source}: column {name!r} has {arr.shape[0]} values for {n} ids")
            cols[name] = arr
        self.columns = cols
        if len(set(self.ids)) != n:
            seen: set[str] = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))
            raise ValueError(f"{self.source}: duplicate id {dup!r} in the score table")

    def column(self, name: str) -> np.ndarray:
        """The (n,) values of one column; ValueError naming the available ones when missing."""
        if name not in self.columns:
            raise ValueError(f"{self.source}: no score column {name!r}; available: {sorted(self.columns)}")
        return self.columns[name]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse: `ScoreTable.from_json`)."""
        return {
            "ids": self.ids,
            "columns": {k: [float(x) for x in v] for k, v in self.columns.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, source: str = "<json>") -> ScoreTable:
        return cls(
            ids=list(obj["ids"]),
            columns={k: np.asarray(v, dtype=np.float64) for k, v in obj["columns"].items()},
            metadata=dict(obj.get("metadata", {})),
            source=source,
        )


def _utf8_error(src: str, data: bytes, e: UnicodeDecodeError, base: int = 0) -> ValueError:
    at = base + e.start
    line = data[:at].count(b"\n") + 1
    return ValueError(f"{src}: line {line}: not UTF-8 (byte 0x{data[at]:02x} at offset {at})")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar JSON object at `path` (the ``.json`` file itself); errors name file, line, column."""
    p = Path(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(f"sidecar {p}", data, e) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"sidecar {p}: line {e.lineno}: invalid JSON ({e.msg} at character {e.colno})"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"sidecar {p}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _number(src: str, where: str, col: str, v: Any) -> float:
    if v is None or v == "":
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"{src}: {where}, column {col!r}: not a number: {v!r:.60}")
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{src}: {where}, column {col!r}: not a number: {v!r:.60}") from None


def _id_of(src: str, where: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ValueError(f"{src}: {where}, column 'id': expected a string id, got {v!r:.60}")
    return str(v)


class _DuplicateField(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateField(key)
        out[key] = value
    return out


def _parse_jsonl(src: str, data: bytes) -> tuple[list[str], dict[str, list[float]], list[str]]:
    ids: list[str] = []
    cols: dict[str, list[float]] | None = None
    where: list[str] = []
    pos = 0
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        start, pos = pos, pos + len(raw) + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(src, data, e, start) from None
        try:
            rec = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{src}: line {line_no}: invalid JSON ({e.msg} at character {e.colno})"
            ) from None
        except _DuplicateField as e:
            raise ValueError(f"{src}: line {line_no}: field {e.args[0]!r} is given twice") from None
        here = f"line {line_no}, row {len(ids) + 1}"
        if not isinstance(rec, dict):
            raise ValueError(f"{src}: {here}: expected a JSON object, got {type(rec).__name__}")
        if "id" not in rec:
            raise ValueError(f"{src}: {here}: no 'id' field (fields: {sorted(rec)[:10]})")
        if cols is None:
            cols = {k: [] for k in rec if k != "id"}
        extra = set(rec) - set(cols) - {"id"}
        if extra:
            raise ValueError(f"{src}: {here}: field {sorted(extra)[0]!r} is not in the first row's columns")
        ids.append(_id_of(src, here, rec["id"]))
        for k, vals in cols.items():
            vals.append(_number(src, here, k, rec.get(k)))
        where.append(here)
    return ids, cols or {}, where


def _parse_csv(src: str, data: bytes) -> tuple[list[str], dict[str, list[float]], list[str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(src, data, e) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return [], {}, []
        if "id" not in header:
            raise ValueError(f"{src}: line 1: the score file has no 'id' column (columns: {header[:10]})")
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise ValueError(f"{src}: line 1: column {dup!r} appears twice")
        id_at = header.index("id")
        names = [(j, h) for j, h in enumerate(header) if j != id_at]
        ids: list[str] = []
        cols: dict[str, list[float]] = {h: [] for _, h in names}
        where: list[str] = []
        for row in reader:
            if not row:
                continue
            here = f"line {reader.line_num}, row {len(ids) + 1}"
            if len(row) != len(header):
                raise ValueError(f"{src}: {here}: {len(row)} cells, the header has {len(header)}")
            ids.append(row[id_at])
            for j, h in names:
                cols[h].append(_number(src, here, h, row[j]))
            where.append(here)
    except csv.Error as e:
        raise ValueError(f"{src}: line {reader.line_num}: malformed CSV ({e})") from None
    return ids, cols, where


def _parse_parquet(src: str, data: bytes) -> tuple[list[str], dict[str, list[float]], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        tab = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise ValueError(f"{src}: cannot read the parquet file ({type(e).__name__}: {e})") from None
    if "id" not in tab.column_names:
        raise ValueError(f"{src}: the score file has no 'id' column (columns: {tab.column_names[:10]})")
    id_col = tab.column("id")
    if not (pa.types.is_string(id_col.type) or pa.types.is_large_string(id_col.type)
            or pa.types.is_integer(id_col.type)):
        raise ValueError(f"{src}: column 'id' has type {id_col.type}; expected strings")
    raw_ids = id_col.to_pylist()
    for r, v in enumerate(raw_ids):
        if v is None:
            raise ValueError(f"{src}: row {r + 1}, column 'id': missing id")
    cols: dict[str, list[float]] = {}
    for name in tab.column_names:
        if name == "id":
            continue
        col = tab.column(name)
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise ValueError(f"{src}: column {name!r} has type {col.type}; expected numbers")
        cols[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    return [str(v) for v in raw_ids], cols, [f"row {r + 1}" for r in range(len(raw_ids))]


def _check_values(src: str, ids: list[str], cols: Mapping[str, np.ndarray], where: list[str]) -> None:
    first: dict[str, int] = {}
    for r, pid in enumerate(ids):
        if not pid.strip() or "\n" in pid or "\r" in pid:
            raise ValueError(f"{src}: {where[r]}, column 'id': id {pid!r} is empty or holds a line break")
        if pid in first:
            raise ValueError(f"{src}: {where[r]}, column 'id': id {pid!r} already used at "
                             f"{where[first[pid]]}; a score file has one row per pair")
        first[pid] = r

    def fail(c: str, mask: np.ndarray, why: str) -> None:
        r = int(np.flatnonzero(mask)[0])
        raise ValueError(
            f"{src}: {where[r]}, column {c!r}: {cols[c][r]!r} {why} ({int(mask.sum())} such rows)"
        )

    for c, v in cols.items():
        if np.isinf(v).any():
            fail(c, np.isinf(v), "is not finite")
    if "grad_cos" in cols:
        fail_mask = np.abs(cols["grad_cos"]) > 1 + _COS_TOL
        if fail_mask.any():
            fail("grad_cos", fail_mask, "is not a cosine (|cos| <= 1)")
    if "train_loss" in cols:
        neg = cols["train_loss"] < 0
        if neg.any():
            fail("train_loss", neg, "is negative (a Bradley-Terry loss is >= 0)")
    if "truncated" in cols:
        t = cols["truncated"]
        bad = ~np.isnan(t) & (t != 0) & (t != 1)
        if bad.any():
            fail("truncated", bad, "is not 0 or 1")


def read_score_table(path: str | os.PathLike) -> ScoreTable:
    """Read a score file (.parquet, .jsonl or .csv with an `id` column) and its sidecar, verified.

    An interrupted write is first finished (`recover_commit`). When the sidecar has a ``content``
    entry the file's SHA-256, size, rows and columns must match it; parquet page checksums are
    verified; then every value is range-checked (module docstring). NaN (empty, null) marks a
    missing score. A score file without a sidecar is read with a warning: nothing can check that it
    is the file the score run wrote.

    Raises:
        FileNotFoundError: no such score file.
        ValueError: naming the file, the line (text formats) or row (parquet), and the column.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"score file not found: {p}")
    suffix = p.suffix.lower()
    src = str(p)
    if suffix not in (".parquet", ".jsonl", ".json", ".csv"):
        raise ValueError(f"{src}: unsupported score file extension {suffix!r} (use .parquet, .jsonl or .csv)")
    try:
        recover_commit(p)
    except PermissionError:
        logger.warning("%s: an interrupted write could not be finished (read-only folder)", src)
    side = sidecar_path(p)
    meta = read_sidecar(side) if side.is_file() else None
    data = p.read_bytes()
    content = meta.get("content") if meta is not None else None
    if isinstance(content, Mapping):
        digest = sha256_bytes(data)
        if digest != content.get("sha256") or len(data) != content.get("bytes"):
            raise ValueError(
                f"{src}: the file does not match its sidecar {side} (sha256 {digest[:16]}…, {len(data)} "
                f"bytes; the sidecar says {str(content.get('sha256'))[:16]}…, {content.get('bytes')} bytes): "
                "the score file was changed or corrupted after it was written, or the two files come "
                "from different runs; score again"
            )
    elif meta is not None:
        logger.warning("%s: the sidecar has no content hash (an older prefprune); integrity not checked", src)
    else:
        logger.warning("%s: no sidecar %s; the file's integrity and settings cannot be checked", src, side)
    if not data.strip():
        raise ValueError(f"{src}: the score file is empty")
    if suffix == ".parquet":
        ids, raw, where = _parse_parquet(src, data)
    elif suffix == ".csv":
        ids, raw, where = _parse_csv(src, data)
    else:
        ids, raw, where = _parse_jsonl(src, data)
    if not ids:
        raise ValueError(f"{src}: the score file has no rows")
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in raw.items()}
    if isinstance(content, Mapping):
        if content.get("rows") != len(ids):
            raise ValueError(f"{src}: {len(ids)} rows, the sidecar {side} says {content.get('rows')}")
        want = content.get("columns")
        if isinstance(want, list) and sorted(want) != sorted(["id", *cols]):
            raise ValueError(
                f"{src}: columns {sorted(['id', *cols])}, the sidecar {side} says {sorted(want)}"
            )
    _check_values(src, ids, cols, where)
    return ScoreTable(ids=ids, columns=cols, metadata=meta or {}, source=src)
