"""The whole model side in one file: a Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 network
with steering, ablation, capping and capture as `forward` arguments, its KV cache, `generate`, and
`load_model`, a strict loader of a local Hugging Face-layout folder (config.json + safetensors). It
imports torch, safetensors and the standard library only, so it copies alone (docs/model.md).

    model, capture = load_model("path/to/model"), Capture()
    answers = generate(model, [prompt_ids], 40, capture=capture)  # [[new token ids]]
    capture.answer_mean()  # [1, N + 1, hidden]: the answer's mean state at every hidden index

Layers: hidden index 0 is the token embeddings, index L > 0 the output of block L (the residual
stream, before the final norm): N + 1 indices, as Hugging Face's `hidden_states` (its last normed).
Spans (forward's `spans`, the interventions' `positions`, Capture's means):
    prompt    the prompt's tokens (every token, when no answer_start is given)
    last      the prompt's last token, from which the answer is written
    answer    the tokens after the prompt (its mean is the official files' `response_avg`)
    response  last + answer: where the official hook steers
Interventions act after a block in this order: ablation, steering, capping, capture.
"""

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

FUSED_ATTENTION = True  # the one switch: the fused kernel, or False: `attention` written out
FULL, SLIDING = "full_attention", "sliding_attention"  # a block's layer type


class UserError(ValueError):
    """A problem the user can fix: the command line prints it as one line (support.UserError)."""


@dataclass
class Config:
    """The model's shape, named like config.json's keys; the families differ only here."""

    model_type: str  # llama, mistral, qwen2, qwen3, gemma2 or gemma3_text
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # grouped-query attention; None: one per query head
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1's {"rope_type": "llama3", ...}, or linear
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o (Qwen2 has it on q, k, v always)
    mlp_bias: bool = False
    hidden_act: str = "silu"  # or gelu_pytorch_tanh (Gemma's `hidden_activation`)
    max_position_embeddings: int = 4096
    query_pre_attn_scalar: float | None = None  # Gemma: scores * this ** -0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None  # scores <- cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits <- cap * tanh(logits / cap)
    sliding_window: int | None = None  # sliding layers see keys fewer than this many columns back
    layer_types: list | None = None  # per block: FULL or SLIDING (None: all FULL)
    rope_local_base_freq: float | None = None  # Gemma 3: sliding layers' RoPE theta, unscaled

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.layer_types = self.layer_types or [FULL] * self.num_hidden_layers
        self.gemma = self.model_type in ("gemma2", "gemma3_text")  # √hidden, 1 + weight, 4 norms
        self.qk_norm = self.model_type in ("qwen3", "gemma3_text")


# transformers' values for keys a family's config.json may omit, where Config's default differs
GEMMA = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096)
GEMMA |= dict(query_pre_attn_scalar=256, tie_word_embeddings=True)
FAMILY_DEFAULTS = {
    "qwen2": dict(max_position_embeddings=32768),
    "qwen3": dict(head_dim=128, max_position_embeddings=32768),
    "gemma2": GEMMA | dict(vocab_size=256000, max_position_embeddings=8192),
    "gemma3_text": GEMMA | dict(vocab_size=262208, max_position_embeddings=131072),
}
FAMILY_DEFAULTS["gemma2"] |= dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
FAMILY_DEFAULTS["gemma3_text"] |= dict(rope_theta=1e6, rope_local_base_freq=1e4)


def config_keys(d: dict) -> dict:
    """config.json's object -> Config's keywords, as transformers 4 and 5 read them (unchecked):
    5's `rope_parameters` (Gemma 3: one per layer type) become 4's keys, which most configs have."""
    d = text_config(d) if d["model_type"] == "gemma3" else dict(d)
    d = FAMILY_DEFAULTS.get(d["model_type"], {}) | d
    rp = d.pop("rope_parameters", None) or {}
    if FULL in rp or SLIDING in rp:
        local = rp.get(SLIDING) or {}
        d["rope_local_base_freq"] = local.get("rope_theta", d.get("rope_local_base_freq", 1e4))
        rp = rp.get(FULL) or {}
    d["rope_theta"] = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    if rp.get("rope_type", "default") != "default":
        d.setdefault("rope_scaling", rp)
    family_keys(d)
    return {f.name: d[f.name] for f in fields(Config) if f.name in d}


