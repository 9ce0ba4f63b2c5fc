"""A hand-written Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 forward pass on safetensors,
with steering, ablation, capping and capture: one block, its variations chosen by `Config`.

    model, tok = load("HuggingFaceTB/SmolLM2-135M-Instruct")
    logits = model(torch.tensor([tok.encode("Hello")]))            # [1, T, vocab]

The layer convention, used everywhere in this project:
    hidden index 0     = the token embeddings (input of block 1; Gemma's scaled by √hidden, as HF's)
    hidden index L > 0 = the output of block L (the residual stream after it), before the final norm
so a model with N blocks has N + 1 indices, as Hugging Face `hidden_states` and the official persona-vectors
files ([N + 1, hidden]) do. One difference: Hugging Face applies the final RMSNorm to its last entry; here
index N is the raw residual, the same stream that steering at N adds to.

Interventions are arguments of `forward`, applied after a block in this order: ablation, steering, capping, capture
(a cap bounds the stream whatever steering added; a capture sees the state the next block reads). This file is the
network; generation (`sample`, `generate`, the `KVCache`) and `Capture` are in support/generation.py. Only torch
and the standard library are imported, so the file copies alone; `load` reaches support/ through one marked import.
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSED_ATTENTION = True  # the one switch: F.scaled_dot_product_attention (faster), or False: `attention` written out


def user_error(message: str) -> ValueError:
    """A problem the user can fix: support.UserError if loaded (as by anyone catching it), else a ValueError."""
    return getattr(sys.modules.get("support"), "UserError", ValueError)(message)


@dataclass
class Config:
    """The model's shape, named like `config.json` keys (support/checkpoint.py reads them).
    Families differ here only: qwen2's bias on q, k, v; qwen3's and gemma3's q/k norms; Gemma's
    scaled embeddings, (1 + weight) norms, four a block, GELU-tanh, sliding layers, soft-caps."""
    model_type: str  # llama, mistral, qwen2, qwen3, gemma2 or gemma3_text
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # grouped-query attention; None = one kv head per query head
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} for Llama-3.1+
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama option: bias on q, k, v and o (Qwen2 always has it on q, k, v only)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # or gelu_pytorch_tanh (Gemma's `hidden_activation`)
    max_position_embeddings: int = 4096
    query_pre_attn_scalar: float | None = None  # Gemma: scores * this ** -0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None  # scores <- cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits <- cap * tanh(logits / cap)
    sliding_window: int | None = None  # sliding layers: keys fewer than this many columns back
    layer_types: list | None = None  # per block: full_attention or sliding_attention (None: full)
    rope_local_base_freq: float | None = None  # Gemma 3: sliding layers' RoPE theta, unscaled

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.layer_types = self.layer_types or ["full_attention"] * self.num_hidden_layers
        self.gemma = self.model_type in ("gemma2", "gemma3_text")  # the variations named above
        self.qk_norm = self.model_type in ("qwen3", "gemma3_text")


class RoPE(nn.Module):
    """Rotary position embedding: position p turns channel pair (i, i + hd/2) by the angle p * inv_freq[i], with
    inv_freq[i] = theta^(-2i/hd) in fp32, scaled (Llama-3.1 style or linearly) if configured.
    local: for sliding layers, which in Gemma 3 have their own theta and no scaling."""
    def __init__(self, c: Config, local: bool = False):
        super().__init__()
        own = local and c.rope_local_base_freq is not None
        theta, rs = (c.rope_local_base_freq, {}) if own else (c.rope_theta, c.rope_scaling or {})
        exponents = torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim  # 2i/hd
        inv_freq = 1.0 / (theta**exponents)
        rope_type = rs.get("rope_type", rs.get("type", "default"))
        if rope_type == "linear":
            inv_freq = inv_freq / rs["factor"]
        elif rope_type == "llama3":
            # Long wavelengths (beyond the original context / low_freq_factor) are slowed by `factor`, short ones
            # are kept, and the band in between is interpolated smoothly.
            factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
            old_len = rs["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
            inv_freq = torch.where(medium, smoothed, scaled)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [hd/2]

    def forward(self, pos: torch.Tensor, dtype: torch.dtype):
        """Position ids [B, T] -> (cos, sin), each [B, 1, T, hd] in `dtype`, from angles computed in fp32."""
        freqs = pos[..., None].float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]: both channels of a pair share an angle
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x [B, H, T, hd] by the angles in cos/sin [B, 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """x / rms(x) * weight; Gemma's (plus_one) stores weight - 1: x / rms(x) * (1 + weight)."""
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # fp32 whatever the dtype: the mean of squares overflows/underflows in bf16
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # rounded once, after the scale (Llama rounds before it)
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def attention(q, k, v, mask, scale: float | None = None, softcap: float | None = None):
    """softmax(q kᵀ * scale, masked) v written out: the fused kernel's reference (FUSED_ATTENTION).
    q [B, H, T, hd]; k, v [B, H_kv, S, hd]; mask [B|1, 1, T, S], True where a query may see a key
    (None: causal). scale: 1/√hd unless given; softcap (Gemma 2): scores <- c * tanh(scores / c)."""
    H, H_kv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, hd]: grouped-query attention, kv head j serves
    v = v.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, hd]  query heads j * H/H_kv .. (j + 1) * H/H_kv - 1
    if mask is None:  # the T queries are the last T of S columns; each sees the keys at or before it
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S]
    scale = scale or q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, S], in fp32 as the kernel
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # within (-softcap, softcap)
    scores = scores.masked_fill(~mask, -math.inf)  # a masked key gets weight exactly 0
    return scores.softmax(dim=-1).to(v.dtype) @ v  # [B, H, T, hd]: per query, the weighted sum of the values


