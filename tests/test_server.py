"""The server, end to end: a real ``treespec serve`` process (uvicorn on an
ephemeral 127.0.0.1 port, a tiny random bundle) spoken to with httpx.

One server process serves the whole module (starting one costs seconds), so
the tests that count metrics first wait for it to be idle, and compare
before/after scrapes of /metrics rather than absolute values. It runs with
the test-only fault hooks on (``TREESPEC_DEBUG_FAULTS``): a prompt starting
with ``[[slow]]`` takes 50 ms per verify step, and one starting with
``[[fail]]`` raises inside the scheduler after its first step.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import tiny_model

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BLOCK = 128
MAX_RUNNING, MAX_WAITING = 2, 2
MAX_BODY = 16384
ORIGIN = "http://dashboard.example"
# A prompt that repeats, so the n-gram drafter finds matches and drafts.
PROMPT = "one two three four one two three four one two three"


# ---------------------------------------------------------------- the harness


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: list[str]):
        self.proc, self.url, self.log = proc, url, log

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        r = httpx.get(self.url + "/metrics", timeout=30)
        assert r.status_code == 200, r.text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    def wait_idle(self, timeout: float = 60) -> dict:
        """Block until no request is running or waiting; return that scrape."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = total(m, "treespec_requests_running") + total(m, "treespec_requests_waiting")
            if busy == 0:
                return m
            assert time.monotonic() < deadline, f"server still busy after {timeout}s"
            time.sleep(0.05)


def total(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == str(val) for k, val in labels.items()))


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def start_server(bundle: Path, *args: str, env: dict | None = None, timeout: float = 180) -> Server:
    cmd = [sys.executable, "-m", "treespec.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--port", "0", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TREESPEC_")}
    full_env.update(env or {})
    if "TREESPEC_TOKENIZER" in os.environ:
        full_env["TREESPEC_TOKENIZER"] = os.environ["TREESPEC_TOKENIZER"]
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    port: list[int] = []

    def pump():  # keep reading, or a full pipe would block the server
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not port:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(log))
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port[0]}"
    while True:  # listening comes first; the bundle loads in the background
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return Server(proc, url, log)
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server never became healthy:\n" + "".join(log))
        time.sleep(0.05)