def text_config(d: dict) -> dict:
    """A multimodal Gemma 3 config -> its language model's, tied as the whole is."""
    text = d.get("text_config") or {}
    tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return text | {"model_type": "gemma3_text", "tie_word_embeddings": tied}


def family_keys(d: dict) -> None:
    """The keys a family does not read dropped; Gemma's activation; `layer_types` if absent."""
    t, n = d["model_type"], d["num_hidden_layers"]
    if t in ("gemma2", "gemma3_text"):  # its `hidden_act` is a leftover
        d["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"
    unread = ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"]
    unread = {"gemma2": [], "gemma3_text": ["attn_logit_softcapping"]}.get(t, unread)
    for k in unread + ([] if t == "gemma3_text" else ["rope_local_base_freq"]):
        d.pop(k, None)
    if t in ("qwen2", "qwen3") and not d.get("use_sliding_window") or t == "llama":
        d["sliding_window"] = None  # transformers ignores it then
    if t == "mistral" or d.get("sliding_window") is None:  # Mistral: every layer, if any window
        d["layer_types"] = [SLIDING if d.get("sliding_window") else FULL] * n
    elif d.get("layer_types") is None and t.startswith("qwen"):  # sliding from max_window_layers
        first = d.get("max_window_layers", 28)
        d["layer_types"] = [SLIDING if i >= first else FULL for i in range(n)]
    elif d.get("layer_types") is None:  # Gemma: every sliding_window_pattern-th layer is global
        every = d.get("sliding_window_pattern", 2 if t == "gemma2" else 6)
        d["layer_types"] = [FULL if (i + 1) % every == 0 else SLIDING for i in range(n)]


class RoPE(nn.Module):
    """Position p turns channel pair (i, i + hd/2) by p * theta^(-2i/hd), scaled if configured.
    local: a sliding layer's (Gemma 3: its own theta, unscaled)."""

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
            # long wavelengths slowed by `factor`, short ones kept, the band between interpolated
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
        """Position ids [B, T] -> (cos, sin), each [B, 1, T, hd], from angles in fp32."""
        freqs = pos[..., None].float() * self.inv_freq  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]: a pair shares its angle
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
    # grouped-query attention: kv head j serves query heads j * H/H_kv .. (j + 1) * H/H_kv - 1
    k = k.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, hd]
    v = v.repeat_interleave(H // H_kv, dim=1)  # [B, H, S, hd]
    if mask is None:  # the T queries are the last T of S columns; each sees the keys up to it
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S]
    scale = scale or q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, S], in fp32 as the kernel
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # within (-softcap, softcap)
    scores = scores.masked_fill(~mask, -math.inf)  # a masked key gets weight exactly 0
    return scores.softmax(dim=-1).to(v.dtype) @ v  # [B, H, T, hd]: weighted sums of the values


class Attention(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.layer, self.hd = layer, c.head_dim
        self.n_head, self.n_kv = c.num_attention_heads, c.num_key_value_heads
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
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, H_kv, T, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's vector normed: [B, H|H_kv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # stored; -> all S = cached + T: [B, H_kv, S, hd]
        if FUSED_ATTENTION and self.softcap is None:  # `attention` in one kernel (fp32 softmax)
            causal, gqa = mask is None and T > 1, self.n_kv != self.n_head
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa
            )
        else:  # the kernel cannot soft-cap: Gemma 2 always takes the written-out path
            y = attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, H, T, hd] -> [B, T, H * hd]


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
        self.attention_type = c.layer_types[layer]  # FULL or SLIDING
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
    """Add `coef * vector` at hidden index `layer` (positions, all three: all, prompt, response)."""

    layer: int
    vector: torch.Tensor  # [hidden], or [B, hidden]: one per row (a zero row steers nothing)
    coef: float = 1.0
    positions: str = "all"


