"""Parameter counts against published figures, derived from the shapes (never typed in code)."""

from crucible.config import load_config
from crucible.plan.flops import attention_flops_per_token, train_flops_per_token
from crucible.plan.params import count_params


def test_smollm3_3b_published_count():
    # SmolLM3-3B's model card / safetensors index: 3,075,098,624 parameters.
    assert count_params(load_config("smollm3-3b").model).total == 3_075_098_624


def test_llama32_1b_published_count_and_split():
    p = count_params(load_config("llama3.2-1b-ablation").model)
    assert p.total == 1_235_814_400  # Llama-3.2-1B
    # The playbook: about 21% embeddings, 14% attention, 65% MLP.
    assert round(p.embedding / p.total, 2) == 0.21
    assert round(p.attention / p.total, 2) == 0.14
    assert round(p.mlp / p.total, 2) == 0.65


def test_untied_adds_lm_head_and_flops_include_attention():
    tied = load_config("tiny").model
    untied = load_config("tiny", ["model.tie_embeddings=false"]).model
    assert count_params(untied).total - count_params(tied).total == tied.vocab_size * 256
    f = train_flops_per_token(tied, 256)
    assert f > 6 * count_params(tied).non_embedding
    # causal attention: 6 * L * seq * heads * head_dim useful FLOPs per token
    assert attention_flops_per_token(tied, 256) == 6 * 4 * 256 * 4 * 64
