"""FP8 (torchao float8): the conversion the trainer applies, checked on CPU, where torchao
emulates the scaled matmul. The trainer itself refuses FP8 off CUDA (tests/test_tp.py)."""

import torch
from torchao.float8.float8_linear import Float8Linear

from crucible.config import load_config
from crucible.model import Transformer
from crucible.train.parallelize import apply_fp8


def test_fp8_converts_the_block_linears_and_stays_near_bf16():
    cfg = load_config("tiny", ["model.vocab_size=512", "model.num_layers=2"]).model
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = Transformer(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = float(ref(x, x).loss)
    for recipe in ("tensorwise", "rowwise"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        apply_fp8(model, recipe)
        linears = {n: type(m) for n, m in model.named_modules() if "proj" in n}
        assert linears and all(t is Float8Linear for t in linears.values()), linears
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, x).loss
        loss.backward()
        assert abs(float(loss) - want) / want < 1e-2, (recipe, float(loss), want)
        assert all(p.grad is not None for p in model.parameters())