@dataclass
class Ablate:
    """Remove the component along `direction` at hidden index `layer`: h <- h - (h.u) u."""

    layer: int
    direction: torch.Tensor  # [hidden]
    positions: str = "all"

    def __post_init__(self):
        self.direction = self.direction / self.direction.norm()  # u


@dataclass
class Cap:
    """Persona capping at each of `layers`: h <- h - u * max(h.u - ceiling, 0), u the unit vector,
    in fp32. `fired` [B]: each row's response positions moved, from a sequence's first call."""

    layers: list[int]
    directions: torch.Tensor  # [len(layers), hidden]
    ceilings: torch.Tensor  # [len(layers)], or [B, len(layers)] per row (+inf: not capped)
    positions: str = "all"
    fired: torch.Tensor | None = None  # [B] int64
    hit: torch.Tensor | None = None  # [B, T] during one forward call: positions moved

    def __post_init__(self):
        self.layers = list(self.layers)
        self.ceilings = torch.as_tensor(self.ceilings, dtype=torch.float32)
        d = self.directions.float()
        self.directions = d / d.norm(dim=-1, keepdim=True)
        n, c = len(self.layers), self.ceilings
        assert d.dim() == 2 and c.dim() <= 2 and len(d) == c.shape[-1] == n, "one of each per layer"


