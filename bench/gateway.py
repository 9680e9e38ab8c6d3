"""Streamed SSE through the gateway against direct to the same engine-sim, side by side.

    .venv/bin/python -m bench.gateway [--requests 400] [--concurrency 1 32] [--max-tokens 32]

Starts an engine-sim and a gateway (with auth, metrics and TTFT recording on, as in
production) as separate processes on 127.0.0.1, seeds a throwaway SQLite store, then for
each concurrency runs the same bounded stream load directly and through the gateway and
prints throughput (streams/s, tokens/s), its ratio, and TTFT p50/p99 with the latency the
gateway adds. Every run is bounded in count (``--requests``) and time (``--seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.models import Instance
from autoscaler.store.tokens import TokenKind, issue_token
from autoscaler.store.workloads import ensure_workload
from autoscaler.uvloop import run_async

MODEL = "bench/llama-8b"
ENGINE_KEY = "bench-engine-key"


@dataclass(frozen=True, slots=True)
class RunResult:
    streams: int
    chunks: int
    seconds: float
    ttfts: tuple[float, ...]

    @property
    def streams_per_sec(self) -> float:
        return self.streams / self.seconds

    def tokens_per_sec(self, max_tokens: int) -> float:
        return self.streams * max_tokens / self.seconds

    def ttft_ms(self, q: float) -> float:
        ordered = sorted(self.ttfts)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one_stream(
    http: aiohttp.ClientSession, url: str, key: str, max_tokens: int
) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about GPUs."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    started = time.perf_counter()
    ttft = None
    chunks = 0
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        async for _chunk in resp.content.iter_any():
            if ttft is None:
                ttft = time.perf_counter() - started
            chunks += 1
    return ttft or 0.0, chunks


async def run_load(
    *, url: str, key: str, concurrency: int, requests: int, seconds: float, max_tokens: int
) -> RunResult:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await _one_stream(http, url, key, max_tokens)  # warm the connection pool
        remaining = requests
        ttfts: list[float] = []
        chunks = 0
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal remaining, chunks
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                ttft, n = await _one_stream(http, url, key, max_tokens)
                ttfts.append(ttft)
                chunks += n

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return RunResult(streams=len(ttfts), chunks=chunks, seconds=elapsed, ttfts=tuple(ttfts))


@contextlib.asynccontextmanager
async def process(*args: str) -> AsyncIterator[str]:
    """Start a server process; yields the first http:// URL it prints."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        yield next(w for w in line.split() if w.startswith("http://")).rstrip("/)")
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def seed(database_url: str, engine_url: str) -> str:
    now = datetime.now(UTC)
    async with open_store(database_url) as engine:
        sessions = session_factory(engine)
        async with sessions() as s, s.begin():
            spec = WorkloadSpec(name="bench", slug="bench", model=MODEL)
            ensured = await ensure_workload(
                s, project="bench", spec=spec, on_drift=OnDrift.RECONCILE, now=now
            )
            s.add(
                Instance(
                    launch_id="lch_bench",
                    workload_id=ensured.workload.id,
                    project="bench",
                    workload_slug="bench",
                    spec_generation=1,
                    provider="local",
                    offer_key="local/sim",
                    region="local",
                    zone="local",
                    instance_type="sim",
                    gpu="A100",
                    gpu_count=1,
                    hourly_usd=0.0,
                    url=engine_url,
                    engine_key=ENGINE_KEY,
                    intent_at=now,
                    launched_at=now,
                    ready_at=now,
                )
            )
            issued = await issue_token(
                s, kind=TokenKind.LIVE, project="bench", workload_slug="bench", now=now
            )
        return issued.secret


def serve_gateway_main(database_url: str) -> None:
    from gateway.app import GatewaySettings, serve_gateway

    settings = GatewaySettings(replica_concurrency_cap=1024)
    run_async(serve_gateway(database_url=database_url, host="127.0.0.1", port=0, settings=settings))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database_url = f"sqlite+aiosqlite:///{Path(tmp) / 'state.db'}"
        engine_args = ["-m", "providers.engine_sim", "--port", "0", "--model", MODEL]
        engine_args += ["--api-key", ENGINE_KEY, "--time-scale", str(args.time_scale)]
        async with process(*engine_args) as engine_url:
            key = await seed(database_url, engine_url)
            async with process(
                "-m", "bench.gateway", "--serve-gateway", database_url
            ) as gateway_url:
                targets = {
                    "direct": (f"{engine_url}/v1/chat/completions", ENGINE_KEY),
                    "gateway": (
                        f"{gateway_url}/endpoint/bench/bench/v1/chat/completions",
                        key,
                    ),
                }
                print(
                    f"{args.requests} streams of {args.max_tokens} tokens per run, at most "
                    f"{args.seconds:g} s; engine-sim time scale {args.time_scale:g}\n"
                )
                header = (
                    f"{'conc':>4} {'path':>8} {'streams/s':>10} {'tokens/s':>10} "
                    f"{'ratio':>6} {'ttft p50 ms':>12} {'ttft p99 ms':>12} "
                    f"{'added p50':>10} {'added p99':>10}"
                )
                print(header)
                for concurrency in args.concurrency:
                    results: dict[str, RunResult] = {}
                    for name, (url, secret) in targets.items():
                        results[name] = await run_load(
                            url=url,
                            key=secret,
                            concurrency=concurrency,
                            requests=args.requests,
                            seconds=args.seconds,
                            max_tokens=args.max_tokens,
                        )
                    _print(concurrency, results, max_tokens=args.max_tokens)


def _print(concurrency: int, results: dict[str, RunResult], *, max_tokens: int) -> None:
    direct = results["direct"]
    for name, r in results.items():
        ratio = r.streams_per_sec / direct.streams_per_sec
        added = ""
        if name != "direct":
            added = (
                f"{r.ttft_ms(0.5) - direct.ttft_ms(0.5):>+10.2f} "
                f"{r.ttft_ms(0.99) - direct.ttft_ms(0.99):>+10.2f}"
            )
        print(
            f"{concurrency:>4} {name:>8} {r.streams_per_sec:>10.1f} "
            f"{r.tokens_per_sec(max_tokens):>10.0f} "
            f"{ratio:>6.2f} {r.ttft_ms(0.5):>12.2f} {r.ttft_ms(0.99):>12.2f} {added}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="streams per run")
    parser.add_argument("--seconds", type=float, default=20.0, help="time bound per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-scale", type=float, default=1000.0)
    parser.add_argument("--serve-gateway", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.serve_gateway:
        serve_gateway_main(parsed.serve_gateway)
    else:
        run_async(main(parsed))
