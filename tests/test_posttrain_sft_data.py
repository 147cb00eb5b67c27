"""SFT data: labels and losses equal TRL's SFTTrainer data path; packing, truncation, loader."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from posttrain_helpers import records, train_small_tokenizer

from crucible.config import ConfigError, ModelConfig
from crucible.model.loss import IGNORE_INDEX
from crucible.model.transformer import Transformer
from crucible.posttrain.chat_template import ChatEncoder, ChatTemplate
from crucible.posttrain.conversations import Conversation, Message, parse_records
from crucible.posttrain.sft_data import (
    Example,
    SFTLoader,
    build_rows,
    pack_bfd,
    tokenize_conversations,
)
from crucible.posttrain.sft_loss import sft_loss
from crucible.tokenizer.train import load_tokenizer

MAX_LEN = 1024  # TRL's max_length: tokens per sequence; our rows hold MAX_LEN - 1 positions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    tok_path = train_small_tokenizer(tmp / "tok")
    tok = load_tokenizer(tok_path)
    encoder = ChatEncoder(ChatTemplate.default(), tok)
    convs = parse_records(records(), "refs").conversations
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=MAX_LEN, doc_masking=True)  # fmt: skip
    model = Transformer(cfg).eval()
    return tmp, tok_path, encoder, convs, model


@pytest.fixture(scope="module")
def trl_ref(setup):
    """TRL's SFTTrainer over the same conversations, with our model exported to transformers."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from crucible.model import export_hf

    tmp, tok_path, encoder, convs, model = setup
    export_hf(model, tmp / "hf", tok_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path), chat_template=encoder.template.source,
        eos_token="<|im_end|>", pad_token="<|pad|>",
    )  # fmt: skip

    def row(c: Conversation, split: bool) -> dict:
        r = {"tools": list(c.tools) if c.tools else None, "chat_template_kwargs": c.template_kwargs}
        msgs = c.template_messages()
        if split:  # prompt-completion: the completion is the last assistant turn
            return {"prompt": msgs[: c.last_assistant], "completion": msgs[c.last_assistant :], **r}
        return {"messages": msgs, **r}

    def trainer(name: str, split: bool = False, **kw) -> SFTTrainer:
        args = SFTConfig(
            output_dir=str(tmp / name), assistant_only_loss=True, report_to=[], use_cpu=True,
            bf16=False, shuffle_dataset=False, per_device_train_batch_size=8, **kw,
        )  # fmt: skip
        ds = Dataset.from_list([row(c, split) for c in convs])
        return SFTTrainer(model=hf_model, args=args, train_dataset=ds, processing_class=hf_tok)

    return {
        "model": hf_model,
        "assistant": trainer("a", max_length=None),
        "completion": trainer("c", split=True, completion_only_loss=True, max_length=None),
        "packed": trainer("p", packing=True, max_length=MAX_LEN),
    }


def _trl_loss(trainer, hf_model) -> float:
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return float(trainer.compute_loss(hf_model, dict(batch)))


def _our_loss(model, examples, packing: bool) -> float:
    n_rows = len(pack_bfd([len(e.ids) - 1 for e in examples], MAX_LEN - 1)) if packing else 8
    loader = SFTLoader(examples, MAX_LEN - 1, n_rows, n_rows, pad_id=1, packing=packing,
                       shuffle=False)  # fmt: skip
    (batch,) = loader.step_batches(0)
    with torch.no_grad():
        return float(sft_loss(model, batch))


@pytest.mark.parametrize("loss", ["assistant", "completion"])
def test_labels_and_loss_equal_trl(setup, trl_ref, loss: str) -> None:
    _, _, encoder, convs, model = setup
    examples, stats = tokenize_conversations(convs, encoder, loss=loss)  # type: ignore[arg-type]
    assert stats.examples == len(convs) and not stats.issues
    ref = trl_ref[loss].train_dataset
    for ex, ids, labels in zip(examples, ref["input_ids"], ref["labels"]):
        assert ex.ids.tolist() == ids, ex.record
        assert ex.labels.tolist() == labels, ex.record
    if loss == "completion":  # only the last assistant turn is learned
        assert stats.supervised < sum(e.num_supervised for e in tokenize_conversations(
            convs, encoder)[0])  # fmt: skip
    ours = _our_loss(model, examples, packing=False)
    assert abs(ours - _trl_loss(trl_ref[loss], trl_ref["model"])) < 1e-5


def test_packed_loss_and_bins_equal_trl(setup, trl_ref) -> None:
    _, _, encoder, convs, model = setup
    examples, _ = tokenize_conversations(convs, encoder)
    ref = trl_ref["packed"]
    trl_bins = sorted(sorted(b) for b in ref.train_dataset["seq_lengths"])
    ours = pack_bfd([len(e.ids) for e in examples], MAX_LEN)
    assert sorted(sorted(len(examples[i].ids) for i in b) for b in ours) == trl_bins
    # Packed (with document masking) and unpacked give TRL's loss.
    trl = _trl_loss(ref, trl_ref["model"])
    assert abs(_our_loss(model, examples, packing=True) - trl) < 1e-5
    assert abs(_our_loss(model, examples, packing=False) - trl) < 1e-5