def token_masks(cols: torch.Tensor, S: int, attention_mask, answer_start, B: int):
    """Tokens at columns `cols` [T] of S, left-padded rows -> (position ids [B, T], attention mask
    [B|1, 1, T, S] (None: causal), spans: [B, T] masks of each span's real tokens). A query sees
    the real keys up to it, and itself (so a padding row is never all -inf)."""
    T = len(cols)
    if attention_mask is None:
        valid, pos = torch.ones(B, T, dtype=torch.bool, device=cols.device), cols.expand(B, T)
        causal = (cols[:, None] >= torch.arange(S, device=cols.device))[None, None]
        mask = None if S == T or T == 1 else causal
    else:
        am = attention_mask.bool()
        assert am.shape == (B, S), f"attention_mask must be [B, cached + new] = {(B, S)}"
        valid, pos = am[:, S - T :], (am.long().cumsum(-1) - 1).clamp(min=0)[:, S - T :]
        keys = torch.arange(S, device=cols.device)
        mask = ((cols[:, None] >= keys) & am[:, None, :] | (cols[:, None] == keys))[:, None]
    last = answer_start[:, None] - 1 if answer_start is not None else cols[-1:].expand(B, 1)
    spans = {"all": torch.ones_like(valid), "prompt": valid & (cols <= last)}  # all: padding too
    spans |= {"last": valid & (cols == last), "answer": valid & (cols > last)}
    spans["response"] = valid & (cols >= last)  # last + answer
    return pos, mask, spans


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.model = nn.Module()  # HF's attribute names: a checkpoint loads as an identity map
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=c.gemma)
        self.model.rotary_emb = RoPE(c)
        self.model.rotary_local = RoPE(c, local=True)  # the sliding layers'
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        answer_start: torch.Tensor | None = None,
        steer: list[Steer] = (),
        ablate: list[Ablate] = (),
        capture=None,
        logits: str | torch.Tensor = "all",
        cap: list[Cap] = (),
    ) -> torch.Tensor | None:
        """input_ids [B, T], left-padded -> logits [B, T, vocab] ("all"), [B, 1, vocab] ("last"),
        None ("none"), or [n, vocab] at a [B, T] bool mask's positions. attention_mask [B, S]: 1 =
        token, over the cache's columns and these; answer_start [B]: each row's answer column."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start == 0:
            self.start_sequence([*steer, *ablate, *cap], input_ids)
        spans, masks, rope = self.layout(input_ids, start, attention_mask, answer_start)
        for c in cap:
            c.hit = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
        h = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        if self.config.gemma:  # times √hidden rounded to the dtype, as Gemma's: index 0 sees it
            h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)
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

    def start_sequence(self, interventions: list, input_ids: torch.Tensor) -> None:
        """At a sequence's first call (not at every token, which would sync the GPU): the positions
        and hidden indices exist; each Cap's tensors go to the device, its count starts at zero."""
        N, dev = self.config.num_hidden_layers, input_ids.device
        for s in interventions:
            layers = s.layers if isinstance(s, Cap) else [s.layer]
            if s.positions not in ("all", "prompt", "response"):
                raise UserError(f"positions must be all, prompt or response, not {s.positions!r}")
            if not all(0 <= layer <= N for layer in layers):
                raise UserError(f"layer out of range in {layers}: hidden indices are 0..{N} here")
            if isinstance(s, Cap):
                s.directions, s.ceilings = s.directions.to(dev), s.ceilings.to(dev)
                s.fired = input_ids.new_zeros(input_ids.shape[0])

    def layout(self, input_ids: torch.Tensor, start: int, attention_mask, answer_start):
        """Tokens after `start` cached ones -> (spans, masks and rope's cos, sin per layer type); a
        sliding layer's masks keys sliding_window columns back (left padding: a row's tokens)."""
        B, T = input_ids.shape
        S, window = start + T, self.config.sliding_window
        cols = torch.arange(start, S, device=input_ids.device)  # [T] absolute columns
        pos, mask, spans = token_masks(cols, S, attention_mask, answer_start, B)
        sliding = mask
        if window is not None and S > window:  # some key is that far back
            keys = torch.arange(S, device=cols.device)
            causal = mask if mask is not None else (cols[:, None] >= keys)[None, None]
            sliding = causal & (cols[:, None] - keys < window)  # [B|1, 1, T, S]
        m, dtype = self.model, self.model.embed_tokens.weight.dtype
        # cos, sin per layer type: [B, 1, T, hd] each
        rope = {FULL: m.rotary_emb(pos, dtype), SLIDING: m.rotary_local(pos, dtype)}
        return spans, {FULL: mask, SLIDING: sliding}, rope

    def intervene(self, i: int, h: torch.Tensor, steer, ablate, cap, capture, spans: dict):
        """The interventions at hidden index i on h [B, T, hidden], each at its span, in order."""
        for a in [a for a in ablate if a.layer == i]:
            u = a.direction.to(h)
            h = torch.where(spans[a.positions][..., None], h - (h @ u)[..., None] * u, h)
        for s in [s for s in steer if s.layer == i]:
            v = s.vector.to(h)
            v = v[:, None] if v.dim() == 2 else v  # [B, hidden] -> [B, 1, hidden]
            h = torch.where(spans[s.positions][..., None], h + s.coef * v, h)
        for c in cap:
            for j in [j for j, layer in enumerate(c.layers) if layer == i]:
                u = c.directions[j]  # [hidden] fp32, unit; the ceiling: [B, 1] per row, or []
                ceiling = c.ceilings[:, j, None] if c.ceilings.dim() == 2 else c.ceilings[j]
                over = (h.float() @ u - ceiling).clamp(min=0)  # [B, T]: how far above the ceiling
                over = over * spans[c.positions]
                h = (h.float() - over[..., None] * u).to(h.dtype)  # exactly h where over == 0
                c.hit |= over > 0
        if capture is not None:
            capture.record(i, h, spans, self.config.num_hidden_layers)
        return h


