"""The scheduler: owns the bundle and its drafters, admits requests, and
runs generation on one worker thread, off the event loop.

The model is not safe for concurrent forwards, so exactly one thread ever
touches it. That thread keeps up to ``max_running`` requests alive at once,
each with its own KV cache and its own decode loop from
``treespec.draft.loop.generate_steps``. Each turn, every running request's
loop goes on until it needs a forward (its prefill, or a verify step of its
last token plus drafts), and then those forwards run together as one batch
(``GPT.forward_batch``: the dense layers see all their rows at once,
attention runs per request over its own cache). A long request never blocks
a short one behind it, and a request's output depends only on its own
prompt, parameters and seed, up to the last bits of a batched matmul
(``Settings.batching`` off runs the forwards one by one instead).
Requests beyond ``max_running`` wait in a FIFO of at most ``max_waiting``;
beyond that, ``submit`` raises ``Overloaded`` at once (the route's 429).

Events cross from the worker to the event loop through
``loop.call_soon_threadsafe`` into the request's asyncio queue. A request is
cancelled by setting its ``cancel`` event, which the generator polls through
``should_stop`` at every verify step; its KV cache is dropped when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import torch

from treespec.draft.loop import check_request
from treespec.draft.types import FINISH_CANCELLED, SamplingParams, SpecStats, StepEvent
from treespec.model.kernels import BUSY_SHARE, CpuShare, time_pass

from .chat import ChatTemplate, ChatTemplateError
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("treespec.server")

# Test-only fault injection (Settings.debug_faults).
FAIL_PREFIX = "[[fail]]"
SLOW_PREFIX = "[[slow]]"
SLOW_STEP_S = 0.05
# The scheduler measures the share of its CPUs that other processes take
# this often, and warns (at most every CPU_WARN_EVERY_S) when that happened
# while it decoded: beside a busy process the kernels' spinning threads
# can decode up to 100x slower.
CPU_CHECK_S = 10.0
CPU_WARN_EVERY_S = 300.0


class InvalidRequest(ValueError):
    """The request cannot be served as asked (a 422)."""


class Overloaded(RuntimeError):
    """Running and waiting are both full (a 429)."""


class NotReady(RuntimeError):
    """The model is still loading, failed to load, or the server is stopping (a 503)."""


class GenerationFailed(RuntimeError):
    """Generation raised; the request fails (a 500) and the scheduler carries on."""


class LoadCancelled(RuntimeError):
    """A shutdown began while the bundle loaded: loading stopped at its next
    timing or drafter, so Ctrl-C during a load exits in about a second
    rather than after the whole kernel and drafter timing."""


@dataclass
class Prepared:
    """A validated request, ready to submit."""

    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    drafter: str


@dataclass
class Job:
    id: str
    prepared: Prepared
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    # Worker-side state (only the worker thread touches these).
    gen: Iterator[Any] | None = None  # generate_steps: StepEvents, and Forwards to run
    forward: Any = None  # the ForwardRequest it waits on
    output: Any = None  # that forward's output, to send it
    cache: Any = None
    cache_bytes: int = 0
    started: float | None = None
    last_token_at: float | None = None
    steps: int = 0
    generated: int = 0
    done: bool = False
    withdraw: Any = None  # the scheduler's: give back a waiting slot at once

    @property
    def drafter(self) -> str:
        return self.prepared.drafter

    def abort(self) -> None:
        """Stop generation at the next verify step (no-op once finished); a
        request still waiting leaves the queue at once, so its slot is free."""
        first = not self.cancel.is_set()
        self.cancel.set()
        if first and self.withdraw is not None:
            self.withdraw(self)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancel.set()

    async def events(self) -> AsyncIterator[StepEvent]:
        """The request's verify steps as they happen; the last has ``finish_reason``.
        Leaving early (the client went away, the task was cancelled) cancels the job."""
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.abort()


def _strict_utf8(name: str, s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"Input validation error: {name} is not valid UTF-8 "
                             f"(it contains a lone surrogate escape)") from None


class Scheduler:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.state = "loading"  # loading -> ready -> stopping; or loading -> failed
        self.load_error: str | None = None
        self.bundle = None
        self.drafters: dict[str, Any] = {}  # name -> Drafter (None for "none")
        self.unavailable: dict[str, str] = {}  # name -> why the bundle cannot offer it
        self.default_drafter: str | None = None
        self.chat_template = None  # chat.ChatTemplate, when the bundle carries one
        self.chat_template_error: str | None = None
        self.loaded_at: float | None = None  # time.time() when the bundle was ready
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._stop_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._generate = None
        self.drafter_names: tuple[str, ...] = ()
        self._decoded = False  # whether a forward ran since the CPU watch last looked
        self._cpu_warned_at = -CPU_WARN_EVERY_S
        self._watch_stop = threading.Event()

    # ------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the bundle and its drafters, then start the worker. Blocking:
        the app runs it in a thread so /health can answer 503 meanwhile."""
        try:
            self._load()
        except LoadCancelled:
            log.info("stopped while loading %s", self.settings.bundle)
            raise
        except Exception as e:  # any failure leaves a clear message for /health and the log
            self.state = "failed"
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load bundle %s: %s", self.settings.bundle, self.load_error)
            raise
        self._thread = threading.Thread(target=self._worker, name="treespec-scheduler", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_cpu, name="treespec-cpu-watch", daemon=True).start()
        with self._cv:
            if self.state == "loading":  # not if a shutdown began while it loaded
                self.state = "ready"
        log.info("bundle %s ready; drafters %s (default %s)", self.settings.bundle,
                 sorted(self.drafters), self.default_drafter)

    def _load(self) -> None:
        from treespec.draft.loop import generate_steps
        from treespec.draft.registry import DRAFTERS, DrafterUnavailable, auto_drafter, make_drafter
        from treespec.model.kernels import load_for_inference

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        t0 = time.perf_counter()
        # Kernels first: the tree drafter then times its verify costs on them.
        self.bundle, self.kernels = load_for_inference(s.bundle, s.dtype, s.device, log=log.info,
                                                       measure=self._measure)
        for name in DRAFTERS:
            self._raise_if_stopping()
            try:
                self.drafters[name] = make_drafter(name, self.bundle, calibrate=s.calibrate_drafter)
            except (DrafterUnavailable, ValueError) as e:
                # A missing or broken tree costs the tree only: the server still
                # serves ngram/none, and /info and the log say why.
                self.unavailable[name] = str(e)
                log.warning("drafter %s unavailable: %s", name, e)
        if s.default_drafter == "auto":
            self.default_drafter = auto_drafter(self.drafters)
        elif s.default_drafter in self.drafters:
            self.default_drafter = s.default_drafter
        else:
            why = self.unavailable.get(s.default_drafter, f"choose one of auto, {', '.join(DRAFTERS)}")
            raise ValueError(f"default_drafter {s.default_drafter!r} is not available: {why}")
        self._generate = generate_steps
        self.drafter_names = tuple(DRAFTERS)
        try:
            self.chat_template = ChatTemplate.of_bundle(self.bundle)
        except ChatTemplateError as e:  # chat answers 400 with this; everything else serves
            self.chat_template_error = str(e)
            log.warning("chat completions unavailable: %s", e)
        self.loaded_at = time.time()
        log.info("loaded %s in %.1fs", s.bundle, time.perf_counter() - t0)

    def _raise_if_stopping(self) -> None:
        if self._stop_deadline is not None:
            raise LoadCancelled("the server was stopped while the bundle loaded")

    def _measure(self, group: str, rows: int, candidate: str, weights) -> float:
        """The kernel planner's timer, which gives up once a shutdown has begun."""
        self._raise_if_stopping()
        return time_pass(group, rows, candidate, weights)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return self.settings.model_name or Path(self.settings.bundle).resolve().name

    # ------------------------------------------------------------ admission

    def prepare(self, prompt: str | list[int], params: SamplingParams, drafter: str | None) -> Prepared:
        """Validate what needs the tokenizer and the model's limits. ``prompt``
        is text, or token ids (then ``Prepared.prompt`` is their text)."""
        self.require_ready()
        cfg = self.bundle.config
        name = drafter or self.default_drafter
        if name not in self.drafter_names:
            raise InvalidRequest(f"Input validation error: unknown drafter {name!r}; "
                                 f"choose one of {', '.join(self.drafter_names)}")
        if name not in self.drafters:
            raise InvalidRequest(f"Input validation error: drafter {name!r} is not available for this "
                                 f"bundle: {self.unavailable.get(name, 'not loaded')}")
        tok = self.bundle.tokenizer
        n_vocab = min(tok.n_vocab, cfg.vocab_size)
        # Text-level checks here; everything about the tokens and the model's
        # limits is the decode loop's own check, run before anything is queued.
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequest("Input validation error: inputs must not be empty or whitespace only")
            _strict_utf8("inputs", prompt)
        for s in params.stop:
            _strict_utf8("stop", s)
        if isinstance(prompt, str) and params.max_new_tokens > cfg.block_size - 1:
            # Before tokenizing: a request that cannot fit whatever its prompt is costs no encode.
            raise InvalidRequest(f"Input validation error: max_new_tokens must be <= {cfg.block_size - 1} "
                                 f"(the context is {cfg.block_size} tokens); got {params.max_new_tokens}")
        ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        try:
            check_request(ids, params, cfg.block_size, n_vocab)
        except ValueError as e:
            raise InvalidRequest(f"Input validation error: {e}") from None
        if not isinstance(prompt, str):  # token ids (OpenAI's completions take them)
            prompt = tok.decode(ids)
        if not params.greedy and params.seed is None:
            # Pick the seed here so the response can report it and the client can replay it.
            params.seed = secrets.randbits(63)
        return Prepared(prompt=prompt, prompt_ids=ids, params=params, drafter=name)

    def submit(self, prepared: Prepared) -> Job:
        """Admit a request or raise ``Overloaded``; never blocks."""
        return self.submit_all([prepared])[0]

    def submit_all(self, prepared: list[Prepared]) -> list[Job]:
        """Admit all of these requests (a batch of prompts, or n choices) or
        none: ``Overloaded`` unless there are slots for every one."""
        loop = asyncio.get_running_loop()
        jobs = [Job(id=uuid.uuid4().hex, prepared=p, loop=loop, queue=asyncio.Queue(), withdraw=self._withdraw)
                for p in prepared]
        with self._cv:
            self.require_ready()
            if len(self._running) + len(self._waiting) + len(jobs) > self.capacity:
                raise Overloaded("Model is overloaded")
            for job in jobs:
                self._waiting.append(job)
                self.metrics.waiting.labels(job.drafter).inc()
            self._cv.notify()
        return jobs

    def _withdraw(self, job: Job) -> None:
        """A cancelled request that is still waiting leaves the queue now
        (not when it reaches the front), and its listener hears so."""
        with self._cv:
            if job not in self._waiting:
                return  # running (it stops at its next step) or already gone
            self._waiting.remove(job)
        m = self.metrics
        m.waiting.labels(job.drafter).dec()
        m.failure.labels(job.drafter, "cancelled").inc()
        job.done = True
        job._put(StepEvent(tokens=[], logprobs=[], texts=[], finish_reason=FINISH_CANCELLED,
                           stats=SpecStats(drafter=job.drafter)))

    @property
    def capacity(self) -> int:
        """The most requests admitted at once: running plus waiting."""
        return self.settings.max_running + self.settings.max_waiting

    def require_ready(self) -> None:
        if self.state == "loading":
            raise NotReady("Model is loading")
        if self.state == "failed":
            raise NotReady(f"Model failed to load: {self.load_error}")
        if self.state != "ready":
            raise NotReady("Server is shutting down")

    def load_counts(self) -> tuple[int, int]:
        with self._cv:
            return len(self._running), len(self._waiting)

    # ------------------------------------------------------------ the worker

    def _worker(self) -> None:
        while True:
            started = []
            with self._cv:
                while not self._closed and not self._waiting and not self._running:
                    self._cv.wait()
                if self._closed and not self._waiting and not self._running:
                    return
                while self._waiting and len(self._running) < self.settings.max_running:
                    job = self._waiting.popleft()
                    self._running.append(job)
                    started.append(job)
                turn = list(self._running)
            for job in started:
                self._start(job)
            # Every running request goes on to its next forward, then all of
            # those forwards run (as one batch, with batching on).
            pending = [job for job in turn if not job.done and self._advance(job)]
            if pending:
                self._run_forwards(pending)
                self._decoded = True

    def _watch_cpu(self) -> None:
        """Every CPU_CHECK_S: how much of the CPUs other processes took (a
        gauge), and a warning when that was enough to slow decoding down and
        there was decoding to slow."""
        share = CpuShare()
        while not self._watch_stop.wait(CPU_CHECK_S):
            busy, share = share.others(), CpuShare()
            decoded, self._decoded = self._decoded, False
            if busy is None:
                continue
            self.metrics.cpu_busy_others.set(busy)
            now = time.monotonic()
            if decoded and busy > BUSY_SHARE and now - self._cpu_warned_at >= CPU_WARN_EVERY_S:
                self._cpu_warned_at = now
                log.warning("other processes kept %.0f%% of this server's CPUs busy while it decoded; its decode "
                            "steps can run many times slower until they stop. Give it cores of its own, or see "
                            "docs/performance.md, 'Sharing the CPU'", 100 * busy)

    def _start(self, job: Job) -> None:
        m, d = self.metrics, job.drafter
        m.waiting.labels(d).dec()
        m.running.labels(d).inc()
        job.started = time.perf_counter()
        m.queue_time.labels(d).observe(job.started - job.arrival)
        if job.cancel.is_set():  # the client left while it waited: no compute at all
            self._finish(job, FINISH_CANCELLED)
            return
        p = job.prepared
        m.prompt_tokens.labels(d).inc(len(p.prompt_ids))
        try:
            model = self.bundle.model
            # The loop needs prompt + max_new_tokens - 1 positions (the last
            # token never runs through the model); no more is allocated.
            job.cache = model.new_cache(batch_size=1, max_len=len(p.prompt_ids) + p.params.max_new_tokens)
            job.cache_bytes = job.cache.nbytes
            m.kv_cache_bytes.inc(job.cache_bytes)
            job.gen = self._generate(model, p.prompt_ids, p.params, self.drafters[d],
                                     tokenizer=self.bundle.tokenizer, cache=job.cache,
                                     should_stop=job.cancel.is_set)
        except Exception as e:
            self._fail(job, e)

    def _advance(self, job: Job) -> bool:
        """Run the request's loop up to its next forward, delivering the events
        it yields on the way. True: it waits on ``job.forward``; False: it has
        finished or failed."""
        prompt = job.prepared.prompt
        try:
            with torch.inference_mode():
                return self._advance_inner(job, prompt)
        except StopIteration:
            self._fail(job, RuntimeError("generation ended without a finish reason"))
        except Exception as e:
            self._fail(job, e)
        return False

    def _advance_inner(self, job: Job, prompt: str) -> bool:
        item = job.gen.send(job.output) if job.forward is not None else next(job.gen)
        job.forward = job.output = None
        while isinstance(item, StepEvent):
            if self.settings.debug_faults:
                if prompt.startswith(SLOW_PREFIX):
                    time.sleep(SLOW_STEP_S)
                if prompt.startswith(FAIL_PREFIX) and job.steps >= 1:
                    raise RuntimeError("injected fault (debug_faults is on and the prompt starts with [[fail]])")
            job.steps += 1
            self._observe_step(job, item)
            if item.finish_reason is not None:
                # Free the slot before the client hears the end: a client that sends its next
                # request at once must find it free, not get a 429 from a full server.
                self._finish(job, item.finish_reason, item.stats)
                job._put(item)
                return False
            job._put(item)
            item = next(job.gen)
        job.forward = item
        return True

    def _run_forwards(self, jobs: list[Job]) -> None:
        """Run the forwards ``jobs`` wait on: as one batch with batching on
        and more than one of them, else one by one. A forward that raises
        fails the requests it was for, and only them."""
        model = self.bundle.model
        if self.settings.batching and len(jobs) > 1:
            groups = [jobs]
        else:
            groups = [[job] for job in jobs]
        for group in groups:
            self.metrics.batch_size.observe(len(group))
            self.metrics.batch_tokens.observe(sum(job.forward.ids.shape[-1] for job in group))
            try:
                with torch.inference_mode():
                    if len(group) == 1:
                        outs = [group[0].forward.run(model)]
                    else:
                        outs = model.forward_batch([(j.forward.ids, j.forward.start, j.forward.cache,
                                                     j.forward.last_only) for j in group])
            except Exception as e:
                for job in group:
                    self._fail(job, e)
                continue
            for job, out in zip(group, outs):
                job.output = out

    def _observe_step(self, job: Job, ev: StepEvent) -> None:
        m, d = self.metrics, job.drafter
        now = time.perf_counter()
        n = len(ev.tokens)
        if n:
            if job.last_token_at is None:
                m.ttft.labels(d).observe(now - job.arrival)
            else:
                per_token = (now - job.last_token_at) / n
                for _ in range(n):
                    m.itl.labels(d).observe(per_token)
            job.last_token_at = now
            job.generated += n
        m.observe_step(d, ev.step)

    def _finish(self, job: Job, reason: str, stats: SpecStats | None = None) -> None:
        m, d = self.metrics, job.drafter
        if reason == FINISH_CANCELLED:
            m.failure.labels(d, "cancelled").inc()
            if job.gen is None:  # cancelled before it started: tell the listener, if any
                job._put(StepEvent(tokens=[], logprobs=[], texts=[], finish_reason=FINISH_CANCELLED,
                                   stats=SpecStats(drafter=d)))
        else:
            m.success.labels(d, reason).inc()
            m.e2e.labels(d).observe(time.perf_counter() - job.arrival)
            if stats is not None and stats.draft_tokens:
                m.acceptance_rate.labels(d).observe(stats.acceptance_rate)
            if stats is not None and stats.verify_steps:
                m.accepted_length.labels(d).observe(stats.mean_accepted_length)
        self._release(job)

    def _fail(self, job: Job, exc: Exception) -> None:
        log.exception("request %s failed", job.id, exc_info=exc)
        self.metrics.failure.labels(job.drafter, "internal").inc()
        job._put(GenerationFailed(f"Request failed during generation: {type(exc).__name__}: {exc}"))
        self._release(job)

    def _release(self, job: Job) -> None:
        """Drop the generator and the KV cache; the job leaves the running set."""
        if job.gen is not None:
            try:
                job.gen.close()
            except Exception:  # a generator that fails to close must not take the worker down
                log.exception("closing the generator of %s failed", job.id)
        job.gen = None
        job.cache = None
        if job.cache_bytes:
            self.metrics.kv_cache_bytes.dec(job.cache_bytes)
            job.cache_bytes = 0
        self.metrics.running.labels(job.drafter).dec()
        job.done = True
        with self._cv:  # its slot is free for admission at once
            self._running.remove(job)

    # ------------------------------------------------------------ shutdown

    def begin_shutdown(self, timeout: float) -> None:
        """Stop admitting new requests (503) and cancel whatever is still in
        flight ``timeout`` seconds from now. Returns at once: the server keeps
        streaming to in-flight requests meanwhile, and a cancelled one ends
        with a proper "cancelled" event instead of a cut connection."""
        with self._cv:
            if self._stop_deadline is not None:
                return
            self._stop_deadline = time.monotonic() + timeout
            if self.state in ("ready", "loading"):
                self.state = "stopping"
        threading.Thread(target=self._cancel_at_deadline, name="treespec-shutdown", daemon=True).start()

    def _cancel_at_deadline(self) -> None:
        while time.monotonic() < self._stop_deadline and any(self.load_counts()):
            time.sleep(0.02)
        with self._cv:
            stragglers = [*self._waiting, *self._running]
        if stragglers:
            log.warning("shutdown: cancelling %d request(s) still in flight after the grace period", len(stragglers))
        for job in stragglers:
            job.abort()

    def shutdown(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to ``timeout``
        seconds, cancel what is left, and stop the worker (blocking)."""
        self.begin_shutdown(timeout)
        while any(self.load_counts()) and time.monotonic() < self._stop_deadline + 10.0:
            time.sleep(0.02)
        self._watch_stop.set()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
