"""Scoring and generation against an independent implementation: transformers' logits."""

import math
from pathlib import Path

import pytest
import torch

from crucible.config import ModelConfig
from crucible.evaluate.generation import generate_until
from crucible.evaluate.lm import HFLM, CrucibleLM, TextTokenizer
from crucible.evaluate.scoring import Request, bits_per_byte, loglikelihood
from crucible.model import Transformer, export_hf, generate


@pytest.fixture(scope="module")
def setup(small_data: Path, tmp_path_factory):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention
    tok_path = small_data / "tokenizer.json"  # 512 tokens, as the model below
    raw = Tokenizer.from_file(str(tok_path))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=48, init_std=0.1)  # fmt: skip
    model = Transformer(cfg).eval()
    out = export_hf(model, tmp_path_factory.mktemp("hf") / "m", tokenizer_path=tok_path)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = TextTokenizer.from_tokenizers(raw)
    yield CrucibleLM(model, tok, cfg), HFLM(hf, tok), hf, raw
    torch.set_num_threads(threads)


REQUESTS = [
    Request("Question: What is the capital of France?\nAnswer:", c)
    for c in (" Paris", " London", " a very long answer about many things")
] + [
    Request("def add(a, b):\n    ", "return a + b"),
    Request("def add(a, b):\n    ", "pass"),
    Request("", "import os"),  # empty context: scored after the start-of-text token
    Request("x = 1\n" * 40, " y"),  # longer than max_seq_len: the oldest tokens are dropped
]


def _reference(hf, raw, req: Request, max_len: int, eos: int) -> tuple[float, bool]:
    """One request through transformers, written out without our scoring code."""
    ctx = req.context.rstrip()
    cont = req.context[len(ctx) :] + req.continuation
    ctx_ids = raw.encode(ctx, add_special_tokens=False).ids or [eos]
    cont_ids = raw.encode(cont, add_special_tokens=False).ids
    full = (ctx_ids + cont_ids)[-(max_len + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([full[:-1]])).logits[0].double(), -1)
    n = len(cont_ids)
    rows = logp[len(full) - 1 - n :]
    lp = sum(rows[i, t].item() for i, t in enumerate(cont_ids))
    greedy = all(rows[i].argmax().item() == t for i, t in enumerate(cont_ids))
    return lp, greedy


@pytest.mark.parametrize("share", [True, False])
def test_loglikelihood_matches_transformers(setup, share):
    ours, hf_lm, hf, raw = setup
    eos = ours.tokenizer.eos_id
    scores = loglikelihood(ours, REQUESTS, batch_size=3, share_context=share)
    hf_scores = loglikelihood(hf_lm, REQUESTS, batch_size=2)
    for req, s, h in zip(REQUESTS, scores, hf_scores, strict=True):
        lp, greedy = _reference(hf, raw, req, ours.max_len, eos)
        assert s.logprob == pytest.approx(lp, abs=1e-3), req
        assert h.logprob == pytest.approx(lp, abs=1e-3), req
        assert s.greedy == greedy == h.greedy


def test_shared_context_runs_fewer_tokens(setup):
    ours = setup[0]
    group = [Request("x = compute(a, b)\n" * 2, c) for c in ("y = x", "z = x + 1", "return")]
    work = {}
    for share in (True, False):
        ours.tokens_run = 0
        loglikelihood(ours, group, share_context=share)
        work[share] = ours.tokens_run
    ctx = len(ours.tokenizer.encode(group[0].context.rstrip()))
    assert work[True] < work[False] and work[False] >= 3 * ctx  # the context is run once


def test_bits_per_byte_matches_direct_computation(setup):
    ours, hf_lm, hf, raw = setup
    text = "def f(x):\n    return x * 2\n"
    ids = raw.encode(text, add_special_tokens=False).ids
    assert len(ids) < ours.max_len
    with torch.no_grad():
        logp = torch.log_softmax(
            hf(torch.tensor([[ours.tokenizer.eos_id, *ids[:-1]]])).logits[0], -1
        )
    nats = -sum(logp[i, t].item() for i, t in enumerate(ids))
    expected = nats / (math.log(2) * len(text.encode()))
    assert bits_per_byte(ours, [text])["bpb"] == pytest.approx(expected, rel=1e-4)
    assert bits_per_byte(hf_lm, [text])["bpb"] == pytest.approx(expected, rel=1e-4)
    long = bits_per_byte(ours, ["x = 1\n" * 60])  # several windows
    assert 0 < long["bpb"] < 20


def test_greedy_generation_matches_model_generate(setup):
    ours, hf_lm, _, raw = setup
    prompt = "import os\n"
    ids = raw.encode(prompt, add_special_tokens=False).ids
    ref = raw.decode(generate(ours.model, ids, 12, temperature=0), skip_special_tokens=False)
    for lm in (ours, hf_lm):
        g = generate_until(lm, prompt, stop=["\x00never"], max_new_tokens=12)
        assert g.text == ref and not g.stopped  # a generation that never stops is cut and flagged
    first = ref[: max(1, len(ref) // 2)]
    cut = generate_until(ours, prompt, stop=[first[-1]], max_new_tokens=12)
    assert cut.stopped and cut.text == ref[: ref.index(first[-1])]


def test_model_tokenizer_mismatch_is_an_error(setup):
    ours = setup[0]
    small = ModelConfig(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, intermediate_size=64, max_seq_len=32)  # fmt: skip
    with pytest.raises(ValueError, match="model/tokenizer mismatch"):
        CrucibleLM(Transformer(small), ours.tokenizer, small)
