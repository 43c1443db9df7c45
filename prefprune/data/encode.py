"""Tokenization of preference pairs (prompt truncation, never the response) and batch collation.

Sequence layout: the tokenizer's own special tokens (what ``tokenizer(text)`` adds: ``[CLS] … [SEP]`` for
BERT, ``<s>`` for Llama, nothing for GPT-2/GPT-NeoX) around ``prompt tokens + response tokens``.

Choices worth knowing:

* Prompt pieces (text before the post, the post, text after it) and the response are tokenized *separately*
  and concatenated, so a sub-word merge across a boundary (a byte-level BPE token spanning the end of the
  prompt and the start of the response) never happens. The encoding can differ from tokenizing the joined
  text by a token at each boundary; it is the same in training and scoring, and it is what makes cutting the
  post at a token boundary exact.
* Chosen and rejected share one prompt encoding, truncated to fit the *longer* response, so both rewards are
  computed on the same context.
* No EOS is appended by default: sequence-classification heads of decoder models read the last non-pad
  token, which already sees the whole sequence, and the pad token of decoder models is often the EOS token
  (an appended EOS would then be treated as padding). ``add_eos=True`` appends ``tokenizer.eos_token_id``
  when the tokenizer's own specials do not end with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefprune.data.loading import PreferencePair

__all__ = ["EncodedPair", "encode_pairs", "collate_pairs", "special_tokens_layout"]

_TRUNCATION = ("prompt", "error")


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair.

    Attributes:
        id: The pair id.
        chosen_ids: Specials + prompt + chosen response tokens, ``len <= max_length``.
        rejected_ids: Specials + prompt + rejected response tokens, ``len <= max_length``.
        truncated: Whether prompt tokens were cut to fit.
    """

    id: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens (HF tokenizer or a raw ``tokenizers.Tokenizer``).

    Goes straight to the Rust backend when there is one: the Python wrapper's per-encoding conversion and
    offset computation cost more than the tokenization itself. Repeated texts are tokenized once.
    """
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "encode_batch") and not callable(tokenizer):
        backend = tokenizer
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        ids = [e.ids for e in encode(unique, add_special_tokens=False)]
    else:
        # verbose=False: long posts exceed model_max_length before we cut them; the warning would be noise.
        ids = [list(x) for x in tokenizer(unique, add_special_tokens=False, verbose=False)["input_ids"]]
    table = dict(zip(unique, ids, strict=True))
    return [table[t] for t in texts]


def special_tokens_layout(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text.

    Found by tokenizing a probe with and without special tokens, so it works for any post-processor.

    Returns:
        ``(prefix_ids, suffix_ids)``, e.g. ``([cls], [sep])`` for BERT, ``([bos], [])`` for Llama.
    """
    probe = "a b"
    if hasattr(tokenizer, "encode_batch") and not callable(tokenizer):
        with_sp = tokenizer.encode(probe, add_special_tokens=True).ids
    else:
        with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = _tokenize(tokenizer, [probe])[0]
    n = len(bare)
    for start in range(len(with_sp) - n + 1):
        if with_sp[start : start + n] == bare:
            return with_sp[:start], with_sp[start + n :]
    raise ValueError(
        f"cannot locate the text tokens {bare} inside the tokenizer's output with special tokens {with_sp}; "
        "encode_pairs needs a tokenizer whose special tokens only wrap the text"
    )


def _split_prompts(data: Sequence[PreferencePair]) -> tuple[list[str], list[str], list[str]]:
    """Each prompt as (fixed head, cuttable middle, fixed tail); a prompt without a span is all middle."""
    heads, mids, tails = [], [], []
    for p in data:
        if p.truncatable is None:
            heads.append("")
            mids.append(p.prompt)
            tails.append("")
            continue
        a, b = p.truncatable
        if not (0 <= a <= b <= len(p.prompt)):
            raise ValueError(
                f"pair {p.id!r}: truncatable span {p.truncatable} outside the prompt (length {len(p.prompt)})"
            )
        heads.append(p.prompt[:a])
        mids.append(p.prompt[a:b])
        tails.append(p.prompt[b:])
    return heads, mids, tails


def _fit_middle(
    p: PreferencePair,
    head: list[int],
    mid: list[int],
    tail: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    n_special: int,
    max_length: int,
    truncation: str,
) -> tuple[list[int], bool]:
    """The prompt's cuttable middle cut so that both sequences fit `max_length`, and whether it was cut."""
    resp = max(len(chosen), len(rejected))
    fixed = len(head) + len(tail)
    total = n_special + fixed + len(mid) + resp
    if total <= max_length:
        return mid, False
    if truncation == "error":
        raise ValueError(
            f"pair {p.id!r}: {total} tokens (prompt {fixed + len(mid)}, chosen {len(chosen)}, "
            f"rejected {len(rejected)}, special {n_special}) > max_length {max_length} "
            "(truncation='error')"
        )
    room = max_length - n_special - fixed - resp
    if room < 0:
        what = "only the fixed prompt parts" if p.truncatable is not None else "an empty prompt"
        raise ValueError(
            f"pair {p.id!r}: does not fit max_length {max_length} even with {what}: responses need "
            f"{resp} tokens (chosen {len(chosen)}, rejected {len(rejected)}), "
            f"fixed prompt {fixed}, special {n_special}"
        )
    # The TL;DR post loses its end; an untyped prompt loses its beginning (the turns nearest the
    # response matter most for a dialogue).
    return (mid[:room] if p.truncatable is not None else mid[len(mid) - room :]), True


