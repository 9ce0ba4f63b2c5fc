"""A hand-written Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 forward pass with steering,
ablation, capping and capture, its generation and its loader: the whole model side in one file.

    model = load_model("path/to/model")  # a Hugging Face-layout directory (config.json, safetensors)
    capture = Capture()
    answers = generate(model, [prompt_ids], 40, capture=capture)  # [[new token ids]]
    capture.answer_mean()  # [1, N + 1, hidden]: the answer's mean state at every hidden index

The layer convention, used everywhere in this project:
    hidden index 0     = the token embeddings (input of block 1; Gemma's scaled by √hidden, as HF's)
    hidden index L > 0 = the output of block L (the residual stream after it), before the final norm
so a model with N blocks has N + 1 indices, as Hugging Face `hidden_states` and the official persona-vectors
files ([N + 1, hidden]) do. One difference: Hugging Face applies the final RMSNorm to its last entry; here
index N is the raw residual, the same stream that steering at N adds to.

The token spans, named once (forward's `spans`, the interventions' `positions`, Capture's means):
    prompt    the prompt's tokens (every token, when no answer_start is given)
    last      the prompt's last token, from which the answer is written
    answer    the tokens after the prompt: the generated answer
    response  last + answer: where the official hook (ActivationSteerer) steers, adding the vector
              at the last position of every forward call, so the first answer token comes from
              steered logits
The official vector files name the answer's mean `response_avg`; that file key is kept
(Capture.answer_mean).

Interventions are arguments of `forward`, applied after a block in this order: ablation, steering,
capping, capture (a cap bounds the stream whatever steering added; a capture sees the state the next
block reads). Only torch, safetensors and the standard library are imported, so this file copies
alone; hub ids, GGUF files and tokenizers are resolved by the callers (support/checkpoint.py's
`load`), which also check a config.json key by key first.
"""

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

FUSED_ATTENTION = True  # the one switch: F.scaled_dot_product_attention (faster), or False: `attention` written out


class UserError(ValueError):
    """A problem the user can fix (bad input, a missing file, a wrong flag): the command line prints
    its message as one line and exits 1 (support.UserError is this class). Every other exception is
    a bug and keeps its traceback."""


@dataclass
class Config:
    """The model's shape, named like `config.json` keys (`config_keys` reads them).
    Families differ here only: qwen2's bias on q, k, v; qwen3's and gemma3's q/k norms; Gemma's
    scaled embeddings, (1 + weight) norms, four a block, GELU-tanh, sliding layers, soft-caps."""

    model_type: str  # llama, mistral, qwen2, qwen3, gemma2 or gemma3_text
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = (
        None  # grouped-query attention; None = one kv head per query head
    )
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} for Llama-3.1+
    tie_word_embeddings: bool = False
    attention_bias: bool = (
        False  # Llama option: bias on q, k, v and o (Qwen2 always has it on q, k, v only)
    )
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


# What transformers' config classes assume for a key that a family's config.json leaves out, where
# Config's default differs (Gemma 3's hub configs, the multimodal ones' text_config above all, omit
# most of these)
FAMILY_DEFAULTS = {
    "qwen2": dict(max_position_embeddings=32768),
    "qwen3": dict(head_dim=128, max_position_embeddings=32768),
    "gemma2": dict(
        vocab_size=256000,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        vocab_size=262208,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=131072,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
    ),
}
FULL, SLIDING = "full_attention", "sliding_attention"


def config_keys(d: dict) -> dict:
    """config.json's object -> Config's keywords, read as transformers reads them: a multimodal
    Gemma 3's text_config unwrapped, the family's defaults, transformers 5's `rope_parameters`
    unfolded, the keys a family does not read dropped, the sliding layers listed. Values are not
    checked here: callers check an untrusted file first (support/checkpoint.py's check_config, whose
    errors are one line)."""
    d = text_config(d) if d["model_type"] == "gemma3" else dict(d)
    d = FAMILY_DEFAULTS.get(d["model_type"], {}) | d
    unfold_rope(d)
    family_keys(d)
    return {f.name: d[f.name] for f in fields(Config) if f.name in d}


