"""The decoder-only backbone shared by every objective (docs/architecture.md section 1).

Pre-norm blocks with RMSNorm, rotary position embeddings (half-split convention), SwiGLU MLPs,
no biases, untied input embedding and LM head, N(0, init_std) init. What real checkpoints need is
configurable: grouped-query attention, a free head width, tied embeddings, attention biases and
the precision of the RoPE angles. Parameter names follow the Hugging Face Llama layout so that
export is a pure renaming (``model.`` prefix aside; ``nextlat.interop.hf``).

The forward pass returns hidden states (after the final norm, the tensor the LM head reads) and
the token embeddings it used; logits are a separate call. Shapes: B batch, T time, D width,
V vocabulary, H heads, Dh head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.config import ModelConfig
from nextlat.data import attention_mask_from_doc_ids, positions_from_doc_ids


def mlp_hidden_width(d_model: int, factor: float) -> int:
    """Round ``factor * d_model`` to a multiple of 128 (at least 128)."""
    return max(128, 128 * round(factor * d_model / 128))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in at least fp32 (stable under bf16 autocast, as Llama does; a float64 model stays float64).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


class Rotary(nn.Module):
    """Cos/sin tables for RoPE, gathered per token so packed documents restart at position 0.

    ``dtype`` is the precision of the angles: float64, or float32 as ``transformers`` computes them
    (inverse frequencies, angles and cos/sin all in float32), which an imported model needs to
    reproduce its reference. The tables are float32 either way.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float, dtype: torch.dtype = torch.float64):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=dtype), inv_freq)  # (T, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, Dh), half-split layout
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        # position_ids (B, T) -> cos, sin (B, 1, T, Dh), broadcast over heads
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values written by position, one length per row.

    k[i], v[i]: layer i's (B, Hkv, S_max, Dh), one tensor per layer (a compiled step then updates each in
    place instead of copying one shared buffer); ``shape`` is (L, B, Hkv, S_max, Dh). Row b holds
    ``lengths[b]`` valid positions; anything past that is stale and masked out, so rolling back after
    rejected draft tokens is just lowering the length.
    ``end`` is the longest row's length, kept on the host so that a decoding step never waits for
    the device to learn how many keys to read. ``uniform`` (host) says every row holds ``end``
    positions (always so for one row): keys are then written by slicing, and a one-token step
    needs no mask.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.shape = (n_layer, batch, n_head, max_len, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.k = [torch.zeros(self.shape[1:], device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(self.shape[1:], device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.end = 0
        self.max_len = max_len
        self.uniform = True

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, H, T, Dh) new keys/values after each row's prefix; return keys/values up to the longest row."""
        B, H, T, Dh = k.shape
        keys, values = self.k[layer], self.v[layer]
        if self.uniform:
            keys[:, :, self.end : self.end + T] = k
            values[:, :, self.end : self.end + T] = v
        else:
            pos = (self.lengths[:, None] + torch.arange(T, device=k.device))[:, None, :, None].expand(B, H, T, Dh)
            keys.scatter_(2, pos, k.to(self.dtype))
            values.scatter_(2, pos, v.to(self.dtype))
        return keys[:, :, : self.end + T], values[:, :, : self.end + T]

    def advance(self, n: int) -> None:
        """Every row now holds ``n`` more positions (the ones just written); ``lengths`` is replaced, not changed."""
        self.lengths = self.lengths + n
        self.end += n

    def rollback(self, lengths: Tensor, end: int | None = None, uniform: bool | None = None) -> None:
        """Forget every position at or past ``lengths`` (B,), e.g. rejected draft tokens.

        ``end`` is ``max(lengths)`` and ``uniform`` whether all lengths are equal, when the caller knows
        them on the host (the decoding engine does); without ``end`` the lengths are read back and
        checked, which waits for the device. Several rows given ``end`` alone count as not uniform.
        """
        if end is None:
            if bool((lengths > self.lengths).any()):
                raise ValueError("rollback cannot extend the cache")
            end = int(lengths.max())
            uniform = bool((lengths == end).all())
        self.lengths = lengths.clone()
        self.end = end
        self.uniform = len(lengths) == 1 or bool(uniform)


@dataclass
class LayerContext:
    """Per-forward inputs shared by all blocks: rotary tables (B, 1, T, Dh), mask, cache."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None  # (B or 1, 1, T, S) bool, True = may attend; None = see ``causal``
    cache: KVCache | None = None
    causal: bool = True  # without a mask: causal, or (one new token after a cache) every key


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, bias = cfg.d_model, cfg.attention_bias
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_width
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=bias)
        # Grouped-query attention: each key/value head serves n_head / n_kv query heads (arXiv 2305.13245).
        self.sdpa_kwargs = {"enable_gqa": True} if self.n_kv != self.n_head else {}

    def forward(self, x: Tensor, ctx: LayerContext, layer: int) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k, v = (proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
                for proj in (self.k_proj, self.v_proj))
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write(layer, k, v)  # (B, Hkv, S, Dh): everything cached so far plus the new keys
        if ctx.mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal, **self.sdpa_kwargs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, **self.sdpa_kwargs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or mlp_hidden_width(cfg.d_model, 8 / 3)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, hidden)

    def forward(self, x: Tensor, ctx: LayerContext, layer: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Backbone: ``forward`` gives hidden states; ``logits`` applies the LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: must be set (>= 1) before building the model")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_width, cfg.max_seq_len, cfg.rope_base, getattr(torch, cfg.rope_dtype))
        init_weights(self, cfg.init_std)
        if cfg.tie_embeddings:  # one parameter under both names (both appear in the state dict)
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: Tensor, check: bool = True) -> Tensor:
        """(B, T) token ids -> (B, T, D) embeddings, with a clear error for bad ids (``check``: reads them back)."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if check and input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return self.embed_tokens(input_ids)

    def context(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None) -> LayerContext:
        """Rotary tables and attention mask shared by every block of one forward pass."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mask, causal = None, True
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("packed documents (doc_ids) cannot be decoded with a KV cache")
            if cache.shape[1] != B:
                raise ValueError(f"KV cache holds batch size {cache.shape[1]}, input has {B}")
            end = cache.end + T
            if end > cache.max_len:
                raise ValueError(f"KV cache of length {cache.max_len} cannot hold {end} tokens")
            # Query t of row b sits at position lengths[b] + t and sees keys 0 .. lengths[b] + t of its row.
            keys = torch.arange(end, device=input_ids.device)
            if cache.uniform:  # every row at cache.end: positions and mask known on the host
                position_ids = (cache.end + torch.arange(T, device=input_ids.device)).expand(B, T)
                if T == 1:
                    causal = False  # one query sees every key
                else:
                    mask = (keys[None, :] <= position_ids[:1, :, None]).unsqueeze(1)  # (1, 1, T, S)
            else:
                position_ids = cache.lengths[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
                mask = (keys[None, None, :] <= position_ids[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
        elif doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
            mask = attention_mask_from_doc_ids(doc_ids)  # (B, 1, T, T)
            if position_ids is None:
                position_ids = positions_from_doc_ids(doc_ids)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rotary(position_ids)
        return LayerContext(cos, sin, mask, cache, causal)

    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """Run the backbone.

        input_ids: (B, T). doc_ids: optional (B, T) document index per token (packed sequences;
        -1 marks padding); attention stays within a document and positions restart in each.
        cache: optional KV cache; the tokens are appended after each row's cached prefix and the
        cache lengths advance by T. Token ids are checked (a read back from the device) unless the
        cache already holds tokens: decoding steps feed ids the decoder chose, so only a prefill is checked.
        Returns (h, emb): h (B, T, D) final-norm hidden states, emb (B, T, D) input embeddings.
        """
        x, emb, _ = self.forward_layers(input_ids, doc_ids, position_ids, cache)
        return self.norm(x), emb

    def forward_layers(self, input_ids: Tensor, doc_ids: Tensor | None = None, position_ids: Tensor | None = None,
                       cache: KVCache | None = None, n_layers: int | None = None
                       ) -> tuple[Tensor, Tensor, LayerContext]:
        """Embed and run the first ``n_layers`` blocks (all by default); no final norm.

        Returns (x, emb, ctx): the residual stream (B, T, D), the embeddings (B, T, D) and the
        layer context, so that extra blocks (e.g. multi-token heads) can continue from x, and
        :meth:`continue_layers` can finish the backbone. A cache advances once the last block has run.
        """
        ctx = self.context(input_ids, doc_ids, position_ids, cache)
        emb = self.embed(input_ids, check=cache is None or cache.end == 0)
        return self.continue_layers(emb, ctx, 0, n_layers), emb, ctx

    def continue_layers(self, x: Tensor, ctx: LayerContext, start: int, end: int | None = None) -> Tensor:
        """Run blocks ``start .. end - 1`` (to the last by default) on the residual stream x (B, T, D).

        The cache of ``ctx`` (if any) advances by T once the last block has written its keys.
        """
        end = len(self.layers) if end is None else end
        for i in range(start, end):
            x = self.layers[i](x, ctx, i)
        if ctx.cache is not None and end == len(self.layers):
            ctx.cache.advance(x.shape[1])
        return x

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens (default model.max_seq_len)."""
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        w = self.lm_head.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.kv_heads, max_len, self.cfg.head_width,
                       device=w.device, dtype=dtype or w.dtype)

    def logits(self, h: Tensor) -> Tensor:
        """(..., D) hidden states -> (..., V) logits."""
        return self.lm_head(h)


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) for every Linear and Embedding; RMSNorm scales start at one."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