def needed_lengths(data: Sequence[PreferencePair], tokenizer: Any, *, add_eos: bool = False) -> list[int]:
    """The smallest ``max_length`` each pair fits with its cuttable prompt cut away entirely: special
    tokens + fixed prompt parts + the longer response (what `encode_pairs` can never cut)."""
    pre_sp, post_sp = special_tokens_layout(tokenizer)
    n_special = len(pre_sp) + len(post_sp) + int(add_eos)
    heads, _, tails = _split_prompts(data)
    n = len(heads)
    toks = _tokenize(tokenizer, heads + tails + [p.chosen for p in data] + [p.rejected for p in data])
    return [n_special + len(toks[i]) + len(toks[n + i]) + max(len(toks[2 * n + i]), len(toks[3 * n + i]))
            for i in range(n)]


def too_long_message(what: str, data: Sequence[PreferencePair], tokenizer: Any, max_length: int) -> str:
    """"none of the N <what> fits max_length=L", with the setting to raise and to what."""
    need = sorted(needed_lengths(data, tokenizer))
    return (
        f"none of the {len(data)} {what} fits max_length={max_length}, even with the prompt cut: raise "
        f"max_length (--max-length) to {need[-1]} for all of them to fit ({need[len(need) // 2]}: half; "
        f"{need[0]}: the shortest), or give shorter responses"
    )


def encode_pairs(
    data: Sequence[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int,
    truncation: str = "prompt",
    add_eos: bool = False,
) -> list[EncodedPair]:
    """Tokenize pairs into chosen and rejected sequences of at most ``max_length`` tokens.

    Args:
        data: Pairs (a :class:`~prefprune.data.PreferenceDataset` or any sequence of pairs).
        tokenizer: A Hugging Face tokenizer (fast ones go straight to the Rust backend) or a
            ``tokenizers.Tokenizer``.
        max_length: Maximum sequence length in tokens, special tokens included.
        truncation: ``"prompt"``: when too long, cut the pair's truncatable span (the TL;DR post) from its
            end, or when it has none the prompt from the left; the response is never cut. ``"error"``: raise
            instead of cutting.
        add_eos: Append ``tokenizer.eos_token_id`` after the response (see the module notes).

    Returns:
        One :class:`EncodedPair` per input pair, in order.

    Raises:
        ValueError: Unknown ``truncation``; a pair too long with ``truncation="error"``; a pair whose
            responses and fixed prompt parts alone exceed ``max_length``. Messages name the pair id and the
            lengths.
    """
    if truncation not in _TRUNCATION:
        raise ValueError(f"truncation must be one of {_TRUNCATION}, got {truncation!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length!r}")
    pre_sp, post_sp = special_tokens_layout(tokenizer)
    if add_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        if not (post_sp and post_sp[-1] == eos):
            post_sp = [*post_sp, eos]
    n_special = len(pre_sp) + len(post_sp)

    # Split each prompt into (fixed head, cuttable middle, fixed tail) and tokenize every piece in one batch.
    heads, mids, tails = _split_prompts(data)
    n = len(heads)
    toks = _tokenize(tokenizer, heads + mids + tails + [p.chosen for p in data] + [p.rejected for p in data])
    head_t, mid_t, tail_t = toks[:n], toks[n : 2 * n], toks[2 * n : 3 * n]
    cho_t, rej_t = toks[3 * n : 4 * n], toks[4 * n :]

    out: list[EncodedPair] = []
    for i, p in enumerate(data):
        mid, cut = _fit_middle(p, head_t[i], mid_t[i], tail_t[i], cho_t[i], rej_t[i], n_special=n_special,
                               max_length=max_length, truncation=truncation)
        prompt_ids = head_t[i] + mid + tail_t[i]
        out.append(
            EncodedPair(
                id=p.id,
                chosen_ids=pre_sp + prompt_ids + cho_t[i] + post_sp,
                rejected_ids=pre_sp + prompt_ids + rej_t[i] + post_sp,
                truncated=cut,
            )
        )
    return out


def collate_pairs(
    batch: Sequence[EncodedPair], *, pad_token_id: int, padding_side: str = "right"
) -> dict[str, Tensor]:
    """Pad a batch of encoded pairs into one tensor of chosen rows followed by rejected rows.

    Args:
        batch: B encoded pairs.
        pad_token_id: Id used for padding.
        padding_side: ``"right"`` (pad after the tokens) or ``"left"``.

    Returns:
        ``{"input_ids": (2B, L) int64, "attention_mask": (2B, L) int64}`` with L the longest sequence in
        the batch; rows ``0..B-1`` are the chosen sequences and rows ``B..2B-1`` the rejected ones, in batch
        order.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if len(batch) == 0:
        raise ValueError("collate_pairs got an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set a pad token on the tokenizer (decoder models have none)")
    seqs = [e.chosen_ids for e in batch] + [e.rejected_ids for e in batch]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(s, dtype=torch.long)
        if padding_side == "right":
            input_ids[row, : len(s)] = t
            mask[row, : len(s)] = 1
        else:
            input_ids[row, length - len(s) :] = t
            mask[row, length - len(s) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