def text_config(d: dict) -> dict:
    """A multimodal Gemma 3 config -> its language model's (text_config), tied as the whole is."""
    text = d.get("text_config") or {}
    tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return text | {"model_type": "gemma3_text", "tie_word_embeddings": tied}


def unfold_rope(d: dict) -> None:
    """transformers 5's `rope_parameters` -> rope_theta and rope_scaling, and Gemma 3's sliding
    layers' theta -> rope_local_base_freq: transformers 4's names, which most hub configs carry."""
    rp = d.pop("rope_parameters", None) or {}
    if FULL in rp or SLIDING in rp:  # Gemma 3: one entry per layer type
        local = rp.get(SLIDING) or {}
        d["rope_local_base_freq"] = local.get("rope_theta", d.get("rope_local_base_freq", 1e4))
        rp = rp.get(FULL) or {}
    d["rope_theta"] = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    if rp.get("rope_type", "default") != "default":
        d.setdefault("rope_scaling", rp)


def family_keys(d: dict) -> None:
    """The keys only some families read, kept for those, Gemma's activation, and `layer_types`:
    which blocks attend through the sliding window (transformers' rules for configs without it)."""
    t, n = d["model_type"], d["num_hidden_layers"]
    if t in (
        "gemma2",
        "gemma3_text",
    ):  # Gemma reads `hidden_activation`; its `hidden_act` is a leftover
        d["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"
    unread = ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"]
    unread = {"gemma2": [], "gemma3_text": ["attn_logit_softcapping"]}.get(t, unread)
    for k in unread + ([] if t == "gemma3_text" else ["rope_local_base_freq"]):
        d.pop(k, None)
    if t in ("qwen2", "qwen3") and not d.get("use_sliding_window") or t == "llama":
        d["sliding_window"] = None  # transformers ignores it then
    if t == "mistral" or d.get("sliding_window") is None:  # Mistral: every layer, if any window
        d["layer_types"] = [SLIDING if d.get("sliding_window") else FULL] * n
    elif d.get("layer_types") is None and t.startswith("qwen"):  # sliding from max_window_layers on
        d["layer_types"] = [
            SLIDING if i >= d.get("max_window_layers", 28) else FULL for i in range(n)
        ]
    elif d.get("layer_types") is None:  # Gemma: every sliding_window_pattern-th layer is global
        every = d.get("sliding_window_pattern", 2 if t == "gemma2" else 6)
        d["layer_types"] = [FULL if (i + 1) % every == 0 else SLIDING for i in range(n)]


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
        emb = torch.cat((freqs, freqs), dim=-1)[
            :, None
        ]  # [B, 1, T, hd]: both channels of a pair share an angle
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
    k = k.repeat_interleave(
        H // H_kv, dim=1
    )  # [B, H, S, hd]: grouped-query attention, kv head j serves
    v = v.repeat_interleave(
        H // H_kv, dim=1
    )  # [B, H, S, hd]  query heads j * H/H_kv .. (j + 1) * H/H_kv - 1
    if (
        mask is None
    ):  # the T queries are the last T of S columns; each sees the keys at or before it
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S]
    scale = scale or q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, S], in fp32 as the kernel
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # within (-softcap, softcap)
    scores = scores.masked_fill(~mask, -math.inf)  # a masked key gets weight exactly 0
    return (
        scores.softmax(dim=-1).to(v.dtype) @ v
    )  # [B, H, T, hd]: per query, the weighted sum of the values