class KVCache:
    """Every layer's keys and values, [B, H_kv, max_len, hd] each, `length` columns filled."""

    def __init__(self, c: Config, batch_size: int, max_len: int, device, dtype):
        shape, n = (batch_size, c.num_key_value_heads, max_len, c.head_dim), c.num_hidden_layers
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@dataclass
class Capture:
    """Per-layer means [B, N + 1, hidden] fp32 of the spans prompt, answer and last over forward
    calls (empty: NaN); `token_layers`: every token's state there too ([B, T, hidden] per call)."""

    token_layers: tuple = ()
    sums: dict = field(default_factory=dict)  # span -> [B, N + 1, hidden] fp32
    counts: dict = field(default_factory=dict)  # span -> [B] number of tokens summed
    tokens: dict = field(default_factory=dict)  # layer -> list of [B, T, hidden]
    rows: torch.Tensor | None = None  # [B] bool: rows whose answer has begun (None: all)

    def record(self, layer: int, h: torch.Tensor, spans: dict, n_layers: int):
        hf, B = h.float(), h.shape[0]
        masks = {s: spans[s].float() for s in ("prompt", "answer", "last")}
        if self.rows is not None:
            masks["answer"] = masks["answer"] * self.rows[:, None].float()
        if not self.sums:  # and the answer's mean per-token norm, a steering coefficient's scale
            self.sums = {s: hf.new_zeros(B, n_layers + 1, h.shape[-1]) for s in masks}
            self.sums["answer_norm"] = hf.new_zeros(B, n_layers + 1)
            self.counts = {s: hf.new_zeros(B) for s in masks}
        for span, m in masks.items():
            self.sums[span][:, layer] += (hf * m[..., None]).sum(1)
            if layer == 0:
                self.counts[span] += m.sum(1)
        self.sums["answer_norm"][:, layer] += (hf.norm(dim=-1) * masks["answer"]).sum(1)
        if layer in self.token_layers:
            self.tokens.setdefault(layer, []).append(h.detach().float())

    def _mean(self, span, sums=None):
        sums = self.sums[span] if sums is None else sums  # [B, ...]
        count = self.counts[span].reshape(-1, *[1] * (sums.dim() - 1))
        return torch.where(count > 0, sums / count.clamp(min=1), math.nan)  # empty: NaN

    def prompt_mean(self):
        return self._mean("prompt")

    def answer_mean(self):  # the official files' `response_avg`
        return self._mean("answer")

    def prompt_last(self):  # a one-token span: the value itself
        return self._mean("last")

    def answer_norm(self):  # [B, N + 1]: the mean per-token norm
        return self._mean("answer", self.sums["answer_norm"])


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [B, T], mask [B, T]), left-padded: each row ends in the last column."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = torch.as_tensor(r), True
    return ids, mask


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from logits [B, vocab]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p > top_p  # after the nucleus; the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, idx, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def start_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int):
    """Prompts -> (ids [B, T0], mask [B, T0 + max_new_tokens], answer_start [B], empty KVCache)."""
    B, T0, n_ctx = len(prompts), max(map(len, prompts)), model.config.max_position_embeddings
    if min(map(len, prompts)) == 0 or not 0 < max_new_tokens < n_ctx:  # before the cache exists
        raise UserError(f"empty prompt, or max_new_tokens {max_new_tokens} not in 1..{n_ctx - 1}")
    if T0 + max_new_tokens > n_ctx:  # a long prompt among short ones: warned, a run stops for none
        past = f"{T0} prompt tokens + {max_new_tokens} new ones exceed the model's context of"
        print(f"warning: {past} {n_ctx} tokens: expect degraded text", file=sys.stderr)
    device, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
    ids, mask = left_pad(prompts, pad_id)  # [B, T0] each
    mask = torch.cat([mask, mask.new_zeros(B, max_new_tokens)], 1)  # [B, T0 + max_new_tokens]
    answer_start = torch.full((B,), T0, device=device)
    cache = KVCache(model.config, B, T0 + max_new_tokens, device, dtype)
    return ids.to(device), mask.to(device), answer_start, cache


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids=(),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    steer: list[Steer] = (),
    capture: Capture | None = None,
    progress: bool = False,
    cap: list[Cap] = (),
    answer_after: tuple[int, frozenset[int]] | None = None,
) -> list[list[int]]:
    """Batched generation -> each prompt's new tokens, up to a stop id (never the first). Thinking
    models: answer_after (`</think>`'s, its newlines' ids) starts a capture's answer after them."""
    ids, mask, answer_start, cache = start_batch(model, prompts, max_new_tokens, pad_id)
    B, T0, device = ids.shape[0], ids.shape[1], ids.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done, out = torch.zeros(B, dtype=torch.bool, device=device), []
    thinking = capture is not None and answer_after is not None
    if thinking:  # its answer span begins after `</think>` and its newlines (answer_after's ids)
        marks = torch.tensor([answer_after[0], *answer_after[1]], device=device)
        closed, capture.rows = torch.zeros_like(done), torch.zeros_like(done)
    kw = dict(steer=steer, capture=capture, cap=cap)
    logits = model(ids, mask[:, :T0], cache, answer_start, logits="last", **kw)
    for t in range(max_new_tokens):
        if progress:
            print(f"\rgenerating: {t}/{max_new_tokens} tokens", end="", file=sys.stderr, flush=True)
        # [B, vocab]; at the first step, no stop token: no empty answer
        step = logits[:, -1] if t > 0 else logits[:, -1].index_fill(-1, stop, -math.inf)
        nxt = sample(step, temperature, top_p, generator)  # [B]
        done |= torch.isin(nxt, stop)
        out.append(torch.where(done, -1, nxt))
        final = t == max_new_tokens - 1  # then only a capture or a cap's count needs it fed back
        if bool(done.all()) or final and capture is None and not cap:
            break
        mask[:, T0 + t] = ~done  # a finished row's filler token is padding from now on
        if thinking:  # a row's answer once `</think>` and its newlines are past
            capture.rows |= closed & ~torch.isin(nxt, marks)
            closed |= nxt == answer_after[0]
        want = "none" if final else "last"
        logits = model(nxt[:, None], mask[:, : T0 + t + 1], cache, answer_start, logits=want, **kw)
    if progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    tokens = torch.stack(out, 1).tolist()  # [B, steps], -1 after a row's stop
    return [[x for x in row if x >= 0] for row in tokens]


