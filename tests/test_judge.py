"""judge.py: logprob aggregation, the OpenAI judge and its client (support/openai_client.py) against
a local fake server, the cache (support/judge_cache.py), the local judge, and the module docstring's
example."""

import json
import math
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from make_golden_models import CONFIGS, random_weights, write_checkpoint
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

import judge as J
from support import UserError
from support.openai_client import OpenAIClient


def lp(p):
    return math.log(p)


# ------------------------------------------------------------------------------- aggregate_logprobs
def test_aggregate_mass_threshold():
    assert J.aggregate_logprobs({"40": lp(0.24), "REFUSAL": lp(0.76)}) is None
    assert J.aggregate_logprobs({"40": lp(0.26), "REFUSAL": lp(0.74)}) == pytest.approx(40)
    # 0.24 in all
    assert J.aggregate_logprobs({"10": lp(0.12), "30": lp(0.12), "x": lp(0.76)}) is None
    assert J.aggregate_logprobs({"10": lp(0.13), "30": lp(0.13), "x": lp(0.74)}) == pytest.approx(
        20
    )


def test_aggregate_refusal_dominant_and_empty():
    assert J.aggregate_logprobs({"REFUSAL": lp(0.9), "0": lp(0.05), "100": lp(0.05)}) is None
    assert J.aggregate_logprobs({}) is None


def test_aggregate_mixed_tokens_and_normalisation():
    table = {
        " 50": lp(0.2),
        "50": lp(0.1),
        "REF": lp(0.1),
        "1000": lp(0.1),
        "-3": lp(0.1),
        "7.5": lp(0.1),
        "100": lp(0.1),
        "0\n": lp(0.1),
        "²": lp(0.05),
        "": lp(0.05),
    }
    # numbers: 50 (0.2 + 0.1), 100 (0.1), 0 (0.1): mass 0.5
    assert J.aggregate_logprobs(table) == pytest.approx((50 * 0.3 + 100 * 0.1 + 0 * 0.1) / 0.5)
    # only relative probabilities among numbers matter once above the threshold
    assert J.aggregate_logprobs({"20": lp(0.3), "80": lp(0.1)}) == pytest.approx(35)
    assert J.aggregate_logprobs({"20": lp(0.6), "80": lp(0.2), "no": lp(0.2)}) == pytest.approx(35)


def test_coherence_prompt_slots():
    text = J.COHERENCE_PROMPT.format(question="What is 2+2? {braces}", answer="4")
    assert "What is 2+2? {braces}" in text and "\n4\n" in text
    assert "0" in text and "100" in text and "50" in text


