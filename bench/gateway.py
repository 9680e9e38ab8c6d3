"""Streamed SSE through the gateway against direct to the same engine-sim, side by side.

    .venv/bin/python -m bench.gateway [--concurrency 1 32] [--rounds 3] [--seconds 3]
                                      [--workers 2]

Starts an engine-sim and a gateway (with auth, metrics and TTFT recording on, as in
production) as separate processes on uvloop, on 127.0.0.1, and seeds a throwaway SQLite
store; and a second gateway run as ``--workers`` worker processes sharing its port
(``gateway.workers``; its row is ``gw-xN``, its CPU the sum of the parent and its
workers; ``--workers 1`` leaves it out). For each concurrency it runs ``--rounds``
rounds; a round warms each path up, then measures direct and through each gateway back
to back, rotating which goes first, so a noisy neighbour or a CPU frequency change lands
on all. It prints, per path, throughput
(the median over rounds), the throughput ratio (the median of each round's gateway/direct
ratio), TTFT p50/p99 over every stream of every round with the latency the gateway adds,
and the CPU time each process spent per stream (load generator, engine, gateway): on a
small machine where all three share the cores, CPU per stream is the figure that does
not move with the neighbours. Every run is bounded in count (``--requests``) and time
(``--seconds``).

Where an ``nginx`` binary is found (on ``PATH``, in ``/usr/sbin``, or ``--nginx``), it is
measured in the same rounds as a reference reverse proxy in front of the same engine: one
single-process nginx (``master_process off``, one worker, like the gateway's one process)
from a throwaway config, with ``proxy_buffering off`` and HTTP/1.1 keep-alive to the
engine so SSE streams through chunk by chunk. Its row carries its own ratio to direct and
its added TTFT, and a line after each concurrency gives the gateway's throughput as a
ratio of nginx's (the median of each round's ratio). Without nginx the bench prints why
and measures the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

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
class Target:
    url: str
    key: str


@dataclass(frozen=True, slots=True)
class RunResult:
    streams: int
    chunks: int
    seconds: float
    ttfts: tuple[float, ...]
    #: CPU seconds (user + system) each process spent during the run.
    cpu: dict[str, float]

    @property
    def streams_per_sec(self) -> float:
        return self.streams / self.seconds


@dataclass(slots=True)
class PathStats:
    """Every round's run of one path at one concurrency."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def streams_per_sec(self) -> float:
        return statistics.median(r.streams_per_sec for r in self.runs)

    @property
    def chunks_per_stream(self) -> float:
        return sum(r.chunks for r in self.runs) / max(1, sum(r.streams for r in self.runs))

    def ttft_ms(self, q: float) -> float:
        ordered = sorted(t for r in self.runs for t in r.ttfts)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def cpu_us_per_stream(self, process: str) -> float:
        streams = sum(r.streams for r in self.runs)
        return 1e6 * sum(r.cpu.get(process, 0.0) for r in self.runs) / max(1, streams)


