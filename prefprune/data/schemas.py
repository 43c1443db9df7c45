"""The three record schemas of preference data: detection, parsing a record into a pair, and back.

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
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: loading imports this module
    from prefprune.data.loading import PreferencePair

__all__ = [
    "SCHEMAS",
    "BadRecord",
    "content_id",
    "detect_schema",
    "find_undecodable",
    "hash_key",
    "normalise_schema",
    "parse_record",
    "tldr_prompt",
    "to_record",
]

SCHEMAS = ("tldr", "prompt_chosen_rejected", "hh")
_SCHEMA_ALIASES = {"pcr": "prompt_chosen_rejected", "hh-rlhf": "hh", "summarize_from_feedback": "tldr"}
_ASSISTANT = "\n\nAssistant:"
_TLDR_HEAD = re.compile(r"SUBREDDIT: r/(.*)\nTITLE: (.*)\nPOST: ", re.S)
# TL;DR prompts stored as plain text (CarperAI, trl-lib): single or blank-line separated fields.
_TLDR_TEXT = re.compile(r"SUBREDDIT: r/[^\n]*\n+TITLE: [^\n]*\n+POST: (?P<post>.*?)\s*\n+TL;DR:\s*", re.S)
_SURROGATE = re.compile("[\udc80-\udcff]")


def hash_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def content_id(*parts: str) -> str:
    """A 64-bit content hash id; collisions are negligible below ~10⁸ pairs."""
    return "h" + hash_key("\x1f".join(parts))[:16]


def tldr_prompt(post: str, *, title: str = "", subreddit: str = "") -> tuple[str, tuple[int, int]]:
    """The TL;DR prompt layout and the character span of the post inside it.

    Returns:
        ``(prompt, (start, end))`` with ``prompt[start:end] == post``.
    """
    head = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: "
    return f"{head}{post}\nTL;DR:", (len(head), len(head) + len(post))


class BadRecord(ValueError):
    """A record-level problem: carries the field so the caller can add file and line."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _require_str(obj: Mapping[str, Any], key: str, where: str, *, what: str = "text") -> str:
    if key not in obj or obj[key] is None:
        raise BadRecord(where, f"missing field {where!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise BadRecord(where, f"field {where!r} must be a string, got {type(v).__name__} {v!r:.60}")
    if not v.strip():
        raise BadRecord(where, f"empty {what} in field {where!r}")
    _check_utf8(v, where)
    return v


def _check_utf8(v: str, where: str) -> None:
    # Text decoded with surrogateescape carries undecodable bytes as lone surrogates U+DC80..U+DCFF.
    m = _SURROGATE.search(v)
    if m is not None:
        raise BadRecord(
            where,
            f"non-UTF-8 byte 0x{ord(m.group()) - 0xDC00:02x} in field {where!r} at character {m.start()}",
        )


def find_undecodable(rec: Any, where: str = "") -> BadRecord | None:
    """The first field of a record (any depth: ids, extra columns) holding an undecodable byte, or None."""
    if isinstance(rec, str):
        m = _SURROGATE.search(rec)
        if m is None:
            return None
        name = where or "value"
        return BadRecord(name, f"non-UTF-8 byte 0x{ord(m.group()) - 0xDC00:02x} at character {m.start()}")
    if isinstance(rec, Mapping):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in rec.items())
    elif isinstance(rec, list | tuple):
        items = ((f"{where}[{j}]", v) for j, v in enumerate(rec))
    else:
        return None
    for key, value in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return BadRecord(key, "non-UTF-8 byte in a field name")
        found = find_undecodable(value, key)
        if found is not None:
            return found
    return None


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
        raise BadRecord("info", "missing field 'info'" if info is None else "field 'info' must be an object")
    post_key = "post" if info.get("post") is not None or "article" not in info else "article"
    post = _require_str(info, post_key, f"info.{post_key}", what="post")
    title = info.get("title") or ""
    subreddit = info.get("subreddit") or ""
    for key, val in (("title", title), ("subreddit", subreddit)):
        if not isinstance(val, str):
            raise BadRecord(f"info.{key}", f"field 'info.{key}' must be a string, got {val!r:.60}")
        _check_utf8(val, f"info.{key}")
    summaries = rec.get("summaries")
    if summaries is None:
        raise BadRecord("summaries", "missing field 'summaries'")
    if not isinstance(summaries, Sequence) or isinstance(summaries, str) or len(summaries) != 2:
        raise BadRecord(
            "summaries", f"field 'summaries' must be a list of 2 summaries, got {summaries!r:.80}"
        )
    texts = []
    for j, s in enumerate(summaries):
        if not isinstance(s, Mapping):
            raise BadRecord(f"summaries[{j}]", f"field 'summaries[{j}]' must be an object, got {s!r:.60}")
        texts.append(_require_str(s, "text", f"summaries[{j}].text", what="summary"))
    choice = rec.get("choice")
    if isinstance(choice, str) and choice.strip() in ("0", "1"):
        choice = int(choice)
    if isinstance(choice, float) and choice in (0.0, 1.0):
        choice = int(choice)
    if choice is None:
        raise BadRecord("choice", "missing field 'choice'")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise BadRecord("choice", f"field 'choice' must be 0 or 1, got {choice!r}")
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
        sid = f"{info['id']}-{hash_key(chr(31).join([texts[0], texts[1], str(choice)]))[:12]}"
    return sid, prompt, chosen, rejected, span


def _parse_pcr(rec: Mapping[str, Any]) -> tuple[str | None, str, str, str, tuple[int, int] | None]:
    prompt = rec.get("prompt")
    if prompt is None:
        raise BadRecord("prompt", "missing field 'prompt'")
    if not isinstance(prompt, str):
        raise BadRecord("prompt", f"field 'prompt' must be a string, got {prompt!r:.60}")
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
        raise BadRecord(
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
            raise BadRecord(key, f"empty response in field {key!r} after the shared prompt")
    return _record_source_id(rec), prompt, chosen, rejected, None


_PARSERS = {"tldr": _parse_tldr, "prompt_chosen_rejected": _parse_pcr, "hh": _parse_hh}


def detect_schema(rec: Mapping[str, Any]) -> str | None:
    keys = set(rec)
    if {"info", "summaries"} <= keys:
        return "tldr"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return None


def to_record(p: PreferencePair, schema: str) -> dict[str, Any]:
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


def normalise_schema(schema: str) -> str:
    """``"auto"`` or a schema name (aliases such as ``"pcr"`` resolved), checked."""
    if schema == "auto":
        return schema
    schema = _SCHEMA_ALIASES.get(schema, schema)
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected 'auto' or one of {SCHEMAS}")
    return schema


Parsed = tuple[str | None, str, str, str, tuple[int, int] | None]
"""(source id or None, prompt, chosen, rejected, truncatable character span or None)."""


def parse_record(schema: str, rec: Mapping[str, Any]) -> Parsed:
    """``(source id or None, prompt, chosen, rejected, truncatable span)`` of one record.

    Raises:
        BadRecord: a missing or malformed field (the caller adds file and line).
    """
    return _PARSERS[schema](rec)