# ------------------------------------------------------------------------------- fake OpenAI server
class FakeOpenAI:
    """An OpenAI-shaped /v1/chat/completions on 127.0.0.1. The prompt "score:N" gets 0.9 on N (split
    between "N" and " N") and 0.1 on "REF"; "words" gets only words; anything else 0.9 on "REFUSAL".
    `failures` are statuses returned first (a 429 with `retry_after`); `reply` replaces every 200
    answer."""

    def __init__(
        self,
        failures=(),
        status=None,
        delay=0.0,
        slow_first=0.0,
        logprobs=True,
        message=None,
        retry_after="0",
        reply=...,
    ):
        self.failures, self.status, self.delay, self.slow_first = (
            list(failures),
            status,
            delay,
            slow_first,
        )
        self.message, self.retry_after, self.reply_override = message, retry_after, reply
        self.logprobs = logprobs
        self.requests, self.lock, self.in_flight, self.max_in_flight = [], threading.Lock(), 0, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    n = len(fake.requests)
                    failure = fake.failures.pop(0) if fake.failures else fake.status
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    if n == 1 and fake.slow_first:
                        time.sleep(fake.slow_first)
                    time.sleep(fake.delay)
                    if failure:
                        message = fake.message or f"fake error {failure}\nsecond line"
                        self.reply(
                            failure,
                            {"error": {"message": message}},
                            {"Retry-After": fake.retry_after} if failure == 429 else {},
                        )
                    elif fake.reply_override is not ...:
                        self.reply(200, fake.reply_override)
                    else:
                        self.reply(200, fake.completion(body))
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def reply(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def completion(self, body):
        prompt = body["messages"][-1]["content"]
        if body.get("max_tokens", 0) > 1:  # the plain chat helper
            return {"choices": [{"message": {"role": "assistant", "content": f"echo: {prompt}"}}]}
        if prompt.startswith("score:"):
            n = prompt.split(":")[1]
            top = [(n, 0.6), (" " + n, 0.3), ("REF", 0.1)]
        elif prompt == "words":
            top = [("The", 0.6), ("I", 0.3), ("5", 0.1)]
        else:
            top = [("REFUSAL", 0.9), ("5", 0.1)]
        content = [
            {
                "token": top[0][0],
                "logprob": lp(top[0][1]),
                "top_logprobs": [
                    {"token": t, "logprob": lp(p), "bytes": list(t.encode())} for t, p in top
                ],
            }
        ]
        return {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": top[0][0]},
                    "logprobs": {"content": content} if self.logprobs else None,
                }
            ]
        }

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(**kwargs):
        servers.append(FakeOpenAI(**kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def judge_for(server, **kwargs):
    return J.OpenAIJudge(
        "judge-model", base_url=server.url, api_key="sk-test", backoff=0.001, **kwargs
    )


def test_openai_request_shape_and_scores(fake):
    server = fake()
    j = judge_for(server)
    assert j.name == f"openai:judge-model@{server.url}"
    assert j.score(["score:42", "refuse", "score:7"]) == [pytest.approx(42), None, pytest.approx(7)]
    assert len(server.requests) == 3
    r = server.requests[0]
    assert r["path"] == "/v1/chat/completions"
    assert r["headers"]["Authorization"] == "Bearer sk-test"
    body = r["body"]
    assert body["model"] == "judge-model" and body["messages"][0]["role"] == "user"
    assert (
        body["max_tokens"],
        body["temperature"],
        body["logprobs"],
        body["top_logprobs"],
        body["seed"],
    ) == (1, 0, True, 20, 0)
    assert sorted(r["body"]["messages"][0]["content"] for r in server.requests) == [
        "refuse",
        "score:42",
        "score:7",
    ]


def test_openai_retries_429_and_5xx(fake):
    server = fake(failures=[429, 500, 503])
    # Retry-After: 0 must win over a huge backoff; the 5xx use the (tiny) backoff
    j = J.OpenAIJudge("m", base_url=server.url, api_key="k", backoff=0.001)
    assert j.score(["score:13"]) == [pytest.approx(13)]
    assert len(server.requests) == 4
    server = fake(failures=[429, 429, 429])
    t0 = time.time()
    assert J.OpenAIJudge("m", base_url=server.url, api_key="k", backoff=100).score(["score:5"]) == [
        pytest.approx(5)
    ]
    assert time.time() - t0 < 5 and len(server.requests) == 4
    server = fake(failures=[500, 429, 502, 500])
    j = judge_for(server, workers=3)
    assert j.score([f"score:{n}" for n in range(6)]) == [pytest.approx(n) for n in range(6)]
    assert len(server.requests) == 6 + 4


def test_openai_gives_up_after_max_retries(fake):
    server = fake(status=500)
    with pytest.raises(
        J.JudgeError, match="failed 3 times, last with HTTP 500: fake error 500 second line"
    ) as e:
        judge_for(server, max_retries=2).score(["score:1"])
    assert "\n" not in str(e.value) and len(server.requests) == 3


def test_openai_retries_timeouts(fake):
    server = fake(slow_first=1.0)
    assert judge_for(server, timeout=0.3).score(["score:9"]) == [pytest.approx(9)]
    assert len(server.requests) == 2


def test_a_refused_connection_fails_fast_with_one_line():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # default retry settings
    j = J.OpenAIJudge("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
    t0 = time.time()
    with pytest.raises(
        J.JudgeError,
        match=r"cannot connect to http://127.0.0.1:\d+/v1/chat/completions "
        r"\(Connection refused, 3 tries\): is the server running",
    ) as e:
        j.score(["score:1"])
    assert time.time() - t0 < 5 and "\n" not in str(e.value)


@pytest.mark.parametrize("url", ["garbage", "127.0.0.1:8000/v1", "ftp://x/v1", "http://"])
def test_a_base_url_that_is_no_url_is_a_one_line_error(url, env):
    """It was requests' MissingSchema or InvalidSchema traceback, at the first request."""
    env.setenv("OPENAI_BASE_URL", url)
    with pytest.raises(UserError, match="OPENAI_BASE_URL '.*' is no http.s. URL") as e:
        J.OpenAIJudge("m", api_key="k").score(["score:1"])
    assert "\n" not in str(e.value)


def test_a_long_retry_after_fails_at_once_and_short_waits_are_announced(fake, capsys, env):
    server = fake(failures=[429], retry_after="3600")
    t0 = time.time()
    with pytest.raises(
        J.JudgeError,
        match="asks to wait 3600 s before the next request .HTTP 429.*more than the "
        "60 s this run waits: try again later, or lower the judge's concurrent "
        "requests with --judge-workers N or PERSONA_JUDGE_WORKERS=N",
    ) as e:
        judge_for(server).score(["score:1"])
    assert time.time() - t0 < 5 and len(server.requests) == 1 and "\n" not in str(e.value)
    server = fake(failures=[429], retry_after="1")
    assert judge_for(server).score(["score:4"]) == [pytest.approx(4)]
    assert (
        "judge: HTTP 429: fake error 429 second line; waiting 1 s before retry 1 of 6\n"
        in capsys.readouterr().err
    )


def test_ctrl_c_stops_every_worker_at_once(fake):
    # every worker is waiting 20 s to retry when Ctrl-C comes
    server = fake(status=429, retry_after="20")
    j = judge_for(server, workers=4, max_retries=1)
    main = threading.main_thread().ident
    # a real SIGINT, as from ^C
    ctrl_c = threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT))
    # Ctrl-C's usual handler, also where the test run was started in the background (a shell then
    # ignores SIGINT)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            j.score([f"score:{n}" for n in range(8)])
    finally:
        ctrl_c.cancel()  # never let it fire outside this test
        signal.signal(signal.SIGINT, handler)
    assert time.time() - t0 < 3
    time.sleep(0.3)
    assert not [
        t for t in threading.enumerate() if t.name == "judge-worker"
    ]  # none left sleeping or retrying
    sent = len(server.requests)
    time.sleep(0.5)
    assert sent == len(server.requests) <= 4


@pytest.mark.parametrize(
    "reply",
    [
        {},
        [],
        None,
        "text",
        {"choices": []},
        {"choices": [None]},
        {"choices": "abc"},
        {"choices": [{"message": {"content": "5"}, "logprobs": {"content": "5 (0.9)"}}]},
        {"choices": [{"logprobs": {"content": [{"top_logprobs": "5: -0.1"}]}}]},
        {
            "choices": [
                {"logprobs": {"content": [{"top_logprobs": [{"token": "5", "logprob": "-0.1"}]}]}}
            ]
        },
        {
            "choices": [
                {"logprobs": {"content": [{"top_logprobs": [{"token": 5, "logprob": -0.1}]}]}}
            ]
        },
        {"choices": [{"logprobs": {"content": [{"top_logprobs": []}]}}]},
        {"choices": [{"logprobs": {"content": ["5"]}}]},
    ],
)
def test_unexpected_replies_are_one_line_judge_errors(fake, reply):
    server = fake(reply=reply)
    with pytest.raises(J.JudgeError) as e:
        judge_for(server).score(["score:1"])
    assert "\n" not in str(e.value) and str(server.url) in str(e.value)


def test_unexpected_chat_replies_are_one_line_judge_errors(fake):
    for reply in (
        {},
        {"choices": []},
        {"choices": [{"message": "hi"}]},
        {"choices": [{"message": {"content": 3}}]},
    ):
        client = OpenAIClient(base_url=fake(reply=reply).url, api_key="k")
        with pytest.raises(J.JudgeError):
            client.chat([{"role": "user", "content": "hi"}], model="writer")


def test_the_worker_count_is_a_setting(fake, env):
    env.setenv("OPENAI_API_KEY", "sk-x")
    assert J.make_judge("openai").workers == 8
    assert J.make_judge("openai", workers=2).workers == 2
    env.setenv("PERSONA_JUDGE_WORKERS", "3")
    assert J.make_judge("openai:m").workers == 3 and J.make_judge(None).workers == 3
    server = fake(delay=0.1)
    env.setenv("OPENAI_BASE_URL", server.url)
    J.make_judge("openai:m").score([f"score:{n}" for n in range(9)])
    assert server.max_in_flight <= 3
    for bad in ("0", "-2", "many"):
        env.setenv("PERSONA_JUDGE_WORKERS", bad)
        with pytest.raises(UserError, match="PERSONA_JUDGE_WORKERS="):
            J.make_judge("openai")


def test_openai_401_and_404_are_clear_and_not_retried(fake, env):
    server = fake(status=401)
    with pytest.raises(J.JudgeError, match="rejected the API key.*set OPENAI_API_KEY") as e:
        judge_for(server).score(["score:1"])
    assert "\n" not in str(e.value) and len(server.requests) == 1
    server = fake(status=401)
    env.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(
        J.JudgeError, match="needs an API key and none was sent.*set OPENAI_API_KEY"
    ):
        J.OpenAIJudge("m", base_url=server.url, api_key=None).score(["score:1"])
    assert "Authorization" not in server.requests[0]["headers"]
    server = fake(status=404)
    with pytest.raises(
        J.JudgeError, match="model 'judge-model' or the base URL is wrong.*OPENAI_BASE_URL"
    ) as e:
        judge_for(server).score(["score:1"] * 5)
    assert "\n" not in str(e.value) and len(server.requests) <= 5
    server = fake(status=400)
    with pytest.raises(J.JudgeError, match="refused the request .HTTP 400: fake error 400"):
        judge_for(server).score(["score:1"])
    server = fake(status=429, message="You exceeded your current quota (insufficient_quota)")
    with pytest.raises(J.JudgeError, match="out of credit"):
        judge_for(server).score(["score:1"])
    assert len(server.requests) == 1  # a 429 that waiting cannot fix is not retried


def test_openai_without_logprobs_is_an_error(fake):
    server = fake(logprobs=False)
    with pytest.raises(J.JudgeError, match="no logprobs"):
        judge_for(server).score(["score:1"])


def test_openai_concurrency(fake, capsys):
    server = fake(delay=0.2)
    t0 = time.time()
    assert judge_for(server, workers=8).score([f"score:{n}" for n in range(16)]) == [
        pytest.approx(n) for n in range(16)
    ]
    assert server.max_in_flight >= 4 and time.time() - t0 < 16 * 0.2 / 2
    assert "16/16\x1b[K\n" in capsys.readouterr().err  # the progress counter
    server = fake(delay=0.05)
    judge_for(server, workers=1).score([f"score:{n}" for n in range(3)])
    assert server.max_in_flight == 1


def test_chat_helper(fake):
    server = fake(failures=[503])
    client = OpenAIClient(base_url=server.url, api_key="k", backoff=0.001)
    out = client.chat(
        [{"role": "user", "content": "hi"}],
        model="writer",
        temperature=0.7,
        max_tokens=100,
        response_format={"type": "json_object"},
    )
    assert out == "echo: hi" and len(server.requests) == 2
    body = server.requests[-1]["body"]
    assert body == {
        "model": "writer",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "max_tokens": 100,
        "response_format": {"type": "json_object"},
    }


def test_the_module_docstring_example_runs(fake, env, tmp_path):
    """The tutorial's entry: judge.py's usage example, run as written against the fake server."""
    server = fake()
    env.setenv("OPENAI_API_KEY", "sk-test")
    env.setenv("OPENAI_BASE_URL", server.url)
    env.chdir(tmp_path)
    lines = J.__doc__.split("\n\n")[1].splitlines()
    example = "\n".join(line[4:] for line in lines)
    namespace = vars(J).copy()
    exec(example, namespace)
    assert namespace["scores"] == [None]  # the fake refuses every prompt that is not "score:N"
    assert server.requests[0]["body"]["messages"][0]["content"].startswith("Rate how coherent")
    record = json.loads((tmp_path / "out/.work/judgments.jsonl").read_text())
    assert record["judge"] == f"openai:{J.DEFAULT_MODEL}@{server.url}" and record["refused"] is True


# --------------------------------------------------------------------------------------- make_judge
@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("PERSONA_JUDGE_WORKERS", raising=False)
    return monkeypatch


def test_make_judge_default(env, capsys):
    j = J.make_judge(None)
    assert isinstance(j, J.NoJudge) and j.name == "none" and j.score(["a", "b"]) == [None, None]
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "OPENAI_API_KEY" in err
        and "local:MODEL" in err
        and "OPENAI_BASE_URL" in err
    )
    env.setenv("OPENAI_API_KEY", "sk-x")
    j = J.make_judge(None)
    # the dated model the official code used, not an alias that can change under the user
    assert (
        isinstance(j, J.OpenAIJudge)
        and j.name == "openai:gpt-4.1-mini-2025-04-14"
        and j.api_key == "sk-x"
    )
    assert j.model == "gpt-4.1-mini-2025-04-14" and J.make_judge("openai").name == j.name
    assert j.base_url == "https://api.openai.com/v1" and capsys.readouterr().err == ""


