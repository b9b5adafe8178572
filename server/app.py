"""The HTTP layer: ``build_app(settings)`` returns a FastAPI app with thin routes.

Routes parse the body themselves (``read_body``) rather than through
FastAPI's body parameters, so that every bad body gets TGI's error shape:
415 unless it is declared JSON (a browser's cross-origin ``text/plain`` POST
needs no preflight, so any web page could otherwise make a keyless local
server compute), 413 before an oversized body is read, 422 for invalid
UTF-8, non-JSON, nesting too deep, NaN/Infinity and wrong types.

Routes: TGI's ``/``, ``/generate``, ``/generate_stream`` and ``/tokenize``;
OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``;
vLLM's ``/tokenize`` and ``/detokenize``; ``/health``, ``/info``,
``/metrics``; ``/docs`` (Swagger UI served from the installed
swagger-ui-bundle, so it works offline).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from treespec import __version__
from treespec.draft.types import FINISH_CANCELLED, SamplingParams, StepEvent
from treespec.model.tokenizer import EOT_TEXT

from . import protocol as P
from .chat import ChatTemplateError
from .scheduler import Scheduler, GenerationFailed, InvalidRequest, Job, NotReady, Overloaded, Prepared
from .metrics import CONTENT_TYPE, Metrics
from .settings import Settings

log = logging.getLogger("treespec.server")

GENERATE_ROUTES = ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER = {"Retry-After": "1"}  # every 429: full now, likely free within a second or so


class ApiError(Exception):
    """An error response in TGI's shape. ``counted`` is False for errors the
    engine has already counted (a request that failed or was cancelled while
    generating)."""

    def __init__(self, status: int, error: str, error_type: str, headers: dict | None = None,
                 counted: bool = True):
        super().__init__(error)
        self.status, self.error, self.error_type, self.headers = status, error, error_type, headers
        self.counted = counted


def _error(status: int, error: str, error_type: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    """TGI's error shape, or on OpenAI's routes (/v1/...) OpenAI's, which its SDK reads the message from."""
    return JSONResponse(_error_body(error, error_type, status, path), status_code=status, headers=headers)


