"""The transport under judge.py's OpenAI judge: a client for any OpenAI-compatible /v1 API (OpenAI,
or vLLM and llama.cpp servers via OPENAI_BASE_URL) and a pool of worker threads that sends many
requests at once.

    client = OpenAIClient()                                  # OPENAI_API_KEY, OPENAI_BASE_URL
    text = client.chat([{"role": "user", "content": "Hi"}], "gpt-4.1-mini")

429, 5xx and timeouts are retried with backoff, honouring Retry-After; every failure is a one-line
JudgeError that says what to do. judge.py reads the paper's score from `top_logprobs`;
apps/new_trait.py uses `chat`.
"""

import json
import os
import queue
import random
import re
import sys
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import requests

from support import UserError

OPENAI_URL = "https://api.openai.com/v1"
WORKERS_ENV = "PERSONA_JUDGE_WORKERS"  # concurrent requests to an OpenAI-compatible judge
WORKERS_HINT = f"lower the judge's concurrent requests with --judge-workers N or {WORKERS_ENV}=N"
MAX_WAIT = 60.0  # seconds: a server asking to wait longer fails the run at once instead
CONNECT_RETRIES = 2  # a refused connection is retried this often (0.5 s, 1 s), then fails


class JudgeError(UserError):
    """The judge server refused or failed; the message says how to fix it."""


class Stopped(Exception):
    """Raised in a worker thread when the run is stopping (an error elsewhere, or Ctrl-C)."""


class OpenAIClient:
    """POST to an OpenAI-compatible API. 429, 5xx and timeouts are retried with exponential backoff
    and jitter, honouring Retry-After up to MAX_WAIT seconds (a longer wait fails at once); each
    wait of a second or more is announced on stderr. A refused connection is retried CONNECT_RETRIES
    times, then fails. Other errors fail at once. Every failure is a one-line JudgeError that says
    what to do."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_delay: float = MAX_WAIT,
        instead: str = "",
    ):
        """`instead`: what the caller's user can run instead, named when no key is set."""
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:  # requests: MissingSchema
            raise UserError(
                f"OPENAI_BASE_URL {self.base_url!r} is no http(s) URL: give one like "
                "http://127.0.0.1:8000/v1 (a local server), or unset it to use OpenAI's API"
            )
        if not self.api_key and urlsplit(self.base_url).hostname == "api.openai.com":
            # Only OpenAI itself surely needs a key. vLLM and llama.cpp servers usually run
            # without one, so any other base URL is tried without; if it does want one, its 401
            # says so.
            raise UserError(
                "OPENAI_API_KEY is not set: export OPENAI_API_KEY=sk-..., or point OPENAI_BASE_URL "
                "at an OpenAI-compatible server" + (f", or {instead}" if instead else "")
            )
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_delay = backoff, max_delay
        self._local = threading.local()  # one requests.Session (connection pool) per thread

    def post(self, path: str, body: dict, stop: threading.Event | None = None) -> dict:
        """The JSON reply; `stop` (set by the caller on Ctrl-C or an error) ends any wait at once
        (Stopped)."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        stop = stop or threading.Event()
        attempt = connect_failures = 0
        while True:
            if stop.is_set():
                raise Stopped
            try:
                return self._post_once(url, body)
            except requests.ConnectionError as e:  # refused, no route, unknown host, time-out
                connect_failures += 1
                if connect_failures > CONNECT_RETRIES:
                    raise JudgeError(
                        f"cannot connect to {url} ({_connection_reason(e)}, {connect_failures} "
                        "tries): is the server running, and is OPENAI_BASE_URL right?"
                    ) from None
                if stop.wait(0.5 * 2 ** (connect_failures - 1)):
                    raise Stopped from None
                continue
            except _Retry as retry:
                why, retry_after = retry.args
            if attempt == self.max_retries:
                raise JudgeError(
                    f"{url} failed {attempt + 1} times, last with {why}; try again later or "
                    f"{WORKERS_HINT}"
                )
            self._wait(why, retry_after, attempt, stop)
            attempt += 1

    def _post_once(self, url: str, body: dict) -> dict:
        """One request: the JSON reply, or _Retry(why, retry_after), or a JudgeError when waiting
        will not help. A connection error is left to the caller."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        try:
            r = self._local.session.post(url, json=body, headers=headers, timeout=self.timeout)
        except requests.ConnectionError:  # a connect timeout too: the caller counts these
            raise
        except requests.Timeout:
            raise _Retry(f"no reply within {self.timeout:g} s", None) from None
        if r.status_code == 200:
            try:
                return r.json()
            except ValueError:  # e.g. an HTML page from a proxy
                raise JudgeError(
                    f"{url} answered 200 with non-JSON text: is OPENAI_BASE_URL an "
                    "OpenAI-compatible API (ending in /v1)?"
                ) from None
        why = f"HTTP {r.status_code}: {_server_message(r)}"
        retryable = r.status_code in (408, 429) or r.status_code >= 500
        if not retryable or "insufficient_quota" in r.text:  # waiting will not help
            raise self._fatal(r.status_code, url, body.get("model"), why)
        retry_after = _retry_after(r.headers)
        if retry_after is not None and retry_after > self.max_delay:
            raise JudgeError(
                f"{url} asks to wait {retry_after:.0f} s before the next request ({why}), more "
                f"than the {self.max_delay:.0f} s this run waits: try again later, or "
                f"{WORKERS_HINT}"
            )
        raise _Retry(why, retry_after)

    def _wait(self, why: str, retry_after, attempt: int, stop: threading.Event) -> None:
        """Sleep before retry attempt + 1: what the server asked for, else backoff with jitter."""
        if retry_after is not None:
            delay = retry_after
        else:
            delay = min(self.max_delay, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        if delay >= 1:
            print(
                f"judge: {why}; waiting {delay:.0f} s before retry {attempt + 1} of "
                f"{self.max_retries}",
                file=sys.stderr,
                flush=True,
            )
        if stop.wait(delay):
            raise Stopped

    def _fatal(self, status: int, url: str, model: str | None, why: str) -> JudgeError:
        if status == 401:
            key = "rejected the API key" if self.api_key else "needs an API key and none was sent"
            return JudgeError(f"{url} {key} ({why}): set OPENAI_API_KEY to a valid key")
        if status == 404:
            return JudgeError(
                f"{url}: model {model!r} or the base URL is wrong ({why}): check the model name "
                f"in --judge openai:MODEL and OPENAI_BASE_URL (it should end in /v1)"
            )
        if status == 429:  # only insufficient_quota comes here
            return JudgeError(
                f"{url}: the account is out of credit ({why}): add credit, or use another judge"
            )
        return JudgeError(f"{url} refused the request ({why})")

    def first_choice(self, reply) -> dict:
        """choices[0] of a chat completion, or a JudgeError naming what came instead."""
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise JudgeError(
                f"{self.base_url} replied without a completion ({_brief(reply)}): is "
                "OPENAI_BASE_URL an OpenAI-compatible /v1 API?"
            )
        return choices[0]

    def top_logprobs(self, reply, model: str) -> list[dict] | None:
        """The first completion token's top_logprobs, [{"token", "logprob"}, ...], from a chat
        completion asked for logprobs; None for an empty completion; a JudgeError for text without
        logprobs or a reply of another shape."""
        choice = self.first_choice(reply)
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not content:
            message = choice.get("message")
            if isinstance(message, dict) and message.get("content"):  # text but no logprobs
                raise JudgeError(
                    f"{self.base_url} returned no logprobs for {model!r}: the judge needs a model "
                    "and server that support logprobs and top_logprobs"
                )
            return None
        first = content[0] if isinstance(content, list) else None
        top = first.get("top_logprobs") if isinstance(first, dict) else None
        if not isinstance(top, list) or not top or not all(map(_is_top_logprob, top)):
            raise JudgeError(
                f"{self.base_url} sent logprobs of an unexpected shape ({_brief(logprobs)}): "
                "expected content[0].top_logprobs = [{token, logprob}, ...] as OpenAI sends"
            )
        return top

    def chat(
        self,
        messages: list[dict],
        model: str,
        temperature: float = 1.0,
        max_tokens: int = 4096,
        response_format: dict | None = None,
    ) -> str:
        """The text of one chat completion (e.g. response_format={"type": "json_object"} for
        JSON)."""
        body = {"model": model, "messages": messages, "temperature": temperature}
        body["max_tokens"] = max_tokens
        if response_format is not None:
            body["response_format"] = response_format
        message = self.first_choice(self.post("chat/completions", body)).get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            refusal = message.get("refusal") if isinstance(message, dict) else None
            why = f"refusal: {refusal!r}"
            raise JudgeError(f"{model} returned no text ({why}); rephrase the request")
        return message["content"]


class _Retry(Exception):
    """A failed request worth retrying: args (why, seconds the server asked to wait or None)."""


def _is_top_logprob(t) -> bool:
    logprob = t.get("logprob") if isinstance(t, dict) else None
    is_number = isinstance(logprob, (int, float)) and not isinstance(logprob, bool)
    return is_number and isinstance(t.get("token"), str)


def _server_message(r: requests.Response) -> str:
    try:
        error = r.json().get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):  # not JSON, or JSON of another shape
        text = None
    return " ".join(str(text or r.text or r.reason).split())[:300]  # one line, bounded