def test_make_judge_specs(env):
    assert isinstance(J.make_judge("none"), J.NoJudge)
    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set") as e:
        J.make_judge("openai")  # fails at construction: no request, no model loaded
    assert "\n" not in str(e.value) and "--judge local:MODEL or --judge none" in str(e.value)
    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set"):
        J.make_judge("openai:gpt-4.1")
    env.setenv("OPENAI_API_KEY", "sk-x")
    assert J.make_judge("openai:gpt-4.1").name == "openai:gpt-4.1"
    assert J.make_judge("openai:ft:gpt-4.1-mini:org::abc").model == "ft:gpt-4.1-mini:org::abc"
    # another server (vLLM, llama.cpp) may run without a key
    env.delenv("OPENAI_API_KEY")
    env.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1/")
    j = J.make_judge("openai:Qwen/Qwen2.5-7B-Instruct")
    assert j.base_url == "http://127.0.0.1:8000/v1" and j.api_key is None
    assert j.name == "openai:Qwen/Qwen2.5-7B-Instruct@http://127.0.0.1:8000/v1"
    for bad in ["gpt-4.1", "local", "local:", "openai:", "", "None", "hf:x"]:
        with pytest.raises(ValueError, match="use openai, openai:MODEL, local:MODEL .* or none"):
            J.make_judge(bad)