def stop_server(server: Server, timeout: float = 60) -> None:
    """SIGTERM, and check the shutdown was the graceful one."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        raise
    time.sleep(0.2)  # let the pump thread read the last lines
    log = "".join(server.log)
    # uvicorn re-raises the signal it caught once it has shut down cleanly.
    assert code in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "Exception in ASGI application" not in log, log


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ranks_path):
    from treespec.model import save_bundle

    return save_bundle(tmp_path_factory.mktemp("srv") / "tiny", tiny_model(block_size=BLOCK), ranks_path)


@pytest.fixture(scope="module")
def srv(bundle):
    server = start_server(bundle, "--max-running", str(MAX_RUNNING), "--cors-origins", ORIGIN,
                          env={"TREESPEC_API_KEY": API_KEY, "TREESPEC_MAX_WAITING": str(MAX_WAITING),
                               "TREESPEC_MAX_BODY_BYTES": str(MAX_BODY), "TREESPEC_DEBUG_FAULTS": "1",
                               "TREESPEC_THREADS": "1", "TREESPEC_DTYPE": "float32"})
    yield server
    stop_server(server)


@pytest.fixture
def client(srv):
    with srv.client(headers=AUTH) as c:
        yield c


def sse_events(lines) -> list:
    """The ``data:`` payloads of an SSE stream, JSON-decoded ("[DONE]" kept as is)."""
    out = []
    for line in lines:
        if not line.startswith("data:"):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data:"):].strip()
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def error_of(r: httpx.Response) -> tuple[str, str]:
    """(message, type) of an error: TGI's shape, or OpenAI's on the /v1/ routes."""
    body = r.json()
    if isinstance(body["error"], dict):
        return body["error"]["message"], body["error"]["type"]
    return body["error"], body["error_type"]


def generate(c: httpx.Client, inputs: str, **params) -> dict:
    r = c.post("/generate", json={"inputs": inputs, "parameters": {"details": True, **params}})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- basics


def test_health_info_and_metrics_are_open_without_the_key(srv):
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    info = httpx.get(srv.url + "/info").json()
    assert info["model_config"]["block_size"] == BLOCK
    assert info["max_total_tokens"] == BLOCK and info["max_running"] == MAX_RUNNING
    # What the kernels plan chose on this machine, and why (model/kernels.py)
    assert info["model_dtype"] == "float32" and info["kernels"]["precision"] == "float32"
    assert info["kernels"]["choices"]["head"]["1"] in ("torch", "torch_wt", "skinny")
    assert info["kernels"]["threads"] == 1 and info["kernels"]["cpu"]["model"]
    # A bundle without a tree drafter defaults to ngram and says why tree is missing.
    assert info["drafters"]["default"] == "ngram"
    assert set(info["drafters"]["available"]) == {"none", "ngram"}
    assert "tree" in info["drafters"]["unavailable"]
    r = httpx.get(srv.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_startup_says_when_it_is_ready_and_how_to_try_it(srv):
    port = srv.url.rsplit(":", 1)[1]
    log = "".join(srv.log)
    ready = log.index(f"treespec is ready at http://127.0.0.1:{port} (model tiny, float32 weights, drafter ngram)")
    assert log.index("Uvicorn running on") < ready  # the line to wait for is the last one
    assert f"curl -s http://127.0.0.1:{port}/generate -H 'Authorization: Bearer $TREESPEC_API_KEY'" in log[ready:]


def test_stopping_while_the_model_loads_exits_at_once_and_never_says_ready():
    """SIGTERM as soon as uvicorn listens lands inside the shipped model's load
    (timing its kernels takes seconds): loading gives up at its next timing, so
    the server exits in seconds, not after the whole load, and says why."""
    from conftest import REPO

    cmd = [sys.executable, "-m", "treespec.cli", "serve", "--bundle", str(REPO / "models" / "default"),
           "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("TREESPEC_")})
    log = []
    for line in proc.stdout:
        log.append(line)
        if "Uvicorn running on" in line:
            break
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        log += proc.stdout.readlines()
        code = proc.wait(60)
    finally:
        proc.kill()
    text = "".join(log)
    assert code in (0, -signal.SIGTERM), text
    assert "stopped while loading" in text and "is ready" not in text and "Traceback" not in text, text
    assert time.monotonic() - t0 < 15, text


def test_a_port_in_use_is_one_clear_line_and_exit_1_before_loading(srv, bundle):
    port = srv.url.rsplit(":", 1)[1]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "treespec.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
                        "--port", port], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("TREESPEC_")})
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"treespec serve: cannot listen on 127.0.0.1:{port}: Address already in use. Is another server "
                     "running there? Stop it, or pick another port with --port (0 picks a free one)."], r.stderr
    assert "loaded" not in r.stdout + r.stderr and time.monotonic() - t0 < 30


def test_generate_routes_need_the_api_key(srv):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for route, b in (("/generate", body), ("/generate_stream", body),
                         ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2})):
            r = httpx.post(srv.url + route, json=b, headers=headers, timeout=30)
            assert r.status_code == 401, (route, headers, r.text)
            assert error_of(r)[1] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(srv.url + "/generate", json=body, headers=AUTH, timeout=60).status_code == 200


def test_cors_allows_only_the_configured_origin(srv):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(srv.url + "/generate", headers={"Origin": ORIGIN, **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    bad = httpx.options(srv.url + "/generate", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers


# ---------------------------------------------------------------- generation and its metrics


def test_generate_reports_details_and_metrics_move_by_exactly_that(srv, client):
    before = srv.wait_idle()
    out = generate(client, PROMPT, max_new_tokens=24, drafter="ngram")
    after = srv.wait_idle()
    d, spec = out["details"], out["details"]["speculative"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 24 == len(d["tokens"])
    assert out["generated_text"] == "".join(t["text"] for t in d["tokens"])
    assert d["seed"] is None  # greedy
    # The repeating prompt gives the n-gram drafter something to propose.
    assert spec["drafter"] == "ngram" and spec["draft_tokens"] > 0
    assert spec["accepted_tokens"] == sum(spec["accepted_per_position"])
    assert spec["draft_tokens"] == sum(spec["drafted_per_position"])
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["draft_tokens"])
    # Every token comes from the prefill or a verify step (accepted drafts + one bonus each).
    assert 1 + spec["verify_steps"] + spec["accepted_tokens"] >= d["generated_tokens"]

    L = {"drafter": "ngram"}
    assert delta(before, after, "treespec_generation_tokens_total", **L) == d["generated_tokens"]
    assert delta(before, after, "treespec_prompt_tokens_total", **L) == d["prompt_tokens"]
    assert delta(before, after, "treespec_spec_decode_num_draft_tokens_total", **L) == spec["draft_tokens"]
    assert delta(before, after, "treespec_spec_decode_num_accepted_tokens_total", **L) == spec["accepted_tokens"]
    assert delta(before, after, "treespec_spec_decode_num_verify_steps_total", **L) == spec["verify_steps"]
    assert delta(before, after, "treespec_spec_decode_model_handbacks_total", **L) == spec["model_handbacks"]
    assert delta(before, after, "treespec_spec_decode_num_drafts_total", **L) == spec["drafted_per_position"][0]
    for j, n in enumerate(spec["accepted_per_position"]):
        assert delta(before, after, "treespec_spec_decode_num_accepted_tokens_per_pos_total",
                     position=j, **L) == n
    assert delta(before, after, "treespec_request_success_total", finish_reason="length", **L) == 1
    for h in ("treespec_time_to_first_token_seconds", "treespec_e2e_request_latency_seconds",
              "treespec_request_queue_time_seconds", "treespec_spec_decode_acceptance_rate"):
        assert delta(before, after, h + "_count", **L) == 1, h
    # One inter-token observation per token after the prefill's.
    assert delta(before, after, "treespec_inter_token_latency_seconds_count", **L) == d["generated_tokens"] - 1
    assert delta(before, after, "treespec_spec_decode_acceptance_rate_sum", **L) == pytest.approx(
        spec["acceptance_rate"])
    assert total(after, "treespec_kv_cache_bytes") == 0  # every cache was freed


def test_stream_matches_generate_event_by_event(srv, client):
    params = {"max_new_tokens": 20, "drafter": "ngram"}
    ref = generate(client, PROMPT, **params)
    with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": params}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert [e["index"] for e in events] == list(range(1, 21))
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None
    last = events[-1]
    assert last["generated_text"] == ref["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert [e["token"] for e in events] == ref["details"]["tokens"]
    assert last["details"]["finish_reason"] == "length"
    assert last["details"]["speculative"] == ref["details"]["speculative"]


def first_clean_stop(toks: list[str], start: int = 1) -> int:
    """The first token k >= start whose text first appears in the output right where it
    begins: used as a stop string, it cuts the output exactly before token k. Chosen
    from the output's own token boundaries, so every output has one (a random tiny
    model's tokens are all different words)."""
    text = "".join(toks)
    return next(k for k in range(start, len(toks))
                if toks[k].strip() and "\ufffd" not in toks[k] and text.find(toks[k]) == len("".join(toks[:k])))


