"""Stock clients against a live server, unchanged: OpenAI's SDK (models,
completions with batched prompts, chat, streaming and not) and
huggingface_hub's InferenceClient (TGI's root route), plus the tokenizer
routes and the offline /docs page.

One ``treespec serve`` process on a tiny random bundle that carries the
plain transcript chat template. Answers are checked against ``/generate``
for the same greedy request, so what a client shows is what the decode loop
made.
"""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import tiny_model
from test_server import error_of, first_clean_stop, sse_events, start_server, stop_server

API_KEY = "clients-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BLOCK = 128
PROMPTS = ["one two three four one two three", "def f(x):\n    return x"]


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory, ranks_path):
    from treespec.model import save_bundle
    from treespec.model.bundle import update_bundle_meta
    from treespec.server.chat import TRANSCRIPT_STOP, TRANSCRIPT_TEMPLATE

    path = save_bundle(tmp_path_factory.mktemp("clients") / "tiny-chat", tiny_model(block_size=BLOCK), ranks_path)
    update_bundle_meta(path, chat_template=TRANSCRIPT_TEMPLATE, chat_stop=TRANSCRIPT_STOP)
    return path


@pytest.fixture(scope="module")
def srv(chat_bundle):
    server = start_server(chat_bundle, "--max-running", "4",
                          env={"TREESPEC_API_KEY": API_KEY, "TREESPEC_MAX_WAITING": "8", "TREESPEC_THREADS": "1",
                               "TREESPEC_DTYPE": "float32"})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def http(srv):
    with srv.client(headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def oai(srv):
    import openai  # the test extra has it

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)


def greedy_text(http: httpx.Client, inputs: str, n: int, **params) -> dict:
    r = http.post("/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": n, "details": True, **params}})
    assert r.status_code == 200, r.text
    return r.json()


def transcript(messages: list[dict]) -> str:
    from treespec.server.chat import TRANSCRIPT_TEMPLATE, ChatTemplate

    return ChatTemplate(TRANSCRIPT_TEMPLATE, "<|endoftext|>").render(messages)


# ---------------------------------------------------------------- OpenAI SDK


def test_openai_models_list_and_retrieve(oai, chat_bundle):
    import openai

    models = oai.models.list().data
    assert [m.id for m in models] == [chat_bundle.name]
    m = oai.models.retrieve(chat_bundle.name)
    assert m.id == chat_bundle.name and m.object == "model" and m.owned_by == "treespec"
    assert m.model_extra["max_model_len"] == BLOCK
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-4")


def test_openai_batched_prompts_are_one_choice_each_in_openai_order(oai, http):
    want = [greedy_text(http, p, 6)["generated_text"] for p in PROMPTS]
    out = oai.completions.create(model="x", prompt=PROMPTS, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt-major: prompt i, choice j -> i * n + j
    assert [c.text for c in out.choices] == [want[0], want[0], want[1], want[1]]
    assert out.usage.completion_tokens == 4 * 6
    ids = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in PROMPTS]
    assert out.usage.prompt_tokens == sum(ids)  # each prompt counted once, not n times
    # Token-id prompts, batched, give the same.
    tok_prompts = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in PROMPTS]
    out2 = oai.completions.create(model="x", prompt=tok_prompts, max_tokens=6, temperature=0)
    assert [c.text for c in out2.choices] == want
    # Streamed, several choices interleave; each one's pieces add up to its text.
    texts, finished = {}, {}
    stream = oai.completions.create(model="x", prompt=PROMPTS, max_tokens=6, temperature=0, n=2, stream=True)
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
                assert c.model_extra["speculative"]["drafter"] in ("ngram", "none", "tree")
    assert texts == {0: want[0], 1: want[0], 2: want[1], 3: want[1]}
    assert finished == {i: "length" for i in range(4)}


