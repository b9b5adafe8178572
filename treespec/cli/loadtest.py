"""``treespec loadtest`` (also ``python bench/load.py``): N concurrent clients
for a bounded time against a treespec server on loopback.

Each client streams ``/generate_stream`` requests back to back (TTFT is only
measurable on a stream), records status, time to first token, end-to-end
time and the final event's details, and after a 429 backs off briefly. New
requests start until ``--duration`` has passed; those in flight then finish.
The report: requests/s and generated tokens/s over the wall time, TTFT and
e2e p50/p95/p99 of the successful requests, the 429 and error counts, and
the draft acceptance rate and tokens per verify step summed over the run.

With ``--bundle DIR`` it starts ``treespec serve`` itself on a free port
(settings from the usual ``TREESPEC_*`` variables, so e.g.
``TREESPEC_MAX_RUNNING=8``) and stops it afterwards; with ``--url`` it uses a
server that is already running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

DEFAULT_PROMPTS = (
    "The history of the city begins in the",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, there was a little",
    "The results of the experiment show that the",
    "Q: What is the capital of France?\nA:",
    "import numpy as np\nimport torch\n\n",
    "In 1905, Albert Einstein published",
    "The recipe calls for two cups of flour, one cup of sugar, and",
)


@dataclass
class Sample:
    status: int
    start: float
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    spec: dict = field(default_factory=dict)
    error: str | None = None


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def _one(client, body: dict) -> Sample:
    t0 = time.perf_counter()
    s = Sample(status=0, start=t0)
    try:
        async with client.stream("POST", "/generate_stream", json=body) as r:
            s.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                s.error = r.text[:200]
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                ev = json.loads(line[5:])
                if "error" in ev:
                    s.status, s.error = 500, ev["error"][:200]
                    return s
                if s.ttft is None:
                    s.ttft = time.perf_counter() - t0
                if ev.get("details"):
                    s.tokens = ev["details"]["generated_tokens"]
                    s.spec = ev["details"]["speculative"]
        s.e2e = time.perf_counter() - t0
        if not s.spec:
            s.status, s.error = 500, "stream ended without a final event"
    except Exception as e:  # a transport error is a result to count, not a crash
        s.status, s.error = -1, f"{type(e).__name__}: {e}"
    return s


async def run_load(url: str, concurrency: int, duration: float, max_new_tokens: int, prompts: list[str],
                   drafter: str | None = None, api_key: str | None = None, seed: int | None = None,
                   temperature: float = 0.0, progress: bool = True) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples: list[Sample] = []
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def client_loop(i: int, client):
        n = 0
        while time.perf_counter() < deadline:
            params = {"max_new_tokens": max_new_tokens}
            if drafter:
                params["drafter"] = drafter
            if temperature > 0:
                params.update(temperature=temperature, seed=None if seed is None else seed + 1000 * i + n)
            s = await _one(client, {"inputs": prompts[(i + n) % len(prompts)], "parameters": params})
            samples.append(s)
            n += 1
            if s.status == 429:
                await asyncio.sleep(0.05)  # the server said so at once; do not spin

    async def ticker():
        while time.perf_counter() < deadline:
            await asyncio.sleep(min(5.0, max(0.1, deadline - time.perf_counter())))
            ok = sum(s.status == 200 for s in samples)
            print(f"  {time.perf_counter() - t0:6.1f}s  ok {ok}  429 {sum(s.status == 429 for s in samples)}  "
                  f"errors {sum(s.status not in (200, 429) for s in samples)}", file=sys.stderr, flush=True)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=30),
                                 limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(i, client)) for i in range(concurrency)]
        tick = asyncio.create_task(ticker()) if progress else None
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        if tick is not None:
            tick.cancel()
    return summarize(samples, wall, concurrency=concurrency, duration=duration, max_new_tokens=max_new_tokens,
                     drafter=drafter)


def summarize(samples: list[Sample], wall: float, **config) -> dict:
    ok = [s for s in samples if s.status == 200]
    drafted = sum(s.spec.get("draft_tokens", 0) for s in ok)
    accepted = sum(s.spec.get("accepted_tokens", 0) for s in ok)
    steps = sum(s.spec.get("verify_steps", 0) for s in ok)
    errors = [s for s in samples if s.status not in (200, 429)]

    def pct(xs):
        return {f"p{q}": percentile(xs, q) for q in (50, 95, 99)}

    return {
        "config": config,
        "wall_s": wall,
        "requests": len(samples),
        "ok": len(ok),
        "rejected_429": sum(s.status == 429 for s in samples),
        "errors": len(errors),
        "error_examples": sorted({s.error or str(s.status) for s in errors})[:5],
        "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_s": sum(s.tokens for s in ok) / wall if wall else 0.0,
        "ttft_s": pct([s.ttft for s in ok if s.ttft is not None]),
        "e2e_s": pct([s.e2e for s in ok if s.e2e is not None]),
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_verify_step": (accepted + steps) / steps if steps else None,
    }


def markdown_row(r: dict) -> str:
    def ms(x):
        return "–" if x is None else f"{x * 1000:.0f}"

    c = r["config"]
    acc = "–" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
    tau = "–" if r["tokens_per_verify_step"] is None else f"{r['tokens_per_verify_step']:.2f}"
    return (f"| {c.get('drafter') or 'default'} | {c['concurrency']} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {ms(r['ttft_s']['p50'])} / {ms(r['ttft_s']['p95'])} / {ms(r['ttft_s']['p99'])} | "
            f"{ms(r['e2e_s']['p50'])} / {ms(r['e2e_s']['p95'])} / {ms(r['e2e_s']['p99'])} | "
            f"{acc} | {tau} | {r['rejected_429']} | {r['errors']} |")


MARKDOWN_HEADER = ("| drafter | clients | req/s | tok/s | TTFT p50/p95/p99 ms | e2e p50/p95/p99 ms | "
                   "acceptance | tokens/step | 429 | errors |\n"
                   "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")


class SpawnedServer:
    """``treespec serve`` on a free loopback port, for the duration of a run."""

    def __init__(self, bundle: str, extra: list[str] | None = None, timeout: float = 300):
        import httpx

        cmd = [sys.executable, "-m", "treespec.cli", "serve", "--bundle", bundle, "--host", "127.0.0.1",
               "--port", "0", *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        port: list[int] = []

        def pump():
            for line in self.proc.stdout:
                self.log.append(line)
                m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
                if m:
                    port.append(int(m.group(1)))

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("treespec serve did not become healthy:\n" + "".join(self.log[-30:]))
            if port:
                self.url = f"http://127.0.0.1:{port[0]}"
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _server_info(url: str, api_key: str | None) -> dict | None:
    """The server's /info (model, precision and kernels, drafter), kept beside the figures:
    a throughput means little without the machine and the kernels it was measured with."""
    import httpx

    try:
        r = httpx.get(url + "/info", timeout=10, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="load-test a treespec server: concurrent streaming clients for a bounded time",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--bundle", help="start `treespec serve` on this bundle (loopback, free port) for the run")
    p.add_argument("--concurrency", "-c", type=int, nargs="+", default=[4],
                   help="concurrent clients; several values run one after another (default 4)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to keep starting requests (default 30)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--drafter", nargs="+", default=[None], help="drafter(s) to ask for (default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="base seed for sampled requests")
    p.add_argument("--prompts", help="file with one prompt per line (default: a built-in mix)")
    p.add_argument("--api-key", default=os.environ.get("TREESPEC_API_KEY"))
    p.add_argument("--server-arg", action="append", default=[], help="extra `treespec serve` flag (with --bundle)")
    p.add_argument("--json", dest="json_out", help="also write all results to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    prompts = list(DEFAULT_PROMPTS)
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    server = SpawnedServer(args.bundle, args.server_arg) if args.bundle else None
    url = server.url if server else args.url.rstrip("/")
    results = []
    try:
        info = _server_info(url, args.api_key)
        for drafter in args.drafter:
            for c in args.concurrency:
                print(f"load: {c} clients, {args.duration:.0f}s, drafter {drafter or 'default'}, "
                      f"max_new_tokens {args.max_new_tokens} -> {url}", file=sys.stderr)
                r = asyncio.run(run_load(url, c, args.duration, args.max_new_tokens, prompts, drafter=drafter,
                                         api_key=args.api_key, seed=args.seed, temperature=args.temperature))
                results.append(r)
    finally:
        if server:
            server.stop()
    print(MARKDOWN_HEADER)
    for r in results:
        print(markdown_row(r))
    bad = [e for r in results for e in r["error_examples"]]
    if bad:
        print(f"\nerrors, e.g.: {bad[:3]}", file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"command": sys.argv, "server_info": info, "results": results}, f, indent=2)
    return 1 if any(r["errors"] for r in results) else 0

