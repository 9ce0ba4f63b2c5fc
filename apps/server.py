"""`serve`: an OpenAI-compatible chat server, on the standard library, where each request may steer
the model along persona vectors and each reply reports how far it leaned along every one of them.

    python -m apps serve [--model M] [--port 8000] [--api-key KEY]
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}],
                                                  "steer": {"evil": -1.5}}'

Endpoints: GET /v1/models and POST /v1/chat/completions (messages, max_tokens /
max_completion_tokens, temperature, top_p, seed, stop, n, stream, logprobs, top_logprobs, usage).
Extensions that other clients ignore: the request field `steer` ({"evil": -1.5, "humorous": "0.1r"},
or a list of {"vector", "coef", "layer", "positions"}, as `steering` reads --steer specs), the
request field `cap` ({"evil": 95}, or {"evil": {"percentile": 95, "layers": "16-19"}}: persona
capping, as --cap reads TRAIT:PERCENTILE@LAYERS) and, on every choice, `persona`: the projection of
the last prompt token (before the reply) and of the reply's mean activation onto each loaded vector,
like `chat`'s gauge, and `capped_tokens`: how many of the reply's tokens each cap moved.

Requests are batched dynamically: one worker thread generates; the requests that arrive while a
batch runs make up the next batch, each row with its own steering (Steer.vector [B, hidden]), caps
(Cap.ceilings [B, n]), sampling settings, stop strings and token limit. A row leaves the batch as
soon as it is done or its client has gone, so its cache, ceilings and cap counts go with it.
"""

import contextlib
import hmac
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

import model as M
import persona_vectors as pv
from apps.monitor import Gauge
from support import UserError, capping, checkpoint, cli
from support.checkpoint import DTYPES
from support.files import check_fits, default_vectors_dir, load_vector, traits_in, vector_path
from support.hub import DEFAULT_MODEL

POSITIONS = ("response", "all", "prompt")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 1000  # characters in one stop string: held_back costs O(length^2) per token and row
UNSUPPORTED = (
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "logit_bias",
    "audio",
    "prediction",
)


class RequestError(UserError):
    """A bad request: answered with `status` and an OpenAI-shaped error body naming `param`."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ):
        super().__init__(" ".join(message.split()))  # always one line
        self.param, self.status, self.code = param, status, code


# ---------------------------------------------------------------------------------- request parsing
@dataclass
class Request:
    """A validated chat-completion request: the prompt's tokens and every setting, one row per
    choice."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    steer: list[M.Steer] = field(default_factory=list)
    # trait -> --cap spec, in the order of trait names
    cap: dict[str, str] = field(default_factory=dict)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(body: dict, name: str, check, what: str, default=None):
    """body[name] if present and not null, after check(value) holds; else `default`."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise RequestError(f"{name} must be {what}, not {json.dumps(value)[:60]}", name)
    return value


def message_text(m, i: int) -> dict:
    """One message as {"role", "content": str}: content may be a string or a list of text parts."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        role = m.get("role") if isinstance(m, dict) else m
        raise RequestError(
            f"messages[{i}].role must be one of {', '.join(ROLES)}, not {json.dumps(role)[:40]}",
            f"messages[{i}].role",
        )
    content = m.get("content")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(
            f"messages[{i}].content must be a string or a list of text parts",
            f"messages[{i}].content",
        )
    return {"role": ROLES[m["role"]], "content": content}


def parse_steer(value, names: list[str], n_layers: int) -> list[tuple[str, str, int | None, str]]:
    """The `steer` field -> [(vector name, --steer spec, layer or None, positions)].

    {"evil": -1.5, "humorous": "0.1r"}, or
    [{"vector": "evil", "coef": -1.5, "layer": 12, "positions": "all"}]. Only vectors loaded at
    start can be named (never a path on the server's disk).
    """
    if value is None:
        return []
    if isinstance(value, dict):
        items = [{"vector": k, "coef": v} for k, v in value.items()]
    elif isinstance(value, list):
        items = value
    else:
        raise RequestError(
            'steer must be an object like {"evil": -1.5} or a list of {"vector", "coef"}', "steer"
        )
    out = []
    for i, it in enumerate(items):
        where = f"steer[{i}]"
        if not isinstance(it, dict) or set(it) - {"vector", "coef", "layer", "positions"}:
            raise RequestError(
                f"{where} must be an object with keys vector, coef and optionally layer, positions",
                "steer",
            )
        name, coef = it.get("vector"), it.get("coef")
        if name not in names:
            raise RequestError(
                f"{where}: unknown vector {json.dumps(name)[:60]}; this server has "
                f"{', '.join(names) or 'no vectors'}",
                "steer",
            )
        if _is_number(coef):
            spec = f"{name}:{float(coef)!r}"
        elif isinstance(coef, str) and coef.strip():
            # "0.1r": relative to the residual norm; parse_steer_spec checks it
            spec = f"{name}:{coef.strip()}"
        else:
            raise RequestError(
                f'{where}.coef must be a finite number or a string like "0.1r"', "steer"
            )
        layer, positions = it.get("layer"), it.get("positions", "response")
        if layer is not None and not (_is_int(layer) and 1 <= layer <= n_layers):
            raise RequestError(f"{where}.layer must be a block 1..{n_layers}", "steer")
        if positions not in POSITIONS:
            raise RequestError(f"{where}.positions must be one of {', '.join(POSITIONS)}", "steer")
        out.append((name, spec, layer, positions))
    return out


