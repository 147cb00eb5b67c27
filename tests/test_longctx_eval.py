"""Long-context evaluation: sample construction, scoring against a copying oracle, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from crucible.evaluate.lm import EvalLM, TextTokenizer
from crucible.evaluate.longctx import (
    Haystack,
    Keys,
    evaluate_longctx,
    extend_context,
    make_sample,
    plot_longctx,
)
from crucible.tokenizer.train import load_tokenizer


@pytest.fixture(scope="module")
def tok(small_data: Path) -> TextTokenizer:
    return TextTokenizer.from_tokenizers(load_tokenizer(small_data / "tokenizer.json"))


@pytest.fixture(scope="module")
def hay(tok) -> Haystack:
    from crucible.evaluate.longctx import _haystack_text

    return Haystack(tok, _haystack_text()[:200_000])


_WORD_LIST = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basil "
    "cedar ember fjord gable harbor jasper kelp lumen maple nectar orbit pebble"
)


def word_tokenizer() -> TextTokenizer:
    """Bytes plus 40 whole words (" word" as one token): enough words for word keys."""
    words = [" " + w for w in _WORD_LIST.split()]
    vocab = [bytes([b]).decode("latin-1") for b in range(256)] + words

    def encode(text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            w = next((w for w in words if text.startswith(w, i)
                      and not text[i + len(w): i + len(w) + 1].isalpha()), None)  # fmt: skip
            ids.append(256 + words.index(w) if w else min(ord(text[i]), 255))
            i += len(w) if w else 1
        return ids

    return TextTokenizer(encode, lambda ids: "".join(vocab[i] for i in ids), len(vocab), 10)


class CopyOracle(EvalLM):
    """Predicts, at each position, the token that followed the longest earlier match of the
    text ending there (an idealised induction head). It solves retrieval by copying and
    nothing else, so it checks the tasks and the scoring independently of any trained model."""

    def __init__(self, tok: TextTokenizer, max_len: int) -> None:
        super().__init__(tok, max_len, tok.vocab_size, "cpu")

    def _predict(self, seq: list[int], t: int) -> int | None:
        best, best_len = None, 0
        for j in range(t - 1, -1, -1):
            k = 0
            while k <= j and seq[j - k] == seq[t - k]:
                k += 1
            if k > best_len:
                best, best_len = seq[j + 1], k
        return best if best_len >= 3 else None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.vocab_size)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                p = self._predict(row, t)
                if p is not None:
                    out[b, t, p] = 20.0
        return out

    def begin(self, ids, max_len):  # pragma: no cover - can_fork is False: never called
        raise AssertionError

    def extend(self, state, ids):  # pragma: no cover
        raise AssertionError


@pytest.mark.parametrize("task", ["needle", "multikey", "vartrack"])
def test_samples_have_the_exact_length_and_the_needle_at_its_depth(task, tok, hay):
    rng = random.Random(0)
    for depth in (0.0, 0.5, 1.0):
        s = make_sample(task, tok, hay, 400, depth, rng, n_candidates=6, bos=0)
        assert len(s.context) + max(map(len, s.candidates)) == 400
        assert len(s.candidates) == 6 and len({tuple(c) for c in s.candidates}) == 6
        answer = tok.decode(s.candidates[s.answer]).strip()
        text = tok.decode(s.context[1:])
        numbers = [tok.decode(c).strip() for c in s.candidates]
        first = {"needle": f"pass key is {answer}", "multikey": f"is {answer}.",
                 "vartrack": f"= {answer}\n"}[task]  # fmt: skip
        at = text.index(first) / len(text)
        # The needle's character offset tracks its token depth (query excluded from the span).
        assert abs(at - depth) < 0.2, (depth, at)
        in_context = [n for n in numbers if n in text]
        expected = {"needle": 1, "multikey": 4, "vartrack": 2}[task]
        assert answer in in_context and len(in_context) == expected


@pytest.mark.parametrize("keys", ["words", "numbers"])
def test_copy_oracle_solves_retrieval_and_not_tracking(tok, hay, keys):
    if keys == "words":  # the test tokenizer (512 tokens) has too few whole words
        from crucible.evaluate.longctx import _haystack_text

        tok = word_tokenizer()
        hay = Haystack(tok, _haystack_text()[:20_000])
    lm = CopyOracle(tok, 256)
    res = evaluate_longctx(lm, ["needle", "multikey", "vartrack"], [256], [0.0, 0.5, 1.0],
                           trials=3, n_candidates=5, haystack=hay, keys=keys)  # fmt: skip
    assert res["needle"]["acc"] == [[1.0], [1.0], [1.0]]
    assert res["multikey"]["acc"] == [[1.0], [1.0], [1.0]]
    assert res["needle"]["keys"] == keys
    # Variable tracking needs two hops: copying the query's variable name leads nowhere.
    assert res["vartrack"]["acc_by_length"][0] < 1.0
    assert res["needle"]["chance"] == 0.2 and res["needle"]["mean_margin"][0][0] > 10


def test_word_keys_are_single_tokens(tok):
    keys = Keys("words", word_tokenizer())
    assert len(keys.pool) == 40
    assert all(len(word_tokenizer().encode(" " + w)) == 1 for w in keys.pool)
    with pytest.raises(ValueError, match="only .* single-token lowercase words"):
        Keys("words", tok)
    with pytest.raises(ValueError, match="--keys must be words or numbers"):
        Keys("letters", tok)


def test_grid_errors_come_before_any_work(tok):
    lm = CopyOracle(tok, 256)
    with pytest.raises(ValueError, match="exceed the model's 256 positions"):
        evaluate_longctx(lm, ["needle"], [512], [0.5])
    with pytest.raises(ValueError, match="depths must lie in"):
        evaluate_longctx(lm, ["needle"], [256], [1.5])
    with pytest.raises(ValueError, match="long-context tasks: needle"):
        evaluate_longctx(lm, ["needles"], [256], [0.5])
    with pytest.raises(ValueError, match="too short for task multikey"):
        evaluate_longctx(lm, ["multikey"], [64], [0.5], keys="numbers")
    with pytest.raises(ValueError, match="apply to crucible models"):
        extend_context(lm, rope_scaling="yarn:2")


def test_heatmap(tmp_path):
    res = {"needle": {"lengths": [256, 512], "depths": [0.0, 1.0], "acc": [[1.0, 0.5], [0.0, 1]],
                      "chance": 0.1}}  # fmt: skip
    out = plot_longctx(res, tmp_path / "h.png", "t")
    assert out.stat().st_size > 1000


def test_cli_on_a_run_with_yarn(small_overrides, capsys):
    from crucible.cli import main
    from crucible.config import load_config
    from crucible.train.trainer import train

    cfg = load_config("tiny", [*small_overrides, "name=lc", "train.steps=2", "train.val_every=0"])
    run = train(cfg, quiet=True).run_dir
    args = ["eval", "longctx", str(run), "--tasks", "needle", "--lengths", "100,256",
            "--depths", "0,1", "--trials", "2", "--rope-scaling", "yarn:4", "--keys", "numbers"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    result = json.loads((run / "eval" / "step_000002.longctx-yarnx4.json").read_text())
    assert result["config"]["max_seq_len"] == 256  # 64 trained positions x 4
    grid = result["longctx"]["needle"]["acc"]
    assert len(grid) == 2 and len(grid[0]) == 2
    assert (run / "eval" / "step_000002.longctx-yarnx4.png").is_file()
    assert "needle (accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args[:5], "--lengths", "256"])  # beyond 64 positions without scaling
    assert e.value.code == 2 and "--max-seq-len" in capsys.readouterr().err


def test_extend_context_keeps_weights_and_scales_rope(small_data):
    from crucible.config import ModelConfig
    from crucible.evaluate.lm import CrucibleLM
    from crucible.model import Transformer

    tok = TextTokenizer.from_tokenizers(load_tokenizer(small_data / "tokenizer.json"))
    model = Transformer(ModelConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2,
                                    num_kv_heads=2, intermediate_size=32, max_seq_len=64))  # fmt: skip
    lm = CrucibleLM(model, tok, model.cfg)
    ext = extend_context(lm, rope_scaling="dynamic:2")
    assert ext.max_len == 128 and ext.cfg.rope_scaling.original_max_position_embeddings == 64
    x = torch.randint(0, 512, (1, 64))
    with torch.no_grad():  # dynamic NTK leaves the original length untouched
        assert torch.equal(ext.model(x).logits, model(x).logits)
    assert extend_context(lm, max_seq_len=256).max_len == 256


def test_loss_by_position_buckets(tok, hay):
    from crucible.evaluate.longctx import loss_by_position

    lm = CopyOracle(tok, 256)
    r = loss_by_position(lm, 256, windows=2, haystack=hay)
    assert r["buckets"] == [[0, 64], [64, 128], [128, 255]]
    assert len(r["loss"]) == 3 and all(0 < x < 20 for x in r["loss"])
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        loss_by_position(lm, 512, haystack=hay)
