"""Preference pairs: the record type, the dataset container, and loading/saving in three schemas.

Schemas (auto-detected from the first record, or named):

* ``"tldr"``: OpenAI's ``summarize_from_feedback`` comparisons: ``info.{id,post,title,subreddit}``,
  ``summaries[i].text``, ``choice``. The prompt uses the layout
  ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``; the post is the truncatable
  span.
* ``"prompt_chosen_rejected"``: ``{prompt, chosen, rejected}`` (optionally ``id``). A prompt in the TL;DR
  layout (single or blank-line separated fields, as in CarperAI's and trl-lib's TL;DR sets) gets its post
  as the truncatable span; other prompts are cut from the left.
* ``"hh"``: ``{chosen, rejected}`` full dialogues (Anthropic HH-RLHF); the longest shared prefix, cut back to
  its last ``"\\n\\nAssistant:"`` turn marker, is the prompt.

Every pair keeps its source record in ``meta["record"]`` so that :meth:`PreferenceDataset.save` writes a
(pruned) dataset back in the schema and shape it was read in.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMAS",
    "PreferencePair",
    "PreferenceDataset",
    "load_preferences",
    "tldr_prompt",
]

SCHEMAS = ("tldr", "prompt_chosen_rejected", "hh")
_SCHEMA_ALIASES = {"pcr": "prompt_chosen_rejected", "hh-rlhf": "hh", "summarize_from_feedback": "tldr"}
_ASSISTANT = "\n\nAssistant:"
_TLDR_HEAD = re.compile(r"SUBREDDIT: r/(.*)\nTITLE: (.*)\nPOST: ", re.S)
# TL;DR prompts stored as plain text (CarperAI, trl-lib): single or blank-line separated fields.
_TLDR_TEXT = re.compile(r"SUBREDDIT: r/[^\n]*\n+TITLE: [^\n]*\n+POST: (?P<post>.*?)\s*\n+TL;DR:\s*", re.S)
_SURROGATE = re.compile("[\udc80-\udcff]")
_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz")
# Upper bound on how many per-record problems are logged individually when skip_bad=True.
_LOG_BAD = 5


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
        order = sorted(range(n), key=lambda i: _hash_key(f"{seed}\x1f{self.pairs[i].id}"))
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
        return [_to_record(p, self.schema) for p in self.pairs]

    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset in its own schema; the format follows the extension.

        Supported: ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of records), ``.json.gz``, ``.parquet``,
        ``.csv`` (nested fields as JSON text). Loading the file again gives the same ids and texts.
        """
        path = Path(path)
        fmt = _format_of(path)
        records = self.to_records()
        path.parent.mkdir(parents=True, exist_ok=True)
        keys: list[str] = list(dict.fromkeys(k for r in records for k in r))
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            # from_pylist takes its columns from the first record only: give every record every key.
            pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
            return
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
        data = text.encode("utf-8")
        if path.name.endswith(".gz"):
            # mtime=0 keeps the bytes reproducible for identical content.
            data = gzip.compress(data, mtime=0)
        path.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _hash_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def _content_id(*parts: str) -> str:
    """A 64-bit content hash id; collisions are negligible below ~10⁸ pairs."""
    return "h" + _hash_key("\x1f".join(parts))[:16]


def tldr_prompt(post: str, *, title: str = "", subreddit: str = "") -> tuple[str, tuple[int, int]]:
    """The TL;DR prompt layout and the character span of the post inside it.

    Returns:
        ``(prompt, (start, end))`` with ``prompt[start:end] == post``.
    """
    head = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: "
    return f"{head}{post}\nTL;DR:", (len(head), len(head) + len(post))