def parse_cap(value, names: list[str]) -> dict[str, str]:
    """The `cap` field -> {trait: --cap spec}, sorted by trait, so that a row's caps apply in one
    order, alone or in any batch. {"evil": 95} (a percentile), or
    {"evil": {"percentile": 95, "layers": "16-19"}}, where either key may be left out (the
    calibrated defaults); layers may also be a list of blocks.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(
            'cap must be an object like {"evil": 95} or {"evil": {"percentile": 95, "layers": '
            '"16-19"}}',
            "cap",
        )
    out = {}
    for name in sorted(value):
        it, where = value[name], f"cap.{name}"
        if name not in names:
            raise RequestError(
                f"cap: unknown vector {json.dumps(name)[:60]}; this server has "
                f"{', '.join(names) or 'no vectors'}",
                "cap",
            )
        it = it if isinstance(it, dict) else {"percentile": it}
        if set(it) - {"percentile", "layers"}:
            raise RequestError(
                f"{where} must be a percentile or an object with keys percentile, layers", "cap"
            )
        p, layers = it.get("percentile", capping.DEFAULT_PERCENTILE), it.get("layers")
        if not (_is_number(p) and 0 < p < 100):
            raise RequestError(
                f"{where}: the percentile must be a number in (0, 100), not {json.dumps(p)[:40]}",
                "cap",
            )
        if isinstance(layers, list) and layers and all(_is_int(l) for l in layers):
            layers = ",".join(map(str, layers))
        elif layers is not None and not (isinstance(layers, str) and layers.strip()):
            raise RequestError(
                f'{where}.layers must be like "16-19", "12,14,16" or [16, 17]', "cap"
            )
        out[name] = f"{name}:{float(p)!r}" + (f"@{layers.strip()}" if layers is not None else "")
    return out


# ---------------------------------------------------------------------------------- generation rows
def byte_level_alphabet() -> dict[str, int]:
    """The characters that byte-level BPE vocabularies (GPT-2, Llama-3, Qwen2, SmolLM2) write bytes
    with -> byte.

    Printable Latin-1 bytes stand for themselves; the 68 others, in byte order, take the characters
    from U+0100.
    """
    printable = [
        b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF
    ]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + i): b for i, b in enumerate(others)}


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` must wait, because they could still grow into a stop
    string.

    >>> held_back("Hello Wor", ["World"]), held_back("Hello", ["World"])
    (3, 0)
    """
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Job:
    """One request in flight: its rows report to `events`, which the HTTP thread reads."""

    def __init__(self, req: Request):
        self.req, self.events, self.cancelled = req, queue.Queue(), False
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())


class Row:
    """One choice being generated: its tokens, text sent so far, logprobs and where it stands."""

    def __init__(self, job: Job, index: int, steer: list[M.Steer], device):
        r = job.req
        self.job, self.index, self.steer, self.caps = job, index, steer, job.req.cap
        self.max_tokens, self.stops = r.max_tokens, r.stop
        self.temperature, self.top_p = r.temperature, r.top_p
        self.generator = (
            torch.Generator(device).manual_seed(r.seed + index)
            if r.seed is not None and r.temperature
            else None
        )
        self.tokens: list[int] = []
        # text decoded so far (only whole characters) and how much of it was sent
        self.text, self.sent = "", 0
        self.prefix = self.read = (
            0  # incremental decoding: tokens[prefix:read] were decoded into the tail of text
        )
        self.finish: str | None = (
            None  # "stop" or "length": done, waiting to be fed once more for the gauge
        )

    def emit(self, kind: str, **data) -> None:
        self.job.events.put((kind, self.index, data))

    def push(self, tok, token: int, stop_ids, logprob: dict | None) -> bool:
        """Add a sampled token and send the text that is safe to send. -> True when the row is done
        at once (an end-of-turn token, which is not part of the reply); a stop string or the token
        limit set `finish` instead.
        """
        if token in stop_ids:
            self.finish = "stop"
            self.flush(tok)
            return True
        self.tokens.append(token)
        self.decode(tok, final=False)
        end = len(self.text)
        look = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        cut = min((i for s in self.stops if (i := self.text.find(s, look)) >= 0), default=-1)
        if cut >= 0:  # the reply ends before the stop string, which is not sent
            self.text, end, self.finish = self.text[:cut], cut, "stop"
            self.prefix = self.read = len(self.tokens)
        elif len(self.tokens) == self.max_tokens:
            self.finish = "length"
            self.decode(tok, final=True)
            end = len(self.text)
        else:
            end -= held_back(self.text, self.stops)
        self.emit("delta", text=self.text[self.sent : end], logprobs=[logprob] if logprob else [])
        self.sent = max(self.sent, end)
        return False

    def decode(self, tok, final: bool) -> None:
        """Extend `text` by the new tokens' characters: a short window is decoded, so each token
        costs O(1); a character whose bytes are not all there yet (decoded as U+FFFD) waits, unless
        this is the end."""
        new = tok.decode(self.tokens[self.prefix :])
        old = tok.decode(self.tokens[self.prefix : self.read])
        if final or not new.endswith("\ufffd"):
            self.text += new[len(old) :]
            self.prefix, self.read = self.read, len(self.tokens)

    def flush(self, tok) -> None:
        """At the end: send everything not sent yet (held back, or not yet decoded)."""
        self.decode(tok, final=True)
        if self.sent < len(self.text):
            self.emit("delta", text=self.text[self.sent :], logprobs=[])
            self.sent = len(self.text)


def per_row_steering(rows: list[Row], hidden: int, device, dtype) -> list[M.Steer]:
    """Every row's own Steer list as Steers with one vector per row ([B, hidden], zeros where a row
    has none).

    The k-th intervention of each row goes into a Steer of its (layer, positions) among the k-th
    ones, and these are applied in k order, so each row gets exactly its own additions, in its own
    order: coef * v is computed in the model's dtype as the forward pass would, and 1.0 * that is
    added.
    """
    groups: dict[tuple, torch.Tensor] = {}
    for b, r in enumerate(rows):
        for k, s in enumerate(r.steer):
            key = (k, s.layer, s.positions)
            if key not in groups:
                groups[key] = torch.zeros(len(rows), hidden, device=device, dtype=dtype)
            groups[key][b] = s.coef * s.vector.to(device=device, dtype=dtype)
    # by k; stable, so rows keep their own order
    in_order = sorted(groups.items(), key=lambda g: g[0][0])
    return [M.Steer(layer, v, 1.0, positions) for (k, layer, positions), v in in_order]