def request_body(max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about GPUs."}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    ).encode()


async def _one_stream(
    http: aiohttp.ClientSession, target: Target, body: bytes
) -> tuple[float, int]:
    headers = {"Authorization": f"Bearer {target.key}", "Content-Type": "application/json"}
    started = time.perf_counter()
    ttft = None
    chunks = 0
    async with http.post(target.url, data=body, headers=headers) as resp:
        resp.raise_for_status()
        async for _chunk in resp.content.iter_any():
            if ttft is None:
                ttft = time.perf_counter() - started
            chunks += 1
    return ttft or 0.0, chunks


class CpuClock:
    """CPU seconds (user + system) of this process and of the server processes."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read(self) -> dict[str, float]:
        times = os.times()
        out = {"loadgen": times.user + times.system}
        for name, pid in self._pids.items():
            out[name] = sum(self._cpu(p) for p in (pid, *_descendants(pid)))
        return out

    def _cpu(self, pid: int) -> float:
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Fields 14 and 15 of /proc/PID/stat, after the parenthesised command name.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self._tick
        return 0.0


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (a gateway's workers)."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


async def run_load(
    *,
    target: Target,
    concurrency: int,
    requests: int,
    seconds: float,
    warmup: float,
    body: bytes,
    clock: CpuClock,
) -> RunResult:
    """``concurrency`` callers streaming back to back: warmed up, then measured."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        remaining = 0
        measuring = False
        ttfts: list[float] = []
        chunks = 0

        async def worker(deadline: float) -> None:
            nonlocal remaining, chunks
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                ttft, n = await _one_stream(http, target, body)
                if measuring:
                    ttfts.append(ttft)
                    chunks += n

        # Warm-up: open the connections, fill the gateway's pool, let the loops settle.
        remaining = requests
        warm_deadline = time.perf_counter() + warmup
        await asyncio.gather(*(worker(warm_deadline) for _ in range(concurrency)))

        remaining = requests
        measuring = True
        before = clock.read()
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = clock.read()
    cpu = {name: after[name] - before.get(name, 0.0) for name in after}
    return RunResult(
        streams=len(ttfts), chunks=chunks, seconds=elapsed, ttfts=tuple(ttfts), cpu=cpu
    )


@dataclass(frozen=True, slots=True)
class Started:
    url: str
    pid: int
    said: tuple[str, ...]


@contextlib.asynccontextmanager
async def process(*args: str) -> AsyncIterator[Started]:
    """Start a server process; yields the first http:// URL it prints and its pid."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        said: list[str] = []
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"{' '.join(args)} exited before serving")
                said.append(line.strip())
                url = next((w for w in line.split() if w.startswith("http://")), None)
                if url is not None:
                    break
        yield Started(url=url.rstrip("/)"), pid=proc.pid, said=tuple(said))
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


def gateway_process(
    database_url: str,
    *,
    source: str | None = None,
    profile: str | None = None,
    workers: int = 1,
) -> contextlib.AbstractAsyncContextManager[Started]:
    args = ["-m", "bench.gateway", "--serve-gateway", database_url]
    if workers > 1:
        args += ["--gateway-workers", str(workers)]
    if source is not None:
        args += ["--gateway-src", str(Path(source).resolve())]
    if profile is not None:
        args += ["--gateway-profile", str(Path(profile).resolve())]
    return process(*args)


def find_nginx(explicit: str | None) -> str | None:
    """The nginx binary to measure: ``explicit``, else ``nginx`` on PATH or in /usr/sbin."""
    if explicit is not None:
        return explicit
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_config(*, prefix: Path, port: int, upstream_url: str) -> str:
    """An nginx config proxying 127.0.0.1:``port`` to ``upstream_url`` for SSE.

    One process (``master_process off``, so the pid started is the one serving and the
    CPU clock reads it), all writable paths under ``prefix``, no access log, responses
    relayed unbuffered, and HTTP/1.1 keep-alive to the upstream so connections are
    reused as the gateway's pool reuses them.
    """
    parts = urlsplit(upstream_url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(
            f"upstream_url {upstream_url!r}: expected http://HOST:PORT (an explicit port)"
        )
    if not 0 < port < 65536:
        raise ValueError(f"port {port}: expected 1-65535")
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""master_process off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp}
    upstream engine {{
        server {parts.hostname}:{parts.port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def nginx_process(binary: str, upstream_url: str) -> AsyncIterator[Started]:
    """Run nginx in the foreground from a throwaway config; stops it on exit."""
    version = await asyncio.create_subprocess_exec(
        binary, "-v", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    said = (await version.communicate())[0].decode().strip()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        prefix = Path(tmp)
        port = _free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(prefix=prefix, port=port, upstream_url=upstream_url))
        proc = await asyncio.create_subprocess_exec(
            binary, "-p", str(prefix), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"
        )
        try:
            async with asyncio.timeout(30):
                while True:
                    if proc.returncode is not None:
                        raise RuntimeError(f"nginx exited with {proc.returncode} before serving")
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        await asyncio.sleep(0.05)
                        continue
                    writer.close()
                    await writer.wait_closed()
                    break
            yield Started(url=f"http://127.0.0.1:{port}", pid=proc.pid, said=(said,))
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()


def uses_uvloop(pid: int) -> bool:
    """Whether uvloop's extension is mapped into the process (Linux only)."""
    with contextlib.suppress(OSError):
        return "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()
    return False


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


async def _serve_gateway(
    database_url: str, source: str | None, profile: str | None, workers: int = 1
) -> None:
    if source is not None:  # a gateway package from another checkout, for before/after
        assert "gateway" not in sys.modules
        sys.path.insert(0, source)
    from gateway import app
    from gateway.app import GatewaySettings, serve_gateway

    loop = asyncio.get_running_loop()
    print(
        f"event loop {type(loop).__module__}.{type(loop).__name__}, gateway from {app.__file__}",
        flush=True,
    )
    settings = GatewaySettings(replica_concurrency_cap=1024)
    # CPU time, not wall time: on cores shared with the engine and the load generator a
    # wall clock charges the gateway's time spent preempted (often right after a socket
    # write wakes the peer) to whichever function was running.
    profiler = cProfile.Profile(time.process_time) if profile is not None else None
    if profiler is not None:
        profiler.enable()
    try:
        await serve_gateway(
            database_url=database_url,
            host="127.0.0.1",
            port=0,
            settings=settings,
            workers=workers,
        )
    finally:
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database_url = f"sqlite+aiosqlite:///{Path(tmp) / 'state.db'}"
        engine_args = ["-m", "providers.engine_sim", "--port", "0", "--model", MODEL]
        engine_args += ["--api-key", ENGINE_KEY, "--time-scale", str(args.time_scale)]
        async with process(*engine_args) as engine, contextlib.AsyncExitStack() as stack:
            key = await seed(database_url, engine.url)
            gateways = {
                "gateway": await stack.enter_async_context(
                    gateway_process(database_url, profile=args.profile_gateway)
                )
            }
            if args.workers > 1:
                gateways[f"gw-x{args.workers}"] = await stack.enter_async_context(
                    gateway_process(database_url, workers=args.workers)
                )
            if args.baseline:
                gateways["baseline"] = await stack.enter_async_context(
                    gateway_process(database_url, source=args.baseline)
                )
            targets = {"direct": Target(f"{engine.url}/v1/chat/completions", ENGINE_KEY)}
            for name, gw in gateways.items():
                targets[name] = Target(f"{gw.url}/endpoint/bench/bench/v1/chat/completions", key)
            proxies = dict(gateways)
            nginx = None if args.no_nginx else find_nginx(args.nginx)
            if nginx is None:
                why = "--no-nginx" if args.no_nginx else "no nginx on PATH or in /usr/sbin"
                print(f"nginx reference row skipped: {why} (--nginx BINARY to name one)")
            else:
                proxies["nginx"] = await stack.enter_async_context(nginx_process(nginx, engine.url))
                targets["nginx"] = Target(f"{proxies['nginx'].url}/v1/chat/completions", ENGINE_KEY)
            clock = CpuClock({"engine": engine.pid} | {n: g.pid for n, g in proxies.items()})
            _print_setup(args, engine=engine, gateways=proxies)
            print(_header(proxies))
            for concurrency in args.concurrency:
                stats = await _measure(
                    concurrency=concurrency, targets=targets, args=args, clock=clock
                )
                _print(concurrency, stats, max_tokens=args.max_tokens, gateways=list(proxies))
    if args.profile_gateway:  # written by the gateway as it stopped, above
        print(f"\ngateway profile (cProfile, all rounds): {args.profile_gateway}")
        stats_file = pstats.Stats(args.profile_gateway, stream=sys.stdout)
        stats_file.sort_stats(pstats.SortKey.TIME).print_stats(args.profile_top)


def _print_setup(
    args: argparse.Namespace, *, engine: Started, gateways: dict[str, Started]
) -> None:
    loop = asyncio.get_running_loop()
    print(
        f"{args.rounds} rounds per concurrency, each {args.warmup:g} s warm-up + at most "
        f"{args.seconds:g} s or {args.requests} streams per path; {args.max_tokens} tokens "
        f"per stream; engine-sim time scale {args.time_scale:g}; {os.cpu_count()} CPUs"
    )
    for name, gw in gateways.items():
        print(f"{name}: {gw.said[0]}")
    on_uvloop = [f"load generator {type(loop).__module__.startswith('uvloop')}"]
    python = {"engine": engine} | {n: g for n, g in gateways.items() if n != "nginx"}
    on_uvloop += [f"{n} {uses_uvloop(p.pid)}" for n, p in python.items()]
    print(f"uvloop: {', '.join(on_uvloop)}\n")


async def _measure(
    *,
    concurrency: int,
    targets: dict[str, Target],
    args: argparse.Namespace,
    clock: CpuClock,
) -> dict[str, PathStats]:
    body = request_body(args.max_tokens)
    names = list(targets)
    stats = {name: PathStats() for name in names}
    for round_no in range(args.rounds):
        # Rotate who goes first, so drift in the machine's load lands on every path.
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            result = await run_load(
                target=targets[name],
                concurrency=concurrency,
                requests=args.requests,
                seconds=args.seconds,
                warmup=args.warmup,
                body=body,
                clock=clock,
            )
            stats[name].runs.append(result)
    return stats


def _header(gateways: dict[str, Started]) -> str:
    return (
        f"{'conc':>4} {'path':>8} {'streams/s':>10} {'tokens/s':>9} {'ratio':>6} "
        f"{'ttft p50':>9} {'ttft p99':>9} {'added p50':>10} {'added p99':>10} "
        f"{'chunks':>6}  cpu us/stream: {'loadgen':>8} {'engine':>8}"
        + "".join(f" {name:>8}" for name in gateways)
    )


def _print(
    concurrency: int, stats: dict[str, PathStats], *, max_tokens: int, gateways: list[str]
) -> None:
    direct = stats["direct"]
    for name, s in stats.items():
        ratios = [
            g.streams_per_sec / d.streams_per_sec for g, d in zip(s.runs, direct.runs, strict=True)
        ]
        added = " " * 21
        if name != "direct":
            added = (
                f"{s.ttft_ms(0.5) - direct.ttft_ms(0.5):>+10.2f} "
                f"{s.ttft_ms(0.99) - direct.ttft_ms(0.99):>+10.2f}"
            )
        cpu = " ".join(f"{s.cpu_us_per_stream(p):>8.0f}" for p in ("loadgen", "engine", *gateways))
        print(
            f"{concurrency:>4} {name:>8} {s.streams_per_sec:>10.1f} "
            f"{s.streams_per_sec * max_tokens:>9.0f} {statistics.median(ratios):>6.2f} "
            f"{s.ttft_ms(0.5):>9.2f} {s.ttft_ms(0.99):>9.2f} {added} "
            f"{s.chunks_per_stream:>6.1f}                {cpu}",
            flush=True,
        )
    if "nginx" in stats:
        for name in gateways:
            if name == "nginx":
                continue
            versus = [
                g.streams_per_sec / n.streams_per_sec
                for g, n in zip(stats[name].runs, stats["nginx"].runs, strict=True)
            ]
            print(
                f"{concurrency:>4} {name} / nginx throughput {statistics.median(versus):.2f} "
                f"(rounds {min(versus):.2f}-{max(versus):.2f}), TTFT p50 "
                f"{stats[name].ttft_ms(0.5) - stats['nginx'].ttft_ms(0.5):+.2f} ms",
                flush=True,
            )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path")
    parser.add_argument("--seconds", type=float, default=3.0, help="time bound per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per run")
    parser.add_argument("--requests", type=int, default=20000, help="streams bound per run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-scale", type=float, default=1000.0)
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure the gateway package found in DIR (a checkout of another "
        "version), interleaved with the rest: before/after figures from one machine state",
    )
    parser.add_argument(
        "--nginx",
        metavar="BINARY",
        help="the nginx to measure as a reference proxy "
        "(default: nginx on PATH or in /usr/sbin; the row is skipped when none is found)",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference row")
    parser.add_argument(
        "--profile-gateway",
        metavar="FILE",
        help="run the gateway under cProfile and write its stats to FILE (read with "
        "python -m pstats); the profiler slows the gateway, so its row is not a measurement",
    )
    parser.add_argument(
        "--profile-top", type=int, default=25, help="functions printed from the profile"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also measure the gateway run as this many worker processes on one port "
        "(row gw-xN); 1: leave that row out",
    )
    parser.add_argument("--serve-gateway", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gateway-profile", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--gateway-src", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.requests < 1 or args.warmup < 0:
        parser.error("--rounds and --requests must be >= 1, --seconds > 0, --warmup >= 0")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.nginx is not None and shutil.which(args.nginx) is None:
        parser.error(f"--nginx {args.nginx!r}: not an executable file (nor a command on PATH)")
    return args


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.serve_gateway:
        run_async(
            _serve_gateway(
                parsed.serve_gateway,
                parsed.gateway_src,
                parsed.gateway_profile,
                parsed.gateway_workers,
            )
        )
    else:
        run_async(main(parsed))