def test_openai_seeded_choices_reproduce(oai):
    a = oai.completions.create(model="x", prompt=PROMPTS[0], max_tokens=8, temperature=0.9, seed=11, n=3)
    b = oai.completions.create(model="x", prompt=PROMPTS[0], max_tokens=8, temperature=0.9, seed=11, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # seed + i: the choices differ from each other


def test_openai_chat_matches_the_template_prompt(oai, http):
    messages = [{"role": "system", "content": "Count."}, {"role": "user", "content": "one two three"}]
    prompt = transcript(messages)
    assert prompt == "Count.\n\nUser: one two three\nAssistant:"
    ref = greedy_text(http, prompt, 7, stop=["\nUser:"])
    out = oai.chat.completions.create(model="x", messages=messages, max_tokens=7, temperature=0)
    c = out.choices[0]
    assert c.message.role == "assistant" and c.message.content == ref["generated_text"]
    assert c.finish_reason == {"length": "length", "stop_sequence": "stop", "eos_token": "stop"}[
        ref["details"]["finish_reason"]]
    assert out.usage.prompt_tokens == ref["details"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["details"]["generated_tokens"]
    assert c.model_extra["speculative"]["verify_steps"] == ref["details"]["speculative"]["verify_steps"]
    # max_completion_tokens is the same thing under its newer name.
    new = oai.chat.completions.create(model="x", messages=messages, max_completion_tokens=7, temperature=0)
    assert new.choices[0].message.content == c.message.content
    # Streamed: the role first, then pieces that add up to the same text.
    chunks = list(oai.chat.completions.create(model="x", messages=messages, max_tokens=7, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_chat_n_seed_stop_and_logprobs(oai, http):
    messages = [{"role": "user", "content": "one two three four one two"}]
    prompt = transcript(messages)
    ref = greedy_text(http, prompt, 10, top_n_tokens=2)
    toks = [t["text"] for t in ref["details"]["tokens"]]
    # A stop string from the output's own token boundaries: the text is cut before it.
    k = first_clean_stop(toks, 2)
    stop = toks[k]
    out = oai.chat.completions.create(model="x", messages=messages, max_tokens=10, temperature=0, stop=[stop],
                                      logprobs=True, top_logprobs=2)
    c = out.choices[0]
    assert c.finish_reason == "stop" and c.message.content == "".join(toks[:k])
    # The tokens generated, the one that completed the stop string included (as /generate's details).
    lp = c.logprobs.content
    assert [e.token for e in lp] == toks[:k + 1]
    assert [e.logprob for e in lp] == pytest.approx([t["logprob"] for t in ref["details"]["tokens"][:k + 1]],
                                                    abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and bytes(e.bytes).decode() == e.token for e in lp)
    # No streamed piece leaks any part of the stop string.
    pieces = [ch.choices[0].delta.content or "" for ch in oai.chat.completions.create(
        model="x", messages=messages, max_tokens=10, temperature=0, stop=[stop], stream=True) if ch.choices]
    assert "".join(pieces) == c.message.content and stop not in "".join(pieces)
    # n seeded choices: reproducible, and streamed interleaved by index.
    a = oai.chat.completions.create(model="x", messages=messages, max_tokens=6, temperature=1.0, seed=5, n=3)
    b = oai.chat.completions.create(model="x", messages=messages, max_tokens=6, temperature=1.0, seed=5, n=3)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
    streamed = {}
    for ch in oai.chat.completions.create(model="x", messages=messages, max_tokens=6, temperature=1.0, seed=5, n=3,
                                          stream=True):
        for x in ch.choices:
            streamed[x.index] = streamed.get(x.index, "") + (x.delta.content or "")
    assert streamed == {i: x.message.content for i, x in enumerate(a.choices)}


def test_openai_logit_bias_steers_and_bans(oai, http):
    ref = greedy_text(http, PROMPTS[0], 6)
    first = ref["details"]["tokens"][0]["id"]
    banned = oai.completions.create(model="x", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                    logit_bias={str(first): -100})
    assert banned.choices[0].text != ref["generated_text"]
    forced = oai.completions.create(model="x", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                    logit_bias={"318": 100})
    ids = http.post("/tokenize", json={"prompt": forced.choices[0].text}).json()["tokens"]
    assert ids == [318] * 4
    chat = oai.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logit_bias={"318": 100})
    assert chat.choices[0].message.content == forced.choices[0].text[:len(chat.choices[0].message.content)]


def test_openai_refusals_are_422_with_the_reason(oai):
    import openai

    for kw, words in ((dict(suffix="x"), "suffix is not supported"),
                      (dict(logit_bias={"5": 150}), "logit_bias values must be in"),
                      (dict(logit_bias={"99999": 1}), "logit_bias token ids must be in")):
        with pytest.raises(openai.UnprocessableEntityError, match=words):
            oai.completions.create(model="x", prompt="hi", max_tokens=2, **kw)
    for kw, words in ((dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
                      (dict(response_format={"type": "json_object"}), "response_format"),
                      (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                       "only text content")):
        args = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
        with pytest.raises(openai.UnprocessableEntityError, match=words):
            oai.chat.completions.create(**args)


def test_chat_without_a_template_is_a_400_that_says_so(tmp_path, ranks_path):
    import openai

    from treespec.model import save_bundle

    bundle = save_bundle(tmp_path / "plain", tiny_model(block_size=BLOCK), ranks_path)
    server = start_server(bundle, env={"TREESPEC_THREADS": "1", "TREESPEC_DTYPE": "float32"})
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert client.completions.create(model="x", prompt="hi", max_tokens=2).choices[0].finish_reason == "length"
    finally:
        stop_server(server)


# ---------------------------------------------------------------- huggingface_hub (TGI's clients)


def test_inference_client_text_generation_on_tgi_root_route(srv, http):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=srv.url, api_key=API_KEY)
    ref = greedy_text(http, PROMPTS[0], 8, top_n_tokens=2, decoder_input_details=True)
    assert client.text_generation(PROMPTS[0], max_new_tokens=8) == ref["generated_text"]
    out = client.text_generation(PROMPTS[0], max_new_tokens=8, details=True, top_n_tokens=2,
                                 decoder_input_details=True)
    assert out.generated_text == ref["generated_text"]
    assert [t.id for t in out.details.tokens] == [t["id"] for t in ref["details"]["tokens"]]
    assert [t.id for t in out.details.prefill] == [t["id"] for t in ref["details"]["prefill"]]
    assert len(out.details.top_tokens) == 8 and all(len(t) == 2 for t in out.details.top_tokens)
    # Streaming, with and without details: the same tokens, as TGI streams them.
    streamed = list(client.text_generation(PROMPTS[0], max_new_tokens=8, stream=True))
    assert "".join(streamed) == ref["generated_text"]
    events = list(client.text_generation(PROMPTS[0], max_new_tokens=8, stream=True, details=True))
    assert [e.token.id for e in events] == [t["id"] for t in ref["details"]["tokens"]]
    assert events[-1].details.finish_reason == "length" and events[-1].generated_text == ref["generated_text"]
    # stop, seed and do_sample reach the decode loop.
    toks = [t["text"] for t in ref["details"]["tokens"]]
    k = first_clean_stop(toks)
    cut = client.text_generation(PROMPTS[0], max_new_tokens=8, stop=[toks[k]], details=True)
    assert cut.generated_text == "".join(toks[:k]) and cut.details.finish_reason == "stop_sequence"
    s1 = client.text_generation(PROMPTS[0], max_new_tokens=8, do_sample=True, seed=3, temperature=0.9)
    s2 = client.text_generation(PROMPTS[0], max_new_tokens=8, do_sample=True, seed=3, temperature=0.9)
    assert s1 == s2


def test_root_route_answers_as_tgi_does(http):
    ref = greedy_text(http, PROMPTS[1], 5)
    r = http.post("/", json={"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200 and r.json() == [{"generated_text": ref["generated_text"], "details": None}]
    with http.stream("POST", "/", json={"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 5},
                                        "stream": True}) as s:
        events = sse_events(s.iter_lines())
    assert "".join(e["token"]["text"] for e in events) == ref["generated_text"]


# ---------------------------------------------------------------- tokenizer routes and docs


def test_tokenize_and_detokenize_in_vllm_and_tgi_shapes(http):
    text = "def f(x):\n    return café"
    v = http.post("/tokenize", json={"prompt": text}).json()
    assert v["count"] == len(v["tokens"]) and v["max_model_len"] == BLOCK
    assert http.post("/detokenize", json={"tokens": v["tokens"]}).json() == {"prompt": text}
    tgi = http.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tgi] == v["tokens"]
    assert "".join(text[t["start"]:t["stop"]] for t in tgi) == text and tgi[0]["start"] == 0
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"] == "User: hi\nAssistant:"
    # The end-of-text token as vLLM's tokenizer reads it, and the info a remote tokenizer needs.
    assert http.post("/tokenize", json={"prompt": "a<|endoftext|>"}).json()["tokens"] == [64, 50256]
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == BLOCK
    assert info["chat_template"].startswith("{% for m in messages %}")
    bad = http.post("/detokenize", json={"tokens": [1, 60000]})
    assert bad.status_code == 422 and "token ids must be in" in error_of(bad)[0]
    both = http.post("/tokenize", json={"prompt": "a", "inputs": "b"})
    assert both.status_code == 422 and "exactly one of" in error_of(both)[0]


def test_docs_page_works_offline(srv):
    page = httpx.get(srv.url + "/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn." not in page.text  # nothing to fetch from the internet
    js = httpx.get(srv.url + "/docs-assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    css = httpx.get(srv.url + "/docs-assets/swagger-ui.css")
    assert css.status_code == 200
    schema = httpx.get(srv.url + "/openapi.json").json()
    assert {"/", "/v1/chat/completions", "/v1/models", "/tokenize"} <= set(schema["paths"])
    assert "/docs" in httpx.get(srv.url + "/redoc").text


def test_json_routes_refuse_other_content_types(srv):
    """A browser may POST text/plain cross-origin without a preflight: that must not run a generation."""
    for route in ("/generate", "/", "/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = httpx.post(srv.url + route, content=json.dumps({"inputs": "hi", "prompt": "hi"}),
                       headers={**AUTH, "Content-Type": "text/plain"})
        assert r.status_code == 415, (route, r.text)
        assert error_of(r) == ("Content-Type must be application/json, got text/plain", "unsupported_media_type")
