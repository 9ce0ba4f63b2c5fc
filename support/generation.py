"""Generation on model.py, kept apart from the network as gpt-fast keeps generate.py apart from model.py:
`generate` (batched, left-padded, with a per-row stop), `sample` (greedy or nucleus), the `KVCache` it decodes with,
and `Capture`, the per-layer activation summaries a generation or forward pass records (forward's `capture`).

    cap = Capture()
    answers = generate(model, [tok.encode_chat(chat)], 40, stop_ids=tok.stop_ids, pad_id=tok.pad_id, capture=cap)
    cap.response_mean()                                              # [1, N + 1, hidden]
"""
import math
import sys
from dataclasses import dataclass, field

import torch

import model as M
from support import UserError


class KVCache:
    """Keys and values of every layer, preallocated: [B, n_kv_heads, max_len, head_dim] each; `length` filled."""
    def __init__(self, c: M.Config, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_hidden_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@dataclass
class Capture:
    """Per-layer summaries of the residual stream, accumulated over one or several forward calls.

    `prompt_mean()`, `response_mean()`, `prompt_last()`: [B, N + 1, hidden] fp32, over the non-padding tokens of the
    span; an empty span gives NaN, never a silent zero. Only running sums are kept; `token_layers` also keeps every
    token's state at those indices (`tokens[layer]`: [B, T, hidden] per forward call), for per-token projections.
    """
    token_layers: tuple = ()
    sums: dict = field(default_factory=dict)  # span -> [B, N + 1, hidden] fp32
    counts: dict = field(default_factory=dict)  # span -> [B] number of tokens summed
    tokens: dict = field(default_factory=dict)  # layer -> list of [B, T, hidden]
    # [B] bool: the rows whose answer tokens count in the response span at this call (None:
    # every row); `generate(..., answer_after=...)` sets it, leaving a think block out
    rows: torch.Tensor | None = None

    def record(self, layer: int, h: torch.Tensor, spans: dict, n_layers: int):
        """Add the states h [B, T, hidden] at hidden index `layer` to the sums; spans: forward's [B, T] token masks."""
        hf, B = h.float(), h.shape[0]
        masks = {"prompt": spans["prompt"].float(), "response": spans["answer"].float(), "last": spans["last"].float()}
        if self.rows is not None:
            masks["response"] = masks["response"] * self.rows[:, None].float()
        if not self.sums:  # and the mean per-token norm of the response, the scale a steering coefficient is set by
            self.sums = {s: hf.new_zeros(B, n_layers + 1, h.shape[-1]) for s in masks}
            self.sums["response_norm"] = hf.new_zeros(B, n_layers + 1)
            self.counts = {s: hf.new_zeros(B) for s in masks}
        for span, m in masks.items():
            self.sums[span][:, layer] += (hf * m[..., None]).sum(1)
            if layer == 0:
                self.counts[span] += m.sum(1)
        self.sums["response_norm"][:, layer] += (hf.norm(dim=-1) * masks["response"]).sum(1)
        if layer in self.token_layers:
            self.tokens.setdefault(layer, []).append(h.detach().float())

    def _mean(self, span, sums=None):
        sums = self.sums[span] if sums is None else sums  # [B, ...]
        count = self.counts[span].reshape(-1, *[1] * (sums.dim() - 1))
        return torch.where(count > 0, sums / count.clamp(min=1), math.nan)  # an empty span: NaN, not 0

    def prompt_mean(self): return self._mean("prompt")
    def response_mean(self): return self._mean("response")
    def prompt_last(self): return self._mean("last")  # a one-token span: the value itself
    def response_norm(self): return self._mean("response", self.sums["response_norm"])


def think_marks(tok) -> tuple[int, frozenset[int]]:
    """(the id of `</think>`, the ids of the newline tokens written after it) for a thinking
    model's tokenizer; a UserError when it has no `</think>` token (no thinking mode)."""
    close = tok.encode("</think>")
    if len(close) != 1:
        raise UserError(f"{tok.name} has no </think> token, so it has no thinking mode "
                        "(Qwen3 has one): drop --thinking")
    newlines = {i for n in (1, 2, 3) for i in tok.encode("\n" * n)
                if not tok.decode([i]).strip("\n")}
    return close[0], frozenset(newlines)


def answer_start(ids: list[int], close: int, newlines: frozenset[int]) -> int:
    """Where a thinking model's answer begins in its reply `ids`: after the first `</think>` and
    the newline tokens that follow it (len(ids) when the reply never closed its think block).

    >>> answer_start([5, 6, 9, 1, 1, 7, 1], close=9, newlines=frozenset({1}))
    5
    """
    if close not in ids:
        return len(ids)
    s = ids.index(close) + 1
    while s < len(ids) and (ids[s] in newlines or ids[s] == close):
        s += 1
    return s


def split_thinking(tok, ids: list[int]) -> tuple[list[int], list[int]]:
    """A reply's ids -> (think block, answer); all answer unless `tok.thinking` is on."""
    if not getattr(tok, "thinking", False):
        return [], list(ids)
    s = answer_start(list(ids), *think_marks(tok))
    return list(ids[:s]), list(ids[s:])


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [B, T], mask [B, T]), left-padded as in generation: each row ends in the last column."""
    T = max(len(r) for r in rows)
    ids, mask = torch.full((len(rows), T), pad_id, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.as_tensor(r), True
    return ids, mask


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, vocab]: argmax when temperature == 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p > top_p  # tokens after the nucleus; the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, idx, p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_new_tokens(model: M.Transformer, max_new_tokens: int, prompt_tokens: int = 1) -> int:
    """The one check of --max-new-tokens against the model's context, used by every command once
    the model is loaded (with the longest prompt where it is known, else 1) and by `generate`
    itself, before its KV cache (prompt + new tokens) is allocated: positions past
    max_position_embeddings were never trained."""
    n_ctx = model.config.max_position_embeddings
    if prompt_tokens + max_new_tokens > n_ctx:
        plural = "s" if prompt_tokens != 1 else ""
        raise UserError(f"--max-new-tokens {max_new_tokens} plus {prompt_tokens} prompt "
                        f"token{plural} is beyond this model's context of {n_ctx} tokens: use "
                        f"--max-new-tokens {max(1, n_ctx - prompt_tokens)} or less"
                        + (" (or a shorter prompt)" if prompt_tokens > 1 else ""))
    return max_new_tokens


@torch.no_grad()
def generate(model: M.Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, steer: list[M.Steer] = (),
             capture: Capture | None = None, progress: bool = False, cap: list[M.Cap] = (),
             answer_after: tuple[int, frozenset[int]] | None = None) -> list[list[int]]:
    """Batched generation with left padding and a KV cache -> the new tokens of each prompt, stop token excluded.

    Every row gets at least one new token: at the first step the stop tokens cannot be chosen (the official
    sampling's minimum of one new token), so no answer is empty. After that a row stops at its first token in
    `stop_ids`; its later columns are masked out, so a `capture` sees exactly the prompt (prompt_mean,
    prompt_last) and every generated token before the stop (response_mean): the same states as a forward pass
    over prompt + answer.
    answer_after: `think_marks(tok)` for a thinking model: the capture's response span then holds
    only the tokens after `</think>` and its newlines (`answer_start`), not the think block.
    """
    device, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
    if not prompts or min(len(p) for p in prompts) == 0:
        raise UserError("empty prompt: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    B, T0 = len(prompts), max(len(p) for p in prompts)
    check_new_tokens(model, max_new_tokens)  # before the KV cache is allocated
    n_ctx = model.config.max_position_embeddings
    if T0 + max_new_tokens > n_ctx:  # a long prompt among short ones: warned, as a run stops for none
        print(f"warning: {T0} prompt tokens + {max_new_tokens} new ones exceed the model's context of "
              f"{n_ctx} tokens (max_position_embeddings): positions past it were never trained, so "
              "expect degraded text; shorten the prompt or --max-new-tokens", file=sys.stderr)
    ids, mask = left_pad(prompts, pad_id)  # [B, T0] each
    mask = torch.cat([mask, mask.new_zeros(B, max_new_tokens)], 1)  # [B, T0 + max_new_tokens]: True = a real token
    ids, mask = ids.to(device), mask.to(device)
    response_start = torch.full((B,), T0, device=device)
    cache = KVCache(model.config, B, T0 + max_new_tokens, device, dtype)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # per row: `</think>` seen; the answer begun
    closed, counting = torch.zeros_like(done), torch.zeros_like(done)
    if capture is not None and answer_after is not None:
        capture.rows = counting
        marks = torch.tensor([answer_after[0], *answer_after[1]], device=device)
    out = []
    logits = model(ids, mask[:, :T0], cache, response_start, steer=steer, capture=capture, logits="last", cap=cap)
    for t in range(max_new_tokens):
        if progress:
            print(f"\rgenerating: {t}/{max_new_tokens} tokens", end="", file=sys.stderr, flush=True)
        step = logits[:, -1] if t > 0 else logits[:, -1].index_fill(-1, stop, -math.inf)  # [B, vocab]
        nxt = sample(step, temperature, top_p, generator)
        done |= torch.isin(nxt, stop)
        out.append(torch.where(done, -1, nxt))
        final = t == max_new_tokens - 1  # then only a capture or a cap's count needs the last token fed back
        if bool(done.all()) or final and capture is None and not cap:
            break
        mask[:, T0 + t] = ~done  # a finished row's filler token is padding from now on
        if capture is not None and answer_after is not None:  # is nxt, fed now, part of the answer?
            counting |= closed & ~torch.isin(nxt, marks)
            closed |= nxt == answer_after[0]
        logits = model(nxt[:, None], mask[:, :T0 + t + 1], cache, response_start, steer=steer, capture=capture,
                       logits="none" if final else "last", cap=cap)
    if progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    tokens = torch.stack(out, 1).tolist()  # [B, steps], -1 after a row's stop
    return [[x for x in row if x >= 0] for row in tokens]