def select_rows(cap: M.Capture, keep: torch.Tensor) -> M.Capture:
    """The capture of the rows `keep` only (its running sums are all [B, ...])."""
    return M.Capture(
        sums={k: v[keep] for k, v in cap.sums.items()},
        counts={k: v[keep] for k, v in cap.counts.items()},
    )


# ------------------------------------------------------------------------------------------- engine
class Engine:
    """The model, its persona vectors, and one worker thread that generates batches of queued
    requests."""

    def __init__(
        self,
        model: M.Transformer,
        tok,
        vectors_dir: str | Path | None = None,
        max_batch: int = 16,
        max_tokens_limit: int = 1024,
        max_n: int = 8,
        batch_wait: float = 0.05,
        max_batch_tokens: int = 32768,
        model_id: str | None = None,
    ):
        if max_batch < 1 or max_tokens_limit < 1 or batch_wait < 0:
            raise UserError("--max-batch and --max-tokens-limit must be >= 1, --batch-wait >= 0")
        if not 1 <= max_n <= max_batch:
            raise UserError(f"--max-n {max_n} must be between 1 and --max-batch {max_batch}")
        self.model, self.tok, self.pv, self.steering = model, tok, pv, pv.steering
        self.model_id = model_id or getattr(model, "name_or_path", "model")
        self.max_batch, self.max_tokens_limit, self.max_n = max_batch, max_tokens_limit, max_n
        self.batch_wait, self.max_batch_tokens = batch_wait, max_batch_tokens
        self.context = model.config.max_position_embeddings
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.vectors_dir = Path(vectors_dir) if vectors_dir else default_vectors_dir(self.model_id)
        self.names = traits_in(self.vectors_dir) if self.vectors_dir.is_dir() else []
        N, d = model.config.num_hidden_layers, model.config.hidden_size
        for (
            name
        ) in self.names:  # fail at start, not at the first request, on a vector of another model
            path = vector_path(self.vectors_dir, name)
            check_fits(*load_vector(path), path, N, d, model)
        self.gauges = [
            Gauge.from_file(vector_path(self.vectors_dir, n), None, N) for n in self.names
        ]
        alphabet = byte_level_alphabet()
        self.token_text = [
            tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)
        ]
        self.token_bytes = []
        for i in range(tok.vocab_size):
            piece = tok.backend.id_to_token(i) or ""
            self.token_bytes.append(
                list(bytes(alphabet[c] for c in piece))
                if all(c in alphabet for c in piece)
                else list(self.token_text[i].encode())
            )
        # vector file -> its vector and checked ceiling file, read at its first cap
        self._calibrations = {}
        self.stats = {
            "batches": 0,
            "rows": 0,
            "max_rows": 0,
            "mixed_steering": 0,
            "cancelled": 0,
            "errors": 0,
        }
        self._waiting: list[Job] = []
        self._running: list[Job] = []  # the jobs of the batch being generated
        # rows of the last batch, when the last request came
        self._last_rows, self._arrived = 1, 0.0
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="generation", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------- requests
    def parse(self, body) -> Request:
        """A chat-completion request body (decoded JSON) -> Request; RequestError on anything
        wrong."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        for name in UNSUPPORTED:
            if body.get(name) not in (None, [], {}):
                raise RequestError(f"{name} is not supported by this server", name)
        if body.get("response_format") not in (None, {"type": "text"}):
            raise RequestError(
                'response_format is not supported by this server (only {"type": "text"})',
                "response_format",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if _get(body, name, _is_number, "a number", 0) != 0:
                raise RequestError(f"{name} is not supported by this server (only 0)", name)
        # any name: this server has one model
        _get(body, "model", lambda x: isinstance(x, str), "a string")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(
                'messages must be a non-empty list of {"role", "content"} objects', "messages"
            )
        prompt = self.tok.encode_chat([message_text(m, i) for i, m in enumerate(messages)])
        if len(prompt) >= self.context:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens, but this model's context is {self.context}: "
                "shorten the messages",
                "messages",
                code="context_length_exceeded",
            )

        def positive(x):
            return _is_int(x) and x >= 1

        max_tokens = _get(body, "max_completion_tokens", positive, "a positive integer")
        max_tokens = _get(body, "max_tokens", positive, "a positive integer", max_tokens)
        if max_tokens is None:
            max_tokens = min(self.max_tokens_limit, self.context - len(prompt))
        elif max_tokens > self.max_tokens_limit:
            raise RequestError(
                f"max_tokens {max_tokens} is over this server's limit of {self.max_tokens_limit}",
                "max_tokens",
            )
        elif len(prompt) + max_tokens > self.context:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
                f"exceed this model's context of {self.context}: lower max_tokens",
                "max_tokens",
                code="context_length_exceeded",
            )
        stop = _get(
            body,
            "stop",
            lambda x: (
                isinstance(x, str)
                and x
                or isinstance(x, list)
                and len(x) <= 4
                and all(isinstance(s, str) and s for s in x)
            ),
            "a non-empty string or a list of up to 4",
            [],
        )
        if max(map(len, [stop] if isinstance(stop, str) else stop), default=0) > MAX_STOP:
            raise RequestError(f"stop strings must be at most {MAX_STOP} characters each", "stop")
        n = _get(body, "n", _is_int, "an integer", 1)
        if not 1 <= n <= self.max_n:
            raise RequestError(f"n must be between 1 and this server's limit of {self.max_n}", "n")
        logprobs = _get(body, "logprobs", lambda x: isinstance(x, bool), "true or false", False)
        top = _get(
            body,
            "top_logprobs",
            lambda x: _is_int(x) and 0 <= x <= 20,
            "an integer from 0 to 20",
            0,
        )
        if top and not logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        options = _get(body, "stream_options", lambda x: isinstance(x, dict), "an object", {})
        specs = parse_steer(body.get("steer"), self.names, self.model.config.num_hidden_layers)
        steer = []
        for name, spec, layer, positions in specs:
            try:
                steer += self.steering([spec], self.model, self.vectors_dir, layer, positions)
            except KeyError:  # a relative coefficient, but the file records no residual norms
                raise RequestError(
                    f"{name} records no residual_norm, so a relative coefficient cannot be "
                    "converted: give a raw coefficient",
                    "steer",
                ) from None
            except ValueError as e:
                raise RequestError(str(e).replace("--steer ", "steer "), "steer") from None
        cap = parse_cap(body.get("cap"), self.names)
        try:
            # every check now (a 400, not a failed batch); each trait's ceiling file is read once,
            # then cached
            capping.resolved(list(cap.values()), self.model, self.vectors_dir, self._calibrations)
        except UserError as e:
            raise RequestError(str(e).replace("--cap ", "cap "), "cap") from None
        return Request(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=_get(
                body,
                "temperature",
                lambda x: _is_number(x) and 0 <= x <= 2,
                "a number from 0 to 2",
                1.0,
            ),
            top_p=_get(
                body, "top_p", lambda x: _is_number(x) and 0 < x <= 1, "a number in (0, 1]", 1.0
            ),
            seed=_get(
                body,
                "seed",
                lambda x: _is_int(x) and 0 <= x < 2**63,
                "an integer from 0 to 2^63 - 1",
            ),
            stop=[stop] if isinstance(stop, str) else stop,
            n=n,
            stream=_get(body, "stream", lambda x: isinstance(x, bool), "true or false", False),
            include_usage=bool(options.get("include_usage")),
            logprobs=logprobs,
            top_logprobs=top,
            steer=steer,
            cap=cap,
        )

    def submit(self, req: Request) -> Job:
        job = Job(req)
        with self._cv:
            if self._closed:
                raise RequestError("the server is shutting down", status=503)
            self._waiting.append(job)
            self._arrived = time.monotonic()
            self._cv.notify()
        return job

    def close(self) -> None:
        """Stop the worker: requests waiting or being generated end with an error (503)."""
        with self._cv:
            self._closed = True
            for job in self._waiting + self._running:
                job.cancelled = True  # the running batch stops at its next step
                job.events.put(("error", None, {"message": "the server is shutting down"}))
            self._waiting.clear()
            self._cv.notify()
        self._worker.join(timeout=60)

    # ----------------------------------------------------------------------------------- the worker
    def _next_batch(self) -> list[Job] | None:
        """Wait for a request -> the jobs of the next batch: every request waiting, up to max_batch
        rows.

        Before starting, it waits (at most batch_wait) for as many rows as the last batch had, and
        while requests keep arriving less than batch_wait / 2 apart: the clients of the batch that
        just ended send their next requests a moment after their replies, and clients that start
        together arrive a few ms apart.
        """
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            now = time.monotonic()
            deadline, want, gap = (
                now + self.batch_wait,
                min(self.max_batch, self._last_rows),
                self.batch_wait / 2,
            )
            while (rows := sum(j.req.n for j in self._waiting)) < self.max_batch and now < deadline:
                if rows >= want and now - self._arrived >= gap:
                    break
                self._cv.wait((deadline if rows < want else self._arrived + gap) - now)
                now = time.monotonic()
            jobs, rows, longest, most = [], 0, 0, 0
            for job in list(self._waiting):
                r = job.req
                p, m = max(longest, len(r.prompt)), max(most, r.max_tokens)
                if jobs and (
                    rows + r.n > self.max_batch or (rows + r.n) * (p + m) > self.max_batch_tokens
                ):
                    break  # it waits for the next batch, at the front of the line
                jobs.append(job)
                rows, longest, most = rows + r.n, p, m
            del self._waiting[: len(jobs)]
            self._last_rows = rows
            return jobs

    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            # gone before their batch began
            self.stats["cancelled"] += sum(j.req.n for j in jobs if j.cancelled)
            self._running = jobs = [j for j in jobs if not j.cancelled]
            try:
                self.generate(
                    [Row(j, i, j.req.steer, self.device) for j in jobs for i in range(j.req.n)]
                )
            except Exception as e:  # a bug: report it to these requests, keep serving the next ones
                self.stats["errors"] += 1
                traceback.print_exc()
                for job in jobs:
                    job.events.put(
                        (
                            "error",
                            None,
                            {"message": f"internal error: {type(e).__name__}: {e}", "status": 500},
                        )
                    )

    @torch.no_grad()
    def generate(self, rows: list[Row]) -> None:
        """Generate every row to its end, step by step (as model.generate does, plus per-row
        settings)."""
        if not rows:
            return
        model, tok, dev = self.model, self.tok, self.device
        B, T0 = len(rows), max(len(r.job.req.prompt) for r in rows)
        self.stats["batches"] += 1
        self.stats["rows"] += B
        self.stats["max_rows"] = max(self.stats["max_rows"], B)
        self.stats["mixed_steering"] += (
            len({tuple((s.layer, s.coef) for s in r.steer) for r in rows}) > 1
        )
        ids, mask = M.left_pad([r.job.req.prompt for r in rows], tok.pad_id)  # [B, T0] each
        # rows leave when done, so every generated column is real
        width = T0 + max(r.max_tokens for r in rows)
        mask = torch.cat([mask, mask.new_ones(B, width - T0)], 1)
        ids, mask = ids.to(dev), mask.to(dev)
        answer_start = torch.full((B,), T0, device=dev)
        cache = M.KVCache(model.config, B, width, dev, self.dtype)
        steer = per_row_steering(rows, model.config.hidden_size, dev, self.dtype)
        cap = M.Capture() if self.gauges else None
        # per trait, so that each Cap's `fired` is that trait's
        traits = sorted({t for r in rows for t in r.caps})
        caps = {
            t: capping.caps_per_row(
                [[r.caps[t]] if t in r.caps else [] for r in rows],
                model,
                self.vectors_dir,
                self._calibrations,
            )
            for t in traits
        }
        all_caps = [c for t in traits for c in caps[t]]
        logits = model(
            ids,
            mask[:, :T0],
            cache,
            answer_start,
            steer=steer,
            capture=cap,
            logits="last",
            cap=all_caps,
        )[:, -1]
        stop = torch.tensor(sorted(tok.stop_ids), dtype=torch.long, device=dev)
        logits = logits.index_fill(-1, stop, -math.inf)  # at least one new token, as M.generate
        for t in range(width - T0 + 1):
            need_lp = any(r.job.req.logprobs for r in rows if r.finish is None)
            logp = torch.log_softmax(logits.float(), dim=-1) if need_lp else None
            greedy = logits.argmax(-1).tolist()
            keep = [
                b
                for b, r in enumerate(rows)
                if self._step(r, b, logits, greedy[b], logp, cap, caps)
            ]
            if len(keep) < len(
                rows
            ):  # rows that are done leave the batch, and their cache with them
                if not keep:
                    return
                idx = torch.tensor(keep, device=dev)
                rows = [rows[b] for b in keep]
                mask, answer_start = mask[idx], answer_start[idx]
                cache.k, cache.v = [k[idx] for k in cache.k], [v[idx] for v in cache.v]
                steer = [M.Steer(s.layer, s.vector[idx], s.coef, s.positions) for s in steer]
                cap = select_rows(cap, idx) if cap is not None else None
                for c in all_caps:  # a row's ceilings and count leave with it
                    c.ceilings, c.fired = c.ceilings[idx], c.fired[idx]
            nxt = torch.tensor([r.tokens[-1] for r in rows], device=dev)[:, None]  # [B, 1]
            logits = model(
                nxt,
                mask[:, : T0 + t + 1],
                cache,
                answer_start,
                steer=steer,
                capture=cap,
                logits="last",
                cap=all_caps,
            )[:, -1]
        # cannot happen
        raise RuntimeError(f"{len(rows)} row(s) still running after the longest max_tokens")

    def _step(
        self,
        r: Row,
        b: int,
        logits: torch.Tensor,
        greedy: int,
        logp: torch.Tensor | None,
        cap: M.Capture | None,
        caps: dict[str, list[M.Cap]],
    ) -> bool:
        """Row r (row b of the batch) after a forward pass: sample its next token, or finish it. ->
        whether it stays in the batch (for its next token, or to feed its last one so that the gauge
        and the caps' counts cover the reply, as M.generate does)."""
        if r.job.cancelled:
            self.stats["cancelled"] += 1
            return False
        if r.finish is not None:  # its last token has now been fed
            self._finish(r, cap, b, caps)
            return False
        if r.temperature == 0:
            token = greedy
        else:
            token = int(M.sample(logits[b : b + 1], r.temperature, r.top_p, r.generator)[0])
        lp = self._logprob(logp[b], token, r.job.req.top_logprobs) if r.job.req.logprobs else None
        ended = r.push(self.tok, token, self.tok.stop_ids, lp)  # an end-of-turn token is not fed
        if ended or r.finish is not None and cap is None and not r.caps:
            self._finish(r, cap, b, caps)
            return False
        return True

    def _logprob(self, logp: torch.Tensor, token: int, top: int) -> dict:
        """OpenAI's logprobs entry for one token: its log probability under the model (before
        temperature)."""
        entry = self._token_entry(token, float(logp[token]))
        values, idx = logp.topk(top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        entry["top_logprobs"] = [
            self._token_entry(i, v) for i, v in zip(idx.tolist(), values.tolist())
        ]
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict:
        # the model's vocabulary may have padding rows beyond the tokenizer's
        known = token < len(self.token_text)
        return {
            "token": self.token_text[token] if known else "",
            "logprob": logprob,
            "bytes": self.token_bytes[token] if known else [],
        }

    def _finish(self, r: Row, cap: M.Capture | None, b: int, caps: dict[str, list[M.Cap]]) -> None:
        r.flush(self.tok)
        capped = {
            t: int(sum(c.fired[b] for c in caps[t])) for t in r.caps
        }  # only its own Cap is finite for it
        persona = {}
        if cap is not None:
            one = select_rows(cap, torch.tensor([b], device=self.device))
            replied = bool(one.counts["answer"][0] > 0)
            acts = {"prompt_last": one.prompt_last(), "response_avg": one.answer_mean()}
            if (
                r.steer or r.caps
            ) and replied:  # an intervened reply is gauged as the plain model reads it (as chat)
                acts = self.pv.read_answers(self.model, [r.job.req.prompt], [r.tokens])
            for g in self.gauges:
                x = g.read(acts)
                persona[g.trait] = {
                    "layer": g.layer,
                    "before_reply": x["prompt_last"],
                    "reply": x["response_avg"] if replied else None,
                    "marks": {
                        "before_reply": g.marks["prompt_last"],
                        "reply": g.marks["response_avg"],
                    },
                }
        r.emit(
            "finish",
            finish_reason=r.finish or "length",
            persona=persona,
            tokens=len(r.tokens),
            capped_tokens=capped,
        )


# --------------------------------------------------------------------------------------------- HTTP
def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


def error_body(
    message: str, status: int = 400, param: str | None = None, code: str | None = None
) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive for JSON replies; a stream is server-sent events, then the
    connection closes."""

    protocol_version = "HTTP/1.1"
    server_version = "persona-vectors"
    timeout = 120  # seconds a client may take to send a request (or keep an idle connection)

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            super().log_message(fmt, *args)

    def handle(self):
        try:
            super().handle()
        except (
            ConnectionError,
            TimeoutError,
        ) as e:  # the client left (or stalled): one line, not a traceback
            self.log_error("the client went away: %s", e)

    def handle_one_request(self):
        """The standard library's, with two waits: an idle keep-alive connection waits up to
        `timeout` s for its next request, but a new connection's first request, and once a request
        has begun its line and headers (as its body, in read_body), must keep coming, with no pause
        over body_timeout s, else a 408: a silent or half request holds its connection seconds, not
        minutes."""
        self.requestline = self.command = ""
        first = not getattr(self, "served", False)  # a new connection owes its first request now
        if first:
            self.connection.settimeout(self.server.body_timeout)
        else:  # idle between requests: a new client at the limit may take this place
            self.server.idle(self.connection, True)
        try:
            if not self.rfile.peek(1):  # the client closed its idle connection, or was evicted
                self.close_connection = True
                return
        except TimeoutError as e:
            if first:  # opened and then silent: a stalled request, not an idle keep-alive
                wait = self.server.body_timeout
                self.send_error(408, f"no request came on this new connection for {wait:g} s")
            else:
                self.log_error("Request timed out: %r", e)
            self.close_connection = True
            return
        finally:
            self.server.idle(self.connection, False)
            self.connection.settimeout(self.timeout)
        self.served = True
        if not self.read_head():
            return
        try:
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                return self.send_error(501, f"Unsupported method ({self.command!r})")
            method()
            self.wfile.flush()
        except TimeoutError as e:  # a reply that could not be written
            self.log_error("Request timed out: %r", e)
            self.close_connection = True

    def read_head(self) -> bool:
        """Read and parse the request line and headers -> whether they came whole and well-formed
        (else answered: a 414, the standard library's 400s and 505, or a 408 when they stalled for
        body_timeout s)."""
        wait = self.server.body_timeout
        self.connection.settimeout(wait)
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return False
            return self.parse_request()
        except TimeoutError:
            self.send_error(
                408, f"the request stalled before its headers ended: nothing came for {wait:g} s"
            )
            return False
        finally:
            self.connection.settimeout(self.timeout)

    def send_json(self, status: int, obj: dict, close: bool = False) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, e: RequestError, close: bool = False) -> None:
        self.send_json(e.status, error_body(str(e), e.status, e.param, e.code), close)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a garbled request line, an unknown method, too many
        headers) in the API's JSON too, as HTTP/1.1 even where the request line was too garbled to
        name its version."""
        self.request_version = self.protocol_version
        message = " ".join(
            filter(None, [message or self.responses.get(code, ("error",))[0], explain])
        )
        self.send_error_json(RequestError(message, status=code), close=True)

    def authorized(self) -> bool:
        """Whether the request has `Authorization: Bearer KEY` (the scheme in any case, as RFC 7235
        says; the key compared in constant time); else it is answered 401."""
        key = self.server.api_key
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if (
            key is None
            or scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode("latin-1"), key.encode())
        ):
            return True
        self.send_error_json(
            RequestError(
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                status=401,
                code="invalid_api_key",
            ),
            close=True,
        )
        return False

    def do_GET(self):
        if not self.authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            return self.send_error_json(
                RequestError(f"no such endpoint: GET {self.path}", status=404)
            )
        self.send_json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": self.engine.model_id,
                        "object": "model",
                        "created": self.server.started,
                        "owned_by": "persona-vectors",
                        "persona_vectors": self.engine.names,
                    }
                ],
            },
        )

    def content_length(self) -> int | None:
        """The body's length from its one Content-Length header (several that agree count as one),
        or None after answering 400: none, not decimal digits, several that disagree, or a
        Transfer-Encoding (RFC 9112 6.3: a message whose length is unclear is refused, and its
        connection closed)."""
        values = [v.strip() for v in self.headers.get_all("Content-Length", [])]
        problem = None
        if "Transfer-Encoding" in self.headers:
            problem = (
                "Transfer-Encoding is not supported: send the request body with a "
                "Content-Length header"
            )
        elif not values:
            problem = "send the request body with a Content-Length header"
        elif len(set(values)) > 1:
            problem = f"conflicting Content-Length headers ({', '.join(values)[:80]}): send one"
        elif not (values[0].isascii() and values[0].isdigit()):
            problem = f"the Content-Length header must be a number of bytes, not {values[0][:40]!r}"
        if problem:
            self.send_error_json(RequestError(problem), close=True)
            return None
        return int(values[0]) if len(values[0]) <= 18 else 1 << 62  # int() refuses > 4300 digits

    def read_body(self) -> bytes | None:
        """The request body, or None after answering 400 (no Content-Length, or over max_body) or
        408 (the body stalled for body_timeout seconds). An oversized body is read and dropped (up
        to 16 x max_body), so that the client gets to read our answer."""
        length = self.content_length()
        if length is None:
            return None
        limit, wait = self.server.max_body, self.server.body_timeout
        # a stalled body frees its thread soon, not after an idle connection's wait
        self.connection.settimeout(wait)
        try:
            if length > limit:
                for start in range(0, length if length <= 16 * limit else 0, 65536):
                    self.rfile.read(min(65536, length - start))
                self.send_error_json(
                    RequestError(
                        f"the request body is {length} bytes, over this server's limit of {limit}"
                    ),
                    close=True,
                )
                return None
            return self.rfile.read(length)
        except TimeoutError:
            self.send_error_json(
                RequestError(f"the request body stalled: nothing came for {wait:g} s", status=408),
                close=True,
            )
            return None
        finally:
            self.connection.settimeout(self.timeout)

    def do_POST(self):
        raw = self.read_body()
        if raw is None or not self.authorized():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.send_error_json(
                RequestError(f"no such endpoint: POST {self.path}", status=404)
            )
        try:
            try:
                body = json.loads(raw, parse_constant=_not_json)  # NaN and Infinity are not JSON
            except (ValueError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON ({e})") from None
            except RecursionError:  # [[[[...: a 500 and a traceback in the log, before
                raise RequestError(
                    "the request body is not valid JSON here (nested too deep)"
                ) from None
            req = self.engine.parse(body)
            job = self.engine.submit(req)
        except RequestError as e:
            return self.send_error_json(e)
        except Exception as e:  # a bug: this request fails, the server stays up
            traceback.print_exc()
            return self.send_error_json(
                RequestError(f"internal error: {type(e).__name__}: {e}", status=500)
            )
        try:
            with self.server.answering():
                if req.stream:
                    self.stream(job)
                else:
                    self.complete(job)
        except (ConnectionError, TimeoutError):
            job.cancelled = True  # the client is gone: its rows leave the batch at the next step
            raise

    def events(self, job: Job):
        """The job's events as they come, until every row has finished; stops the job if the client
        leaves."""
        finished, checked = 0, time.monotonic()
        while finished < job.req.n:
            if time.monotonic() - checked > 0.5:  # twice a second, whether or not tokens are coming
                if self.client_gone():
                    job.cancelled = True
                    raise ConnectionResetError("the client closed the connection")
                checked = time.monotonic()
            try:
                kind, index, data = job.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "error":
                raise RequestError(data["message"], status=data.get("status", 503))
            finished += kind == "finish"
            yield kind, index, data

    def client_gone(self) -> bool:
        """Whether the client closed its connection (it has nothing to send while it waits for our
        reply)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def head(self, job: Job, obj: str) -> dict:
        return {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": self.engine.model_id,
            "system_fingerprint": None,
        }

    def usage(self, job: Job, completion: int) -> dict:
        p = len(job.req.prompt)
        return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}

    def complete(self, job: Job) -> None:
        n = job.req.n
        text, lps, ends = [""] * n, [[] for _ in range(n)], [None] * n
        try:
            for kind, i, data in self.events(job):
                if kind == "delta":
                    text[i] += data["text"]
                    lps[i] += data["logprobs"]
                else:
                    ends[i] = data
        except RequestError as e:
            return self.send_error_json(e)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text[i], "refusal": None},
                "logprobs": {"content": lps[i], "refusal": None} if job.req.logprobs else None,
                "finish_reason": ends[i]["finish_reason"],
                "persona": ends[i]["persona"],
                "capped_tokens": ends[i]["capped_tokens"],
            }
            for i in range(n)
        ]
        self.send_json(
            200,
            self.head(job, "chat.completion")
            | {"choices": choices, "usage": self.usage(job, sum(e["tokens"] for e in ends))},
        )

    def stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # no length and no chunked encoding: the end of the stream is EOF
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        head = self.head(job, "chat.completion.chunk")
        lp = job.req.logprobs

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        for i in range(job.req.n):
            send(
                head
                | {
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                }
            )
        completion = 0
        try:
            for kind, i, data in self.events(job):
                if kind == "delta":
                    if data["text"] or data["logprobs"]:
                        logprobs = {"content": data["logprobs"], "refusal": None} if lp else None
                        send(
                            head
                            | {
                                "choices": [
                                    {
                                        "index": i,
                                        "delta": {"content": data["text"]},
                                        "logprobs": logprobs,
                                        "finish_reason": None,
                                    }
                                ]
                            }
                        )
                else:
                    completion += data["tokens"]
                    send(
                        head
                        | {
                            "choices": [
                                {
                                    "index": i,
                                    "delta": {},
                                    "logprobs": None,
                                    "finish_reason": data["finish_reason"],
                                    "persona": data["persona"],
                                    "capped_tokens": data["capped_tokens"],
                                }
                            ]
                        }
                    )
        except RequestError as e:  # the stream has begun: the error goes into it
            send(error_body(str(e), e.status))
        else:
            if job.req.include_usage:
                send(head | {"choices": [], "usage": self.usage(job, completion)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Busy(Handler):
    """A connection beyond the server's max_connections: answered 503 at once by the accepting
    thread, unread."""

    timeout = 1  # the accepting thread never waits long on it
    requestline, request_version = "-", "HTTP/1.1"

    def handle_one_request(self):
        self.send_error_json(
            RequestError(
                f"this server is at its limit of {self.server.max_connections} open "
                "connections (--max-connections): retry later",
                status=503,
            ),
            close=True,
        )


class Server(ThreadingHTTPServer):
    """One thread per connection, at most max_connections of them, and a record of the open
    connections: server_close closes them and joins their threads, so that no handler thread (which
    may hold the model's tensors) outlives the server. At the limit, a new connection takes the
    place of the connection idle longest between requests (a keep-alive client's, closed as it
    would be after its 120 s); only when none is idle is it answered 503."""

    daemon_threads = (
        False  # joined by server_close (the standard library joins only non-daemon threads)
    )

    def __init__(self, address, handler, max_connections: int, drain: float = 5):
        self.lock, self.connections, self.max_connections = threading.Lock(), set(), max_connections
        self.idle_connections: dict[socket.socket, None] = {}  # an ordered set: longest idle first
        self.replies = threading.Condition(self.lock)  # notified when a reply from the engine ends
        self.in_reply, self.drain = 0, drain  # replies being written; how long server_close waits
        super().__init__(address, handler)

    @contextlib.contextmanager
    def answering(self):
        """Around a request's reply from the engine: server_close waits for it (up to `drain` s) to
        be written."""
        with self.lock:
            self.in_reply += 1
        try:
            yield
        finally:
            with self.lock:
                self.in_reply -= 1
                self.replies.notify_all()

    def idle(self, conn: socket.socket, idle: bool) -> None:
        """Record that `conn` waits for its next request (idle), or no longer does."""
        with self.lock:
            if idle:
                self.idle_connections[conn] = None
            else:
                self.idle_connections.pop(conn, None)

    def process_request(self, request, client_address):
        with self.lock:
            if len(self.connections) >= self.max_connections and self.idle_connections:
                evicted = next(iter(self.idle_connections))  # its handler's wait ends: it closes
                del self.idle_connections[evicted]
                self.connections.discard(evicted)
                try:
                    evicted.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            busy = len(self.connections) >= self.max_connections
            if not busy:
                self.connections.add(request)
        if busy:
            Busy(request, client_address, self)
            self.shutdown_request(request)
        else:
            super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        """Stop listening; close the engine, so that each reply in flight ends (a 503, or in a
        stream an error chunk and [DONE]), and wait up to `drain` s for those ends to be written;
        then end every open connection (a keep-alive client's too), and join their threads."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        with self.lock:
            self.replies.wait_for(lambda: not self.in_reply, timeout=self.drain)
            for conn in self.connections:
                try:
                    # a thread waiting to read or write wakes up and ends
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        super().server_close()


def make_server(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_body: int = 1 << 20,
    quiet: bool = False,
    max_connections: int = 64,
    body_timeout: float = 10,
) -> Server:
    """An HTTP server for `engine` (not yet serving: call serve_forever); port 0 picks a free
    port."""
    try:
        server = Server((host, port), Handler, max_connections)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host"
        ) from None
    server.engine, server.api_key, server.max_body, server.quiet = engine, api_key, max_body, quiet
    server.body_timeout = body_timeout
    server.started = int(time.time())
    return server


def serve(
    model: str = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    vectors: str | None = None,
    max_batch: int = 16,
    max_tokens_limit: int = 1024,
    max_n: int = 8,
    batch_wait: float = 0.05,
    max_body: int = 1 << 20,
    max_connections: int = 64,
    device: str | None = None,
    dtype: str | None = None,
    quiet: bool = False,
) -> None:
    """Serve `model` on http://host:port/v1 until interrupted (Ctrl-C)."""
    if vectors is not None and not Path(vectors).is_dir():
        raise UserError(
            f"--vectors {vectors} is not a directory: pass the directory "
            "of `extract`'s vector files, or leave --vectors out"
        )
    lm, tok = checkpoint.load(model, device, DTYPES.get(dtype))
    engine = Engine(
        lm, tok, vectors, max_batch, max_tokens_limit, max_n, batch_wait, model_id=model
    )
    server = make_server(engine, host, port, api_key, max_body, quiet, max_connections)
    h, p = server.server_address[:2]
    print(
        f"serving {model} on http://{h}:{p}/v1 (persona vectors: "
        f"{', '.join(engine.names) or 'none'} from {engine.vectors_dir}); Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "warning: listening beyond this machine without "
            "--api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()  # the engine first: each reply in flight ends with an error


def add_commands(sub) -> None:
    """Register `serve` on the command line's subparsers (python -m apps)."""
    sp = sub.add_parser(
        "serve",
        help="an OpenAI-compatible chat server with per-request steering and persona gauges",
    )
    sp.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local directory")
    sp.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s: this machine)",
    )
    sp.add_argument(
        "--port",
        type=cli.bounded("port"),
        default=8000,
        help="0 picks a free port (default: %(default)s)",
    )
    sp.add_argument(
        "--api-key",
        default=os.environ.get("PERSONA_VECTORS_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $PERSONA_VECTORS_API_KEY, else none)",
    )
    sp.add_argument(
        "--vectors", default=None, help="directory of vector files (default: vectors/<model name>/)"
    )
    sp.add_argument(
        "--max-batch",
        type=cli.COUNT,
        default=16,
        help="rows generated together (default: %(default)s)",
    )
    sp.add_argument(
        "--max-tokens-limit",
        type=cli.MAX_NEW_TOKENS,
        default=1024,
        help="largest max_tokens a request may ask",
    )
    sp.add_argument("--max-n", type=cli.COUNT, default=8, help="largest n (choices per request)")
    sp.add_argument(
        "--batch-wait",
        type=cli.bounded("seconds"),
        default=0.05,
        help="seconds the worker waits for more requests to join a batch (default: %(default)s)",
    )
    sp.add_argument(
        "--max-body",
        type=cli.bounded("bytes"),
        default=1 << 20,
        help="largest request body in bytes",
    )
    sp.add_argument(
        "--max-connections",
        type=cli.COUNT,
        default=64,
        help="open connections served at once; one more gets 503 at once (default: %(default)s)",
    )
    sp.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    sp.add_argument("--dtype", choices=DTYPES, default=None)
    sp.add_argument("--quiet", action="store_true", help="no access log on stderr")
    sp.set_defaults(
        run=lambda a: serve(
            model=a.model,
            host=a.host,
            port=a.port,
            api_key=a.api_key,
            vectors=a.vectors,
            max_batch=a.max_batch,
            max_tokens_limit=a.max_tokens_limit,
            max_n=a.max_n,
            batch_wait=a.batch_wait,
            max_body=a.max_body,
            max_connections=a.max_connections,
            device=a.device,
            dtype=a.dtype,
            quiet=a.quiet,
        )
    )
