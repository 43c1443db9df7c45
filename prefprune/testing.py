"""Tiny offline models for tests and smoke runs: a byte-level tokenizer and small configs per family.

Nothing here is downloaded: the tokenizer is built in memory and the configs are randomly
initialisable (`prefprune.model.build_reward_model` accepts a config; ``model="tiny:FAMILY"`` in a
`prefprune.model.ModelConfig` builds one of these).
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BertConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

__all__ = ["tiny_config", "tiny_tokenizer"]


def tiny_tokenizer(*, model_max_length: int = 512):
    """A small offline byte-level tokenizer (261 tokens) that suits encoder and decoder models.

    Every byte is one token (no merges), so tokenising a prompt and a response separately and
    concatenating gives the same ids as tokenising the joined text. Specials: ``[PAD]`` = 0,
    ``[UNK]`` = 1, ``[CLS]`` = 2 (also BOS), ``[SEP]`` = 3 (also EOS), ``[MASK]`` = 4; single sequences
    are wrapped as ``[CLS] text [SEP]``, so a decoder's last token is ``[SEP]``.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        padding_side="right",
    )


_TINY_VOCAB = 5 + 256


def tiny_config(family: str, **overrides: Any):
    """A tiny randomly-initialisable sequence-classifier config (hidden 32, 2 layers, 4 heads).

    The vocabulary and special-token ids match :func:`tiny_tokenizer`; dropout is 0 so that tiny
    models are deterministic in train mode.

    Args:
        family: ``"gpt_neox"``, ``"llama"``, ``"bert"`` or ``"gpt2"``.
        **overrides: Config fields to change (e.g. ``hidden_size=64``).

    Returns:
        A ``PretrainedConfig`` with ``num_labels=1``.
    """
    common = dict(vocab_size=_TINY_VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3, num_labels=1)
    if family == "gpt_neox":
        cls, kw = (
            GPTNeoXConfig,
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                use_cache=False,
            ),
        )
    elif family == "llama":
        cls, kw = (
            LlamaConfig,
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                attention_dropout=0.0,
                use_cache=False,
            ),
        )
    elif family == "bert":
        cls, kw = (
            BertConfig,
            dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=512,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
        )
    elif family == "gpt2":
        cls, kw = (
            GPT2Config,
            dict(
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_inner=64,
                n_positions=512,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                use_cache=False,
            ),
        )
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose gpt_neox, llama, bert or gpt2")
    kwargs = {**common, **kw, **overrides}
    return cls(**kwargs)


def random_pairs(n: int, *, seed: int, prefix: str) -> list:
    """`n` seeded pairs of random short texts (prompt 3–21, chosen 1–11, rejected 2–12 characters) with ids
    `<prefix><i>`: data with no pattern, for checks that depend only on the numbers (refactor guards)."""
    import random

    from prefprune.data import PreferencePair

    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(rng.choice("abcdefgh ijklmnop") for _ in range(k))

    return [PreferencePair(id=f"{prefix}{i}", prompt=text(rng.randrange(3, 23) | 1),
                           chosen=text(rng.randrange(1, 12) | 1), rejected=text(rng.randrange(2, 13)))
            for i in range(n)]