# -------------------------------------------------------------------------------------------- cache
class CountingJudge:
    def __init__(self, name="fake", fail_after=None):
        self.name, self.fail_after, self.calls = name, fail_after, []

    def score(self, prompts, on_result=None):
        self.calls.append(list(prompts))
        out = []
        for i, p in enumerate(prompts):
            if self.fail_after is not None and i == self.fail_after:
                raise J.JudgeError("boom")
            out.append(None if p == "refuse" else float(len(p)))
            if on_result:
                on_result(i, out[-1])
        return out


def test_cache_second_run_makes_no_requests(fake, tmp_path):
    server = fake()
    prompts = ["score:1", "score:2", "refuse", "score:1"]
    cache = J.JudgeCache(tmp_path / "c" / "judge.jsonl")
    first = J.cached_score(judge_for(server), cache, prompts)
    # a repeated prompt is judged once
    assert first == [1, 2, None, 1] and len(server.requests) == 3
    cache.close()
    with J.JudgeCache(tmp_path / "c" / "judge.jsonl") as cache:
        assert J.cached_score(judge_for(server), cache, prompts) == first
        assert len(server.requests) == 3  # nothing new, the None included
        assert J.cached_score(judge_for(server), cache, prompts + ["score:3"]) == first + [3]
    assert [r["body"]["messages"][0]["content"] for r in server.requests[3:]] == ["score:3"]
    assert len((tmp_path / "c" / "judge.jsonl").read_text().splitlines()) == 4


