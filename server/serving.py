"""The serving layer: requests in, jobs to the scheduler, jobs' events out as
responses. No routes here, and nothing a test needs HTTP for: the routers
(server/routes/) parse a body and call one method.

``Serving.start`` validates and admits a request's jobs (one per prompt and
choice); the response builders turn the jobs' ``StepEvent``s into TGI's or
OpenAI's bodies, whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable

from treespec import __version__
from treespec.draft.types import FINISH_CANCELLED, SamplingParams, SpecStats, StepEvent
from treespec.model.tokenizer import EOT_TEXT

from . import protocol
from .chat import ChatTemplateError
from .http import RETRY_AFTER, ApiError, sse_error
from .metrics import Metrics
from .scheduler import GenerationFailed, InvalidRequest, Job, NotReady, Overloaded, Prepared, Scheduler
from .settings import Settings

CANCELLED = "Request cancelled (the server is shutting down)"


class Serving:
    def __init__(self, scheduler: Scheduler, settings: Settings, metrics: Metrics):
        self.scheduler, self.settings, self.metrics = scheduler, settings, metrics

    # ------------------------------------------------------------ admission

    def bundle(self):
        """The loaded bundle, or a 503 while there is none."""
        s = self.scheduler
        if s.bundle is None or not s.ready:
            try:
                s.require_ready()
            except NotReady as e:
                raise ApiError(503, str(e), "unavailable") from None
        return s.bundle

    async def start(self, prompts: list[str | list[int]], params: list[SamplingParams], drafter: str | None,
                    state: Any) -> list[Job]:
        """Validate and admit one job per (prompt, params), all or none.
        ``state`` (the request's) learns the drafter, to label errors by it."""
        s = self.scheduler
        if drafter is not None:  # label errors with the drafter asked for, if it is one we know
            state.drafter = drafter if drafter in s.drafter_names else "unknown"
        if len(params) > s.capacity:
            raise ApiError(422, f"Input validation error: this request asks for {len(params)} completions "
                                f"(prompts x n), but the server runs and queues at most {s.capacity} at once "
                                f"(max_running + max_waiting)", "validation")
        try:
            prepared: list[Prepared] = []
            for prompt, p in zip(prompts, params):
                if isinstance(prompt, str) and len(prompt) > 8192:  # tokenizing it would stall every other stream
                    prepared.append(await asyncio.to_thread(s.prepare, prompt, p, drafter))
                else:
                    prepared.append(s.prepare(prompt, p, drafter))
            state.drafter = prepared[0].drafter
            return s.submit_all(prepared)
        except InvalidRequest as e:
            raise ApiError(422, str(e), "validation") from None
        except Overloaded:
            raise ApiError(429, "Model is overloaded", "overloaded", RETRY_AFTER) from None
        except NotReady as e:
            raise ApiError(503, str(e), "unavailable") from None

    async def collect(self, jobs: list[Job], disconnected: Awaitable | None = None
                      ) -> list[tuple[list[StepEvent], StepEvent]]:
        """Each job's events and its last one, once all have finished. If
        ``disconnected`` completes first (the client left), the jobs stop."""
        async def watch():
            await disconnected
            for job in jobs:
                job.abort()

        watcher = asyncio.create_task(watch()) if disconnected is not None else None

        async def events_of(job: Job) -> list[StepEvent]:
            return [ev async for ev in job.events()]

        try:
            all_events = await asyncio.gather(*(events_of(job) for job in jobs))
        except GenerationFailed as e:
            raise ApiError(500, str(e), "generation", counted=False) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            for job in jobs:  # one failed: the others stop too
                job.abort()
        if any(events[-1].finish_reason == FINISH_CANCELLED for events in all_events):
            raise ApiError(503, "Request cancelled (the server is shutting down or the client left)", "cancelled",
                           counted=False)
        return [(events, events[-1]) for events in all_events]

    # ------------------------------------------------------------ shared response parts

    @staticmethod
    def speculative(stats: SpecStats) -> protocol.Speculative:
        return protocol.Speculative(**stats.report())

    def token_text(self, t: int) -> str:
        """One token on its own: a token that is part of a UTF-8 character shows as U+FFFD."""
        return self.scheduler.bundle.tokenizer.token_bytes(t).decode("utf-8", errors="replace")

    def tokens_of(self, ev: StepEvent) -> list[protocol.Token]:
        eot = self.scheduler.bundle.tokenizer.eot_id
        return [protocol.Token(id=t, text=x, logprob=lp, special=(t == eot))
                for t, x, lp in zip(ev.tokens, ev.texts, ev.logprobs)]

    def top_tokens_of(self, ev: StepEvent) -> list[list[protocol.Token]]:
        eot = self.scheduler.bundle.tokenizer.eot_id
        return [[protocol.Token(id=i, text=self.token_text(i), logprob=v, special=(i == eot)) for i, v in alt]
                for alt in ev.top_logprobs]

    def prefill_of(self, job: Job, first: StepEvent | None) -> list[protocol.PrefillToken]:
        if first is None or first.prompt is None:
            return []
        return [protocol.PrefillToken(id=t, text=self.token_text(t), logprob=lp)
                for t, lp in zip(job.prepared.prompt_ids, first.prompt.logprobs)]

    def details(self, job: Job, last: StepEvent, tokens: list[protocol.Token] | None,
                top_tokens: list[list[protocol.Token]] = (), prefill: StepEvent | None = None) -> protocol.Details:
        st = last.stats
        return protocol.Details(finish_reason=last.finish_reason, generated_tokens=st.generated_tokens,
                         prompt_tokens=len(job.prepared.prompt_ids), seed=job.prepared.params.seed, tokens=tokens,
                         top_tokens=list(top_tokens), prefill=self.prefill_of(job, prefill),
                         speculative=self.speculative(st))

    @staticmethod
    def usage(jobs: list[Job], lasts: list[StepEvent], n: int) -> protocol.Usage:
        """Prompt tokens once per prompt (every n-th job starts a new one), completion tokens of every choice."""
        n_in = sum(len(job.prepared.prompt_ids) for job in jobs[::n])
        n_out = sum(last.stats.generated_tokens for last in lasts)
        return protocol.Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)

    # ------------------------------------------------------------ TGI

    async def generate(self, req: protocol.GenerateRequest, state: Any) -> Job:
        [job] = await self.start([req.inputs], [req.to_sampling_params(self.settings.default_max_new_tokens)],
                                 req.parameters.drafter, state)
        return job

    async def generate_response(self, req: protocol.GenerateRequest, job: Job,
                                disconnected: Awaitable | None = None) -> protocol.GenerateResponse:
        [(events, last)] = await self.collect([job], disconnected)
        text = "".join(x for ev in events for x in ev.texts)
        if req.parameters.return_full_text:
            text = req.inputs + text
        body = protocol.GenerateResponse(generated_text=text)
        if req.parameters.details:
            body.details = self.details(job, last, [t for ev in events for t in self.tokens_of(ev)],
                                        [a for ev in events for a in self.top_tokens_of(ev)], events[0])
        return body

    async def generate_stream(self, req: protocol.GenerateRequest, job: Job) -> AsyncIterator[str]:
        """TGI's server-sent events: one per token, the last with the text and details."""
        index, text, first = 0, [req.inputs if req.parameters.return_full_text else ""], None
        try:
            async for ev in job.events():
                first = first or ev
                toks, tops = self.tokens_of(ev), self.top_tokens_of(ev)
                if ev.finish_reason == FINISH_CANCELLED:
                    yield sse_error(CANCELLED, "cancelled")
                    return
                for i, tok in enumerate(toks):
                    index += 1
                    text.append(tok.text)
                    final = ev.finish_reason is not None and i == len(toks) - 1
                    out = protocol.StreamResponse(index=index, token=tok, top_tokens=tops[i] if tops else [],
                                           generated_text="".join(text) if final else None,
                                           details=self.details(job, ev, None, prefill=first) if final else None)
                    yield "data:" + out.model_dump_json() + "\n\n"
        except GenerationFailed as e:
            yield sse_error(str(e), "generation")
        finally:
            job.abort()

    # ------------------------------------------------------------ OpenAI completions

    async def completions(self, req: protocol.CompletionRequest, state: Any) -> list[Job]:
        params = req.to_sampling_params(self.settings.default_max_new_tokens)
        return await self.start([p for p in req.prompts() for _ in range(req.n)], params, req.drafter, state)

    def _logprobs_builder(self, req: protocol.CompletionRequest) -> "LogprobsBuilder | None":
        return LogprobsBuilder(self.scheduler.bundle.tokenizer) if req.logprobs is not None else None

    @staticmethod
    def _choice_logprobs(req: protocol.CompletionRequest, builder: "LogprobsBuilder | None", job: Job, ev: StepEvent,
                         first: bool, out: protocol.CompletionLogprobs | None = None) -> protocol.CompletionLogprobs | None:
        """The logprobs of this event's tokens (after the prompt's, with echo, on the first),
        added to ``out`` (a new one by default)."""
        if builder is None:
            return None
        out = out if out is not None else protocol.CompletionLogprobs()
        if first and req.echo:
            builder.add(out, job.prepared.prompt_ids, ev.prompt.logprobs, ev.prompt.top_logprobs)
        builder.add(out, ev.tokens, ev.logprobs, ev.top_logprobs)
        return out

    async def completion_response(self, req: protocol.CompletionRequest, jobs: list[Job],
                                  disconnected: Awaitable | None = None) -> protocol.CompletionResponse:
        results = await self.collect(jobs, disconnected)
        choices = []
        for index, (job, (events, last)) in enumerate(zip(jobs, results)):
            lp, b = None, self._logprobs_builder(req)
            if b is not None:
                lp = protocol.CompletionLogprobs()
                for i, ev in enumerate(events):
                    self._choice_logprobs(req, b, job, ev, i == 0, lp)
            text = "".join(x for ev in events for x in ev.texts)
            choices.append(protocol.CompletionChoice(text=(job.prepared.prompt if req.echo else "") + text, index=index,
                                              logprobs=lp, speculative=self.speculative(last.stats),
                                              finish_reason=protocol.OPENAI_FINISH[last.finish_reason]))
        return protocol.CompletionResponse(id="cmpl-" + uuid.uuid4().hex, created=int(time.time()),
                                    model=self.scheduler.model_name, choices=choices,
                                    usage=self.usage(jobs, [last for _, last in results], req.n))

    async def completion_stream(self, req: protocol.CompletionRequest, jobs: list[Job]) -> AsyncIterator[str]:
        cid, created, model = "cmpl-" + uuid.uuid4().hex, int(time.time()), self.scheduler.model_name
        builders = [self._logprobs_builder(req) for _ in jobs]
        started, lasts = set(), {}
        try:
            async for i, ev in merged_events(jobs):
                job = jobs[i]
                if ev.finish_reason == FINISH_CANCELLED:
                    yield sse_error(CANCELLED, "cancelled", " ", "/v1/")
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
                chunk = protocol.CompletionResponse(
                    id=cid, created=created, model=model,
                    usage=self.usage(jobs, [lasts[j] for j in range(len(jobs))], req.n) if done else None,
                    choices=[protocol.CompletionChoice(
                        text=piece, index=i, logprobs=self._choice_logprobs(req, builders[i], job, ev, first),
                        speculative=self.speculative(ev.stats) if final else None,
                        finish_reason=protocol.OPENAI_FINISH[ev.finish_reason] if final else None)])
                # OpenAI sends usage on the last chunk only, and finish_reason null until then
                data = chunk.model_dump(exclude_none=True)
                data["choices"][0].setdefault("finish_reason", None)
                data["choices"][0].setdefault("logprobs", None)
                yield "data: " + json.dumps(data) + "\n\n"
            yield "data: [DONE]\n\n"
        except GenerationFailed as e:
            yield sse_error(str(e), "generation", " ", "/v1/")

    # ------------------------------------------------------------ OpenAI chat

    def chat_template(self):
        self.bundle()
        s = self.scheduler
        if s.chat_template is None:
            raise ApiError(400, "This model has no chat template, so chat messages cannot be turned into a "
                                "prompt: its bundle carries none (config.json meta.chat_template"
                                + (f"; the one there failed: {s.chat_template_error}" if s.chat_template_error else "")
                                + "). Use /v1/completions with a prompt, or serve a bundle with a template "
                                  "(treespec import keeps a Hugging Face model's).", "invalid_request")
        return s.chat_template

    def render_chat(self, messages: list[protocol.ChatMessage], add_generation_prompt: bool = True) -> str:
        try:
            return self.chat_template().render([_message(m) for m in messages], add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "invalid_request") from None

    async def chat(self, req: protocol.ChatCompletionRequest, state: Any) -> list[Job]:
        text = self.render_chat(req.messages)
        ids = self.scheduler.bundle.tokenizer.encode(text, allow_eot=True)  # the template's own special tokens
        params = req.to_sampling_params(self.settings.default_max_new_tokens, self.chat_template().stop)
        return await self.start([ids] * req.n, params, req.drafter, state)

    def chat_logprobs(self, ev: StepEvent) -> list[protocol.ChatTokenLogprob]:
        tok = self.scheduler.bundle.tokenizer

        def entry(t: int, lp: float) -> dict:
            b = tok.token_bytes(t)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

        tops = ev.top_logprobs or [[] for _ in ev.tokens]
        return [protocol.ChatTokenLogprob(**entry(t, lp), top_logprobs=[protocol.TopLogprob(**entry(a, v)) for a, v in alt])
                for t, lp, alt in zip(ev.tokens, ev.logprobs, tops)]

    async def chat_response(self, req: protocol.ChatCompletionRequest, jobs: list[Job],
                            disconnected: Awaitable | None = None) -> protocol.ChatCompletionResponse:
        results = await self.collect(jobs, disconnected)
        choices = [protocol.ChatChoice(
            index=i, message=protocol.ChatResponseMessage(content="".join(x for ev in events for x in ev.texts)),
            logprobs=protocol.ChatLogprobs(content=[e for ev in events for e in self.chat_logprobs(ev)])
            if req.logprobs else None,
            finish_reason=protocol.OPENAI_FINISH[last.finish_reason], speculative=self.speculative(last.stats))
            for i, (events, last) in enumerate(results)]
        return protocol.ChatCompletionResponse(id="chatcmpl-" + uuid.uuid4().hex, created=int(time.time()),
                                        model=self.scheduler.model_name, choices=choices,
                                        usage=self.usage(jobs, [last for _, last in results], req.n))

    async def chat_stream(self, req: protocol.ChatCompletionRequest, jobs: list[Job]) -> AsyncIterator[str]:
        cid, created, model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), self.scheduler.model_name

        def chunk(choices: list[protocol.ChatChunkChoice], use: protocol.Usage | None = None) -> str:
            data = protocol.ChatCompletionChunk(id=cid, created=created, model=model, choices=choices,
                                         usage=use).model_dump(exclude_none=True)
            for c in data["choices"]:
                c.setdefault("finish_reason", None)
                c.setdefault("logprobs", None)
            return "data: " + json.dumps(data) + "\n\n"

        lasts = {}
        try:
            for i in range(len(jobs)):  # OpenAI's first chunk of each choice names the role
                yield chunk([protocol.ChatChunkChoice(index=i, delta=protocol.ChatDelta(role="assistant", content=""))])
            async for i, ev in merged_events(jobs):
                if ev.finish_reason == FINISH_CANCELLED:
                    yield sse_error(CANCELLED, "cancelled", " ", "/v1/")
                    return
                piece, final = "".join(ev.texts), ev.finish_reason is not None
                if not piece and not final:
                    continue
                if final:
                    lasts[i] = ev
                yield chunk([protocol.ChatChunkChoice(
                    index=i, delta=protocol.ChatDelta(content=piece or None),
                    logprobs=protocol.ChatLogprobs(content=self.chat_logprobs(ev)) if req.logprobs else None,
                    finish_reason=protocol.OPENAI_FINISH[ev.finish_reason] if final else None,
                    speculative=self.speculative(ev.stats) if final else None)])
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk([], self.usage(jobs, [lasts[j] for j in range(len(jobs))], req.n))
            yield "data: [DONE]\n\n"
        except GenerationFailed as e:
            yield sse_error(str(e), "generation", " ", "/v1/")

    # ------------------------------------------------------------ models, tokenizer, info

    def model_card(self) -> protocol.ModelCard:
        bundle = self.bundle()
        s = self.scheduler
        return protocol.ModelCard(id=s.model_name, created=int(s.loaded_at or time.time()), root=str(bundle.path),
                           max_model_len=bundle.config.block_size)

    def tokenize(self, req: protocol.TokenizeRequest):
        bundle = self.bundle()
        tok = bundle.tokenizer
        if req.inputs is not None:  # TGI's shape: each token with its text and character span
            out, at, raw = [], 0, b""
            for t in tok.encode(req.inputs):
                raw += tok.token_bytes(t)
                end = len(raw.decode("utf-8", errors="ignore"))
                out.append({"id": t, "text": self.token_text(t), "start": at, "stop": end})
                at = end
            return out
        text = self.render_chat(req.messages, req.add_generation_prompt) if req.messages is not None else req.prompt
        # "<|endoftext|>" is the special token here, as a Hugging Face tokenizer (vLLM's) reads it.
        ids = tok.encode(text, allow_eot=True)
        return {"count": len(ids), "max_model_len": bundle.config.block_size, "tokens": ids}

    def detokenize(self, req: protocol.DetokenizeRequest) -> dict:
        bundle = self.bundle()
        n_vocab = min(bundle.tokenizer.n_vocab, bundle.config.vocab_size)
        bad = [t for t in req.tokens if not 0 <= t < n_vocab]
        if bad:
            raise ApiError(422, f"Input validation error: token ids must be in [0, {n_vocab}), got {bad[:5]}",
                           "validation")
        return {"prompt": bundle.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        """vLLM's: what a remote client needs to tokenize as the server does (lm-eval's
        ``tokenizer_backend=remote`` reads it, then calls /tokenize and /detokenize)."""
        bundle = self.bundle()
        return {"tokenizer_class": "tiktoken r50k_base (GPT-2 BPE)", "eos_token": EOT_TEXT, "bos_token": EOT_TEXT,
                "pad_token": None, "model_max_length": bundle.config.block_size,
                "chat_template": bundle.meta.get("chat_template")}

    def info(self) -> dict:
        s, settings = self.scheduler, self.settings
        b = s.bundle
        cfg = b.config
        return {
            "model_id": s.model_name,
            "model_sha": b.weights_sha256,
            "model_dtype": s.kernels.precision,
            "kernels": s.kernels.to_dict(),
            "model_device_type": settings.device,
            "model_config": cfg.to_dict(),
            "parameters": b.model.num_params(non_embedding=False),
            # Each drafter describes itself; the server does not read their insides.
            "drafters": {"default": s.default_drafter, "available": sorted(s.drafters),
                         "unavailable": s.unavailable,
                         "settings": {name: d.describe() if d is not None else {} for name, d in s.drafters.items()}},
            "max_input_tokens": cfg.block_size - 1,
            "max_total_tokens": cfg.block_size,
            "default_max_new_tokens": settings.default_max_new_tokens,
            "max_stop_sequences": protocol.MAX_STOP,
            "max_top_n_tokens": protocol.MAX_TOP_N,
            "max_k": protocol.MAX_K,
            "max_running": settings.max_running,
            "max_waiting": settings.max_waiting,
            "max_body_bytes": settings.max_body_bytes,
            "version": __version__,
        }


def _message(m: protocol.ChatMessage) -> dict:
    out = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    return out


async def merged_events(jobs: list[Job]) -> AsyncIterator[tuple[int, StepEvent]]:
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

    def add(self, out: protocol.CompletionLogprobs, ids: list[int], lps: list[float | None],
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
