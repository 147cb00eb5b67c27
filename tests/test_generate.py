"""Sampling with the KV cache agrees with plain full-sequence decoding."""

from __future__ import annotations

import pytest
import torch

from crucible.config import ModelConfig
from crucible.model import Transformer, generate, generate_text
from crucible.model.generate import heal_prompt

CFG = ModelConfig(
    vocab_size=53,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=96,
    max_seq_len=32,
    nope_interval=2,
    init_std=0.2,  # peaked distributions: greedy ties are practically impossible
)
PROMPT = [3, 14, 15, 9, 26]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_greedy_with_cache_matches_full_recompute(model: Transformer) -> None:
    ours = generate(model, PROMPT, max_new_tokens=12, temperature=0.0)
    assert ours == greedy_without_cache(model, PROMPT, 12)
    assert len(set(ours)) > 1  # not a degenerate repetition that would hide errors
    assert generate(model, torch.tensor(PROMPT), max_new_tokens=12, temperature=0.0) == ours


def test_top_k_one_is_greedy(model: Transformer) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=10, temperature=0.0)
    gen = torch.Generator().manual_seed(123)
    assert generate(model, PROMPT, 10, temperature=1.0, top_k=1, generator=gen) == greedy
    assert generate(model, PROMPT, 10, temperature=0.7, top_p=1e-6, generator=gen) == greedy


def test_sampling_is_seeded(model: Transformer) -> None:
    def run(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return generate(model, PROMPT, 15, temperature=1.5, top_k=20, top_p=0.95, generator=g)

    a, b = run(1), run(1)
    assert a == b and all(0 <= t < CFG.vocab_size for t in a)


def test_eos_stops(model: Transformer) -> None:
    greedy = generate(model, PROMPT, max_new_tokens=12, temperature=0.0)
    eos = greedy[4]
    first = greedy.index(eos)
    out = generate(model, PROMPT, max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    assert out == greedy[: first + 1]  # stops right after the eos token, which is included
    assert generate(model, PROMPT, 12, temperature=0.0, eos_token_id=[999, eos]) == out


def test_max_seq_len_respected(model: Transformer) -> None:
    prompt = list(range(1, 28))  # 27 of 32 positions
    out = generate(model, prompt, max_new_tokens=50, temperature=0.0)
    assert len(out) == CFG.max_seq_len - len(prompt)
    assert generate(model, list(range(32)), max_new_tokens=5) == []
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(33)), max_new_tokens=1)


def test_generate_text_decodes_new_tokens_and_empty_prompt_starts_a_document():
    class CharTok:  # the tokenizers.Tokenizer surface generate_text uses
        def encode(self, text):
            return type("Enc", (), {"ids": [ord(c) % CFG.vocab_size for c in text]})()

        def decode(self, ids):
            return ",".join(map(str, ids))

    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    greedy = {"temperature": 0.0}
    text = generate_text(model, CharTok(), "ab", 5, None, token_healing=False, **greedy)
    assert text == ",".join(
        map(str, generate(model, [97 % CFG.vocab_size, 98 % CFG.vocab_size], 5, **greedy))
    )
    empty = generate_text(
        model, CharTok(), "", 4, 7, token_healing=False, **greedy
    )  # starts from EOS id 7
    assert empty == ",".join(map(str, generate(model, [7], 4, eos_token_id=7, **greedy)))


def _byte_bpe(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def main():\n    return max(a, b)\n", "def mean(xs):\n    return sum(xs)\n"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    return tok


def test_token_healing_backs_off_a_trailing_space_and_keeps_the_text_round_trip():
    tok = _byte_bpe()
    ids = tok.encode("def ").ids
    assert [tok.decode([i]) for i in ids] == ["def", " "]  # the bare space the model never saw
    healed, tail, allowed = heal_prompt(tok, ids)
    assert healed == tok.encode("def").ids and tail == " "
    texts = [tok.decode([i]) for i in range(tok.get_vocab_size())]
    assert sorted(allowed.tolist()) == [i for i, t in enumerate(texts) if t.startswith(" ")]
    assert tok.token_to_id("Ġmain") in allowed.tolist()  # " main" is a candidate

    cfg = CFG.model_copy(update={"vocab_size": tok.get_vocab_size()})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        text = generate_text(model, tok, "def ", 6, None, temperature=1.0, generator=gen)
        # The first new token re-chose the space: the prompt is still a prefix of what the
        # tokens decode to, and the returned text is what follows it.
        gen = torch.Generator().manual_seed(seed)
        new = generate(model, healed, 6, temperature=1.0, generator=gen, first_allowed=allowed)
        assert texts[new[0]].startswith(" ")
        assert "def " + text == tok.decode(healed + new)


def test_token_healing_leaves_single_token_and_special_endings_alone():
    tok = _byte_bpe()
    one = tok.encode("def").ids
    assert heal_prompt(tok, one) == (one, "", None)