def test_cache_scores_only_missing_in_one_call(tmp_path):
    cache, j = J.JudgeCache(tmp_path / "c.jsonl"), CountingJudge()
    assert J.cached_score(j, cache, ["a", "bb"]) == [1, 2]
    assert J.cached_score(j, cache, ["ccc", "a", "dddd", "bb"]) == [3, 1, 4, 2]
    assert j.calls == [["a", "bb"], ["ccc", "dddd"]]
    assert J.cached_score(j, cache, ["a"]) == [1] and len(j.calls) == 2


def test_cache_key_depends_on_judge_and_prompt(tmp_path):
    key = J.JudgeCache.key
    assert key("a", "p") == key("a", "p")
    assert len({key("a", "p"), key("b", "p"), key("a", "q"), key("a:", "p"), key("a", ":p")}) == 5
    cache = J.JudgeCache(tmp_path / "c.jsonl")
    a, b = CountingJudge("judge-a"), CountingJudge("judge-b")
    J.cached_score(a, cache, ["xy"])
    J.cached_score(b, cache, ["xy"])
    assert a.calls == b.calls == [["xy"]] and len(cache) == 2


def test_cache_torn_last_line_and_killed_run(tmp_path):
    path = tmp_path / "c.jsonl"
    cache, j = J.JudgeCache(path), CountingJudge(fail_after=2)
    with pytest.raises(J.JudgeError):
        J.cached_score(j, cache, ["a", "bb", "ccc", "dddd"])
    cache.close()
    assert len(path.read_text().splitlines()) == 2  # what was paid for before the failure is kept
    with open(path, "a") as f:
        f.write('{"key": "0123", "judge": "fake", "sco')  # kill -9 in the middle of a write
    cache = J.JudgeCache(path)
    assert len(cache) == 2 and path.read_text().endswith("}\n")  # torn line dropped and cut off
    j = CountingJudge()
    assert J.cached_score(j, cache, ["a", "bb", "ccc", "dddd"]) == [1, 2, 3, 4]
    assert j.calls == [["ccc", "dddd"]]
    cache.close()
    assert [json.loads(line)["score"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    path.write_text(
        '{"key": "k", "judge": "j", "score": 1}\nnot json\n{"key": "l", "judge": "j", "score": 2}\n'
    )
    with pytest.raises(ValueError, match="c.jsonl:2 is not a judge-cache record: delete that line"):
        J.JudgeCache(path)


@pytest.mark.parametrize("score", ["NaN", "Infinity", "true"])
def test_a_cached_score_that_is_no_finite_number_is_refused(tmp_path, score):
    """json reads NaN, Infinity and true; as scores they made every mean NaN (or 1)."""
    path = tmp_path / "c.jsonl"
    path.write_text(f'{{"key": "k", "judge": "j", "score": {score}}}\n')
    with pytest.raises(UserError, match="c.jsonl:1 is not a judge-cache record") as e:
        J.JudgeCache(path)
    assert "\n" not in str(e.value)


def test_a_cache_path_that_is_a_folder_or_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "d.jsonl", tmp_path / "f" / "c.jsonl"):
        with pytest.raises(UserError, match="cannot use .* as the judge cache"):
            J.JudgeCache(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "f"]


def test_cache_with_a_judge_that_ignores_on_result(tmp_path):
    class Plain:
        name = "plain"

        def score(self, prompts, on_result=None):
            return [float(len(p)) for p in prompts]

    with J.JudgeCache(tmp_path / "c.jsonl") as cache:
        assert J.cached_score(Plain(), cache, ["a", "bb", "a"]) == [1, 2, 1] and len(cache) == 2


def test_only_answers_are_cached(fake, tmp_path, capsys):
    server = fake()
    path = tmp_path / "judge.jsonl"
    with J.JudgeCache(path) as cache:
        assert J.cached_score(judge_for(server), cache, ["score:1", "words", "refuse"]) == [
            1,
            None,
            None,
        ]
    err = capsys.readouterr().err
    assert "1 of 3 judgments were neither a number nor a refusal" in err and "not cached" in err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # workers finish in any order: the cache holds the number and the refusal, and nothing for
    # "words"
    assert sorted([(r["score"], r.get("refused")) for r in records], key=str) == [
        (1, None),
        (None, True),
    ]
    with J.JudgeCache(path) as cache:  # the rerun asks again for the words, and only for them
        assert J.cached_score(judge_for(server), cache, ["score:1", "words", "refuse"]) == [
            1,
            None,
            None,
        ]
    assert [r["body"]["messages"][0]["content"] for r in server.requests[3:]] == ["words"]
    # a null cached by an older version (a failure or a refusal, no one knows) is asked again
    j = judge_for(server)
    path.write_text(
        json.dumps({"key": J.JudgeCache.key(j.name, "score:2"), "judge": j.name, "score": None})
        + "\n"
    )
    with J.JudgeCache(path) as cache:
        assert len(cache) == 0 and J.cached_score(j, cache, ["score:2"]) == [2]


def test_the_cache_message_says_how_to_clear_it(tmp_path, capsys):
    with J.JudgeCache(tmp_path / "c.jsonl") as cache:
        J.cached_score(CountingJudge(), cache, ["a", "b"])
        J.cached_score(CountingJudge(), cache, ["a", "b", "c", "d", "e"])
    assert (
        f"2 of 5 judgments reused from {tmp_path / 'c.jsonl'} (delete it to judge everything again)"
        in capsys.readouterr().err
    )


def test_no_judge_is_not_cached(tmp_path):
    cache = J.JudgeCache(tmp_path / "c.jsonl")
    assert J.cached_score(J.NoJudge(), cache, ["a", "b"]) == [None, None] and len(cache) == 0
    assert J.cached_score(CountingJudge(), None, ["a"]) == [1]


# --------------------------------------------------------------------------------------- LocalJudge
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz ?.,:-\n")
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_judge_model(path, style):
    """A tiny ChatML model dir. style "split": digits are single tokens plus "10" (so "100" = "10"
    "0") and " 7"; "whole": every number 0..100 is one token (like Llama-3). Digit rows of the head
    are scaled up so that numbers get a fair share of the probability, as in a real judge."""
    merges = (
        [("1", "0"), (" ", "7")]
        if style == "split"
        else [(str(n)[0], str(n)[1]) for n in range(10, 100)] + [("10", "0")]
    )
    tokens = SPECIAL + CHARS + [a + b for a, b in merges]
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.decoder = decoders.Fuse()
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
        )
    )
    config = dict(CONFIGS["tiny-llama3"], vocab_size=96 if style == "split" else 160)
    # the rows past the tokenizer's vocabulary are padding
    assert len(tokens) <= config["vocab_size"]
    weights = random_weights(config, seed=7)
    digit_start = torch.tensor(
        [t[:1].isdigit() for t in tokens] + [False] * (config["vocab_size"] - len(tokens))
    )
    weights["lm_head.weight"] *= torch.where(digit_start, 2.0, 0.5)[:, None]
    write_checkpoint(path, config, weights, shards=1)
    return path