class Attention(nn.Module):
    def __init__(self, c: Config, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = (
            layer,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
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
        q = (
            self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)
        )  # [B, T, H * hd] -> [B, H, T, hd]
        k = (
            self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        )  # [B, T, H_kv * hd] -> [B, H_kv, T, hd]
        v = (
            self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        )  # [B, T, H_kv * hd] -> [B, H_kv, T, hd]
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
        return self.o_proj(
            y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        )  # [B, H, T, hd] -> [B, T, H * hd]


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

    positions (the same for Ablate and Cap): "all" every token, or the span "prompt" or "response"
    (the last prompt token and the answer, as the official hook steers; see the top of this file),
    so that a forward over prompt + answer steers exactly what generation did.
    """

    layer: int
    vector: (
        torch.Tensor
    )  # [hidden], or [B, hidden]: one vector per row of the batch (a zero row steers nothing)
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
    `fired` [B]: how many of each row's response positions the cap moved at some layer, counted from a
    sequence's first call (generate feeds its last token back, so it equals a forward over prompt + answer)."""

    layers: list[int]
    directions: torch.Tensor  # [len(layers), hidden]: the direction at each of those indices
    ceilings: (
        torch.Tensor
    )  # [len(layers)], or [B, len(layers)]: one ceiling per row (+inf: the row is not capped)
    positions: str = "all"
    fired: torch.Tensor | None = None  # [B] int64
    hit: torch.Tensor | None = None  # [B, T] during one forward call: positions moved at some layer

    def __post_init__(self):
        self.layers, self.ceilings = (
            list(self.layers),
            torch.as_tensor(self.ceilings, dtype=torch.float32),
        )
        n, d = len(self.layers), self.directions
        if not (
            d.dim() == 2
            and len(d) == n
            and self.ceilings.shape[-1:] == (n,)
            and self.ceilings.dim() <= 2
        ):
            raise UserError(
                f"cap: {n} layers need directions [{n}, hidden] and ceilings [{n}] or [batch, {n}], "
                f"not {tuple(d.shape)} and {tuple(self.ceilings.shape)}"
            )
        if torch.isnan(self.ceilings).any() or (self.ceilings == -math.inf).any():
            raise UserError(
                "cap: a ceiling is NaN or -inf; use a finite ceiling, or +inf for no cap"
            )
        for layer, v in zip(self.layers, d):
            check_intervention(layer, v, 1.0, self.positions, unit=True)
        self.directions = d.float() / d.float().norm(dim=-1, keepdim=True)


def check_intervention(
    layer: int, vector: torch.Tensor, coef: float, positions: str, unit: bool = False
) -> None:
    # once, at construction: a finiteness check inside forward would sync the GPU at every decoded token
    if positions not in ("all", "prompt", "response"):
        raise UserError(f"positions must be all, prompt or response, not {positions!r}")
    if not (math.isfinite(coef) and torch.isfinite(vector).all()):
        raise UserError(
            f"intervention at layer {layer}: coefficient or vector has non-finite values; recompute it"
        )
    if not torch.isfinite(
        (coef * vector.float()).pow(2).sum()
    ):  # RMSNorm squares the steered state in fp32
        raise UserError(
            f"intervention at layer {layer}: coefficient {coef:g} is too large (coef * vector overflows "
            "float32 in the next norm); use a coefficient of the order of the residual norm or less"
        )
    if unit and not vector.norm() > 0:
        raise UserError(
            f"intervention at layer {layer}: the direction is zero, so it has no unit vector"
        )


def check_fits(c: Config, interventions: list, B: int) -> None:
    """Each Steer's, Ablate's or Cap's layers and vector shapes fit this model and a batch of B rows."""
    for s in interventions:
        if isinstance(s, Cap) and s.ceilings.dim() == 2 and len(s.ceilings) != B:
            raise UserError(
                f"cap ceilings of shape {tuple(s.ceilings.shape)}: expected [{len(s.layers)}] or "
                f"[batch = {B}, {len(s.layers)}]"
            )
        if isinstance(s, Cap):
            at = zip(s.layers, s.directions)
        else:
            at = [(s.layer, s.vector if isinstance(s, Steer) else s.direction)]
        for layer, v in at:
            if not 0 <= layer <= c.num_hidden_layers:
                raise UserError(
                    f"layer {layer} out of range: this model has hidden indices 0..{c.num_hidden_layers}"
                )
            if v.shape[-1:] != (c.hidden_size,):
                raise UserError(
                    f"vector of shape {tuple(v.shape)} at layer {layer}, but the model's hidden size is "
                    f"{c.hidden_size}: was it extracted from another model?"
                )
            if v.dim() != 1 and not (isinstance(s, Steer) and v.shape[0] == B and v.dim() == 2):
                raise UserError(
                    f"vector of shape {tuple(v.shape)} at layer {layer}: expected [hidden], or "
                    f"[batch = {B}, hidden] to steer each row with its own vector"
                )


def token_masks(
    cols: torch.Tensor, S: int, attention_mask: torch.Tensor | None, answer_start, B: int
):
    """For tokens at columns `cols` [T] of S -> (position ids [B, T], attention mask [B|1, 1, T, S] or None, spans).

    Rows are left-padded, so a row's positions count only its real tokens. The mask lets a query see the keys at
    or before it that are not padding; every query may also see itself, so a padding row is never all -inf (NaN).
    None means plain causal attention (no padding; or a single new token, which sees the whole cache).
    spans: [B, T] masks of the real tokens of each span (see the top of this file), and "all": None.
    """
    T = len(cols)
    if attention_mask is None:
        valid, pos = torch.ones(B, T, dtype=torch.bool, device=cols.device), cols.expand(B, T)
        mask = (
            None
            if S == T or T == 1
            else (cols[:, None] >= torch.arange(S, device=cols.device))[None, None]
        )
    else:
        am = attention_mask.bool()
        assert am.shape == (B, S), f"attention_mask must be [B, cached + new] = {(B, S)}"
        valid, pos = am[:, S - T :], (am.long().cumsum(-1) - 1).clamp(min=0)[:, S - T :]
        keys = torch.arange(S, device=cols.device)
        mask = ((cols[:, None] >= keys) & am[:, None, :] | (cols[:, None] == keys))[
            :, None
        ]  # [B, 1, T, S]
    last = (
        answer_start[:, None] - 1 if answer_start is not None else cols[-1:].expand(B, 1)
    )  # [B, 1]
    return (
        pos,
        mask,
        {
            "all": None,
            "prompt": valid & (cols <= last),
            "response": valid & (cols >= last),
            "answer": valid & (cols > last),
            "last": valid & (cols == last),
        },
    )


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
        self.model = (
            nn.Module()
        )  # attribute names follow Hugging Face, so checkpoints load as an identity map
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, plus_one=c.gemma)
        self.model.rotary_emb = RoPE(c)
        self.model.rotary_local = RoPE(c, local=True)  # the sliding layers'
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.gradient_checkpointing = (
            False  # recompute each block in backward to save activation memory
        )

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
        """input_ids [B, T] (left-padded) -> logits [B, T, vocab] ("all"), [B, 1, vocab] ("last") or None ("none");
        logits may also be a [B, T] bool mask: the logits of those positions only, [n, vocab] (training's loss).

        cache: the keys and values of earlier calls (`length` columns, `update(layer, k, v)`): a KVCache;
        attention_mask [B, S]: 1 = token, 0 = padding, over the cached columns and
        these T (S = cache.length + T).
        answer_start [B]: column (in those S) where each row's answer begins; None = all prompt.
        steer, ablate and cap are checked at a sequence's first call, not again at every decoded token.
        capture: an object with record(layer, h, spans, n_layers), e.g. a Capture, called at every
        hidden index with the state after the interventions and the token spans of `token_masks`.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start == 0:
            self.start_sequence([*steer, *ablate, *cap], input_ids)
        spans, masks, rope = self.layout(
            start, T, attention_mask, answer_start, B, input_ids.device
        )
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
        return self.head(h, logits)

    def start_sequence(self, interventions: list, input_ids: torch.Tensor) -> None:
        """At a sequence's first call: the interventions fit this model and batch; each Cap's
        tensors go to the device once (not copied at every decoded token) and its count starts at
        zero."""
        B, dev = input_ids.shape[0], input_ids.device
        check_fits(self.config, interventions, B)
        for c in [c for c in interventions if isinstance(c, Cap)]:
            c.directions, c.ceilings, c.fired = (
                c.directions.to(dev),
                c.ceilings.to(dev),
                input_ids.new_zeros(B),
            )

    def layout(self, start: int, T: int, attention_mask, answer_start, B: int, dev):
        """For T tokens after `start` cached ones -> (spans, attention masks, rope's (cos, sin)),
        the last two per layer type (full_attention, sliding_attention)."""
        cols = torch.arange(start, start + T, device=dev)  # [T] absolute columns of these tokens
        pos, mask, spans = token_masks(cols, start + T, attention_mask, answer_start, B)
        window = window_mask(mask, cols, start + T, self.config.sliding_window)
        dtype = self.model.embed_tokens.weight.dtype
        rope = {
            FULL: self.model.rotary_emb(pos, dtype),
            SLIDING: self.model.rotary_local(pos, dtype),
        }
        return spans, {FULL: mask, SLIDING: window}, rope  # cos, sin: [B, 1, T, hd]

    def head(self, h: torch.Tensor, logits: str | torch.Tensor) -> torch.Tensor | None:
        """The final norm and the LM head, where `logits` asks for them (see forward)."""
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
                h = (
                    hu
                    if spans[a.positions] is None
                    else torch.where(spans[a.positions][..., None], hu, h)
                )
        for s in steer:
            if s.layer == i:
                v = s.vector.to(h)
                hs = h + s.coef * (
                    v[:, None] if v.dim() == 2 else v
                )  # [B, hidden] -> [B, 1, hidden]
                h = (
                    hs
                    if spans[s.positions] is None
                    else torch.where(spans[s.positions][..., None], hs, h)
                )
        for c in cap:
            for j in [j for j, layer in enumerate(c.layers) if layer == i]:
                u = c.directions[j]  # [hidden] fp32, unit
                ceiling = (
                    c.ceilings[:, j, None] if c.ceilings.dim() == 2 else c.ceilings[j]
                )  # [B, 1] per row, or []
                over = (h.float() @ u - ceiling).clamp(
                    min=0
                )  # [B, T]: how far each position is above its ceiling
                if spans[c.positions] is not None:
                    over = over * spans[c.positions]
                h = (h.float() - over[..., None] * u).to(h.dtype)  # exactly h where over == 0
                c.hit |= over > 0
        if capture is not None:
            capture.record(i, h, spans, self.config.num_hidden_layers)
        return h


class KVCache:
    """Keys and values of every layer, preallocated: [B, n_kv_heads, max_len, head_dim] each;
    `length` filled."""

    def __init__(self, c: Config, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)
        ]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@dataclass
class Capture:
    """Per-layer means of the residual stream over the spans prompt, answer and last (see the top of
    this file), accumulated over one or several forward calls (forward's `capture`).

    `prompt_mean()`, `answer_mean()`, `prompt_last()`: [B, N + 1, hidden] fp32, over the non-padding
    tokens of the span; an empty span gives NaN, never a silent zero. Only running sums are kept;
    `token_layers` also keeps every token's state at those indices (`tokens[layer]`: [B, T, hidden]
    per forward call), for per-token projections.
    """

    token_layers: tuple = ()
    sums: dict = field(default_factory=dict)  # span -> [B, N + 1, hidden] fp32
    counts: dict = field(default_factory=dict)  # span -> [B] number of tokens summed
    tokens: dict = field(default_factory=dict)  # layer -> list of [B, T, hidden]
    # [B] bool: the rows whose tokens count in the answer span at this call (None: every row);
    # `generate(..., answer_after=...)` sets it, leaving a think block out
    rows: torch.Tensor | None = None

    def record(self, layer: int, h: torch.Tensor, spans: dict, n_layers: int):
        """Add the states h [B, T, hidden] at hidden index `layer` to the sums; spans: forward's [B,
        T] token masks."""
        hf, B = h.float(), h.shape[0]
        masks = {s: spans[s].float() for s in ("prompt", "answer", "last")}
        if self.rows is not None:
            masks["answer"] = masks["answer"] * self.rows[:, None].float()
        if (
            not self.sums
        ):  # and the mean per-token norm of the answer, the scale a steering coefficient is set by
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
        return torch.where(
            count > 0, sums / count.clamp(min=1), math.nan
        )  # an empty span: NaN, not 0

    def prompt_mean(self):
        return self._mean("prompt")

    def answer_mean(self):  # the official files' `response_avg`
        return self._mean("answer")

    def prompt_last(self):  # a one-token span: the value itself
        return self._mean("last")

    def answer_norm(self):  # [B, N + 1]: the mean per-token norm
        return self._mean("answer", self.sums["answer_norm"])


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [B, T], mask [B, T]), left-padded as in generation: each row ends in the
    last column."""
    T = max(len(r) for r in rows)
    ids, mask = (
        torch.full((len(rows), T), pad_id, dtype=torch.long),
        torch.zeros(len(rows), T, dtype=torch.bool),
    )
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = torch.as_tensor(r), True
    return ids, mask


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from logits [B, vocab]: argmax when temperature == 0, else nucleus
    sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        drop = (
            p.cumsum(-1) - p > top_p
        )  # tokens after the nucleus; the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, idx, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_new_tokens(model: Transformer, max_new_tokens: int, prompt_tokens: int = 1) -> int:
    """The one check of --max-new-tokens against the model's context, used by every command once
    the model is loaded (with the longest prompt where it is known, else 1) and by `generate`
    itself, before its KV cache (prompt + new tokens) is allocated: positions past
    max_position_embeddings were never trained."""
    n_ctx = model.config.max_position_embeddings
    if prompt_tokens + max_new_tokens > n_ctx:
        plural = "s" if prompt_tokens != 1 else ""
        raise UserError(
            f"--max-new-tokens {max_new_tokens} plus {prompt_tokens} prompt "
            f"token{plural} is beyond this model's context of {n_ctx} tokens: use "
            f"--max-new-tokens {max(1, n_ctx - prompt_tokens)} or less"
            + (" (or a shorter prompt)" if prompt_tokens > 1 else "")
        )
    return max_new_tokens