def test_packed_rows_give_each_example_its_own_logits(setup) -> None:
    _, _, encoder, convs, model = setup
    examples, _ = tokenize_conversations(convs[:3], encoder)
    width = sum(len(e.ids) - 1 for e in examples) + 5
    batch = build_rows(examples, [[0, 1, 2]], width, pad_id=1, packed=True)
    with torch.no_grad():
        packed = model(batch.tokens, doc_ids=batch.doc_ids).logits[0]
        pos = 0
        for ex in examples:
            n = len(ex.ids) - 1
            alone = model(torch.from_numpy(ex.ids[:-1])[None]).logits[0]
            torch.testing.assert_close(packed[pos : pos + n], alone, atol=1e-5, rtol=1e-5)
            pos += n
    assert batch.doc_ids[0, pos:].tolist() == [3] * 5  # padding is a document of its own


def test_packing_needs_document_masking(setup) -> None:
    _, _, encoder, convs, model = setup
    examples, _ = tokenize_conversations(convs[:2], encoder)
    batch = build_rows(examples, [[0, 1]], 900, pad_id=1, packed=True)
    plain = Transformer(model.cfg.model_copy(update={"doc_masking": False}))
    with pytest.raises(ConfigError, match="doc_masking"):
        sft_loss(plain, batch)


def test_bfd_picks_the_tightest_bin() -> None:
    # Worked by hand, capacity 10: 7 -> A(3 left); 5 -> B(5); 4 -> B(1); 3 -> A(0); 2 -> C; 1 -> B.
    assert pack_bfd([3, 7, 1, 5, 2, 4], 10) == [[1, 0], [3, 5, 2], [4]]
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(300)]
    bins = pack_bfd(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 64) * 11 // 9 + 1  # BFD's 11/9 OPT + 1 bound
    with pytest.raises(ValueError, match="longer than the bin capacity 64"):
        pack_bfd([10, 65], 64)


def test_truncation_is_counted_never_silent(setup) -> None:
    _, _, encoder, convs, _ = setup
    n_tokens = [len(e.ids) for e in tokenize_conversations(convs, encoder)[0]]
    limit = sorted(n_tokens)[4]
    over = sum(n > limit for n in n_tokens)
    kept, stats = tokenize_conversations(convs, encoder, max_tokens=limit)
    assert stats.too_long == over and len(kept) == len(convs) - over
    assert [i.kind for i in stats.issues] == ["too long"] * over
    assert f"{over} dropped: longer than the maximum length" in stats.summary()
    cut, stats = tokenize_conversations(convs, encoder, max_tokens=limit, truncation="keep_start")
    assert stats.truncated + stats.too_long == over and all(len(e.ids) <= limit for e in cut)
    assert sum(e.truncated for e in cut) == stats.truncated
    # Cut before the first assistant token: nothing left to learn, dropped and counted.
    _, stats = tokenize_conversations(convs, encoder, max_tokens=12, truncation="keep_start")
    assert stats.too_long == len(convs) and stats.examples == 0
    with pytest.raises(ConfigError, match=r"refs:\d+: \d+ tokens > the maximum"):
        tokenize_conversations(convs, encoder, max_tokens=limit, truncation="error")


def test_problem_conversations_are_named_and_left_out(setup) -> None:
    _, _, encoder, convs, _ = setup
    injected = Conversation(
        (Message("user", "hi <|im_end|> there"), Message("assistant", "ok")), name="x.jsonl:3"
    )
    no_think_reasoning = Conversation(
        (Message("system", "/no_think"), Message("user", "q"), Message("assistant", "a", "r")),
        name="x.jsonl:4",
    )
    examples, stats = tokenize_conversations([convs[0], injected, no_think_reasoning], encoder)
    assert len(examples) == 1
    assert [(i.record, i.kind) for i in stats.issues] == [
        ("x.jsonl:3", "special token"),
        ("x.jsonl:4", "template error"),
    ]
    assert 0 < stats.supervised_share < 1
    assert stats.supervised_share == stats.supervised / stats.tokens


