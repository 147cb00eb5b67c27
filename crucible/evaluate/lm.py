"""The model side of evaluation: one small interface over our Transformer and transformers models.

Scoring and generation only need four things from a model: text <-> ids, logits for a batch of
right-padded ids, and an incremental (KV-cached) forward pass. `CrucibleLM` wraps our
`Transformer` (possibly inside DDP/FSDP during training); `HFLM` wraps any local transformers
causal LM. Right padding needs no attention mask: causal attention never lets a real token see
the pads that follow it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class TextTokenizer:
    """What evaluation needs from a tokenizer, whichever library provides it."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    eos_id: int | None

    @classmethod
    def from_tokenizers(cls, tok: Any) -> TextTokenizer:
        """From a `tokenizers.Tokenizer` (what our runs save as tokenizer.json)."""
        eos = None
        for name in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"):
            eos = tok.token_to_id(name)
            if eos is not None:
                break
        return cls(
            encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
            decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            eos_id=eos,
        )

    @classmethod
    def from_transformers(cls, tok: Any) -> TextTokenizer:
        return cls(
            encode=lambda s: tok(s, add_special_tokens=False)["input_ids"],
            decode=lambda ids: tok.decode(ids),
            vocab_size=len(tok),
            eos_id=tok.eos_token_id,
        )


class EvalLM(ABC):
    """Base class: a tokenizer, a context length, and batched / incremental logits."""

    name: str = "model"
    # Whether `fork` exists: a prefilled context can be copied to N continuations.
    can_fork: bool = False

    def __init__(self, tokenizer: TextTokenizer, max_len: int, vocab_size: int, device) -> None:
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"model/tokenizer mismatch: the tokenizer has {tokenizer.vocab_size} tokens but "
                f"the model's vocabulary has {vocab_size} rows"
            )
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Work done, for tests and benchmarks: forward passes and token positions run.
        self.forward_calls = 0
        self.tokens_run = 0

    def _count(self, ids: Tensor) -> Tensor:
        self.forward_calls += 1
        self.tokens_run += ids.numel()
        return ids.to(self.device)

    @property
    def prefix_id(self) -> int:
        """The token that stands for 'start of text' when a context is empty."""
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0

    @abstractmethod
    def logits(self, ids: Tensor) -> Tensor:  # [B, T] -> fp32 [B, T, V]
        """Logits of every position."""

    @abstractmethod
    def begin(self, ids: Tensor, max_len: int) -> tuple[Any, Tensor]:
        """Prefill ids [B, T]; return (state, fp32 logits of the last position [B, V])."""

    @abstractmethod
    def extend(self, state: Any, ids: Tensor) -> tuple[Any, Tensor]:
        """Continue the cached sequence with ids [B, t]; return (state, fp32 logits [B, t, V])."""

    def fork(self, state: Any, n: int) -> Any:
        """Copy a prefilled context to n continuations; only where `can_fork`."""
        raise TypeError(f"{type(self).__name__} cannot fork a cached context (can_fork is False)")

    def eval_mode(self):
        return nullcontext()


class CrucibleLM(EvalLM):
    """Our Transformer. `model` may be wrapped (DDP, FSDP2, compiled); `cfg` is its ModelConfig."""

    can_fork = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        cfg,
        device="cpu",
        autocast: torch.dtype | None = None,
        name: str = "crucible",
    ) -> None:
        super().__init__(tokenizer, cfg.max_seq_len, cfg.vocab_size, device)
        # DDP's forward broadcasts buffers to the other ranks on every call; each rank holds the
        # whole model, so evaluation runs the replica inside and needs no collectives. (FSDP2
        # gathers parameters in each forward: every rank must run the same forwards.)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model, self.cfg, self.autocast, self.name = model, cfg, autocast, name

    def _ctx(self):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def eval_mode(self):
        return _EvalMode(self.model)

    def logits(self, ids: Tensor) -> Tensor:
        with self._ctx():
            return self.model(self._count(ids)).logits.float()

    def begin(self, ids: Tensor, max_len: int) -> tuple[Any, Tensor]:
        from crucible.model.attention import KVCache

        cache = KVCache(self.cfg.num_layers, ids.shape[0], min(max_len, self.max_len))
        with self._ctx():
            out = self.model(self._count(ids), cache=cache, logits_to_keep=1).logits
        return cache, out[:, -1].float()

    def extend(self, state: Any, ids: Tensor) -> tuple[Any, Tensor]:
        with self._ctx():
            return state, self.model(self._count(ids), cache=state).logits.float()

    def fork(self, state: Any, n: int) -> Any:
        return state.fork(n)  # KVCache.fork copies keys, values and linear-attention states


class HFLM(EvalLM):
    """A transformers causal LM (AutoModelForCausalLM) with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, device="cpu", name="hf"):
        cfg = model.config
        max_len = getattr(cfg, "max_position_embeddings", None) or 2048
        super().__init__(tokenizer, max_len, cfg.vocab_size, device)
        self.model, self.name = model, name
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def eval_mode(self):
        return _EvalMode(self.model)

    def logits(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=self._count(ids), use_cache=False).logits.float()

    def begin(self, ids: Tensor, max_len: int) -> tuple[Any, Tensor]:
        out = self.model(input_ids=self._count(ids), use_cache=True)
        return _hf_cache(out), out.logits[:, -1].float()

    def extend(self, state: Any, ids: Tensor) -> tuple[Any, Tensor]:
        kw = {self._cache_kw: state}
        out = self.model(input_ids=self._count(ids), use_cache=True, **kw)
        return _hf_cache(out), out.logits.float()


def _hf_cache(out: Any) -> Any:
    # transformers >= 5.2x names the KV cache `cache`; earlier versions `past_key_values`.
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


class _EvalMode:
    """no_grad + eval() for the duration, then the previous train/eval mode again."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)
