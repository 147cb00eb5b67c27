"""The decoder-only transformer: embedding, pre-norm blocks, final norm, (tied) output head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crucible.config import ModelConfig
from crucible.model.attention import (
    Attention,
    AttentionMask,
    KVCache,
    doc_attention_mask,
    offset_causal_mask,
    positions_from_doc_ids,
)
from crucible.model.autocast import active_autocast_dtype
from crucible.model.deltanet import GatedDeltaNet
from crucible.model.loss import linear_cross_entropy
from crucible.model.mlp import MLP
from crucible.model.moe import Experts, MoE
from crucible.model.norm import RMSNorm
from crucible.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: Tensor | None = None  # fp32 [B, T, V]; None when targets were given
    loss: Tensor | None = None
    z_loss: Tensor | None = None  # mean logsumexp^2 over non-ignored tokens (for logging)
    # MoE, training forward passes: moe_aux_loss and moe_z_loss (unweighted, mean over layers;
    # the balance loss is 1.0 when balanced) and moe_loss, the weighted sum included in `loss`.
    aux: dict[str, Tensor] = field(default_factory=dict)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)). The token mixer is
    attention (`self_attn`), or Gated DeltaNet (`linear_attn`) on the linear layers of a hybrid
    model; the MLP is a MoE layer when cfg.moe is set."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_linear = cfg.is_linear(layer_idx)  # a plain flag: no attribute probe per step
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.moe is not None else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: AttentionMask,
        cache: KVCache | None,
        starts: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the new residual stream and the MoE layer's auxiliary losses (or {}).
        starts [B, T]: document starts, where a linear layer resets its state (doc masking)."""
        h = self.input_layernorm(x)
        if self.is_linear:
            x = x + self.linear_attn(h, cache, starts)
        else:
            x = x + self.self_attn(h, cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h)
            return x + y, aux
        return x + self.mlp(h), {}


class Transformer(nn.Module):
    """Llama / SmolLM3 / Qwen3-style decoder. Parameter names follow transformers' layout.

    All initialisation lives in `init_weights()`. Built under `with torch.device("meta")` the
    model stays uninitialised (then `to_empty(device=...)` + `init_weights()`, e.g. after
    sharding); built anywhere else it is initialised on the current default device.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        target = torch.get_default_device()
        # Always allocate on meta first: it skips PyTorch's default per-layer initialisation,
        # so a model built directly and one built on meta + to_empty + init_weights get
        # identical weights from the same seed.
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.lm_head = (
                None
                if cfg.tie_embeddings
                else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            )
            self.rope = RotaryEmbedding(
                cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_original_len
            )
        # Rows per chunk of the fused output-layer cross-entropy; None picks from vocab size.
        self.loss_chunk_rows: int | None = None
        if target.type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for embedding and linear weights, zero biases, unit norm gains
        (and zero output projections with `zero_init_residual`)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, Experts):
                module.reset_parameters(std)
            elif isinstance(module, MoE):
                module.reset_buffers()
            elif isinstance(module, GatedDeltaNet):
                module.reset_parameters()
        if self.cfg.zero_init_residual:
            for block in self.layers:
                out = block.linear_attn.out_proj if block.is_linear else block.self_attn.o_proj
                nn.init.zeros_(out.weight)
                if isinstance(block.mlp, MLP):  # MoE experts keep their init
                    nn.init.zeros_(block.mlp.down_proj.weight)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (the RoPE table), e.g. after `to_empty()`."""
        self.rope.reset_parameters(device=self.embed.weight.device)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of (unique) parameters; optionally without the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def output_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for up to `max_len` (default max_seq_len) positions."""
        max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        return KVCache(self.cfg.num_layers, batch_size, max_len)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        doc_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the model on input_ids [B, T].

        targets [B, T] (-100 = ignore): return the loss (see `linear_cross_entropy` for the
        reductions and the z-loss) and no logits. Otherwise return fp32 logits [B, T, V], or
        only the last `logits_to_keep` positions when that is > 0 (generation).
        doc_ids [B, T]: with cfg.doc_masking, tokens attend only to earlier tokens with the same
        id (documents are contiguous runs of one id) and positions restart at each document.
        cache: a KVCache from `new_cache`; the tokens continue the cached sequence.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds model max_seq_len {cfg.max_seq_len}"
            )
        if (
            input_ids.device.type == "cpu"
            and input_ids.numel()
            and not torch.compiler.is_compiling()
        ):
            # Cheap on CPU; on GPU it would force a sync, and the embedding asserts anyway.
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} outside the vocabulary 0..{cfg.vocab_size - 1}")
        if not cfg.doc_masking:
            doc_ids = None
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids cannot be combined with a KV cache")

        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(position_ids)
        mask = self._attention_mask(doc_ids, T, past, input_ids.device)
        starts = None
        if doc_ids is not None and cfg.linear_attention is not None:
            starts = torch.zeros_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]

        x = self.embed(input_ids)
        layer_aux: list[dict[str, Tensor]] = []
        for layer in self.layers:
            x, aux = layer(x, cos, sin, mask, cache, starts)
            if aux:
                layer_aux.append(aux)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)

        w = self.output_weight()
        if targets is None:
            if logits_to_keep > 0:
                x = x[:, -logits_to_keep:]
            return ModelOutput(logits=F.linear(x, w).float())
        loss, z_loss = linear_cross_entropy(
            x.reshape(B * T, -1),
            w,
            targets.reshape(B * T),
            reduction=reduction,
            z_coef=cfg.z_loss,
            chunk_rows=self.loss_chunk_rows,
        )
        if reduction == "none":
            loss = loss.view(B, T)
        moe_aux: dict[str, Tensor] = {}
        if layer_aux and cfg.moe is not None:
            moe_loss, moe_aux = self._moe_loss(layer_aux, cfg)
            if reduction == "mean":  # the training loss; evaluation reductions stay pure LM
                loss = loss + moe_loss
        return ModelOutput(loss=loss, z_loss=z_loss, aux=moe_aux)

    @staticmethod
    def _moe_loss(
        layer_aux: list[dict[str, Tensor]], cfg: ModelConfig
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum over layers of aux_loss_coef * balance loss + router_z_loss * z-loss."""
        assert cfg.moe is not None
        bal = torch.stack([a["aux_loss"] for a in layer_aux])
        z = torch.stack([a["z_loss"] for a in layer_aux])
        total = cfg.moe.aux_loss_coef * bal.sum() + cfg.moe.router_z_loss * z.sum()
        logged = {"moe_aux_loss": bal.mean(), "moe_z_loss": z.mean(), "moe_loss": total}
        return total, {k: v.detach() for k, v in logged.items()}

    def _attention_mask(
        self, doc_ids: Tensor | None, T: int, past: int, device: torch.device
    ) -> AttentionMask:
        if doc_ids is not None:
            cfg = self.cfg
            dtype = active_autocast_dtype(device.type) or self.embed.weight.dtype
            return doc_attention_mask(
                doc_ids, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, dtype
            )
        if past == 0:
            return AttentionMask(causal=True)
        if T == 1:  # one new token sees the whole cache
            return AttentionMask(causal=False)
        return AttentionMask(causal=False, dense=offset_causal_mask(T, past, device))