def test_a_batch_without_supervised_tokens_names_its_records(setup) -> None:
    _, _, _, _, model = setup
    ids = np.arange(10, 20, dtype=np.int64)
    ex = Example(ids, np.full(10, IGNORE_INDEX, dtype=np.int64), "data.jsonl:9")
    with pytest.raises(ConfigError, match=r"no supervised tokens \(records: data.jsonl:9\)"):
        build_rows([ex], [[0]], 9, pad_id=1, packed=False)


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(2, 500, size=int(rng.integers(5, 40)))
        labels = np.where(np.arange(len(ids)) >= len(ids) // 2, ids, IGNORE_INDEX)
        out.append(Example(ids, labels, f"r:{i}"))
    return out


def test_loader_is_deterministic_resumable_and_rank_consistent() -> None:
    examples = _examples(50)

    def loader(micro: int = 2, **extra) -> SFTLoader:
        return SFTLoader(examples, 64, 4, micro, pad_id=1, packing=True, seed=3, **extra)

    a = loader()
    for _ in range(12):  # several epochs
        a.next_step()
    assert a.epoch >= 1
    b = loader()
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.next_step(), b.next_step()):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)
    # Each epoch visits every row once, in its own order.
    n = a.n_rows
    assert sorted(a.row_ids(np.arange(n)).tolist()) == list(range(n))
    assert sorted(a.row_ids(n + np.arange(n)).tolist()) == list(range(n))
    assert a.row_ids(np.arange(n)).tolist() != a.row_ids(n + np.arange(n)).tolist()
    # Two ranks' micro-batches together are the single-process step.
    r0, r1, single = loader(rank=0, world_size=2), loader(rank=1, world_size=2), loader(micro=1)
    for step in range(3):
        mine = [*r0.step_batches(step), *r1.step_batches(step)]
        ref = single.step_batches(step)
        assert torch.equal(torch.cat([m.tokens for m in mine]), torch.cat([m.tokens for m in ref]))
        assert mine[0].step_supervised == ref[0].step_supervised == sum(
            m.num_supervised for m in ref)  # fmt: skip
    other = SFTLoader(_examples(50, seed=1), 64, 4, 2, pad_id=1, packing=True, seed=3)
    with pytest.raises(ValueError, match="SFT data changed"):
        other.load_state_dict(a.state_dict())


def test_accumulated_micro_batches_weigh_every_token_alike(setup) -> None:
    _, _, encoder, convs, model = setup
    examples, _ = tokenize_conversations(convs, encoder)
    whole = SFTLoader(examples, MAX_LEN - 1, 8, 8, pad_id=1, packing=False, shuffle=False)
    split = SFTLoader(examples, MAX_LEN - 1, 8, 2, pad_id=1, packing=False, shuffle=False)
    with torch.no_grad():
        ref = sft_loss(model, whole.step_batches(0)[0])
        parts = split.step_batches(0)
        total = sum(sft_loss(model, b, normalizer=b.step_supervised) for b in parts)
    assert parts[0].tokens.shape[1] < MAX_LEN - 1  # unpacked rows pad to the longest only
    torch.testing.assert_close(total, ref, atol=1e-6, rtol=1e-6)
    stats = whole.stats()
    assert stats["rows"] == 8 and 0 < stats["supervised_share"] < 1


def test_unfit_examples_and_bad_options_are_config_errors(setup) -> None:
    _, _, encoder, convs, _ = setup
    examples = _examples(3)
    with pytest.raises(ConfigError, match="longer than seq_len"):
        SFTLoader(examples, 8, 1, 1, pad_id=1)
    with pytest.raises(ConfigError, match="no SFT examples"):
        SFTLoader([], 8, 1, 1, pad_id=1)
    with pytest.raises(ConfigError, match="loss must be"):
        tokenize_conversations(convs, encoder, loss="all")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="truncation must be"):
        tokenize_conversations(convs, encoder, truncation="cut")  # type: ignore[arg-type]


def test_template_defaults_pin_the_date_under_the_records_own(setup) -> None:
    _, _, encoder, convs, _ = setup
    undated = [replace(c, template_kwargs={}) for c in convs[:2]]
    pinned = {"today_date": "01 January 2030"}
    a, _ = tokenize_conversations(undated, encoder, template_kwargs=pinned)
    b, _ = tokenize_conversations([replace(c, template_kwargs=pinned) for c in convs[:2]], encoder)
    assert [e.ids.tolist() for e in a] == [e.ids.tolist() for e in b]
    dated, _ = tokenize_conversations(convs[:1], encoder, template_kwargs=pinned)
    assert "02 March 2026" in encoder.tokenizer.decode(dated[0].ids.tolist())


def test_load_sft_data_reads_tokenizes_and_reports(setup, tmp_path) -> None:
    from crucible.posttrain.conversations import write_jsonl
    from crucible.posttrain.sft_prepare import load_sft_data

    _, tok_path, encoder, convs, _ = setup
    write_jsonl(convs, tmp_path / "a.jsonl")
    with (tmp_path / "a.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "x"}]}\n')
    lengths = sorted(len(e.ids) for e in tokenize_conversations(convs, encoder)[0])
    data = load_sft_data([tmp_path / "a.jsonl"], tok_path, seq_len=lengths[-1] - 2)
    assert len(data.examples) == len(convs) - 1 and data.stats.too_long == 1
    summary = data.summary()
    assert "a.jsonl: 8 of 9 records used" in summary and "1 dropped" in summary
    assert data.pad_id == encoder.tokenizer.token_to_id("<|pad|>")
    (tmp_path / "b.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ConfigError, match="no usable SFT examples"):
        load_sft_data([tmp_path / "b.jsonl"], tok_path, seq_len=64)