def test_stop_sequence_ends_the_text_before_it(srv, client):
    # Seeded sampling: the tiny model's greedy text repeats one word, its sampled text varies.
    seeded = {"do_sample": True, "temperature": 1.0, "seed": 3}
    free = generate(client, PROMPT, max_new_tokens=30, drafter="none", **seeded)
    toks = [t["text"] for t in free["details"]["tokens"]]
    k = first_clean_stop(toks, len(toks) // 2)  # from the middle of what the model says anyway
    stop = toks[k]
    out = generate(client, PROMPT, max_new_tokens=30, drafter="ngram", stop=[stop], **seeded)
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["generated_text"] == "".join(toks[:k])
    assert out["details"]["generated_tokens"] == k + 1  # the token that completed the stop string counts
    with client.stream("POST", "/generate_stream",
                       json={"inputs": PROMPT, "parameters": {"max_new_tokens": 30, "stop": [stop], **seeded}}) as r:
        events = sse_events(r.iter_lines())
    # Nothing at or after the stop string was ever sent, not even a prefix of it.
    assert "".join(e["token"]["text"] for e in events) == out["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"


def test_openai_completions_stream_and_usage(srv, client):
    before = srv.wait_idle()
    body = {"model": "anything", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    after = srv.wait_idle()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    usage = out["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    L = {"drafter": "ngram"}
    assert delta(before, after, "treespec_prompt_tokens_total", **L) == usage["prompt_tokens"]
    assert delta(before, after, "treespec_generation_tokens_total", **L) == 12

    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        chunks = sse_events(r.iter_lines())
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0].get("finish_reason") for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["usage"] == usage


def test_openai_stop_and_seeded_sampling(srv, client):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    a, b = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    # stop, end to end: the reason, the cut text, and no streamed chunk with any part of it.
    free = generate(client, PROMPT, max_new_tokens=16, temperature=1.0, seed=5)
    toks = [t["text"] for t in free["details"]["tokens"]]
    k = first_clean_stop(toks, 2)
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 5, "stop": [toks[k], "never said"]}
    cut = client.post("/v1/completions", json=body).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == "".join(toks[:k])
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [c for c in sse_events(r.iter_lines()) if c != "[DONE]"]
    # Together the pieces are exactly the cut text: no chunk carried any part of the stop string.
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
        "do_sample": True, "max_new_tokens": 4, "details": True}})
    assert isinstance(r.json()["details"]["seed"], int)  # the server picked one and says which


def test_penalties_reach_the_engine_on_both_apis(srv, client, bundle):
    """The server's penalised greedy text is the decode loop's, run here on the same bundle."""
    from treespec.draft.loop import generate_all
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import load_for_inference

    b, _ = load_for_inference(bundle, "float32")  # the model as the server runs it
    ids = b.tokenizer.encode(PROMPT)

    def local(**pen) -> str:
        return generate_all(b.model, ids, SamplingParams(max_new_tokens=16, **pen), tokenizer=b.tokenizer).text

    plain = generate(client, PROMPT, max_new_tokens=16)["generated_text"]
    assert plain == local()
    tgi = generate(client, PROMPT, max_new_tokens=16, repetition_penalty=1.5, frequency_penalty=0.5)
    assert tgi["generated_text"] == local(repetition_penalty=1.5, frequency_penalty=0.5) != plain
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                             "presence_penalty": 1.0, "repetition_penalty": 1.2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == local(presence_penalty=1.0, repetition_penalty=1.2)


def test_openai_n_completions_are_seeded_choices_run_together(srv, client):
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0.9, "seed": 40, "logprobs": 1}
    before = srv.wait_idle()
    r = client.post("/v1/completions", json={**body, "n": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    after = srv.wait_idle()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for i, c in enumerate(out["choices"]):  # choice i is the request with seed + i
        alone = client.post("/v1/completions", json={**body, "seed": 40 + i}).json()["choices"][0]
        assert c["text"] == alone["text"] and c["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
    assert len({c["text"] for c in out["choices"]}) > 1
    one = client.post("/v1/completions", json=body).json()["usage"]
    assert out["usage"] == {"prompt_tokens": one["prompt_tokens"], "completion_tokens": 30,
                            "total_tokens": one["prompt_tokens"] + 30}  # the prompt once, every choice's tokens
    # The three ran side by side: some forwards held more than one of them.
    assert delta(before, after, "treespec_batch_size_count") < delta(before, after, "treespec_batch_size_sum")
    greedy = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "n": 2}).json()
    assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]


def test_openai_prompt_as_token_ids(srv, client, bundle):
    from treespec.model import load_bundle

    ids = load_bundle(bundle).tokenizer.encode(PROMPT)
    body = {"max_tokens": 6, "temperature": 0, "echo": True, "logprobs": 0}
    as_text = client.post("/v1/completions", json={"prompt": PROMPT, **body}).json()
    for prompt in (ids, [ids]):
        r = client.post("/v1/completions", json={"prompt": prompt, **body})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"] == as_text["choices"] and out["usage"] == as_text["usage"]


