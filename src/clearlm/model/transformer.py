"""A Llama-family decoder: RMSNorm, rotary positions, SwiGLU, no biases, causal SDPA attention.

Two block layouts: Llama's (norm before each sublayer) and OLMo 2's (norm on each sublayer's output,
`h = x + RMSNorm(Attn(x))`, plus RMSNorm on the whole query and key projections). Parameter names
follow transformers' `LlamaForCausalLM` / `Olmo2ForCausalLM` (under a `model.` prefix there), so
export and import are a rename. Projections are kept separate: on CPU, fused q/k/v and gate/up matmuls
measured slower, because their backward has to concatenate the gradients again.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clearlm.model.loss import IGNORE_INDEX, fused_cross_entropy
from clearlm.numerics import mkl_strict

ARCHITECTURES = ("llama", "olmo2")


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    architecture: str = "llama"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    context: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")

    @property
    def olmo2(self) -> bool:
        return self.architecture == "olmo2"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: Llama's 8/3 d_model rounded up to a multiple of 64 unless given."""
        return self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_cache(head_dim: int, context: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [context, head_dim] in transformers' rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence [batch, heads, 1, head_dim] over the cached keys and values
    [batch, kv_heads, cached, head_dim]: each key/value head serves its group of query heads in place (no copy of
    the cache per step), and two small matmuls beat SDPA's CPU kernel, which is built for long queries. With a
    `prefix` (see `prefix_attention`) the queries may be several tokens."""
    if prefix is not None:
        return prefix_attention(q, k, v, mask, prefix)
    B, H, _, D = q.shape
    groups = q.view(B, k.shape[1], H // k.shape[1], D)
    scores = (groups @ k.transpose(-1, -2)) * D**-0.5
    if mask is not None:  # [batch, 1, 1, cached]
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).view(B, H, 1, D)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    prefix: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Attention of new tokens [batch, heads, new, head_dim] over a prompt prefix every sequence shares (its keys
    and values [1, kv_heads, shared, head_dim], held once) followed by each sequence's own cache [batch, kv_heads,
    own, head_dim]. One softmax over both parts, as if the prefix were in every row: a batch of few-shot prompts
    reads the few-shot examples' keys once per step instead of once per sequence. `mask` [batch, 1, new, own]
    (True: may attend) covers the own part; None is causal (own = new) or nothing to hide (one new token)."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    pk, pv = prefix
    P = pk.shape[2]
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    q = q.reshape(B, G, H // G * T, D)
    shared = (q.transpose(0, 1).reshape(G, -1, D) @ pk[0].transpose(-1, -2)).view(G, B, -1, P).transpose(0, 1)
    own = q @ k.transpose(-1, -2)
    if mask is not None:
        own = own.view(B, G, H // G, T, S).masked_fill(~mask[:, :, None], float("-inf")).view(B, G, -1, S)
    probs = (torch.cat([shared, own], -1) * D**-0.5).softmax(-1)
    head = probs[..., :P].transpose(0, 1).reshape(G, -1, P) @ pv[0]
    y = head.view(G, B, -1, D).transpose(0, 1) + probs[..., P:] @ v
    return y.reshape(B, H, T, D)


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, rows: int, length: int
                            ) -> torch.Tensor:  # fmt: skip
    """Attention in a packed row [1, heads, prefix + rows x length, head_dim] that holds a prefix and then `rows`
    continuations of it, each `length` tokens: the prefix attends causally to itself, each continuation to the
    prefix and causally to its own tokens, as if each were in a row of its own after the prefix. Returns
    [1, prefix + rows x length, heads x head_dim]."""
    H, D = q.shape[1], q.shape[3]
    pk, pv = k[:, :, :prefix], v[:, :, :prefix]
    head = F.scaled_dot_product_attention(q[:, :, :prefix], pk, pv, is_causal=True, enable_gqa=True)

    def each(t: torch.Tensor) -> torch.Tensor:  # [rows, heads, length, head_dim]
        return t[0, :, prefix:].view(t.shape[1], rows, length, D).transpose(0, 1)

    tail = prefix_attention(each(q), each(k), each(v), None, (pk, pv))
    return torch.cat([head[0].transpose(0, 1).reshape(prefix, H * D),
                      tail.transpose(1, 2).reshape(rows * length, H * D)])[None]  # fmt: skip


class Projection:
    """A weight [out, in] as generation multiplies by it. Under MKL's strict reproducible mode (`clearlm.numerics`)
    it is kept transposed, [in, out]: `x @ weight` then gives the same bits as `F.linear(x, weight.T)`, which
    transformers runs (checked on 300 random shapes), and a step's few rows run ~1.4x faster (MKL's strict
    kernel streams a transposed operand at half the memory bandwidth). Elsewhere it is used as it is."""

    def __init__(self, weight: torch.Tensor, transposed: bool) -> None:
        self.transposed = transposed
        self.weight = weight.t().contiguous() if transposed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight if self.transposed else F.linear(x, self.weight)


@dataclass(frozen=True)
class LayerWeights:
    """One block's products for generation: q/k/v and gate/up fused, so that a step makes four matrix products
    where training makes seven (on a CPU a decoding step is mostly per-operation overhead)."""

    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection


@dataclass(frozen=True)
class DecodeWeights:
    """The weights generation multiplies by (`Transformer.decode_weights`), made once per generation or scoring
    call: fused and transposed ones are copies of the weights of that moment."""

    layers: list[LayerWeights]
    lm_head: Projection


class LayerCache:
    """One layer's state while a batch is generated: its keys and values, allocated once at the longest length they
    will reach, so that a step computes one new column instead of re-running the prefix, and its `LayerWeights`.
    Keys and values start at zero: columns a padded row never writes are masked, and must not hold NaN."""

    def __init__(self, block: Block, batch: int, length: int, weights: LayerWeights) -> None:
        attn = block.self_attn
        self.keys = attn.q_proj.weight.new_zeros(batch, attn.kv_heads, length, attn.head_dim)
        self.values = torch.zeros_like(self.keys)
        self.filled = 0
        self.weights = weights
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # keys and values every sequence shares

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values [batch, heads, new, head_dim]; all of them so far."""
        end = self.filled + k.shape[2]
        self.keys[:, :, self.filled : end] = k
        self.values[:, :, self.filled : end] = v
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the sequences not in `rows` (finished ones), so later steps compute only the others."""
        self.keys, self.values = self.keys[rows], self.values[rows]

    def repeat(self, n: int) -> None:
        """n copies of the one sequence cached so far (a shared context), each to be extended on its own."""
        self.keys, self.values = self.keys.repeat(n, 1, 1, 1), self.values.repeat(n, 1, 1, 1)

    def copy_row(self, source: int, to: int) -> None:
        """Row `to` takes row `source`'s keys and values (the same prompt, prefilled once)."""
        self.keys[to], self.values[to] = self.keys[source], self.values[source]

    def row(self, i: int, start: int) -> LayerCache:
        """Row i's cache from column `start` on, sharing this cache's tensors: a left-padded prompt prefilled alone
        (causal attention, no padding mask: SDPA's fast path) writes its keys and values in place."""
        view = copy.copy(self)
        view.keys, view.values, view.filled = self.keys[i : i + 1, :, start:], self.values[i : i + 1, :, start:], 0
        return view


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.olmo2
        if self.qk_norm:  # OLMo 2: over all heads of the projection, before RoPE
            self.q_norm = RMSNorm(cfg.n_heads * cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.kv_heads * cfg.head_dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        shared: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        if cache is not None:
            return self.cached(x, cos, sin, mask, cache)
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if shared is not None:
            return self.o_proj(shared_prefix_attention(q, k, v, *shared))
        if self.kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def cached(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache
    ) -> torch.Tensor:
        """`forward` for generation: the same computation from the fused q/k/v projection, with rotary positions
        applied to queries and keys at once, and this step's keys and values appended to the cache."""
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.kv_heads, self.head_dim
        qkv = cache.weights.qkv(x)
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qkv[..., : H * D]), self.k_norm(qkv[..., H * D : (H + G) * D])], -1)
        else:
            qk = qkv[..., : (H + G) * D]
        qk = apply_rope(qk.view(B, T, H + G, D).transpose(1, 2), cos, sin)
        v = qkv[..., (H + G) * D :].view(B, T, G, D).transpose(1, 2)
        if mask is None and T > 1 and cache.filled and cache.prefix is None:
            raise ValueError("several new tokens after cached ones need an explicit mask (SDPA's is_causal aligns "
                             "to the top left)")  # fmt: skip
        k, v = cache.extend(qk[:, H:], v)
        if T == 1 or cache.prefix is not None:
            y = decode_attention(qk[:, :H], k, v, mask, cache.prefix)
        else:
            y = F.scaled_dot_product_attention(qk[:, :H], k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return cache.weights.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        if cache is not None:  # generation: one product for gate and up
            gate, up = cache.weights.gate_up(x).chunk(2, dim=-1)
            return cache.weights.down(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Llama: `h = x + Attn(norm(x)); h + MLP(norm(h))`. OLMo 2: `h = x + norm(Attn(x)); h + norm(MLP(h))`;
    the names are transformers' for each (Llama's `post_attention_layernorm` is the norm before the MLP)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.post_norm = cfg.olmo2
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if self.post_norm:
            self.post_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        else:
            self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
        shared: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        if self.post_norm:
            h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, cache, shared))
            return h + self.post_feedforward_layernorm(self.mlp(h, cache))
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, shared)
        return h + self.mlp(self.post_attention_layernorm(h), cache)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpoint_blocks = False  # recompute each block's activations in backward (saves memory)
        self.compile_loss = False  # fuse the loss chunks' elementwise work with torch.compile
        cos, sin = rope_cache(cfg.head_dim, cfg.context, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int) -> None:
        """Normal(0, std) everywhere, residual outputs scaled by 1/sqrt(2 n_layers) as in GPT-2."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith(("norm.weight", "layernorm.weight")):
                    p.fill_(1.0)
                else:
                    std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else self.cfg.init_std
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def hidden_states(self, idx: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [batch, time, d_model] for token ids [batch, time] (time <= context).

        `segments` [batch, time] numbers the sequences packed into each row (non-decreasing): positions
        restart at each sequence and attention stays within it, so packed sequences see exactly what
        they would see alone."""
        T = idx.shape[1]
        if T > self.cfg.context:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.cfg.context}")
        mask = None
        if segments is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            steps = torch.arange(T, device=idx.device).expand_as(segments)
            starts = torch.where(torch.diff(segments, dim=1, prepend=segments[:, :1] - 1) != 0, steps, 0)
            positions = steps - torch.cummax(starts, dim=1).values
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (segments.unsqueeze(2) == segments.unsqueeze(1)).logical_and(causal).unsqueeze(1)
        x = self.embed_tokens(idx)
        for block in self.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        return self.norm(x)

    def shared_prefix_states(self, prefix: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states of a prefix [prefix] and of continuations of it [rows, length], the prefix
        computed once instead of once per row: the same as `hidden_states` of each row after the prefix (up to
        rounding), for groups of completions of one prompt. Returns [prefix, d_model] and [rows, length, d_model]."""
        P, (B, T) = len(prefix), rows.shape
        if P + T > self.cfg.context:
            raise ValueError(f"sequence of {P + T} tokens exceeds the context of {self.cfg.context}")
        positions = torch.cat([torch.arange(P + T), torch.arange(P, P + T).repeat(B - 1)]).to(rows.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed_tokens(torch.cat([prefix, rows.reshape(-1)]))[None]
        for block in self.layers:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, None, None, (P, B, T), use_reentrant=False)
            else:
                x = block(x, cos, sin, shared=(P, B, T))
        x = self.norm(x)[0]
        return x[:P], x[P:].view(B, T, x.shape[-1])  # T may be 0: every continuation one token or none

    @torch.no_grad()
    def decode_weights(self) -> DecodeWeights:
        """The weights generation multiplies by, copied in the layout `Projection` picks for this device."""
        device = self.embed_tokens.weight.device
        transposed = device.type == "cpu" and mkl_strict()

        def each(*weights: torch.Tensor) -> Projection:
            return Projection(torch.cat(weights) if len(weights) > 1 else weights[0], transposed)

        layers = [LayerWeights(each(b.self_attn.q_proj.weight, b.self_attn.k_proj.weight, b.self_attn.v_proj.weight),
                               each(b.self_attn.o_proj.weight), each(b.mlp.gate_proj.weight, b.mlp.up_proj.weight),
                               each(b.mlp.down_proj.weight)) for b in self.layers]  # fmt: skip
        return DecodeWeights(layers, each(self.lm_head.weight))

    def new_cache(self, batch: int, length: int, weights: DecodeWeights | None = None) -> list[LayerCache]:
        """Empty key/value caches of every layer for `batch` sequences of up to `length` tokens, over `weights`
        (made now when not given)."""
        weights = weights or self.decode_weights()
        return [LayerCache(block, batch, length, w) for block, w in zip(self.layers, weights.layers, strict=True)]

    def hidden_cached(
        self, idx: torch.Tensor, positions: torch.Tensor, cache: list[LayerCache], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Final-norm hidden states [batch, new, d_model] of `idx`'s tokens [batch, new], which sit at `positions`
        [batch, new] after what `cache` holds; `mask` [batch, 1, new, cached + new] (True: may attend) hides padding
        or other rows' tokens, None means causal attention (a first call, or one new token). The cache is extended
        with the new tokens' keys and values."""
        if int(positions.max()) >= self.cfg.context:
            raise ValueError(f"position {int(positions.max())} is beyond the context of {self.cfg.context}")
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.embed_tokens(idx)
        for block, layer_cache in zip(self.layers, cache, strict=True):
            x = block(x, cos, sin, mask, layer_cache)
        return self.norm(x)

    def forward_cached(
        self, idx: torch.Tensor, positions: torch.Tensor, cache: list[LayerCache], mask: torch.Tensor | None,
        lm_head: Projection,
    ) -> torch.Tensor:  # fmt: skip
        """`hidden_cached`'s logits [batch, vocab] at the last new token (through `lm_head`, the `DecodeWeights`'
        output layer): what generation needs."""
        return lm_head(self.hidden_cached(idx, positions, cache, mask)[:, -1])

    def forward(
        self,
        idx: torch.Tensor,
        segments: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        z_loss: float = 0.0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [batch, time, vocab]; with `targets`, the summed loss and its z-loss part (`loss_parts`),
        so that DDP and FSDP2, which act on forward, see the training computation."""
        if targets is not None:
            return self.loss_parts(idx, targets, z_loss)
        return self.lm_head(self.hidden_states(idx, segments))

    def loss_sum(self, idx: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Summed next-token cross-entropy (targets -100 ignored), without materialising the logits. The output layer
        runs only where there is a target: SFT's prompts and padding need hidden states, not logits."""
        scored = (targets != IGNORE_INDEX).reshape(-1)
        h = self.hidden_states(idx, segments).flatten(0, 1)[scored]
        return fused_cross_entropy(h, self.lm_head.weight, targets.reshape(-1)[scored], 0.0, self.compile_loss)[0]

    def loss_parts(
        self, idx: torch.Tensor, targets: torch.Tensor, z_loss: float, segments: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy + z_loss * sum of log Z squared, that z term alone and detached), both summed over
        target tokens: the first is what pretraining backpropagates, the second lets it log both parts."""
        h = self.hidden_states(idx, segments)
        return fused_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), z_loss,
                                   self.compile_loss)  # fmt: skip

    def grow_vocab(self, vocab_size: int, new_ids: Sequence[int] = ()) -> None:
        """Rows for added special tokens: rows beyond the old vocabulary, and the `new_ids` that fell inside
        it (a padded embedding's untrained rows), start at the mean of the other rows, as transformers'
        `resize_token_embeddings(mean_resizing=True)` does, so new tokens begin neutral, not random."""
        old = self.cfg.vocab_size
        reused = sorted(i for i in new_ids if i < old)
        if vocab_size <= old and not reused:
            return
        size = max(vocab_size, old)
        kept = torch.ones(old, dtype=torch.bool)
        kept[reused] = False

        def grown(weight: torch.Tensor) -> torch.Tensor:
            out = torch.empty(size, self.cfg.d_model, dtype=weight.dtype)
            mean = weight[kept].mean(0)
            out[:old], out[old:] = weight, mean
            out[reused] = mean
            return out

        with torch.no_grad():
            embed = nn.Embedding(size, self.cfg.d_model)
            embed.weight.copy_(grown(self.embed_tokens.weight))
            head = nn.Linear(self.cfg.d_model, size, bias=False)
            if self.cfg.tie_embeddings:
                head.weight = embed.weight
            else:
                head.weight.copy_(grown(self.lm_head.weight))
        self.embed_tokens, self.lm_head = embed, head
        self.cfg = replace(self.cfg, vocab_size=size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention, as in PaLM's appendix."""
        n = self.num_params() - (0 if self.cfg.tie_embeddings else self.embed_tokens.weight.numel())
        attn = 12 * self.cfg.n_layers * self.cfg.d_model * self.cfg.context
        return 6 * n + attn