class Attention(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = c.model_type == "qwen2" or c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, c.hidden_size, bias=c.attention_bias)
        self.scale = (c.query_pre_attn_scalar or self.hd) ** -0.5
        self.softcap, self.qk_norm = c.attn_logit_softcapping, c.qk_norm
        if c.qk_norm:  # Qwen 3, Gemma 3: an RMSNorm over head_dim, the same weights for every head
            self.q_norm = RMSNorm(self.hd, c.rms_norm_eps, plus_one=c.gemma)
            self.k_norm = RMSNorm(self.hd, c.rms_norm_eps, plus_one=c.gemma)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # [B, T, H * hd] -> [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, T, H_kv * hd] -> [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, T, H_kv * hd] -> [B, H_kv, T, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's vector normed: [B, H|H_kv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # stored; -> all S = cached + T: [B, H_kv, S, hd]
        if FUSED_ATTENTION and self.softcap is None:  # `attention` in one kernel (fp32 softmax)
            causal, gqa = mask is None and T > 1, self.n_kv != self.n_head
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               scale=self.scale, enable_gqa=gqa)
        else:  # the kernel cannot soft-cap: Gemma 2 always takes the written-out path
            y = attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))  # [B, H, T, hd] -> [B, T, H * hd]


class MLP(nn.Module):
    """The gated MLP: down(act(gate(x)) * up(x)), act = silu (SwiGLU) or tanh-approximated GELU."""
    def __init__(self, c: Config):
        super().__init__()
        self.tanh_gelu = c.hidden_act == "gelu_pytorch_tanh"
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        gate = self.gate_proj(x)  # [B, T, intermediate]
        gate = F.gelu(gate, approximate="tanh") if self.tanh_gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Gemma also norms each sublayer's output before
    the add: four norms, named as HF names them (post_attention_layernorm: elsewhere the MLP's)."""
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.attention_type = c.layer_types[layer]  # full_attention or sliding_attention
        self.sandwich = c.gemma
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=c.gemma)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=c.gemma)
        self.mlp = MLP(c)
        if c.gemma:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=True)

    def forward(self, x, cos, sin, mask, cache=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # [B, T, hidden]
        if not self.sandwich:  # Llama, Mistral, Qwen
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(a)  # Gemma
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


@dataclass
class Steer:
    """Add `coef * vector` to hidden index `layer` (1..N: output of block `layer`; 0: embeddings).

    positions (the same for Ablate and Cap): "all" every token; "prompt" the tokens before `response_start`;
    "response" the LAST prompt token and every token after it, as the official hook (ActivationSteerer) adds the
    vector at the last position of every forward call: the first new token already comes from steered logits, and a
    forward over prompt + answer steers exactly what generation did. (Capture's response: the generated tokens only.)
    """
    layer: int
    vector: torch.Tensor  # [hidden], or [B, hidden]: one vector per row of the batch (a zero row steers nothing)
    coef: float = 1.0
    positions: str = "all"

    def __post_init__(self):
        check_intervention(self.layer, self.vector, self.coef, self.positions)


@dataclass
class Ablate:
    """Remove the component along `direction` from hidden index `layer`: h <- h - (h.u) u, u = direction/|direction|."""
    layer: int
    direction: torch.Tensor  # [hidden]
    positions: str = "all"

    def __post_init__(self):
        check_intervention(self.layer, self.direction, 1.0, self.positions, unit=True)
        self.direction = self.direction / self.direction.norm()


@dataclass
class Cap:
    """Persona capping: bound the component along a direction from above at one or several hidden indices,
        h <- h - u * max(h.u - ceiling, 0),   u = direction / |direction|   (in fp32, rounded once to h's dtype)
    so after the block h.u <= ceiling, and a state at or below its ceiling is left exactly as it was.
    `fired` [B]: how many of each row's response positions (see Steer) the cap moved at some layer, counted from a
    sequence's first call (generate feeds its last token back, so it equals a forward over prompt + answer)."""
    layers: list[int]
    directions: torch.Tensor  # [len(layers), hidden]: the direction at each of those indices
    ceilings: torch.Tensor  # [len(layers)], or [B, len(layers)]: one ceiling per row (+inf: the row is not capped)
    positions: str = "all"
    fired: torch.Tensor | None = None  # [B] int64
    hit: torch.Tensor | None = None  # [B, T] during one forward call: positions moved at some layer

    def __post_init__(self):
        self.layers, self.ceilings = list(self.layers), torch.as_tensor(self.ceilings, dtype=torch.float32)
        n, d = len(self.layers), self.directions
        if not (d.dim() == 2 and len(d) == n and self.ceilings.shape[-1:] == (n,) and self.ceilings.dim() <= 2):
            raise user_error(f"cap: {n} layers need directions [{n}, hidden] and ceilings [{n}] or [batch, {n}], "
                             f"not {tuple(d.shape)} and {tuple(self.ceilings.shape)}")
        if torch.isnan(self.ceilings).any() or (self.ceilings == -math.inf).any():
            raise user_error("cap: a ceiling is NaN or -inf; use a finite ceiling, or +inf for no cap")
        for layer, v in zip(self.layers, d):
            check_intervention(layer, v, 1.0, self.positions, unit=True)
        self.directions = d.float() / d.float().norm(dim=-1, keepdim=True)


def check_intervention(layer: int, vector: torch.Tensor, coef: float, positions: str, unit: bool = False) -> None:
    # once, at construction: a finiteness check inside forward would sync the GPU at every decoded token
    if positions not in ("all", "prompt", "response"):
        raise user_error(f"positions must be all, prompt or response, not {positions!r}")
    if not (math.isfinite(coef) and torch.isfinite(vector).all()):
        raise user_error(f"intervention at layer {layer}: coefficient or vector has non-finite values; recompute it")
    if not torch.isfinite((coef * vector.float()).pow(2).sum()):  # RMSNorm squares the steered state in fp32
        raise user_error(f"intervention at layer {layer}: coefficient {coef:g} is too large (coef * vector overflows "
                         "float32 in the next norm); use a coefficient of the order of the residual norm or less")
    if unit and not vector.norm() > 0:
        raise user_error(f"intervention at layer {layer}: the direction is zero, so it has no unit vector")


def check_fits(c: Config, interventions: list, B: int) -> None:
    """Each Steer's, Ablate's or Cap's layers and vector shapes fit this model and a batch of B rows."""
    for s in interventions:
        if isinstance(s, Cap) and s.ceilings.dim() == 2 and len(s.ceilings) != B:
            raise user_error(f"cap ceilings of shape {tuple(s.ceilings.shape)}: expected [{len(s.layers)}] or "
                             f"[batch = {B}, {len(s.layers)}]")
        if isinstance(s, Cap):
            at = zip(s.layers, s.directions)
        else:
            at = [(s.layer, s.vector if isinstance(s, Steer) else s.direction)]
        for layer, v in at:
            if not 0 <= layer <= c.num_hidden_layers:
                raise user_error(f"layer {layer} out of range: this model has hidden indices 0..{c.num_hidden_layers}")
            if v.shape[-1:] != (c.hidden_size,):
                raise user_error(f"vector of shape {tuple(v.shape)} at layer {layer}, but the model's hidden size is "
                                 f"{c.hidden_size}: was it extracted from another model?")
            if v.dim() != 1 and not (isinstance(s, Steer) and v.shape[0] == B and v.dim() == 2):
                raise user_error(f"vector of shape {tuple(v.shape)} at layer {layer}: expected [hidden], or "
                                 f"[batch = {B}, hidden] to steer each row with its own vector")


def token_masks(cols: torch.Tensor, S: int, attention_mask: torch.Tensor | None, response_start, B: int):
    """For tokens at columns `cols` [T] of S -> (position ids [B, T], attention mask [B|1, 1, T, S] or None, spans).

    Rows are left-padded, so a row's positions count only its real tokens. The mask lets a query see the keys at
    or before it that are not padding; every query may also see itself, so a padding row is never all -inf (NaN).
    None means plain causal attention (no padding; or a single new token, which sees the whole cache).
    spans: [B, T] masks of real tokens: "prompt" (before response_start; all without it), "response" (from the last
    prompt token on, see Steer), "answer" (after it: Capture's response), "last" (the last prompt token); "all": None.
    """
    T = len(cols)
    if attention_mask is None:
        valid, pos = torch.ones(B, T, dtype=torch.bool, device=cols.device), cols.expand(B, T)
        mask = None if S == T or T == 1 else (cols[:, None] >= torch.arange(S, device=cols.device))[None, None]
    else:
        am = attention_mask.bool()
        assert am.shape == (B, S), f"attention_mask must be [B, cached + new] = {(B, S)}"
        valid, pos = am[:, S - T:], (am.long().cumsum(-1) - 1).clamp(min=0)[:, S - T:]
        keys = torch.arange(S, device=cols.device)
        mask = ((cols[:, None] >= keys) & am[:, None, :] | (cols[:, None] == keys))[:, None]  # [B, 1, T, S]
    last = response_start[:, None] - 1 if response_start is not None else cols[-1:].expand(B, 1)  # [B, 1]
    return pos, mask, {"all": None, "prompt": valid & (cols <= last), "response": valid & (cols >= last),
                       "answer": valid & (cols > last), "last": valid & (cols == last)}


def window_mask(mask, cols: torch.Tensor, S: int, window: int | None) -> torch.Tensor | None:
    """A sliding layer's mask [B|1, 1, T, S]: `mask` (None: causal), and a query sees only keys
    fewer than `window` columns back (itself included). Left padding keeps a row's tokens
    contiguous, so the columns count its tokens, in the cache and alone alike."""
    if window is None or S <= window:  # no key is that far back
        return mask
    keys = torch.arange(S, device=cols.device)
    causal = mask if mask is not None else (cols[:, None] >= keys)[None, None]
    return causal & (cols[:, None] - keys < window)  # [T, S] broadcast


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.model = nn.Module()  # attribute names follow Hugging Face, so checkpoints load as an identity map
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=c.gemma)
        self.model.rotary_emb = RoPE(c)
        self.model.rotary_local = RoPE(c, local=True)  # the sliding layers'
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, response_start: torch.Tensor | None = None,
                steer: list[Steer] = (), ablate: list[Ablate] = (), capture=None,
                logits: str | torch.Tensor = "all", cap: list[Cap] = ()) -> torch.Tensor | None:
        """input_ids [B, T] (left-padded) -> logits [B, T, vocab] ("all"), [B, 1, vocab] ("last") or None ("none");
        logits may also be a [B, T] bool mask: the logits of those positions only, [n, vocab] (training's loss).

        cache: the keys and values of earlier calls (`length` columns, `update(layer, k, v)`), e.g.
        support.generation.KVCache; attention_mask [B, S]: 1 = token, 0 = padding, over the cached columns and
        these T (S = cache.length + T).
        response_start [B]: column (in those S) where each row's response begins; None = all prompt.
        steer, ablate and cap are checked at a sequence's first call, not again at every decoded token.
        capture: an object with record(layer, h, spans, n_layers), e.g. support.generation.Capture, called at every
        hidden index with the state after the interventions and the token spans of `token_masks`.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        start = cache.length if cache is not None else 0
        if start == 0:
            check_fits(self.config, [*steer, *ablate, *cap], B)
            for c in cap:  # on the device once, not copied at every decoded token; a new sequence, a new count
                c.directions, c.ceilings, c.fired = c.directions.to(dev), c.ceilings.to(dev), input_ids.new_zeros(B)
        cols = torch.arange(start, start + T, device=dev)  # [T] absolute columns of these tokens
        pos, mask, spans = token_masks(cols, start + T, attention_mask, response_start, B)
        window = window_mask(mask, cols, start + T, self.config.sliding_window)
        masks = {"full_attention": mask, "sliding_attention": window}
        for c in cap:
            c.hit = torch.zeros(B, T, dtype=torch.bool, device=dev)
        dtype = self.model.embed_tokens.weight.dtype
        rope = {"full_attention": self.model.rotary_emb(pos, dtype),  # (cos, sin), [B, 1, T, hd]
                "sliding_attention": self.model.rotary_local(pos, dtype)}
        h = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        if self.config.gemma:  # times √hidden rounded to the dtype, as Gemma's: index 0 sees it
            h = h * torch.tensor(self.config.hidden_size**0.5, dtype=dtype)
        h = self.intervene(0, h, steer, ablate, cap, capture, spans)
        for i, block in enumerate(self.model.layers, start=1):
            args = (h, *rope[block.attention_type], masks[block.attention_type], cache)
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
            h = self.intervene(i, h, steer, ablate, cap, capture, spans)
        for c in cap:  # count the response positions this call capped at any layer
            c.fired += (c.hit & spans["response"]).sum(1)  # [B]
        if cache is not None:
            cache.length += T
        if isinstance(logits, torch.Tensor):
            h = h[logits]  # [n, hidden]: the LM head runs only where a loss is taken
        elif logits == "none":
            return None
        elif logits == "last":
            h = h[:, -1:]  # left padding puts every row's last token in the last column
        out, softcap = self.lm_head(self.model.norm(h)), self.config.final_logit_softcapping
        return out if softcap is None else softcap * torch.tanh(out / softcap)  # Gemma 2

    def intervene(self, i: int, h: torch.Tensor, steer, ablate, cap, capture, spans: dict):
        """The interventions at hidden index i on h [B, T, hidden], in order: ablation, steering, capping, capture.
        Each is applied at the positions of its span (None: everywhere)."""
        for a in ablate:
            if a.layer == i:
                u = a.direction.to(h)
                hu = h - (h @ u)[..., None] * u
                h = hu if spans[a.positions] is None else torch.where(spans[a.positions][..., None], hu, h)
        for s in steer:
            if s.layer == i:
                v = s.vector.to(h)
                hs = h + s.coef * (v[:, None] if v.dim() == 2 else v)  # [B, hidden] -> [B, 1, hidden]
                h = hs if spans[s.positions] is None else torch.where(spans[s.positions][..., None], hs, h)
        for c in cap:
            for j in [j for j, layer in enumerate(c.layers) if layer == i]:
                u = c.directions[j]  # [hidden] fp32, unit
                ceiling = c.ceilings[:, j, None] if c.ceilings.dim() == 2 else c.ceilings[j]  # [B, 1] per row, or []
                over = (h.float() @ u - ceiling).clamp(min=0)  # [B, T]: how far each position is above its ceiling
                if spans[c.positions] is not None:
                    over = over * spans[c.positions]
                h = (h.float() - over[..., None] * u).to(h.dtype)  # exactly h where over == 0
                c.hit |= over > 0
        if capture is not None:
            capture.record(i, h, spans, self.config.num_hidden_layers)
        return h


def load(name_or_path: str | Path, device: str | None = None, dtype: torch.dtype | None = None, model_only=False):
    """A model (in eval mode) and its tokenizer from a hub id or a Hugging Face-layout directory -> (model, tokenizer);
    model_only: the model of a local directory alone. It is built on the meta device and its weights assigned
    strictly (every key and shape checked; one copy in memory); on the CPU, small matrix products are split across
    the cores (support/cpu_speed.py)."""
    from support import checkpoint, cpu_speed, hub, tokenizer  # PROJECT IMPORT: checks, downloads, GGUF, tokenizer
    model_dir = Path(name_or_path) if model_only else hub.resolve(name_or_path)
    device = checkpoint.check_device(device or checkpoint.default_device())
    dtype = dtype or checkpoint.default_dtype(device)
    config = checkpoint.read_config(model_dir / "config.json", Config)
    with torch.device("meta"):  # no memory for random init: the weights are assigned straight from the files
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = checkpoint.read_weights(model_dir, expected, config.tie_word_embeddings, device, dtype, config.model_type)
    model.load_state_dict(state, strict=True, assign=True)
    if state["lm_head.weight"] is state["model.embed_tokens.weight"]:  # one Parameter: training updates both uses
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RoPE(config).to(device)  # computed, not read from the files
    model.model.rotary_local = RoPE(config, local=True).to(device)
    model = cpu_speed.split_linears(model.eval()) if torch.device(device).type == "cpu" else model.eval()
    if model_only:
        return model
    model.name_or_path, model.source_dir = str(name_or_path), model_dir  # recorded in the files we write
    model.source = hub.source(name_or_path, model_dir)  # hub, local or converted GGUF, and any quantization
    return model, tokenizer.Tokenizer(model_dir)


def load_model(model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> Transformer:
    return load(model_dir, device, dtype, model_only=True)