class _BadRecord(ValueError):
    """A record-level problem: carries the field so the caller can add file and line."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _require_str(obj: Mapping[str, Any], key: str, where: str, *, what: str = "text") -> str:
    if key not in obj or obj[key] is None:
        raise _BadRecord(where, f"missing field {where!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise _BadRecord(where, f"field {where!r} must be a string, got {type(v).__name__} {v!r:.60}")
    if not v.strip():
        raise _BadRecord(where, f"empty {what} in field {where!r}")
    _check_utf8(v, where)
    return v


def _check_utf8(v: str, where: str) -> None:
    # Text decoded with surrogateescape carries undecodable bytes as lone surrogates U+DC80..U+DCFF.
    m = _SURROGATE.search(v)
    if m is not None:
        raise _BadRecord(
            where,
            f"non-UTF-8 byte 0x{ord(m.group()) - 0xDC00:02x} in field {where!r} at character {m.start()}",
        )


def _record_source_id(rec: Mapping[str, Any]) -> str | None:
    v = rec.get("id")
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def _parse_tldr(rec: Mapping[str, Any]) -> tuple[str | None, str, str, str, tuple[int, int] | None]:
    info = rec.get("info")
    if not isinstance(info, Mapping):
        raise _BadRecord("info", "missing field 'info'" if info is None else "field 'info' must be an object")
    post_key = "post" if info.get("post") is not None or "article" not in info else "article"
    post = _require_str(info, post_key, f"info.{post_key}", what="post")
    title = info.get("title") or ""
    subreddit = info.get("subreddit") or ""
    for key, val in (("title", title), ("subreddit", subreddit)):
        if not isinstance(val, str):
            raise _BadRecord(f"info.{key}", f"field 'info.{key}' must be a string, got {val!r:.60}")
        _check_utf8(val, f"info.{key}")
    summaries = rec.get("summaries")
    if summaries is None:
        raise _BadRecord("summaries", "missing field 'summaries'")
    if not isinstance(summaries, Sequence) or isinstance(summaries, str) or len(summaries) != 2:
        raise _BadRecord(
            "summaries", f"field 'summaries' must be a list of 2 summaries, got {summaries!r:.80}"
        )
    texts = []
    for j, s in enumerate(summaries):
        if not isinstance(s, Mapping):
            raise _BadRecord(f"summaries[{j}]", f"field 'summaries[{j}]' must be an object, got {s!r:.60}")
        texts.append(_require_str(s, "text", f"summaries[{j}].text", what="summary"))
    choice = rec.get("choice")
    if isinstance(choice, str) and choice.strip() in ("0", "1"):
        choice = int(choice)
    if isinstance(choice, float) and choice in (0.0, 1.0):
        choice = int(choice)
    if choice is None:
        raise _BadRecord("choice", "missing field 'choice'")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise _BadRecord("choice", f"field 'choice' must be 0 or 1, got {choice!r}")
    if post_key == "article":
        head = f"TITLE: {title}\nARTICLE: "
        prompt, span = f"{head}{post}\nTL;DR:", (len(head), len(head) + len(post))
    else:
        prompt, span = tldr_prompt(post, title=title, subreddit=subreddit)
    chosen, rejected = texts[choice], texts[1 - choice]
    sid = _record_source_id(rec)
    if sid is None and info.get("id") is not None:
        # The same post is compared many times: the post id alone is not a pair id. The summaries and the
        # choice make it one (a repeat of the same comparison and label is an exact duplicate).
        sid = f"{info['id']}-{_hash_key(chr(31).join([texts[0], texts[1], str(choice)]))[:12]}"
    return sid, prompt, chosen, rejected, span


def _parse_pcr(rec: Mapping[str, Any]) -> tuple[str | None, str, str, str, tuple[int, int] | None]:
    prompt = rec.get("prompt")
    if prompt is None:
        raise _BadRecord("prompt", "missing field 'prompt'")
    if not isinstance(prompt, str):
        raise _BadRecord("prompt", f"field 'prompt' must be a string, got {prompt!r:.60}")
    _check_utf8(prompt, "prompt")
    chosen = _require_str(rec, "chosen", "chosen", what="response")
    rejected = _require_str(rec, "rejected", "rejected", what="response")
    # A TL;DR prompt in plain text still gets its post as the truncatable span (never cut the summary).
    m = _TLDR_TEXT.fullmatch(prompt)
    span = m.span("post") if m is not None else None
    return _record_source_id(rec), prompt, chosen, rejected, span


def _split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Longest shared prefix cut back to its last Assistant turn marker → (prompt, chosen, rejected)."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(_ASSISTANT)
    if cut < 0:
        raise _BadRecord(
            "chosen", f"chosen and rejected share no {_ASSISTANT!r} turn (shared prefix: {shared[:60]!r})"
        )
    end = cut + len(_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _parse_hh(rec: Mapping[str, Any]) -> tuple[str | None, str, str, str, None]:
    full_c = _require_str(rec, "chosen", "chosen", what="dialogue")
    full_r = _require_str(rec, "rejected", "rejected", what="dialogue")
    if full_c == full_r:
        # Identical pairs are dropped (and counted) by the caller, before prompt extraction.
        return _record_source_id(rec), "", full_c, full_r, None
    prompt, chosen, rejected = _split_dialogues(full_c, full_r)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _BadRecord(key, f"empty response in field {key!r} after the shared prompt")
    return _record_source_id(rec), prompt, chosen, rejected, None


_PARSERS = {"tldr": _parse_tldr, "prompt_chosen_rejected": _parse_pcr, "hh": _parse_hh}


def _detect_schema(rec: Mapping[str, Any]) -> str | None:
    keys = set(rec)
    if {"info", "summaries"} <= keys:
        return "tldr"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return None


def _to_record(p: PreferencePair, schema: str) -> dict[str, Any]:
    src = p.meta.get("record")
    rec: dict[str, Any] = dict(src) if isinstance(src, Mapping) else {}
    if p.meta.get("flipped"):
        rec["flipped"] = True
    elif "flipped" in rec:
        rec["flipped"] = False
    if schema == "prompt_chosen_rejected":
        rec.update(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected)
        if not isinstance(src, Mapping):
            # A hand-made pair has no source record that would reproduce its id on reload.
            rec["id"] = p.id
        return rec
    if schema == "hh":
        rec.update(chosen=p.prompt + p.chosen, rejected=p.prompt + p.rejected)
        return rec
    # tldr: rebuild info from the prompt span when there is no source record.
    info = dict(rec.get("info") or {})
    if "post" not in info and "article" not in info:
        head = _TLDR_HEAD.fullmatch(p.prompt[: p.truncatable[0]]) if p.truncatable else None
        if head is None or p.prompt[p.truncatable[1] :] != "\nTL;DR:":
            raise ValueError(
                f"pair {p.id!r}: cannot write a TL;DR record: no source record and the prompt is not in the "
                f"TL;DR layout ({p.prompt[:60]!r})"
            )
        a, b = p.truncatable
        info.update(subreddit=head.group(1), title=head.group(2), post=p.prompt[a:b])
    rec["info"] = info
    choice = rec.get("choice", 0)
    choice = int(choice) if str(choice) in ("0", "1") else 0
    old = rec.get("summaries")
    old = list(old) if isinstance(old, Sequence) and not isinstance(old, str) and len(old) == 2 else [{}, {}]
    new = [dict(s) if isinstance(s, Mapping) else {} for s in old]
    new[choice]["text"] = p.chosen
    new[1 - choice]["text"] = p.rejected
    rec["summaries"] = new
    rec["choice"] = choice
    if not isinstance(src, Mapping):
        rec["id"] = p.id
    return rec


# ------------------------------------------------------------------------------------------------
# reading records
# ------------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for ext in _FORMATS:
        if name.endswith(ext):
            return ext.removesuffix(".gz").lstrip(".")
    raise ValueError(f"{path}: unsupported file extension; expected one of {', '.join(_FORMATS)}")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
    return data


# Each reader yields (record number, record or an Exception describing why it could not be read).
RecordStream = Iterator[tuple[int, "Mapping[str, Any] | Exception"]]


def _jsonl_records(data: bytes, path: Path) -> RecordStream:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, _BadRecord("", f"non-UTF-8 byte 0x{raw[e.start]:02x} at byte {e.start} of the line")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, _BadRecord("", f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        yield lineno, rec


def _json_records(data: bytes, path: Path, split: str) -> RecordStream:
    text = data.decode("utf-8", "surrogateescape")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Many ".json" files on the hub are JSON lines; `datasets` reads both, so do we.
            yield from _jsonl_records(data, path)
            return
        raise ValueError(f"{path}: line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, Mapping) and _detect_schema(doc) is not None:
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
    yield from enumerate(doc, start=1)


def _csv_value(key: str, value: str | None) -> Any:
    if value is None:
        return None
    v = value.strip()
    if v[:1] in ("{", "[") and key in ("info", "summaries", "extra", "meta"):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise _BadRecord(key, f"field {key!r} holds malformed JSON ({e.msg})") from None
    return value


def _csv_records(data: bytes, path: Path) -> RecordStream:
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
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
                    raise _BadRecord("", f"more cells than the {len(reader.fieldnames or [])} header columns")
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
        except _BadRecord as e:
            yield lineno, e


def _parquet_records(path: Path) -> RecordStream:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise ValueError(f"{path}: cannot read parquet file ({type(e).__name__}: {e})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _hub_records(source: str, name: str | None, split: str) -> RecordStream:
    import datasets

    ds = datasets.load_dataset(source, name, split=split)
    yield from enumerate(ds, start=1)


def _looks_like_path(source: str) -> bool:
    """Hub ids look like ``owner/name``; anything path-like or with a data-file extension is a local file."""
    s = source.lower()
    return s.startswith((".", "/", "~")) or any(s.endswith(ext) for ext in _FORMATS)


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
    if schema != "auto":
        schema = _SCHEMA_ALIASES.get(schema, schema)
        if schema not in SCHEMAS:
            raise ValueError(f"unknown schema {schema!r}; expected 'auto' or one of {SCHEMAS}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be positive, got {max_pairs!r}")
    src = str(source)
    path = Path(src).expanduser()
    unit = "record"
    if path.is_file():
        fmt = _format_of(path)
        if fmt == "parquet":
            if path.stat().st_size == 0:
                raise ValueError(f"{path}: file is empty")
            stream = _parquet_records(path)
        else:
            data = _read_bytes(path)
            if not data.strip():
                raise ValueError(f"{path}: file is empty")
            if fmt == "jsonl":
                stream, unit = _jsonl_records(data, path), "line"
            elif fmt == "json":
                stream = _json_records(data, path, split)
            else:
                stream, unit = _csv_records(data, path), "line"
        where = str(path)
    elif path.is_dir() or not _looks_like_path(src):
        stream = _hub_records(src, name, split)
        where = src if name is None else f"{src} ({name}, {split})"
    else:
        raise FileNotFoundError(f"no such preference file: {src!r}")

    stats = {"records": 0, "dropped_identical": 0, "dropped_duplicate": 0, "skipped_bad": 0}
    pairs: list[PreferencePair] = []
    seen_content: set[tuple[str, str, str]] = set()
    seen_ids: dict[str, int] = {}
    parse = _PARSERS.get(schema)

    def bad(num: int, err: _BadRecord) -> None:
        fld = f", field {err.field!r}" if err.field else ""
        msg = f"{where}: {unit} {num}{fld}: {err}"
        if not skip_bad:
            raise ValueError(msg + " (pass skip_bad=True to skip bad records)")
        if stats["skipped_bad"] < _LOG_BAD:
            logger.warning("skipping bad record: %s", msg)
        stats["skipped_bad"] += 1

    for num, rec in stream:
        stats["records"] += 1
        if isinstance(rec, _BadRecord):
            bad(num, rec)
            continue
        if not isinstance(rec, Mapping):
            bad(num, _BadRecord("", f"expected a JSON object, got {type(rec).__name__} {rec!r:.60}"))
            continue
        if parse is None:
            schema = _detect_schema(rec) or ""
            if not schema:
                raise ValueError(
                    f"{where}: {unit} {num}: cannot detect the schema from fields {sorted(rec)[:12]}; "
                    "expected 'info'+'summaries' (tldr), 'prompt'+'chosen'+'rejected' or "
                    "'chosen'+'rejected' (hh); or pass schema="
                )
            parse = _PARSERS[schema]
        try:
            sid, prompt, chosen, rejected, span = parse(rec)
        except _BadRecord as e:
            bad(num, e)
            continue
        if chosen == rejected:
            stats["dropped_identical"] += 1
            continue
        key = (prompt, chosen, rejected)
        if key in seen_content:
            stats["dropped_duplicate"] += 1
            continue
        pid = sid if sid is not None else _content_id(prompt, chosen, rejected)
        if pid in seen_ids:
            bad(
                num,
                _BadRecord("id", f"id {pid!r} already used by {unit} {seen_ids[pid]} for a different pair"),
            )
            continue
        seen_content.add(key)
        seen_ids[pid] = num
        meta: dict[str, Any] = {"record": rec, "line": num}
        if rec.get("flipped") in (True, "True", "true", 1):
            meta["flipped"] = True
        pairs.append(PreferencePair(pid, prompt, chosen, rejected, span, meta))
        if max_pairs is not None and len(pairs) >= max_pairs:
            break

    if stats["records"] == 0:
        raise ValueError(f"{where}: no records (empty file or dataset)")
    if not pairs:
        raise ValueError(
            f"{where}: no usable pairs among {stats['records']} records "
            f"(skipped bad: {stats['skipped_bad']}, identical: {stats['dropped_identical']}, "
            f"duplicates: {stats['dropped_duplicate']})"
        )
    if stats["skipped_bad"]:
        logger.warning("%s: skipped %d bad record(s) of %d", where, stats["skipped_bad"], stats["records"])
    assert schema in SCHEMAS
    return PreferenceDataset(pairs, schema=schema, source=where, stats=stats)