def _error_body(error: str, error_type: str, status: int | None, path: str) -> dict:
    if path.startswith("/v1/"):
        return {"error": {"message": error, "type": error_type, "param": None, "code": status}}
    return {"error": error, "error_type": error_type}


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_strings(value: Any, where: str = "body") -> None:
    """JSON may escape lone surrogates (\\ud800), which no UTF-8 can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, f"Input validation error: {where} is not valid UTF-8 "
                                f"(it contains a lone surrogate escape)", "validation") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, where)


def build_app(settings: Settings, *, engine: Scheduler | None = None, metrics: Metrics | None = None,
              load: bool = True, on_load_failed: Callable[[], None] | None = None,
              on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app. With ``load`` the lifespan loads the bundle in a thread (so
    /health answers 503 until it is ready, and ``on_ready`` runs once it is)
    and stops the engine on shutdown."""
    metrics = metrics or (engine.metrics if engine else Metrics())
    engine = engine or Scheduler(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if load:
            async def load_in_thread():
                try:
                    await asyncio.to_thread(engine.load)
                except Exception:
                    if on_load_failed is not None:
                        on_load_failed()
                    return
                if on_ready is not None:
                    on_ready()
            loader = asyncio.create_task(load_in_thread())
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                await asyncio.wait([loader], timeout=settings.graceful_timeout_s + 60)
            await asyncio.to_thread(engine.shutdown, settings.graceful_timeout_s)

    app = FastAPI(title="treespec", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _mount_docs(app)

    # ------------------------------------------------------------ errors

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        if e.counted and request.url.path in GENERATE_ROUTES:
            reason = {401: "unauthorized", 413: "too_large", 415: "validation", 422: "validation", 400: "validation",
                      429: "overloaded", 499: "disconnected", 503: "unavailable"}.get(e.status, "internal")
            metrics.failure.labels(getattr(request.state, "drafter", "unknown"), reason).inc()
        return _error(e.status, e.error, e.error_type, e.headers, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return _error(e.status_code, str(e.detail), kind, getattr(e, "headers", None), request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        if request.url.path in GENERATE_ROUTES:
            metrics.failure.labels(getattr(request.state, "drafter", "unknown"), "internal").inc()
        return _error(500, f"Internal server error: {type(e).__name__}: {e}", "internal", path=request.url.path)

    # ------------------------------------------------------------ request plumbing

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "Missing or invalid API key: send Authorization: Bearer <key>", "unauthorized",
                           {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request, model: type[BaseModel]) -> Any:
        check_auth(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'}",
                           "unsupported_media_type")
        limit = settings.max_body_bytes
        too_large = ApiError(413, f"Request body is larger than {limit} bytes", "payload_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large  # refuse before reading a byte of it
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:
            # The client's doing, not ours: one line, no traceback, nobody to answer.
            log.info("client left %s while sending its request body (%d bytes read)", request.url.path, len(body))
            raise ApiError(499, "Client closed the connection while sending the request", "disconnected") from None
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(422, f"Input validation error: request body is not valid UTF-8 "
                                f"(byte {body[e.start]:#04x} at offset {e.start})", "validation") from None
        try:
            data = json.loads(text, parse_constant=_no_constants)
        except RecursionError:
            raise ApiError(422, "Input validation error: request body is nested too deeply", "validation") from None
        except ValueError as e:
            raise ApiError(422, f"Input validation error: request body is not valid JSON ({e})", "validation") from None
        try:
            _check_strings(data)
            return model.model_validate(data)
        except RecursionError:
            raise ApiError(422, "Input validation error: request body is nested too deeply", "validation") from None
        except ValidationError as e:
            raise ApiError(422, P.validation_message(e), "validation") from None

    def require_bundle():
        if engine.bundle is None or not engine.ready:
            try:
                engine._require_ready()
            except NotReady as e:
                raise ApiError(503, str(e), "unavailable") from None
        return engine.bundle

    async def start(prompts: list[str | list[int]], params: list[SamplingParams], drafter: str | None,
                    request: Request) -> list[Job]:
        """Validate and admit one job per (prompt, params), all or none."""
        if drafter is not None:  # label errors with the drafter asked for, if it is one we know
            request.state.drafter = drafter if drafter in engine.drafter_names else "unknown"
        if len(params) > engine.capacity:
            raise ApiError(422, f"Input validation error: this request asks for {len(params)} completions "
                                f"(prompts x n), but the server runs and queues at most {engine.capacity} at once "
                                f"(max_running + max_waiting)", "validation")
        try:
            prepared: list[Prepared] = []
            for prompt, p in zip(prompts, params):
                if isinstance(prompt, str) and len(prompt) > 8192:  # tokenizing it would stall every other stream
                    prepared.append(await asyncio.to_thread(engine.prepare, prompt, p, drafter))
                else:
                    prepared.append(engine.prepare(prompt, p, drafter))
            request.state.drafter = prepared[0].drafter
            return engine.submit_all(prepared)
        except InvalidRequest as e:
            raise ApiError(422, str(e), "validation") from None
        except Overloaded:
            raise ApiError(429, "Model is overloaded", "overloaded", RETRY_AFTER) from None
        except NotReady as e:
            raise ApiError(503, str(e), "unavailable") from None

    def penalties(p) -> dict:
        """The request's penalties and logit bias that are set (None: the neutral default)."""
        out = {k: getattr(p, k) for k in ("repetition_penalty", "frequency_penalty", "presence_penalty")
               if getattr(p, k, None) is not None}
        if getattr(p, "logit_bias", None):
            out["logit_bias"] = dict(p.logit_bias)
        return out

    async def start_generate(request: Request) -> tuple[P.GenerateRequest, Job]:
        req = await read_body(request, P.GenerateRequest)
        p = req.parameters
        params = SamplingParams(
            max_new_tokens=p.max_new_tokens or settings.default_max_new_tokens,
            temperature=p.sampling_temperature(), top_k=p.top_k or 0,
            top_p=1.0 if p.top_p is None else p.top_p, seed=p.seed, stop=list(p.stop or []), k_max=p.k_max,
            top_n=p.top_n_tokens or 0, prompt_logprobs=p.decoder_input_details, **penalties(p))
        [job] = await start([req.inputs], [params], p.drafter, request)
        return req, job

    def openai_params(req, max_new_tokens: int | None, n_prompts: int, stop: list[str], top_n: int,
                      prompt_logprobs: bool = False) -> list[SamplingParams]:
        """One SamplingParams per choice, prompt-major (choice index = prompt * n + i);
        choice i samples with seed + i when a seed is given, as vLLM does."""
        return [SamplingParams(
            max_new_tokens=settings.default_max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=req.sampling_temperature(), top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p, seed=None if req.seed is None else req.seed + i,
            stop=list(stop or []), k_max=req.k_max, top_n=top_n, prompt_logprobs=prompt_logprobs, **penalties(req))
            for _ in range(n_prompts) for i in range(req.n)]

    async def watch_disconnect(request: Request, jobs: list[Job]) -> None:
        """For non-streaming routes: cancel the jobs if the client goes away."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for job in jobs:
                    job.abort()
                return

    async def collect(request: Request, *jobs: Job) -> list[tuple[list[StepEvent], StepEvent]]:
        """Each job's events and its last one, once all have finished."""
        watcher = asyncio.create_task(watch_disconnect(request, list(jobs)))

        async def events_of(job: Job) -> list[StepEvent]:
            return [ev async for ev in job.events()]

        try:
            all_events = await asyncio.gather(*(events_of(job) for job in jobs))
        except GenerationFailed as e:
            raise ApiError(500, str(e), "generation", counted=False) from None
        finally:
            watcher.cancel()
            for job in jobs:  # one failed: the others stop too
                job.abort()
        if any(events[-1].finish_reason == FINISH_CANCELLED for events in all_events):
            raise ApiError(503, "Request cancelled (the server is shutting down or the client left)", "cancelled",
                           counted=False)
        return [(events, events[-1]) for events in all_events]

    def speculative(job: Job, st) -> P.Speculative:
        return P.Speculative(
            drafter=job.drafter, verify_steps=st.verify_steps, draft_tokens=st.draft_tokens,
            accepted_tokens=st.accepted_tokens, acceptance_rate=st.acceptance_rate,
            mean_accepted_length=st.mean_accepted_length,
            accepted_per_position=list(st.accepted_per_position),
            drafted_per_position=list(st.drafted_per_position), model_handbacks=st.model_handbacks,
            skipped_proposals=st.skipped_proposals, guess_tokens=st.guess_tokens,
            accepted_guesses=st.accepted_guesses)

    def details(job: Job, last: StepEvent, tokens: list[P.Token] | None, top_tokens: list[list[P.Token]] = (),
                prefill: StepEvent | None = None) -> P.Details:
        st = last.stats
        return P.Details(
            finish_reason=last.finish_reason, generated_tokens=st.generated_tokens,
            prompt_tokens=len(job.prepared.prompt_ids), seed=job.prepared.params.seed, tokens=tokens,
            top_tokens=list(top_tokens), prefill=prefill_of(job, prefill), speculative=speculative(job, st))

    def tokens_of(ev: StepEvent) -> list[P.Token]:
        eot = engine.bundle.tokenizer.eot_id
        return [P.Token(id=t, text=x, logprob=lp, special=(t == eot))
                for t, x, lp in zip(ev.tokens, ev.texts, ev.logprobs)]

    def token_text(t: int) -> str:
        """One token on its own: a token that is part of a UTF-8 character shows as U+FFFD."""
        return engine.bundle.tokenizer.token_bytes(t).decode("utf-8", errors="replace")

    def top_tokens_of(ev: StepEvent) -> list[list[P.Token]]:
        eot = engine.bundle.tokenizer.eot_id
        return [[P.Token(id=i, text=token_text(i), logprob=v, special=(i == eot)) for i, v in alt]
                for alt in ev.top_logprobs]

    def prefill_of(job: Job, first: StepEvent | None) -> list[P.PrefillToken]:
        if first is None or first.prompt is None:
            return []
        return [P.PrefillToken(id=t, text=token_text(t), logprob=lp)
                for t, lp in zip(job.prepared.prompt_ids, first.prompt.logprobs)]

    def usage(jobs: list[Job], lasts: list[StepEvent], n: int) -> P.Usage:
        """Prompt tokens once per prompt (every n-th job starts a new one), completion tokens of every choice."""
        n_in = sum(len(job.prepared.prompt_ids) for job in jobs[::n])
        n_out = sum(last.stats.generated_tokens for last in lasts)
        return P.Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)

    # ------------------------------------------------------------ TGI

    async def generate_response(request: Request, req: P.GenerateRequest, job: Job) -> P.GenerateResponse:
        [(events, last)] = await collect(request, job)
        text = "".join(x for ev in events for x in ev.texts)
        if req.parameters.return_full_text:
            text = req.inputs + text
        body = P.GenerateResponse(generated_text=text)
        if req.parameters.details:
            body.details = details(job, last, [t for ev in events for t in tokens_of(ev)],
                                   [a for ev in events for a in top_tokens_of(ev)], events[0])
        return body

    def generate_stream_response(req: P.GenerateRequest, job: Job) -> StreamingResponse:
        prefix = req.inputs if req.parameters.return_full_text else ""

        async def sse():
            index, text, first = 0, [prefix], None
            try:
                async for ev in job.events():
                    first = first or ev
                    toks, tops = tokens_of(ev), top_tokens_of(ev)
                    if ev.finish_reason == FINISH_CANCELLED:
                        yield _sse_error("Request cancelled (the server is shutting down)", "cancelled")
                        return
                    for i, tok in enumerate(toks):
                        index += 1
                        text.append(tok.text)
                        final = ev.finish_reason is not None and i == len(toks) - 1
                        out = P.StreamResponse(index=index, token=tok, top_tokens=tops[i] if tops else [],
                                               generated_text="".join(text) if final else None,
                                               details=details(job, ev, None, prefill=first) if final else None)
                        yield "data:" + out.model_dump_json() + "\n\n"
            except GenerationFailed as e:
                yield _sse_error(str(e), "generation")
            finally:
                job.abort()

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if engine.ready:
            return {"status": "ok"}
        if engine.state == "failed":
            return _error(503, f"Model failed to load: {engine.load_error}", "unavailable")
        return _error(503, "Model is loading" if engine.state == "loading" else "Server is shutting down",
                      "unavailable")

    @app.get("/info")
    async def info():
        if engine.bundle is None:
            return _error(503, "Model is loading", "unavailable")
        return engine_info(engine, settings)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post("/")
    async def tgi_root(request: Request):
        """TGI's own route, which its clients (huggingface_hub's InferenceClient,
        text_generation.Client) call: a list of one response, or the stream."""
        req, job = await start_generate(request)
        if req.stream:
            return generate_stream_response(req, job)
        body = await generate_response(request, req, job)
        return JSONResponse([body.model_dump(exclude_none=False)])

    @app.post("/generate", response_model=P.GenerateResponse)
    async def generate(request: Request):
        req, job = await start_generate(request)
        body = await generate_response(request, req, job)
        return JSONResponse(body.model_dump(exclude_none=False))

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        req, job = await start_generate(request)
        return generate_stream_response(req, job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, P.CompletionRequest)
        prompts = req.prompts()
        params = openai_params(req, req.max_tokens, len(prompts), req.stop, req.logprobs or 0,
                               prompt_logprobs=req.echo and req.logprobs is not None)
        jobs = await start([p for p in prompts for _ in range(req.n)], params, req.drafter, request)
        cid, created, model = "cmpl-" + uuid.uuid4().hex, int(time.time()), engine.model_name

        def choice_logprobs(builder: "LogprobsBuilder | None", job: Job, ev: StepEvent, first: bool,
                            out: P.CompletionLogprobs | None = None) -> P.CompletionLogprobs | None:
            """The logprobs of this event's tokens (after the prompt's, with echo, on the first),
            added to ``out`` (a new one by default)."""
            if builder is None:
                return None
            out = out if out is not None else P.CompletionLogprobs()
            if first and req.echo:
                builder.add(out, job.prepared.prompt_ids, ev.prompt.logprobs, ev.prompt.top_logprobs)
            builder.add(out, ev.tokens, ev.logprobs, ev.top_logprobs)
            return out

        def builder() -> "LogprobsBuilder | None":
            return LogprobsBuilder(engine.bundle.tokenizer) if req.logprobs is not None else None

        if not req.stream:
            results = await collect(request, *jobs)
            choices = []
            for index, (job, (events, last)) in enumerate(zip(jobs, results)):
                lp, b = None, builder()
                if b is not None:
                    lp = P.CompletionLogprobs()
                    for i, ev in enumerate(events):
                        choice_logprobs(b, job, ev, i == 0, lp)
                text = "".join(x for ev in events for x in ev.texts)
                choices.append(P.CompletionChoice(text=(job.prepared.prompt if req.echo else "") + text,
                                                  index=index, logprobs=lp, speculative=speculative(job, last.stats),
                                                  finish_reason=P.OPENAI_FINISH[last.finish_reason]))
            body = P.CompletionResponse(id=cid, created=created, model=model, choices=choices,
                                        usage=usage(jobs, [last for _, last in results], req.n))
            return JSONResponse(body.model_dump())

        builders = [builder() for _ in jobs]

        async def sse():
            started, lasts = set(), {}
            try:
                async for i, ev in merged_events(jobs):
                    job = jobs[i]
                    if ev.finish_reason == FINISH_CANCELLED:
                        yield _sse_error("Request cancelled (the server is shutting down)", "cancelled", " ", "/v1/")
                        return
                    first = i not in started
                    started.add(i)
                    piece = (job.prepared.prompt if first and req.echo else "") + "".join(ev.texts)
                    final = ev.finish_reason is not None
                    if not piece and not final and builders[i] is None:
                        continue  # nothing released yet (held back for a possible stop sequence)
                    if final:
                        lasts[i] = ev
                    done = len(lasts) == len(jobs)
                    chunk = P.CompletionResponse(
                        id=cid, created=created, model=model,
                        usage=usage(jobs, [lasts[j] for j in range(len(jobs))], req.n) if done else None,
                        choices=[P.CompletionChoice(
                            text=piece, index=i, logprobs=choice_logprobs(builders[i], job, ev, first),
                            speculative=speculative(job, ev.stats) if final else None,
                            finish_reason=P.OPENAI_FINISH[ev.finish_reason] if final else None)])
                    # OpenAI sends usage on the last chunk only, and finish_reason null until then
                    data = chunk.model_dump(exclude_none=True)
                    data["choices"][0].setdefault("finish_reason", None)
                    data["choices"][0].setdefault("logprobs", None)
                    yield "data: " + json.dumps(data) + "\n\n"
                yield "data: [DONE]\n\n"
            except GenerationFailed as e:
                yield _sse_error(str(e), "generation", " ", "/v1/")

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, P.ChatCompletionRequest)
        template = chat_template()
        try:
            text = template.render([_message(m) for m in req.messages])
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        ids = engine.bundle.tokenizer.encode(text, allow_eot=True)  # the template's own special tokens
        top_n = (req.top_logprobs or 0) if req.logprobs else 0
        params = openai_params(req, req.max_new_tokens(), 1, (req.stop or []) + template.stop, top_n)
        jobs = await start([ids] * req.n, params, req.drafter, request)
        cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), engine.model_name

        def logprobs_of(events: list[StepEvent]) -> P.ChatLogprobs | None:
            return P.ChatLogprobs(content=[e for ev in events for e in chat_logprobs(ev)]) if req.logprobs else None

        if not req.stream:
            results = await collect(request, *jobs)
            choices = [P.ChatChoice(index=i, message=P.ChatResponseMessage(content="".join(
                x for ev in events for x in ev.texts)), logprobs=logprobs_of(events),
                finish_reason=P.OPENAI_FINISH[last.finish_reason], speculative=speculative(job, last.stats))
                for i, (job, (events, last)) in enumerate(zip(jobs, results))]
            body = P.ChatCompletionResponse(id=cid, created=created, model=model, choices=choices,
                                            usage=usage(jobs, [last for _, last in results], req.n))
            return JSONResponse(body.model_dump())

        def chunk(choices: list[P.ChatChunkChoice], use: P.Usage | None = None) -> str:
            data = P.ChatCompletionChunk(id=cid, created=created, model=model, choices=choices,
                                         usage=use).model_dump(exclude_none=True)
            for c in data["choices"]:
                c.setdefault("finish_reason", None)
                c.setdefault("logprobs", None)
            return "data: " + json.dumps(data) + "\n\n"

        async def sse():
            lasts = {}
            try:
                for i in range(len(jobs)):  # OpenAI's first chunk of each choice names the role
                    yield chunk([P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))])
                async for i, ev in merged_events(jobs):
                    if ev.finish_reason == FINISH_CANCELLED:
                        yield _sse_error("Request cancelled (the server is shutting down)", "cancelled", " ", "/v1/")
                        return
                    piece, final = "".join(ev.texts), ev.finish_reason is not None
                    if not piece and not final:
                        continue
                    if final:
                        lasts[i] = ev
                    yield chunk([P.ChatChunkChoice(
                        index=i, delta=P.ChatDelta(content=piece or None),
                        logprobs=P.ChatLogprobs(content=chat_logprobs(ev)) if req.logprobs else None,
                        finish_reason=P.OPENAI_FINISH[ev.finish_reason] if final else None,
                        speculative=speculative(jobs[i], ev.stats) if final else None)])
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield chunk([], usage(jobs, [lasts[j] for j in range(len(jobs))], req.n))
                yield "data: [DONE]\n\n"
            except GenerationFailed as e:
                yield _sse_error(str(e), "generation", " ", "/v1/")

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

    def chat_template():
        require_bundle()
        if engine.chat_template is None:
            raise ApiError(400, "This model has no chat template, so chat messages cannot be turned into a "
                                "prompt: its bundle carries none (config.json meta.chat_template"
                                + (f"; the one there failed: {engine.chat_template_error}"
                                   if engine.chat_template_error else "")
                                + "). Use /v1/completions with a prompt, or serve a bundle with a template "
                                  "(treespec import keeps a Hugging Face model's).", "invalid_request")
        return engine.chat_template

    def chat_logprobs(ev: StepEvent) -> list[P.ChatTokenLogprob]:
        tok = engine.bundle.tokenizer

        def entry(t: int, lp: float) -> dict:
            b = tok.token_bytes(t)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

        tops = ev.top_logprobs or [[] for _ in ev.tokens]
        return [P.ChatTokenLogprob(**entry(t, lp), top_logprobs=[P.TopLogprob(**entry(a, v)) for a, v in alt])
                for t, lp, alt in zip(ev.tokens, ev.logprobs, tops)]

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return P.ModelList(data=[model_card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        card = model_card()
        if model_id != card.id:
            raise ApiError(404, f"The model {model_id!r} does not exist: this server serves {card.id!r}",
                           "not_found")
        return card.model_dump()

    def model_card() -> P.ModelCard:
        bundle = require_bundle()
        return P.ModelCard(id=engine.model_name, created=int(engine.loaded_at or time.time()),
                           root=str(bundle.path), max_model_len=bundle.config.block_size)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await read_body(request, P.TokenizeRequest)
        bundle = require_bundle()
        tok = bundle.tokenizer
        if req.inputs is not None:  # TGI's shape: each token with its text and character span
            out, at, raw = [], 0, b""
            for t in tok.encode(req.inputs):
                raw += tok.token_bytes(t)
                end = len(raw.decode("utf-8", errors="ignore"))
                out.append({"id": t, "text": token_text(t), "start": at, "stop": end})
                at = end
            return out
        if req.messages is not None:
            try:
                text = chat_template().render([_message(m) for m in req.messages], req.add_generation_prompt)
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "invalid_request") from None
        else:
            text = req.prompt
        # "<|endoftext|>" is the special token here, as a Hugging Face tokenizer (vLLM's) reads it.
        ids = tok.encode(text, allow_eot=True)
        return {"count": len(ids), "max_model_len": bundle.config.block_size, "tokens": ids}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        """vLLM's: what a remote client needs to tokenize as the server does (lm-eval's
        ``tokenizer_backend=remote`` reads it, then calls /tokenize and /detokenize)."""
        check_auth(request)
        bundle = require_bundle()
        return {"tokenizer_class": "tiktoken r50k_base (GPT-2 BPE)", "eos_token": EOT_TEXT, "bos_token": EOT_TEXT,
                "pad_token": None, "model_max_length": bundle.config.block_size,
                "chat_template": bundle.meta.get("chat_template")}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await read_body(request, P.DetokenizeRequest)
        bundle = require_bundle()
        n_vocab = min(bundle.tokenizer.n_vocab, bundle.config.vocab_size)
        bad = [t for t in req.tokens if not 0 <= t < n_vocab]
        if bad:
            raise ApiError(422, f"Input validation error: token ids must be in [0, {n_vocab}), got {bad[:5]}",
                           "validation")
        return {"prompt": bundle.tokenizer.decode(req.tokens)}

    return app


def _message(m: P.ChatMessage) -> dict:
    out = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    return out


async def merged_events(jobs: list[Job]):
    """(choice index, event) from several jobs as they come. Leaving early
    (the client went away) cancels every job."""
    if len(jobs) == 1:
        async for ev in jobs[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        try:
            async for ev in job.events():
                queue.put_nowait((i, ev))
        except Exception as e:  # GenerationFailed: the consumer raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield i, item
            if item.finish_reason is not None:
                left -= 1
    finally:
        for task in tasks:
            task.cancel()
        for job in jobs:
            job.abort()


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the installed swagger-ui-bundle, so /docs works
    without the internet (FastAPI's default loads it from a CDN)."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="treespec API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        # ReDoc has no offline package to serve it from: say where the docs are.
        return HTMLResponse('<!doctype html><title>treespec API</title><p>This server serves its API docs '
                            'offline at <a href="/docs">/docs</a> (Swagger UI); the schema is at '
                            '<a href="/openapi.json">/openapi.json</a>.</p>')

class LogprobsBuilder:
    """OpenAI's legacy logprobs for one choice, built event by event: each
    token as text (``bytes:\\xNN`` for one that is part of a UTF-8
    character, as OpenAI writes it), its log-probability, the most likely
    tokens there (the chosen one always among them), and where it starts in
    the choice's text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = b""  # every token so far, to find where the next one starts

    def token_str(self, t: int) -> str:
        b = self.tokenizer.token_bytes(t)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)

    def add(self, out: "P.CompletionLogprobs", ids: list[int], lps: list[float | None],
            tops: list[list[tuple[int, float]]]) -> None:
        for i, (t, lp) in enumerate(zip(ids, lps)):
            out.tokens.append(self.token_str(t))
            out.token_logprobs.append(lp)
            if lp is None:
                out.top_logprobs.append(None)
            else:
                alt = {self.token_str(a): v for a, v in (tops[i] if i < len(tops) else [])}
                out.top_logprobs.append({**alt, self.token_str(t): lp})
            out.text_offset.append(len(self.text.decode("utf-8", errors="ignore")))
            self.text += self.tokenizer.token_bytes(t)


def _sse_error(error: str, error_type: str, sep: str = "", path: str = "") -> str:
    return f"data:{sep}" + json.dumps(_error_body(error, error_type, None, path)) + "\n\n"


def engine_info(engine: Scheduler, settings: Settings) -> dict:
    b = engine.bundle
    cfg = b.config
    drafters = {}
    for name, d in engine.drafters.items():
        entry: dict[str, Any] = {"k_max": getattr(d, "k_max", None)} if d is not None else {}
        spec = getattr(d, "spec", None)
        if spec is not None:  # the tree: its classes are K tokens + __COPY__ + __MODEL__
            entry.update(token_classes=len(spec.classes), classes=len(spec.classes) + 2,
                         feature_version=getattr(spec, "version", None), p_min=getattr(d, "p_min", None),
                         verify_ms=d.verify_ms, calibration=d.calibration,
                         # The trusted-match shortcut, and the copy length it drafts per
                         # bucket of match evidence (draft/copylen.py) under this machine's curve.
                         trust_match=getattr(d, "trust_match", None),
                         copy_lengths=d.copy_lengths.lengths if getattr(d, "copy_lengths", None) else None,
                         # How many token ids the corpus bigram guesses a follower for (draft/corpus.py).
                         corpus_bigram=len(d.corpus) if getattr(d, "corpus", None) is not None else None)
        drafters[name] = entry
    return {
        "model_id": engine.model_name,
        "model_sha": b.weights_sha256,
        "model_dtype": engine.kernels.precision,
        "kernels": engine.kernels.to_dict(),
        "model_device_type": settings.device,
        "model_config": cfg.to_dict(),
        "parameters": b.model.num_params(non_embedding=False),
        "drafters": {"default": engine.default_drafter, "available": sorted(engine.drafters),
                     "unavailable": engine.unavailable, "settings": drafters},
        "max_input_tokens": cfg.block_size - 1,
        "max_total_tokens": cfg.block_size,
        "default_max_new_tokens": settings.default_max_new_tokens,
        "max_stop_sequences": P.MAX_STOP,
        "max_top_n_tokens": P.MAX_TOP_N,
        "max_k": P.MAX_K,
        "max_running": settings.max_running,
        "max_waiting": settings.max_waiting,
        "max_body_bytes": settings.max_body_bytes,
        "version": __version__,
    }