def test_tgi_top_tokens_and_prefill_details(srv, client, bundle):
    from treespec.draft.loop import generate_all
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import load_for_inference

    b, _ = load_for_inference(bundle, "float32")  # the model as the server runs it
    ids = b.tokenizer.encode(PROMPT)
    out = generate(client, PROMPT, max_new_tokens=6, top_n_tokens=3, decoder_input_details=True)
    d = out["details"]
    assert len(d["top_tokens"]) == len(d["tokens"]) == 6
    for tok, top in zip(d["tokens"], d["top_tokens"]):
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["id"] == tok["id"] and top[0]["logprob"] == pytest.approx(tok["logprob"], abs=1e-6)  # greedy
    local = generate_all(b.model, ids, SamplingParams(max_new_tokens=6, prompt_logprobs=True), tokenizer=b.tokenizer)
    assert [p["id"] for p in d["prefill"]] == ids and d["prefill"][0]["logprob"] is None
    assert [p["logprob"] for p in d["prefill"][1:]] == pytest.approx(local.prompt.logprobs[1:], abs=1e-5)
    assert "".join(p["text"] for p in d["prefill"]) == PROMPT
    plain = generate(client, PROMPT, max_new_tokens=6)["details"]
    assert plain["top_tokens"] == [] and plain["prefill"] == [] and plain["tokens"] == d["tokens"]

    with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": 6, "top_n_tokens": 3, "decoder_input_details": True}}) as r:
        events = sse_events(r.iter_lines())
    assert [e["top_tokens"] for e in events] == d["top_tokens"]
    assert events[-1]["details"]["prefill"] == d["prefill"]