@pytest.fixture(scope="module", params=["split", "whole"])
def local_judge(request, tmp_path_factory):
    path = make_judge_model(tmp_path_factory.mktemp("judge") / request.param, request.param)
    return request.param, J.LocalJudge(str(path), "cpu", torch.float32)


PROMPTS = ["rate this: what is 7?", "hello there", "a b c"]


def brute_force(j, prompt):
    """log P(n) from one full forward per number: its tokens, then any token not starting with a
    digit."""
    prompt_ids = j.tok.encode_chat([{"role": "user", "content": prompt}])
    V = j.model.config.vocab_size
    stops = [i for i in range(V) if i >= j.tok.vocab_size or not j.tok.decode([i])[:1].isdigit()]
    out = {}
    for n in range(101):
        seq = j.tok.encode(str(n))
        assert j.tok.decode(seq) == str(n)
        with torch.no_grad():
            logp = torch.log_softmax(j.model(torch.tensor([prompt_ids + seq]))[0].double(), -1)
        tokens = sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(seq))
        out[n] = float(tokens + torch.logsumexp(logp[-1, stops], 0))
    return out


def test_local_judge_matches_brute_force(local_judge):
    style, j = local_judge
    for prompt in PROMPTS:
        got, want = j.number_logprobs(prompt), brute_force(j, prompt)
        assert sorted(got) == list(range(101))
        for n in range(101):
            assert math.exp(got[n]) == pytest.approx(math.exp(want[n]), abs=1e-6, rel=1e-4), n
        assert sum(math.exp(v) for v in got.values()) <= 1 + 1e-5