def check_prompts(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts or min(len(p) for p in prompts) == 0:
        raise UserError("empty prompt: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    check_new_tokens(model, max_new_tokens)  # before the KV cache is allocated
    T0, n_ctx = max(len(p) for p in prompts), model.config.max_position_embeddings
    if (
        T0 + max_new_tokens > n_ctx
    ):  # a long prompt among short ones: warned, as a run stops for none
        print(
            f"warning: {T0} prompt tokens + {max_new_tokens} new ones exceed the model's context of "
            f"{n_ctx} tokens (max_position_embeddings): positions past it were never trained, so "
            "expect degraded text; shorten the prompt or --max-new-tokens",
            file=sys.stderr,
        )


class AnswerRows:
    """A thinking model's rows whose answer has begun (after `</think>` and its newlines), as a [B]
    bool tensor for Capture.rows; answer_after: (the id of `</think>`, the ids of its newlines)."""

    def __init__(self, answer_after: tuple[int, frozenset[int]], done: torch.Tensor):
        self.close, self.closed, self.counting = (
            answer_after[0],
            torch.zeros_like(done),
            torch.zeros_like(done),
        )
        self.marks = torch.tensor([answer_after[0], *answer_after[1]], device=done.device)

    def feed(self, nxt: torch.Tensor) -> None:
        """The tokens nxt [B] fed now: part of a row's answer once `</think>` and its newlines are
        past."""
        self.counting |= self.closed & ~torch.isin(nxt, self.marks)
        self.closed |= nxt == self.close


def start_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int):
    """Prompts -> (ids [B, T0] left-padded, mask [B, T0 + max_new_tokens] (True = a real token),
    answer_start [B], an empty KVCache), on the model's device, after checking the prompts."""
    check_prompts(model, prompts, max_new_tokens)
    device, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
    B, T0 = len(prompts), max(len(p) for p in prompts)
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
    """Batched generation (left padding, a KV cache) -> each prompt's new tokens, stop excluded. No
    stop token at the first step (the official minimum of one new token); then a row stops at its
    first token in `stop_ids`, later columns masked out, so a `capture` sees the states of a forward
    over prompt + answer. answer_after (`</think>`'s id, its newlines' ids): a thinking model's
    capture counts only the tokens after them in the answer span (AnswerRows)."""
    ids, mask, answer_start, cache = start_batch(model, prompts, max_new_tokens, pad_id)
    B, T0, device = ids.shape[0], ids.shape[1], ids.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done, out = torch.zeros(B, dtype=torch.bool, device=device), []
    thinking = AnswerRows(answer_after, done) if capture is not None and answer_after else None
    if thinking:
        capture.rows = thinking.counting  # updated in place as the answers begin
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
        if thinking:
            thinking.feed(nxt)
        want = "none" if final else "last"
        logits = model(nxt[:, None], mask[:, : T0 + t + 1], cache, answer_start, logits=want, **kw)
    if progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    tokens = torch.stack(out, 1).tolist()  # [B, steps], -1 after a row's stop
    return [[x for x in row if x >= 0] for row in tokens]


# A multimodal Gemma 3 checkpoint: its language model's tensors under a prefix (as transformers 4
# or 5 wrote it), and the vision tower and its projector, which a text model does not use
MULTIMODAL_PREFIXES = {
    "language_model.model.": "model.",
    "model.language_model.": "model.",
    "language_model.lm_head.": "lm_head.",
}
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)
        if (
            not isinstance(weight_map, dict)
            or not isinstance(weight_map.get("weight_map"), dict)
            or not all(isinstance(v, str) for v in weight_map["weight_map"].values())
        ):
            raise UserError(
                f"{index}: expected an object with a `weight_map` of tensor name -> file name"
            )
        return [model_dir / name for name in sorted(set(weight_map["weight_map"].values()))]
    if (model_dir / "model.safetensors").exists():
        return [model_dir / "model.safetensors"]
    raise UserError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors weights are supported; convert .bin checkpoints first)"
    )


