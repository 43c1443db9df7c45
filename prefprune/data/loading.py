"""Preference pairs: the record type, the dataset container, and `load_preferences`.

Records are read by `prefprune.data.readers` (file formats, the hub) and parsed by
`prefprune.data.schemas` (``tldr``, ``prompt_chosen_rejected``, ``hh``; see there). Every pair keeps its
source record in ``meta["record"]`` so that :meth:`PreferenceDataset.save` writes a (pruned) dataset back
in the schema and shape it was read in.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import pyarrow as pa
import pyarrow.parquet as pq

from prefprune._io import atomic_write_bytes
from prefprune.data.readers import format_of, open_records
from prefprune.data.schemas import (
    SCHEMAS,
    BadRecord,
    content_id,
    detect_schema,
    find_undecodable,
    hash_key,
    normalise_schema,
    parse_record,
    tldr_prompt,
    to_record,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMAS",
    "PreferencePair",
    "PreferenceDataset",
    "load_preferences",
    "pairs_digest",
    "tldr_prompt",
]

# How many skipped or dropped records the one summary line of a load names (the rest are counted).
_LOG_FIRST = 5
#: How a caller skips bad records, in each place a setting can be given (the loader does not know which).
SKIP_BAD_HINT = (
    "to skip bad records, pass --skip-bad (prefprune experiment and demo: --data.skip-bad; YAML config: "
    "data.skip_bad: true; Python: skip_bad=True)"
)


@dataclass(frozen=True)
class PreferencePair:
    """One preference comparison.

    Attributes:
        id: Stable identifier: from the source when it has one, else a content hash. Survives shuffling,
            splitting and pruning.
        prompt: Full prompt text as the model sees it (TL;DR layout for TL;DR data).
        chosen: Preferred response text; the model input is ``prompt + chosen``.
        rejected: Dispreferred response text.
        truncatable: Character span ``(start, end)`` of ``prompt`` that may be cut when a sequence is too
            long (the TL;DR post). ``None``: the prompt may be cut from the left.
        meta: Extra information: ``"record"`` (the source record, used by ``save``), ``"flipped"``
            (planted label noise in synthetic data), ``"line"`` (record number in the source).
    """

    id: str
    prompt: str
    chosen: str
    rejected: str
    truncatable: tuple[int, int] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


class PreferenceDataset(Sequence[PreferencePair]):
    """An ordered collection of :class:`PreferencePair` with unique ids.

    Args:
        pairs: The pairs. Ids must be unique.
        schema: Schema the data came from (one of :data:`SCHEMAS`); ``save`` writes it back in it.
        source: Where the data came from (path or hub id), for messages and provenance.
        stats: Loading counts (``records``, ``pairs``, ``dropped_identical``, ``dropped_duplicate``,
            ``skipped_bad``, ...).
    """

    def __init__(
        self,
        pairs: Iterable[PreferencePair],
        *,
        schema: str,
        source: str = "",
        stats: Mapping[str, int] | None = None,
    ) -> None:
        self.pairs: list[PreferencePair] = list(pairs)
        if schema not in SCHEMAS:
            raise ValueError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")
        self.schema = schema
        self.source = str(source)
        self._index: dict[str, int] = {}
        for i, p in enumerate(self.pairs):
            if p.id in self._index:
                raise ValueError(
                    f"duplicate pair id {p.id!r} at positions {self._index[p.id]} and {i} in {self.source!r}"
                )
            self._index[p.id] = i
        self.stats: dict[str, int] = dict(stats or {})
        self.stats["pairs"] = len(self.pairs)

    # -- Sequence protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, i: int) -> PreferencePair: ...

    @overload
    def __getitem__(self, i: slice) -> PreferenceDataset: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._derive(self.pairs[i])
        return self.pairs[i]

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._index
        return isinstance(item, PreferencePair) and self._index.get(item.id) is not None

    def __repr__(self) -> str:
        return f"PreferenceDataset(n={len(self)}, schema={self.schema!r}, source={self.source!r})"

    # -- ids and subsets ---------------------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        """Pair ids in dataset order."""
        return [p.id for p in self.pairs]

    @property
    def flipped_ids(self) -> set[str]:
        """Ids of pairs with planted label noise (``meta["flipped"]``); empty for real data."""
        return {p.id for p in self.pairs if p.meta.get("flipped")}

    def get(self, pair_id: str) -> PreferencePair:
        """The pair with id ``pair_id`` (KeyError naming it when absent)."""
        try:
            return self.pairs[self._index[pair_id]]
        except KeyError:
            raise KeyError(f"no pair with id {pair_id!r} in {self.source!r}") from None

    def _derive(self, pairs: Iterable[PreferencePair]) -> PreferenceDataset:
        return PreferenceDataset(pairs, schema=self.schema, source=self.source, stats=self.stats)

    def _check_ids(self, ids: Iterable[str], missing: str, what: str) -> set[str]:
        if missing not in ("error", "ignore"):
            raise ValueError(f"missing must be 'error' or 'ignore', got {missing!r}")
        wanted = {ids} if isinstance(ids, str) else set(ids)
        unknown = [i for i in wanted if i not in self._index]
        if unknown and missing == "error":
            shown = ", ".join(repr(u) for u in sorted(unknown)[:5])
            raise ValueError(
                f"{what}: {len(unknown)} id(s) not in the dataset ({self.source!r}), e.g. {shown}; "
                "pass missing='ignore' to allow this"
            )
        return wanted

    def select(self, ids: Iterable[str], *, missing: str = "error") -> PreferenceDataset:
        """The pairs whose id is in ``ids``, in dataset order.

        Args:
            ids: Ids to keep.
            missing: ``"error"`` (default) raises ValueError when an id is not in the dataset (a score file
                from another dataset); ``"ignore"`` skips such ids.
        """
        wanted = self._check_ids(ids, missing, "select")
        return self._derive(p for p in self.pairs if p.id in wanted)

    def exclude(self, ids: Iterable[str], *, missing: str = "error") -> PreferenceDataset:
        """All pairs except those whose id is in ``ids``, in dataset order (``missing`` as in ``select``)."""
        drop = self._check_ids(ids, missing, "exclude")
        return self._derive(p for p in self.pairs if p.id not in drop)

    def split(self, fractions: Sequence[float], *, seed: int) -> list[PreferenceDataset]:
        """Disjoint random subsets with the given fractions of the pairs.

        Assignment depends only on ``seed`` and the pair ids (each id gets a seeded hash rank), so the part a
        pair lands in does not change when the input is shuffled. Sizes are ``round(cumsum(fractions) * n)``
        differences; within a part the dataset order is kept.

        Args:
            fractions: Positive fractions summing to at most 1 (the rest, if any, is left out).
            seed: Split seed.

        Returns:
            One dataset per fraction.
        """
        fr = [float(f) for f in fractions]
        if not fr or any(not (f > 0.0) for f in fr) or sum(fr) > 1.0 + 1e-9:
            raise ValueError(f"fractions must be positive and sum to at most 1, got {list(fractions)!r}")
        n = len(self.pairs)
        order = sorted(range(n), key=lambda i: hash_key(f"{seed}\x1f{self.pairs[i].id}"))
        bounds, acc = [0], 0.0
        for f in fr:
            acc += f
            bounds.append(min(n, round(acc * n)))
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            keep = sorted(order[a:b])
            parts.append(self._derive(self.pairs[i] for i in keep))
        return parts

    # -- saving ------------------------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """The pairs as source records in this dataset's schema (what ``save`` writes)."""
        return [to_record(p, self.schema) for p in self.pairs]

    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset in its own schema; the format follows the extension.

        Supported: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of records), ``.json.gz``, ``.parquet``,
        ``.csv`` (nested fields as JSON text). Loading the file again gives the same ids and texts. The
        file is written atomically (`prefprune._io.atomic_write_bytes`): a crash or a full disk leaves
        the previous file.
        """
        path = Path(path)
        data = self.to_bytes(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)

    def to_bytes(self, path: str | os.PathLike) -> bytes:
        """The bytes `save` writes to `path` (the format follows its extension)."""
        path = Path(path)
        fmt = format_of(path)
        records = self.to_records()
        keys: list[str] = list(dict.fromkeys(k for r in records for k in r))
        if fmt == "parquet":
            # from_pylist takes its columns from the first record only: give every record every key.
            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), sink,
                           write_page_checksum=True)
            return sink.getvalue()
        if fmt in ("jsonl", "json"):
            if fmt == "jsonl":
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            else:
                text = json.dumps(records, ensure_ascii=False)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            for r in records:
                writer.writerow(
                    {
                        k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                        for k, v in r.items()
                    }
                )
            text = buf.getvalue()
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{path}: cannot write character {text[e.start]!r} as UTF-8 (undecodable bytes of the input "
                "reached the output; load the input again: the loader names the file, line and field)"
            ) from None
        if path.name.endswith(".gz"):
            # mtime=0 keeps the bytes reproducible for identical content.
            data = gzip.compress(data, mtime=0)
        return data


def pairs_digest(pairs: Iterable[PreferencePair]) -> str:
    """SHA-256 of the pairs' ids and texts, in id order: what every stage that consumes another stage's
    output compares to know that both read the same data (a changed label or text changes it; the file's
    format, record order or path does not)."""
    h = hashlib.sha256()
    for p in sorted(pairs, key=lambda p: p.id):
        for part in (p.id, p.prompt, p.chosen, p.rejected):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()


def load_preferences(
    source: str | os.PathLike,
    *,
    schema: str = "auto",
    split: str = "train",
    name: str | None = None,
    skip_bad: bool = False,
    max_pairs: int | None = None,
) -> PreferenceDataset:
    """Load preference pairs from a local file or a Hugging Face hub dataset.

    Args:
        source: A local ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of records, or an object holding the list
            under ``split`` or ``"data"``; JSON lines also accepted), ``.parquet`` or ``.csv`` file (nested
            fields as JSON text or dotted headers such as ``info.post``); a local directory or a hub id
            (e.g. ``"openai/summarize_from_feedback"``) is read with ``datasets.load_dataset``.
        schema: ``"auto"`` (detect from the first record), ``"tldr"``, ``"prompt_chosen_rejected"`` or
            ``"hh"``.
        split: Split for ``datasets.load_dataset`` (and the key of a JSON object); ignored for other files.
        name: Dataset config for ``datasets.load_dataset`` (e.g. ``"comparisons"``).
        skip_bad: Skip records that cannot be read (counted in ``stats["skipped_bad"]`` and logged) instead of
            raising ValueError.
        max_pairs: Stop after this many pairs.

    Returns:
        The dataset. ``stats`` holds ``records`` (read), ``pairs`` (kept), ``dropped_identical`` (chosen ==
        rejected), ``dropped_duplicate`` (exact repeats of an earlier pair) and ``skipped_bad``.

    Raises:
        ValueError: Unknown schema, unreadable or empty source, or (without ``skip_bad``) a bad record; the
            message names the file, the line (JSON lines, CSV) or record number, and the field.
        FileNotFoundError: ``source`` looks like a local file but does not exist.
    """
    schema = normalise_schema(schema)
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be positive, got {max_pairs!r}")
    stream, unit, where = open_records(str(source), split=split, name=name)
    collector = _PairCollector(where, unit, schema=schema, skip_bad=skip_bad)
    for num, rec in stream:
        collector.add(num, rec)
        if max_pairs is not None and len(collector.pairs) >= max_pairs:
            break
    return collector.dataset()


class _PairCollector:
    """Turns a record stream into pairs: schema detection, bad records, identical and duplicate pairs."""

    def __init__(self, where: str, unit: str, *, schema: str, skip_bad: bool) -> None:
        self.where, self.unit, self.skip_bad = where, unit, skip_bad
        self.schema = schema if schema != "auto" else None
        self.stats = {"records": 0, "dropped_identical": 0, "dropped_duplicate": 0, "skipped_bad": 0}
        self.pairs: list[PreferencePair] = []
        self._seen_content: dict[tuple[str, str, str], int] = {}
        self._seen_ids: dict[str, int] = {}
        # The first few of each kind, for the one summary line per load (`_log_summary`).
        self._first_bad: list[str] = []
        self._first_dropped: list[str] = []

    def bad(self, num: int, err: BadRecord) -> None:
        fld = f", field {err.field!r}" if err.field else ""
        if not self.skip_bad:
            raise ValueError(f"{self.where}: {self.unit} {num}{fld}: {err} ({SKIP_BAD_HINT})")
        if len(self._first_bad) < _LOG_FIRST:
            self._first_bad.append(f"{self.unit} {num}{fld}: {err}")
        self.stats["skipped_bad"] += 1

    def dropped(self, num: int, what: str, why: str) -> None:
        """Count record `num` as dropped (`what`: a stats key) and keep its reason if among the first."""
        self.stats[what] += 1
        if len(self._first_dropped) < _LOG_FIRST:
            self._first_dropped.append(f"{self.unit} {num} {why}")

    def add(self, num: int, rec: Any) -> None:
        """Parse record number `num` and keep its pair unless it is bad, identical or a repeat."""
        self.stats["records"] += 1
        if isinstance(rec, BadRecord):
            return self.bad(num, rec)
        if not isinstance(rec, Mapping):
            got = f"expected a JSON object, got {type(rec).__name__} {rec!r:.60}"
            return self.bad(num, BadRecord("", got))
        if self.schema is None:
            self.schema = detect_schema(rec)
            if self.schema is None:
                raise ValueError(
                    f"{self.where}: {self.unit} {num}: cannot detect the schema from fields "
                    f"{sorted(rec)[:12]}; "
                    "expected 'info'+'summaries' (tldr), 'prompt'+'chosen'+'rejected' or "
                    "'chosen'+'rejected' (hh); or pass --schema (prefprune experiment and demo: "
                    "--data.schema; YAML config: data.schema; Python: schema=)"
                )
        try:
            sid, prompt, chosen, rejected, span = parse_record(self.schema, rec)
        except BadRecord as e:
            return self.bad(num, e)
        if chosen == rejected:
            return self.dropped(num, "dropped_identical", "has chosen == rejected")
        key = (prompt, chosen, rejected)
        if key in self._seen_content:
            return self.dropped(num, "dropped_duplicate", f"repeats {self.unit} {self._seen_content[key]}")
        pid = sid if sid is not None else content_id(prompt, chosen, rejected)
        if "\n" in pid or "\r" in pid:
            why = f"id {pid!r} holds a line break (ids are written one per line)"
            return self.bad(num, BadRecord("id", why))
        undecodable = find_undecodable(rec)
        if undecodable is not None:
            return self.bad(num, undecodable)
        if pid in self._seen_ids:
            used = f"id {pid!r} already used by {self.unit} {self._seen_ids[pid]} for a different pair"
            return self.bad(num, BadRecord("id", used))
        self._seen_content[key] = num
        self._seen_ids[pid] = num
        meta: dict[str, Any] = {"record": rec, "line": num, "unit": self.unit}
        if rec.get("flipped") in (True, "True", "true", 1):
            meta["flipped"] = True
        self.pairs.append(PreferencePair(pid, prompt, chosen, rejected, span, meta))
        return None

    def dataset(self) -> PreferenceDataset:
        """The collected pairs, checked to be non-empty."""
        stats, where = self.stats, self.where
        if stats["records"] == 0:
            raise ValueError(f"{where}: no records (empty file or dataset)")
        if not self.pairs:
            raise ValueError(
                f"{where}: no usable pairs among {stats['records']} records "
                f"(skipped bad: {stats['skipped_bad']}, identical: {stats['dropped_identical']}, "
                f"duplicates: {stats['dropped_duplicate']})"
            )
        self._log_summary()
        assert self.schema in SCHEMAS
        return PreferenceDataset(self.pairs, schema=self.schema, source=where, stats=stats)

    def _log_summary(self) -> None:
        """One warning per kind for the whole load: the count, the first few records and why."""
        stats, where = self.stats, self.where
        if stats["skipped_bad"]:
            logger.warning("%s: skipped %d bad record(s) of %d: %s", where, stats["skipped_bad"],
                           stats["records"], _first_few(self._first_bad, stats["skipped_bad"]))
        kinds = {"dropped_duplicate": "exact duplicate pair(s)",
                 "dropped_identical": "pair(s) with chosen == rejected"}
        counts = [f"{stats[key]} {what}" for key, what in kinds.items() if stats[key]]
        if counts:
            n_dropped = stats["dropped_duplicate"] + stats["dropped_identical"]
            logger.warning("%s: dropped %s of %d records: %s", where, " and ".join(counts), stats["records"],
                           _first_few(self._first_dropped, n_dropped))


def _first_few(shown: list[str], total: int) -> str:
    """`shown` joined, with how many more were counted but not named."""
    more = f"; and {total - len(shown)} more" if total > len(shown) else ""
    return "; ".join(shown) + more
