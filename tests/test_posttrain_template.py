"""The chat template: parity with transformers' apply_chat_template, modes, errors, shipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from posttrain_helpers import records, train_small_tokenizer

from crucible.config import ConfigError, ModelConfig
from crucible.posttrain.chat_template import (
    ChatEncoder,
    ChatTemplate,
    TemplateRenderError,
    mask_from_spans,
    write_chat_template,
)
from crucible.posttrain.conversations import Conversation, Message, parse_record, parse_records
from crucible.tokenizer.train import load_tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def encoder(tok_path: Path) -> ChatEncoder:
    return ChatEncoder(ChatTemplate.default(), load_tokenizer(tok_path))


@pytest.fixture(scope="module")
def hf_tok(tok_path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        chat_template=ChatTemplate.default().source,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


def _hf(hf_tok, conv: Conversation, **kw):
    return hf_tok.apply_chat_template(
        conv.template_messages(),
        tools=list(conv.tools) if conv.tools else None,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **conv.template_kwargs,
        **kw,
    )


def test_ids_and_assistant_mask_equal_transformers(encoder: ChatEncoder, hf_tok) -> None:
    convs = parse_records(records()).conversations
    for conv in convs:
        ours = encoder.encode(conv)
        ref = _hf(hf_tok, conv)
        assert ours.ids == ref["input_ids"], conv.name
        assert ours.mask == ref["assistant_masks"], conv.name
        assert ours.text == hf_tok.apply_chat_template(
            conv.template_messages(), tools=list(conv.tools) if conv.tools else None,
            tokenize=False, **conv.template_kwargs,
        )  # fmt: skip
        # Generation prompts (what chat and serving send) agree as well.
        prompt = conv.template_messages()[: conv.last_assistant]
        ours_p = encoder.encode(conv, messages=prompt, add_generation_prompt=True)
        ref_p = hf_tok.apply_chat_template(
            prompt, tools=list(conv.tools) if conv.tools else None, tokenize=True,
            add_generation_prompt=True, **conv.template_kwargs,
        )  # fmt: skip
        assert ours_p.ids == ref_p["input_ids"]


def test_every_assistant_turn_ends_its_mask_on_the_end_of_turn_token(encoder: ChatEncoder) -> None:
    for conv in parse_records(records()).conversations:
        enc = encoder.encode(conv)
        masked = [i for i, m in zip(enc.ids, enc.mask) if m]
        n_assistant = sum(m.role == "assistant" for m in conv.messages)
        assert masked.count(encoder.end_of_turn_id) == n_assistant
        assert masked[-1] == encoder.end_of_turn_id
        # What the user, system and tools wrote is outside the mask.
        unmasked = [i for i, m in zip(enc.ids, enc.mask) if not m]
        text = encoder.tokenizer.decode(unmasked, skip_special_tokens=False)
        for m in conv.messages:
            if m.role in ("user", "tool"):
                assert m.content in text


def test_modes_flags_and_metadata(encoder: ChatEncoder) -> None:
    t = encoder.template

    def render(system: str | None, **kw) -> str:
        msgs = [] if system is None else [Message("system", system)]
        msgs += [Message("user", "q"), Message("assistant", "a")]
        return t.render(Conversation(tuple(msgs)), today_date="05 May 2026", **kw).text

    think = render(None)
    assert "Reasoning Mode: /think" in think and "Today Date: 05 May 2026" in think
    assert "<|im_start|>assistant\n<think>\n\n</think>\na<|im_end|>" in think
    no_think = render("Be brief. /no_think")
    assert "Reasoning Mode: /no_think" in no_think and "Be brief.\n" in no_think
    assert "/no_think" not in no_think.split("## Custom Instructions")[1]  # flag stripped
    assert "/no_think" in render(None, enable_thinking=False)
    assert "/think" in render("/think", enable_thinking=False)  # the system flag wins
    override = render("You are Bob. /system_override")
    assert override.startswith("<|im_start|>system\nYou are Bob.<|im_end|>\n")
    assert "Metadata" not in override
    assert "Knowledge Cutoff Date: June 2025" in render(None, knowledge_cutoff="June 2025")
    # The playbook's bug: custom_instructions=None must not erase a system prompt.
    assert "Speak like a pirate." in render("Speak like a pirate.", custom_instructions=None)
    assert "Be kind." in render(None, custom_instructions="Be kind.")


def test_generation_prompt_prefills_the_empty_think_block_in_no_think_mode(encoder) -> None:
    t = encoder.template
    conv = Conversation((Message("user", "q"),))
    assert t.render(conv, add_generation_prompt=True).text.endswith("<|im_start|>assistant\n")
    r = t.render(conv, add_generation_prompt=True, enable_thinking=False)
    assert r.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert r.spans == []


def test_reasoning_is_kept_in_every_turn(encoder: ChatEncoder) -> None:
    conv = Conversation(
        (Message("user", "a"), Message("assistant", "1", "first thought"),
         Message("user", "b"), Message("assistant", "2", "second thought"))
    )  # fmt: skip
    r = encoder.template.render(conv, today_date="x")
    spans = [r.text[a:b] for a, b in r.spans]
    assert spans == ["<think>\nfirst thought\n</think>\n1<|im_end|>",
                     "<think>\nsecond thought\n</think>\n2<|im_end|>"]  # fmt: skip


def test_template_errors_name_the_record_and_the_line(encoder: ChatEncoder) -> None:
    rec = {"messages": [{"role": "system", "content": "/no_think"},
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "reasoning_content": "r"}]}  # fmt: skip
    conv = parse_record(rec, "data.jsonl:7")
    with pytest.raises(TemplateRenderError) as e:
        encoder.encode(conv)
    source = ChatTemplate.default().source.splitlines()
    msg = str(e.value)
    assert msg.startswith("data.jsonl:7: crucible/posttrain/templates/chat_template.jinja line ")
    line = int(msg.split(" line ")[1].split(":")[0])
    assert "reasoning in a /no_think" in source[line - 1]
    with pytest.raises(ConfigError, match=r"my.jinja line 2: template syntax error"):
        ChatTemplate("ok\n{% if %}", "my.jinja")


def test_the_sandbox_blocks_python_internals(encoder: ChatEncoder) -> None:
    t = ChatTemplate("{{ messages[0]['content'].__class__.__mro__ }}", "evil.jinja")
    with pytest.raises(TemplateRenderError, match="evil.jinja"):
        t.render(Conversation((Message("user", "x"),)))
    t = ChatTemplate("{% set ns = namespace(_x=1) %}", "evil2.jinja")
    with pytest.raises(TemplateRenderError, match="not allowed"):
        t.render(Conversation((Message("user", "x"),)))


def test_a_template_that_does_not_train_the_end_of_turn_token_is_rejected(encoder) -> None:
    tok = encoder.tokenizer
    outside = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(ConfigError, match="outside the assistant mask"):
        ChatEncoder(ChatTemplate(outside, "bad.jinja"), tok)
    no_markers = outside.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ConfigError, match="no tokens in the loss mask"):
        ChatEncoder(ChatTemplate(no_markers, "nomark.jinja"), tok)
    inside = outside.replace("{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>",
                             "<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>"
                             "{% endif %}")  # fmt: skip
    ChatEncoder(ChatTemplate(inside, "good.jinja"), tok)  # accepted


def test_mask_from_spans_marks_every_overlapping_token() -> None:
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 9), (9, 12)]
    assert mask_from_spans(offsets, [(3, 6)]) == [0, 1, 1, 0, 0, 0]
    assert mask_from_spans(offsets, [(0, 1), (8, 10)]) == [1, 0, 0, 1, 1, 1]
    assert mask_from_spans(offsets, []) == [0] * 6


def test_the_template_ships_with_the_hf_export(tmp_path: Path, tok_path: Path, encoder) -> None:
    from transformers import AutoTokenizer

    from crucible.model import export_hf
    from crucible.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=64)  # fmt: skip
    out = export_hf(
        Transformer(cfg), tmp_path / "hf", tok_path, chat_template=ChatTemplate.default().source
    )
    assert (out / "chat_template.jinja").read_text() == ChatTemplate.default().source
    gen = json.loads((out / "generation_config.json").read_text())
    assert encoder.end_of_turn_id in gen["eos_token_id"]
    loaded = AutoTokenizer.from_pretrained(out)
    conv = parse_records(records()).conversations[3]
    assert _hf(loaded, conv)["input_ids"] == encoder.encode(conv).ids
    assert write_chat_template(tmp_path / "run").read_text() == ChatTemplate.default().source
    # A template written for transformers may use the tokenizer's special tokens.
    plain = (
        "{{ eos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% endfor %}"
    )
    ours = ChatEncoder(ChatTemplate(plain), encoder.tokenizer).encode(conv)
    assert ours.text.startswith("<|endoftext|><|im_start|>user")
    ref = loaded.apply_chat_template(
        conv.template_messages(),
        chat_template=plain,
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    assert (ours.ids, ours.mask) == (ref["input_ids"], ref["assistant_masks"])


def test_replies_parse_back_to_the_rendered_messages(encoder: ChatEncoder) -> None:
    from crucible.posttrain.replies import parse_reply

    n = 0
    for conv in parse_records(records()).conversations:
        r = encoder.template.render(conv)
        turns = [m for m in conv.messages if m.role == "assistant"]
        for m, (a, b) in zip(turns, r.spans, strict=True):
            got = parse_reply(r.text[a:b] + "\nignored after the end of turn")
            assert (got.content, got.reasoning) == (m.content, m.reasoning)
            assert [(c.name, c.arguments) for c in got.tool_calls] == [
                (c.name, c.arguments) for c in m.tool_calls
            ]
            n += len(m.tool_calls)
    assert n == 4  # XML and Python-style calls both parsed
    # Cut off while thinking; malformed call left as text; arbitrary code.
    assert parse_reply("<think>\nstill going").reasoning == "still going"
    bad = parse_reply("<tool_call>{not json}</tool_call>")
    assert bad.tool_calls == () and "not json" in bad.content
    code = parse_reply("<code>\nprint(2 + 3)\n</code>").tool_calls[0]
    assert (code.name, code.arguments) == ("python", {"code": "print(2 + 3)"})