def our_name(key: str, model_type: str) -> str | None:
    """A checkpoint's tensor name -> the model's (HF's causal-LM names); None: a tensor not used."""
    if key.endswith("rotary_emb.inv_freq"):  # recomputed
        return None
    if model_type == "gemma3_text":
        if key.startswith(VISION_PREFIXES):
            return None
        for prefix, ours in MULTIMODAL_PREFIXES.items():
            if key.startswith(prefix):
                return ours + key[len(prefix) :]
    return key


def read_file(path: Path, expected: dict, c: Config, device, dtype, state: dict) -> None:
    """Every tensor of one safetensors file, checked against `expected` (name -> shape), into
    `state`. Harmless extras are skipped: rotary inv_freq, recomputed; a tied model's
    lm_head.weight; a multimodal Gemma 3's vision tower. Any other unexpected or misshapen tensor is
    a UserError."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():
            name = our_name(key, c.model_type)
            if name is None or (name == "lm_head.weight" and c.tie_word_embeddings):
                continue
            if name not in expected:
                raise UserError(
                    f"unexpected tensor {key!r} in {path}: not a {c.model_type} checkpoint?"
                )
            t = f.get_tensor(key)
            if t.shape != expected[name]:
                raise UserError(
                    f"tensor {key!r} in {path} has shape {tuple(t.shape)}, expected "
                    f"{tuple(expected[name])}: config.json does not match the weights"
                )
            state[name] = t.to(device=device, dtype=dtype)


def read_weights(model_dir: Path, expected: dict, c: Config, device, dtype) -> dict:
    """Every tensor of the checkpoint, checked -> {name: tensor on device}; a missing lm_head.weight
    means a tied head; a missing tensor is a UserError."""
    files, state = weight_files(model_dir), {}
    for n, path in enumerate(files, start=1):
        if len(files) > 1:
            print(f"loading {path.name} ({n}/{len(files)})", file=sys.stderr, flush=True)
        try:
            read_file(path, expected, c, device, dtype, state)
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"cannot read {path} ({e}); the file is missing or truncated: download it again"
            ) from None
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state[
            "model.embed_tokens.weight"
        ]  # tied, or no separate head: share it
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(
            f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}: "
            "incomplete download?"
        )
    return state


def load_model(
    model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """A Hugging Face-layout directory (config.json + safetensors) -> the model, in eval mode. It is
    built on the meta device and its weights assigned strictly (every key and shape checked; one
    copy in memory)."""
    model_dir = Path(model_dir)
    config = Config(**config_keys(read_json(model_dir / "config.json")))
    with torch.device(
        "meta"
    ):  # no memory for random init: the weights are assigned straight from the files
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = read_weights(model_dir, expected, config, device, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if (
        state["lm_head.weight"] is state["model.embed_tokens.weight"]
    ):  # one Parameter: training updates both uses
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RoPE(config).to(device)  # computed, not read from the files
    model.model.rotary_local = RoPE(config, local=True).to(device)
    return model.eval()