def test_openai_logprobs_and_echo(srv, client):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    out = client.post("/v1/completions", json=body).json()
    choice, n_in = out["choices"][0], out["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
    for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[t] == v and len(top) == 2 and max(top.values()) == v  # greedy: the chosen one is the top one

    echo = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echo["text"] == PROMPT + choice["text"]
    elp = echo["logprobs"]
    assert len(elp["tokens"]) == n_in + 5 and "".join(elp["tokens"]) == echo["text"]
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert all(v < 0 for v in elp["token_logprobs"][1:])
    assert elp["token_logprobs"][n_in:] == lp["token_logprobs"] and elp["text_offset"][n_in] == len(PROMPT)
    assert elp["text_offset"] == sorted(elp["text_offset"])
    assert client.post("/v1/completions", json={**body, "logprobs": None}).json()["choices"][0]["logprobs"] is None
    # max_tokens 0 scores the prompt alone, as evaluation harnesses ask.
    score = client.post("/v1/completions", json={**body, "echo": True, "max_tokens": 0}).json()
    sc = score["choices"][0]
    assert sc["text"] == PROMPT and sc["finish_reason"] == "length"
    assert sc["logprobs"]["token_logprobs"] == elp["token_logprobs"][:n_in]
    assert score["usage"] == {"prompt_tokens": n_in, "completion_tokens": 0, "total_tokens": n_in}

    with client.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True}) as r:
        chunks = [c for c in sse_events(r.iter_lines()) if c != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == echo["text"]
    for k in ("tokens", "token_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["choices"][0]["logprobs"][k]] == elp[k]


# ---------------------------------------------------------------- bad input


LONG = "word " * (BLOCK + 10)
BAD_INPUTS = [
    # (case, route, body: dict or raw bytes, status, words expected in the error)
    ("empty inputs", "/generate", {"inputs": ""}, 422, "empty"),
    ("whitespace inputs", "/generate", {"inputs": " \n\t "}, 422, "empty"),
    ("prompt longer than the context", "/generate", {"inputs": LONG, "parameters": {"max_new_tokens": 8}}, 422,
     "max_new_tokens must be <="),
    ("prompt of 10k characters", "/generate", {"inputs": "word " * 2000}, 422, "max_new_tokens must be <="),
    ("prompt + max_new_tokens over the context", "/generate",
     {"inputs": "word " * (BLOCK - 20), "parameters": {"max_new_tokens": 30}}, 422, "inputs tokens + max_new_tokens"),
    ("max_new_tokens zero", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422, "max_new_tokens"),
    ("max_new_tokens negative", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": -3}}, 422, "max_new_tokens"),
    ("max_new_tokens huge", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}, 422, "max_new_tokens"),
    ("temperature negative", "/generate", {"inputs": "hi", "parameters": {"temperature": -0.1}}, 422, "temperature"),
    ("top_p zero", "/generate", {"inputs": "hi", "parameters": {"top_p": 0}}, 422, "top_p"),
    ("top_p above one", "/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "top_p"),
    ("top_k negative", "/generate", {"inputs": "hi", "parameters": {"top_k": -1}}, 422, "top_k"),
    ("five stop strings", "/generate", {"inputs": "hi", "parameters": {"stop": list("abcde")}}, 422, "at most 4"),
    ("empty stop string", "/generate", {"inputs": "hi", "parameters": {"stop": ["x", ""]}}, 422, "must not be empty"),
    ("unknown drafter", "/generate", {"inputs": "hi", "parameters": {"drafter": "magic"}}, 422, "unknown drafter"),
    ("tree drafter on a bundle without one", "/generate", {"inputs": "hi", "parameters": {"drafter": "tree"}}, 422,
     "not available"),
    ("k_max zero", "/generate", {"inputs": "hi", "parameters": {"k_max": 0}}, 422, "k_max"),
    ("not JSON", "/generate", b"{inputs: hi", 422, "not valid JSON"),
    ("JSON NaN", "/generate", b'{"inputs": "hi", "parameters": {"temperature": NaN}}', 422, "NaN"),
    ("wrong type: inputs", "/generate", {"inputs": 42}, 422, "inputs"),
    ("wrong type: max_new_tokens", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, 422,
     "max_new_tokens"),
    ("wrong type: stop", "/generate", {"inputs": "hi", "parameters": {"stop": "x"}}, 422, "stop"),
    ("wrong type: body", "/generate", b"[1, 2]", 422, "validation"),
    ("missing inputs", "/generate", {"parameters": {}}, 422, "inputs"),
    ("unsupported option", "/generate", {"inputs": "hi", "parameters": {"typical_p": 0.5}}, 422, "not supported"),
    ("repetition_penalty zero", "/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 0}}, 422,
     "repetition_penalty"),
    ("frequency_penalty above two", "/generate", {"inputs": "hi", "parameters": {"frequency_penalty": 2.5}}, 422,
     "frequency_penalty"),
    ("openai: presence_penalty below minus two", "/v1/completions", {"prompt": "hi", "presence_penalty": -2.5}, 422,
     "presence_penalty"),
    ("invalid UTF-8", "/generate", b'{"inputs": "caf\xc3\x28 \xff"}', 422, "UTF-8"),
    ("lone surrogate", "/generate", b'{"inputs": "a\\ud800b"}', 422, "UTF-8"),
    ("stream: bad input", "/generate_stream", {"inputs": "", "parameters": {}}, 422, "empty"),
    ("openai: empty prompt", "/v1/completions", {"prompt": "  "}, 422, "empty"),
    ("openai: max_tokens zero without echo", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422,
     "max_tokens=0 only scores the prompt"),
    ("openai: n above 16", "/v1/completions", {"prompt": "hi", "n": 17}, 422, "n"),
    ("openai: logprobs above 5", "/v1/completions", {"prompt": "hi", "logprobs": 6}, 422, "logprobs"),
    ("top_n_tokens above 5", "/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 6}}, 422, "top_n_tokens"),
    ("openai: empty prompt list", "/v1/completions", {"prompt": []}, 422, "prompt list is empty"),
    ("openai: more completions than the server ever admits", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 2},
     422, "at most 4 at once"),
    ("openai: suffix", "/v1/completions", {"prompt": "hi", "suffix": "x"}, 422, "suffix is not supported"),
    ("openai: logit_bias above 100", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 422,
     "logit_bias values must be in"),
    ("openai: logit_bias key not a token id", "/v1/completions", {"prompt": "hi", "logit_bias": {"five": 1}}, 422,
     "logit_bias keys must be token ids"),
    ("chat: no messages", "/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("chat: unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    # float32's edge: a logit divided by this overflows (NaN probabilities, then a 500 on details)
    ("repetition_penalty 1e-39", "/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e-39}}, 422,
     "repetition_penalty must be >= 0.01"),
    ("JSON nested 1000 deep", "/generate", b"[" * 1000 + b"]" * 1000, 422, "nested too deeply"),
    ("openai: token id past the vocabulary", "/v1/completions", {"prompt": [5, 50300]}, 422, "token ids must be in"),
    ("openai: empty token list", "/v1/completions", {"prompt": [[]]}, 422, "token list is empty"),
    ("openai: five stops", "/v1/completions", {"prompt": "hi", "stop": list("abcde")}, 422, "at most 4"),
    ("oversized body", "/generate", {"inputs": "x" * (MAX_BODY + 1)}, 413, "larger than"),
]


@pytest.mark.parametrize("case,route,body,status,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(srv, client, case, route, body, status, words):
    before = srv.metrics()
    if isinstance(body, bytes):
        r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    if route.startswith("/v1/"):  # OpenAI's shape, which its SDK reads the message from
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
        err = {"error": err["error"]["message"], "error_type": err["error"]["type"]}
    assert set(err) == {"error", "error_type"}
    assert err["error_type"] == ("validation" if status == 422 else "payload_too_large")
    assert words.lower() in err["error"].lower(), err["error"]
    reason = "validation" if status == 422 else "too_large"
    assert delta(before, srv.metrics(), "treespec_request_failure_total", reason=reason) == 1
    assert httpx.get(srv.url + "/health").status_code == 200


def test_oversized_chunked_body_is_cut_off_at_the_limit(srv, client):
    def chunks():  # no Content-Length: the server has to count as it reads
        for _ in range(MAX_BODY // 1024 + 4):
            yield b" " * 1024

    r = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert generate(client, PROMPT, max_new_tokens=2)["details"]["generated_tokens"] == 2


# ---------------------------------------------------------------- faults, load, cancellation


def test_an_exception_fails_only_its_own_request(srv, client):
    before = srv.wait_idle()
    r = client.post("/generate", json={"inputs": "[[fail]] " + PROMPT, "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 500, r.text
    assert r.json()["error_type"] == "generation" and "injected fault" in r.json()["error"]
    with client.stream("POST", "/generate_stream",
                       json={"inputs": "[[fail]] " + PROMPT, "parameters": {"max_new_tokens": 8}}) as s:
        events = sse_events(s.iter_lines())
    assert events[-1]["error_type"] == "generation"
    assert all("token" in e for e in events[:-1])
    out = generate(client, PROMPT, max_new_tokens=6)
    assert out["details"]["generated_tokens"] == 6
    after = srv.wait_idle()
    assert delta(before, after, "treespec_request_failure_total", reason="internal") == 2
    assert delta(before, after, "treespec_request_success_total") == 1
    assert total(after, "treespec_kv_cache_bytes") == 0


def test_sixteen_parallel_requests_each_succeed_or_get_429_quickly(srv):
    """With max_running=2 and max_waiting=2, sixteen long requests at once: exactly four
    are admitted (two run, two wait, as the waiting gauge shows) and twelve are turned
    away at once, each 429 in well under a second, with Retry-After."""
    before = srv.wait_idle()
    n_steps = 40  # 40 verify steps at 50 ms: 2 s each, far longer than the burst takes to arrive

    async def timed(c, body):
        t0 = time.monotonic()
        r = await c.post("/generate", json=body)
        return r, time.monotonic() - t0

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as c:
            body = {"inputs": "[[slow]] " + PROMPT, "parameters": {"max_new_tokens": n_steps, "drafter": "none"}}
            burst = asyncio.gather(*(timed(c, body) for _ in range(16)))
            seen = set()  # (running, waiting) as the gauges showed them
            while not burst.done():
                m = await asyncio.to_thread(srv.metrics)
                seen.add((total(m, "treespec_requests_running"), total(m, "treespec_requests_waiting")))
                await asyncio.sleep(0.05)
            return await burst, seen

    results, seen = asyncio.run(main())
    codes = [r.status_code for r, _ in results]
    assert sorted(codes) == [200] * (MAX_RUNNING + MAX_WAITING) + [429] * (16 - MAX_RUNNING - MAX_WAITING), \
        [r.text for r, _ in results]
    # Two ran while two waited; admitted requests queue first, so for an instant all four may wait.
    assert (MAX_RUNNING, MAX_WAITING) in seen and all(r + w <= MAX_RUNNING + MAX_WAITING for r, w in seen), seen
    for r, seconds in results:
        if r.status_code == 429:
            assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            assert r.headers["retry-after"] == "1"  # clients (the OpenAI SDK among them) back off by it
            assert seconds < 0.5, seconds  # turned away at once, not queued
        else:
            assert r.json()["generated_text"] is not None
    after = srv.wait_idle()
    assert delta(before, after, "treespec_request_failure_total", reason="overloaded") == 12
    assert delta(before, after, "treespec_request_success_total") == 4


def test_concurrent_seeded_requests_match_their_solo_runs(srv, client):
    reqs = [
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "do_sample": True, "seed": 1, "drafter": "ngram"}},
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 16, "temperature": 1.3, "top_k": 50, "seed": 2,
                                          "drafter": "none"}},
        {"inputs": "the cat sat on the mat and the cat", "parameters": {"max_new_tokens": 16, "seed": 3,
                                                                        "top_p": 0.9, "drafter": "ngram"}},
        {"inputs": "hello hello hello", "parameters": {"max_new_tokens": 16}},
    ]
    assert len(reqs) <= MAX_RUNNING + MAX_WAITING  # all admitted at once: no 429 here
    for r in reqs:
        r["parameters"]["details"] = True

    def forwards(outs) -> int:  # each request's prefill and verify steps
        return sum(o["details"]["speculative"]["verify_steps"] + 1 for o in outs)

    before = srv.wait_idle()
    solo = [client.post("/generate", json=r).json() for r in reqs]
    mid = srv.wait_idle()
    # Alone, every forward is a batch of one.
    assert delta(before, mid, "treespec_batch_size_count") == delta(before, mid, "treespec_batch_size_sum") \
        == forwards(solo)

    async def together():
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(c.post("/generate", json=r) for r in reqs))

    rs = asyncio.run(together())
    after = srv.wait_idle()
    assert [r.status_code for r in rs] == [200] * len(reqs), [r.text for r in rs]
    assert [r.json()["generated_text"] for r in rs] == [o["generated_text"] for o in solo]
    # Together, their forwards ran in batches (up to max_running of them), and every one was run once.
    assert delta(mid, after, "treespec_batch_size_sum") == forwards([r.json() for r in rs])
    assert delta(mid, after, "treespec_batch_size_count") < delta(mid, after, "treespec_batch_size_sum")
    assert delta(mid, after, "treespec_batch_size_bucket", le="1.0") < delta(mid, after, "treespec_batch_size_count")


def test_without_batching_every_forward_runs_alone(bundle):
    server = start_server(bundle, "--max-running", "3", "--no-batching", env={"TREESPEC_THREADS": "1"})
    try:
        reqs = [{"inputs": p, "parameters": {"max_new_tokens": 12, "details": True, "drafter": d}}
                for p, d in ((PROMPT, "ngram"), ("hello hello hello", "none"), ("the cat sat", "ngram"))]
        with server.client() as c:
            solo = [c.post("/generate", json=r).json() for r in reqs]

        async def together():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/generate", json=r) for r in reqs))

        before = server.wait_idle()
        rs = [r.json() for r in asyncio.run(together())]
        after = server.wait_idle()
        assert [r["generated_text"] for r in rs] == [o["generated_text"] for o in solo]
        n = sum(r["details"]["speculative"]["verify_steps"] + 1 for r in rs)
        assert delta(before, after, "treespec_batch_size_count") == delta(before, after, "treespec_batch_size_sum") == n
    finally:
        stop_server(server)


def _generated(srv) -> float:
    return total(srv.metrics(), "treespec_generation_tokens_total")


def _wait_stable(srv, quiet: float = 1.0, timeout: float = 30) -> float:
    """The generation-token counter once it has not moved for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = _generated(srv), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "generation never stopped"
        time.sleep(0.1)
        now = _generated(srv)
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_client_disconnect_mid_stream_stops_compute(srv, client):
    before = srv.wait_idle()
    n_max = 100  # at 50 ms a step, 5 s of work if nothing stopped it
    body = {"inputs": "[[slow]] hi", "parameters": {"max_new_tokens": n_max, "drafter": "none"}}
    got = 0
    with client.stream("POST", "/generate_stream", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                got += 1
                if got == 3:
                    break  # leaving the block closes the connection mid-stream
    stopped_at = _wait_stable(srv)
    after = srv.wait_idle()
    produced = stopped_at - total(before, "treespec_generation_tokens_total")
    # Compute stopped: far fewer tokens than asked for were ever generated,
    # the scheduler counted a cancellation (not a success), and the cache is gone.
    assert got <= produced < n_max / 2, produced
    assert delta(before, after, "treespec_request_failure_total", reason="cancelled") == 1
    assert delta(before, after, "treespec_request_success_total") == 0
    assert total(after, "treespec_kv_cache_bytes") == 0
    assert generate(client, PROMPT, max_new_tokens=3)["details"]["generated_tokens"] == 3


def test_client_disconnect_on_generate_stops_compute(srv):
    before = srv.wait_idle()
    body = {"inputs": "[[slow]] hi", "parameters": {"max_new_tokens": 100, "drafter": "none"}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/generate", json=body, headers=AUTH, timeout=httpx.Timeout(30, read=0.5))
    stopped_at = _wait_stable(srv)
    after = srv.wait_idle()
    assert stopped_at - total(before, "treespec_generation_tokens_total") < 50
    assert delta(before, after, "treespec_request_failure_total", reason="cancelled") == 1


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a response: not JSON"))


def test_values_at_float32_s_edge_never_put_nan_on_the_wire(srv, client):
    """temperature 1e-39 (below 1e-5 decodes greedily, as vLLM) and top_p 1e-45 (the top
    token always stays) give the greedy tokens with finite log-probabilities, on every route."""
    ref = generate(client, PROMPT, max_new_tokens=4, top_n_tokens=2)
    for extra in ({"temperature": 1e-39, "do_sample": True, "seed": 1}, {"top_p": 1e-45, "do_sample": True, "seed": 1}):
        r = client.post("/generate", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": 4, "details": True, "top_n_tokens": 2, **extra}})
        assert r.status_code == 200, r.text
        out = _strict_json(r.text)
        assert [t["id"] for t in out["details"]["tokens"]] == [t["id"] for t in ref["details"]["tokens"]]
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 1e-39, "logprobs": 2, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    text = "".join(_strict_json(line[5:])["choices"][0]["text"] for line in lines)
    assert text == ref["generated_text"]


def test_client_that_leaves_mid_upload_is_one_log_line_not_an_error(srv):
    import socket

    before = srv.wait_idle()
    n_log = len(srv.log)
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
                     b'{"inputs": "hel')
        time.sleep(0.3)  # the server is now reading the body
    deadline = time.monotonic() + 10
    while delta(before, srv.metrics(), "treespec_request_failure_total", reason="disconnected") < 1:
        assert time.monotonic() < deadline, "".join(srv.log[n_log:])
        time.sleep(0.05)
    after = srv.metrics()
    assert delta(before, after, "treespec_request_failure_total", reason="internal") == 0
    new = "".join(srv.log[n_log:])
    assert "client left /generate while sending its request body" in new and "Traceback" not in new


def test_a_queued_request_whose_client_left_gives_its_slot_back(srv, client):
    """With running and waiting both full, a waiting client that hangs up frees its
    waiting slot at once (not when it would have reached the front)."""
    before = srv.wait_idle()
    slow = {"inputs": "[[slow]] hi", "parameters": {"max_new_tokens": 60, "drafter": "none"}}
    runners = []

    def run():
        runners.append(httpx.post(srv.url + "/generate", json=slow, headers=AUTH, timeout=60).status_code)

    threads = [threading.Thread(target=run) for _ in range(MAX_RUNNING)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while total(srv.metrics(), "treespec_requests_running") < MAX_RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = [httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) for _ in range(MAX_WAITING)]
    streams = [c.stream("POST", "/generate_stream", json=slow) for c in waiting]
    responses = [st.__enter__() for st in streams]  # admitted: headers come back while they wait
    assert total(srv.metrics(), "treespec_requests_waiting") == MAX_WAITING
    full = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
    assert full.status_code == 429
    for st, c in zip(streams, waiting):  # both waiting clients hang up
        st.__exit__(None, None, None)
        c.close()
    deadline = time.monotonic() + 5
    while total(srv.metrics(), "treespec_requests_waiting") > 0:
        assert time.monotonic() < deadline, "the waiting slots were not given back"
        time.sleep(0.02)
    assert total(srv.metrics(), "treespec_requests_running") == MAX_RUNNING  # the runners still run
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text  # admitted: it waits behind the runners
    for t in threads:
        t.join()
    assert runners == [200] * MAX_RUNNING and all(x.status_code == 200 for x in responses)
    after = srv.wait_idle()
    assert delta(before, after, "treespec_request_failure_total", reason="cancelled") == MAX_WAITING
    assert delta(before, after, "treespec_request_failure_total", reason="overloaded") == 1


# ---------------------------------------------------------------- shutdown


def test_graceful_shutdown_finishes_in_flight_requests_then_cancels_stragglers(bundle):
    server = start_server(bundle, "--graceful-timeout", "3", env={"TREESPEC_DEBUG_FAULTS": "1"})
    results: dict[str, list] = {}

    def stream(name: str, n: int):
        body = {"inputs": "[[slow]] hi", "parameters": {"max_new_tokens": n, "drafter": "none"}}
        events = []
        try:
            with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
        except httpx.HTTPError as e:
            events.append(e)
        results[name] = events

    threads = [threading.Thread(target=stream, args=("short", 10)),
               threading.Thread(target=stream, args=("long", 120))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while total(server.metrics(), "treespec_requests_running") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    stop_server(server)
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 30
    # The short request finished normally during the grace period ...
    assert results["short"][-1]["details"]["finish_reason"] == "length"
    assert len(results["short"]) == 10
    # ... the long one was cancelled after it, well before its 120 tokens, and
    # told so in a last event rather than by a cut connection.
    long = results["long"]
    assert long[-1] == {"error": "Request cancelled (the server is shutting down)", "error_type": "cancelled"}
    assert all("token" in e and e["details"] is None for e in long[:-1])
    assert 10 <= len(long) - 1 < 120
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)


# ---------------------------------------------------------------- the load benchmark


def test_load_benchmark_reports_what_the_server_counted(srv):
    from treespec.cli.loadtest import run_load

    before = srv.wait_idle()
    r = asyncio.run(run_load(srv.url, concurrency=6, duration=1.5, max_new_tokens=4, prompts=[PROMPT, "hi there"],
                             api_key=API_KEY, progress=False))
    after = srv.wait_idle()
    assert r["errors"] == 0, r["error_examples"]
    assert r["ok"] >= 1 and r["requests"] == r["ok"] + r["rejected_429"]
    assert delta(before, after, "treespec_request_success_total") == r["ok"]
    assert delta(before, after, "treespec_request_failure_total", reason="overloaded") == r["rejected_429"]
    assert delta(before, after, "treespec_generation_tokens_total") == 4 * r["ok"]
    assert r["tokens_per_s"] * r["wall_s"] == pytest.approx(4 * r["ok"])
    p = r["e2e_s"]
    assert 0 < r["ttft_s"]["p50"] <= p["p99"] and p["p50"] <= p["p95"] <= p["p99"]
    # The JSON keeps what the figures were measured with: the server's /info (kernels, model).
    from treespec.cli.loadtest import _server_info

    info = _server_info(srv.url, API_KEY)
    assert info is not None and info["kernels"]["precision"] and info == srv.client().get("/info").json()


# ---------------------------------------------------------------- the tree drafter, live


def test_tree_drafter_serves_through_a_live_server(fitted):
    """A bundle with a fitted tree: the server picks it by default, drafts with
    it, stays lossless, and counts its drafts and handbacks under its label."""
    path, _ = fitted
    server = start_server(path, env={"TREESPEC_THREADS": "1"})
    try:
        with server.client() as c:
            info = c.get("/info").json()["drafters"]
            assert info["default"] == "tree" and "tree" in info["available"]
            assert info["settings"]["tree"]["classes"] == info["settings"]["tree"]["token_classes"] + 2
            # Its costs were timed on this machine at startup, not taken from the fit (--verify-ms 1.9,...).
            cal = info["settings"]["tree"]["calibration"]
            assert cal["fitted"]["verify_ms"] == [1.9, 1.9, 1.9, 3.2] and cal["threads"] == 1
            assert info["settings"]["tree"]["verify_ms"] == cal["here"]["verify_ms"]
            # ... and they are the ones the startup log reports as timed here.
            here = [round(v, 2) for v in cal["here"]["verify_ms"]]
            assert f"verify {here} ms for T=1..4 (fitted: [1.9, 1.9, 1.9, 3.2])" in "".join(server.log)
            tree_meta = json.loads((path / "draft" / "meta.json").read_text())["settings"]
            assert info["settings"]["tree"]["trust_match"] == tree_meta["trust_match"]
            assert (info["settings"]["tree"]["copy_lengths"] is None) == (tree_meta.get("copy_lengths") is None)
            assert info["settings"]["tree"]["corpus_bigram"] == tree_meta["corpus_bigram"]["tokens"] > 0
            prompt = "the cat sat on a mat and then it ran. the cat sat on a mat and then"
            before = server.wait_idle()
            tree = generate(c, prompt, max_new_tokens=16)  # the default drafter
            after = server.wait_idle()
            plain = generate(c, prompt, max_new_tokens=16, drafter="none")
            # Seeded sampling: the tree's drafts do not change which tokens the seed gives.
            sampled = [c.post("/generate", json={"inputs": prompt, "parameters": {
                "max_new_tokens": 16, "do_sample": True, "temperature": 0.9, "seed": 7, "drafter": d}}).json()
                for d in ("tree", "none")]
        assert sampled[0]["generated_text"] == sampled[1]["generated_text"]
        spec = tree["details"]["speculative"]
        assert spec["drafter"] == "tree" and spec["draft_tokens"] > 0
        assert tree["generated_text"] == plain["generated_text"]
        L = {"drafter": "tree"}
        assert delta(before, after, "treespec_spec_decode_num_draft_tokens_total", **L) == spec["draft_tokens"]
        assert delta(before, after, "treespec_spec_decode_model_handbacks_total", **L) == spec["model_handbacks"]
        assert delta(before, after, "treespec_spec_decode_skipped_proposals_total", **L) == spec["skipped_proposals"]
        assert delta(before, after, "treespec_spec_decode_num_guess_tokens_total", **L) == spec["guess_tokens"]
        assert delta(before, after, "treespec_spec_decode_num_accepted_guesses_total", **L) == spec["accepted_guesses"]
        assert spec["accepted_guesses"] <= spec["guess_tokens"] <= spec["draft_tokens"]
        assert delta(before, after, "treespec_request_success_total", **L) == 1
    finally:
        stop_server(server)