def _brief(obj) -> str:
    """A JSON value as one short line, for error messages."""
    return " ".join(json.dumps(obj, default=str).split())[:120]


def _connection_reason(e: requests.ConnectionError) -> str:
    """'Connection refused' out of requests' long message, or the exception's type name."""
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))
    return found[-1].strip() if found else type(e).__name__


def _retry_after(headers) -> float | None:
    """Seconds the server asks us to wait (OpenAI also sends retry-after-ms), or None."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, ValueError):  # absent, or an HTTP date: fall back to our own backoff
            continue
    return None


def default_workers() -> int:
    """Concurrent requests to an OpenAI-compatible judge: $PERSONA_JUDGE_WORKERS, else 8."""
    value = os.environ.get(WORKERS_ENV, "8")
    if not value.isdigit() or int(value) < 1:
        raise UserError(
            f"{WORKERS_ENV}={value!r}: expected a whole number of concurrent requests, at least 1"
        )
    return int(value)


def map_in_threads(
    fn: Callable[[str, threading.Event], object],
    items: list[str],
    workers: int,
    on_result: Callable[[int, object], None],
) -> list:
    """[fn(item, stop) for item in items], `workers` calls at a time; on_result(i, value) is called
    in this thread as each value arrives. Ctrl-C or a failure stops every worker at once: they are
    daemon threads that wait on `stop`, so none keeps sleeping or retrying, nor keeps the process
    alive."""
    values: list = [None] * len(items)
    todo, results, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for item in enumerate(items):
        todo.put(item)

    def work():
        while not stop.is_set():
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((i, fn(item, stop), None))
            except Stopped:
                return
            except BaseException as e:  # noqa: BLE001 (handed to the main thread, which raises it)
                results.put((i, None, e))
                return

    for _ in range(min(workers, len(items))):
        threading.Thread(target=work, name="judge-worker", daemon=True).start()
    try:
        for _ in items:  # results are handled in this thread
            i, value, error = results.get()
            if error is not None:
                raise error
            values[i] = value
            on_result(i, value)
    finally:
        stop.set()  # after an error or Ctrl-C: no worker starts another request or keeps waiting
    return values
