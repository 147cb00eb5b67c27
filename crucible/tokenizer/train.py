"""Train, save and inspect a byte-level BPE tokenizer.

Byte-level means every string, in any language or with any binary junk, encodes losslessly with no
unknown token: the base alphabet is the 256 bytes (mapped to printable characters GPT-2 style).
There is no normalizer, so ``decode(encode(text)) == text`` exactly and the bytes covered by each
token are known, which is what bits-per-byte needs (`token_byte_lengths`).

Special tokens take the first ids: ``<|endoftext|>`` (EOS, also the document separator in shards),
``<|pad|>``, and the chat tokens ``<|im_start|>``/``<|im_end|>`` reserved for post-training. The
vocabulary is padded with ``<|reserved_N|>`` special tokens up to exactly the requested size
(rounded up to a multiple of `round_to`, 128 by default, a friendly size for matmuls), so the
embedding table size never depends on how many merges a small corpus happened to allow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crucible.atomic import write_text_atomic

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>")
# `crucible tokenizer train` also reserves a BOS token; appended, so the ids above stay put.
LAB_SPECIAL_TOKENS: tuple[str, ...] = (*DEFAULT_SPECIAL_TOKENS, BOS_TOKEN)
BYTE_ALPHABET_SIZE = 256


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _resolve_out(out_path: str | os.PathLike[str]) -> Path:
    p = Path(out_path)
    return p / "tokenizer.json" if p.suffix != ".json" else p


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike[str],
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    round_to: int = 128,
    split_digits: bool = False,
) -> Path:
    """Train byte-level BPE on `texts` and save it; returns the tokenizer.json path.

    `out_path` is a ``.json`` file or a directory (then ``<dir>/tokenizer.json``). The final
    vocabulary has exactly ``round_up(vocab_size, round_to)`` entries. Special tokens come first,
    ``special_tokens[0]`` is the EOS token. `split_digits` makes every digit its own pre-token
    (PaLM / DeepSeek style), so numbers are spelled digit by digit and never merged.
    """
    if not special_tokens or not all(special_tokens):
        raise ValueError("special_tokens must contain at least the EOS token (and no empty name)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency {min_frequency}: must be at least 1")
    if round_to < 1:
        raise ValueError(f"round_to {round_to}: must be at least 1")
    target = round_up(vocab_size, max(1, round_to))
    minimum = BYTE_ALPHABET_SIZE + len(special_tokens)
    if target < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum} "
            f"({BYTE_ALPHABET_SIZE} bytes + {len(special_tokens)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=target,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterable[str]:
        nonlocal seen
        for t in texts:
            seen += len(t)
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if not seen:
        raise ValueError("no text to train on: the inputs are empty")
    missing = target - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])

    out = _resolve_out(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, tok.to_str(pretty=False))
    if out.name == "tokenizer.json":
        # Lets `AutoTokenizer.from_pretrained(dir)` load it with the right special tokens.
        hf_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": special_tokens[0],
            "pad_token": PAD_TOKEN if PAD_TOKEN in special_tokens else None,
            "bos_token": BOS_TOKEN if BOS_TOKEN in special_tokens else None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        write_text_atomic(out.with_name("tokenizer_config.json"), json.dumps(hf_config, indent=2))
    return out


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer.json (or a directory holding one), with a clear error when absent."""
    p = _resolve_out(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{p}: not a Hugging Face tokenizers tokenizer.json ({reason})") from None


def eos_id(tok: Tokenizer, eos_token: str = EOS_TOKEN) -> int:
    i = tok.token_to_id(eos_token)
    if i is None:
        raise ValueError(f"tokenizer has no EOS token {eos_token!r}")
    return i


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """int64 array: how many UTF-8 bytes each token id decodes to (special tokens: 0).

    Summed over an encoding of plain text this equals ``len(text.encode())``: the basis of
    bits-per-byte, a loss comparable across tokenizers.
    """
    n = tok.get_vocab_size(with_added_tokens=True)
    byte_chars = set(pre_tokenizers.ByteLevel.alphabet())
    added = tok.get_added_tokens_decoder()
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if i in added:
            at = added[i]
            out[i] = 0 if at.special else len(at.content.encode())
            continue
        s = tok.id_to_token(i)
        if s is None:
            continue
        if all(c in byte_chars for c in s):
            out[i] = len(s)  # each alphabet character stands for exactly one byte
        else:  # not a byte-level vocabulary entry: measure what it decodes to
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode())
    return out