def test_local_judge_tokenization(local_judge):
    style, j = local_judge
    tid = j.tok._tok.token_to_id
    if style == "split":
        assert j.numbers[100] == (tid("10"), tid("0")) and j.numbers[10] == (tid("10"),)
        assert j.numbers[37] == (tid("3"), tid("7")) and j.numbers[5] == (tid("5"),)
        assert j.continues[tid("10")] and j.continues[tid("0")] and not j.continues[tid(" 7")]
        assert (
            (tid("10"), tid("0")) in j.rows
            and (tid("10"),) not in j.rows
            and (tid("3"),) not in j.rows
        )
    else:
        assert all(len(s) == 1 for s in j.numbers) and len(j.rows) == 101
    assert not j.continues[tid("<|im_end|>")] and not j.continues[tid("a")] and not j.continues[-1]


def test_local_judge_two_forward_calls(local_judge):
    style, j = local_judge
    shapes = []
    handle = j.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        j.score(PROMPTS[:2])
    finally:
        handle.remove()
    prompt_len = len(j.tok.encode_chat([{"role": "user", "content": PROMPTS[0]}]))
    L = 2 if style == "split" else 1
    assert shapes[:2] == [(1, prompt_len), (len(j.rows), L)] and len(shapes) == 4
    assert len(j.rows) <= 101