def our_name(key: str, c: Config) -> str | None:
    """A checkpoint's tensor name -> the model's; None: not used (inv_freq, recomputed; a tied
    lm_head.weight; a multimodal Gemma 3's vision tower, whose language model loses its prefix)."""
    if c.model_type == "gemma3_text":
        if key.removeprefix("model.").startswith(("vision_tower.", "multi_modal_projector.")):
            return None
        key = key.replace("language_model.", "", 1)  # (model.)language_model.x -> (model.)x
    if key.endswith("rotary_emb.inv_freq") or key == "lm_head.weight" and c.tie_word_embeddings:
        return None
    return key


def load_model(model_dir: str | Path, device="cpu", dtype=torch.float32) -> Transformer:
    """A Hugging Face-layout folder (config.json + safetensors) -> the model, in eval mode, its
    weights assigned strictly (every name and shape) to a model built on the meta device."""
    model_dir = Path(model_dir)
    config = Config(**config_keys(json.loads((model_dir / "config.json").read_bytes())))
    with torch.device("meta"):  # no memory for a random init: the weights come from the files
        model = Transformer(config)
    index = model_dir / "model.safetensors.index.json"  # a sharded checkpoint's
    shards = json.loads(index.read_bytes())["weight_map"].values() if index.exists() else []
    files, state = [model_dir / f for f in sorted(set(shards)) or ["model.safetensors"]], {}
    for n, path in enumerate(files, start=1):
        if len(files) > 1:
            print(f"loading {path.name} ({n}/{len(files)})", file=sys.stderr, flush=True)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if (name := our_name(key, config)) is not None:
                    state[name] = f.get_tensor(key).to(device=device, dtype=dtype)
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, or no separate head
    model.load_state_dict(state, strict=True, assign=True)
    if state["lm_head.weight"] is state["model.embed_tokens.weight"]:  # one Parameter, both uses
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RoPE(config).to(device)  # computed, not read from the files
    model.model.rotary_local = RoPE(config, local=True).to(device)
    return model.eval()