def test_local_judge_score_follows_aggregate_rule(local_judge):
    style, j = local_judge
    scores = j.score(PROMPTS)
    for prompt, score in zip(PROMPTS, scores):
        probs = {n: math.exp(v) for n, v in brute_force(j, prompt).items()}
        mass = sum(probs.values())
        if (
            mass < 0.25
        ):  # no score: the tiny vocabulary has no token starting "REF", so not a refusal either
            assert (
                math.isnan(score)
                and J.aggregate_logprobs({str(n): math.log(p) for n, p in probs.items()}) is None
            )
        else:
            assert score == pytest.approx(sum(n * p for n, p in probs.items()) / mass, rel=1e-4)
            assert score == J.aggregate_logprobs(
                {str(n): v for n, v in j.number_logprobs(prompt).items()}
            )
    if (
        style == "split"
    ):  # both paths exercised (with 101 number tokens, a number rarely ends: all no score)
        assert any(math.isnan(s) for s in scores) and any(not math.isnan(s) for s in scores)


def test_local_judge_refusal_is_none_and_words_are_no_answer(local_judge, monkeypatch):
    style, j = local_judge
    numbers = {n: math.log(0.2 / 101) for n in range(101)}  # 0.2 on numbers: below the threshold
    for top, expected in (("REF", None), (" refuse", None), ("The", "nan")):
        monkeypatch.setattr(j, "answer", lambda prompt, top=top: (numbers, top))
        score = j.score(["q"])[0]
        assert (score is None) if expected is None else math.isnan(score)


def test_make_judge_local_loads_the_model_once(local_judge, monkeypatch):
    style, j = local_judge
    path = j.name.split(":", 1)[1]
    loads = []
    real_load = J.checkpoint.load
    monkeypatch.setattr(J.checkpoint, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    J._local_judge.cache_clear()
    # e.g. checked early, then used
    assert J.make_judge(f"local:{path}") is J.make_judge(f"local:{path}")
    assert len(loads) == 1
    local = J.make_judge(f"local:{path}")
    assert isinstance(local, J.LocalJudge) and local.name == f"local:{path}"
