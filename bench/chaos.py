"""Crash and fault trials: the real controller process, SIGKILLed, against moto's EC2.

    .venv/bin/python -m bench.chaos --trials 200 [--seed 1] [--kills 3] [--jobs 4]

Each trial runs ``autoscaler controller`` (the installed command's code, as a separate
process) against its own moto EC2 server behind its own EC2 proxy
(``tests/fakes/ec2_proxy.py``), with a fresh SQLite store and cluster id, and one fixed
workload. It walks a scenario, and SIGKILLs the controller at a random moment of each
step, then starts it again:

* ``launch``: apply 3 replicas;
* ``scale_down``: apply 3, then re-apply with 1;
* ``replace``: apply 2, change the engine command (a spec-drift rollout), and terminate
  one machine behind the controller's back;
* ``delete``: apply 2, then delete.

Every trial ends with a delete, and the controller left to finish. Each trial draws a
provider fault, injected at random into the EC2 calls: ``capacity``, ``quota``,
``throttle``, ``server_error`` (5xx), ``lost`` (the request takes effect, the answer
never comes), ``timeout`` (the same after holding the connection), ``eventual``
(new instances missing from ``DescribeInstances``/``TerminateInstances`` for 2-8 s), or
``none``.

An observer compares moto's view with the ledger every ``--observe-sec`` throughout
(the ledger is read first, so a row closed before a machine shows running is a real
breach):

* **untracked**: a running machine whose launch id no ledger row holds (every machine
  must have its intent row before it is bought);
* **duplicated**: two live machines for one launch id, or two open rows on one machine;
* **false termination**: a running machine whose row the ledger has closed;
* **ceiling overrun**: running machines (at the catalog's prices) above the fleet
  ceiling, or open ledger rows above it;
* **leaked**: a machine still running when the trial's last delete has settled.

It prints one line per scenario and fault and the totals, and exits 1 if any invariant
broke (2 if the harness itself failed; 3 if it was stopped, after printing the table of
the trials that finished). Bounded: each wait has a deadline, each trial a
fixed number of kills. Everything listens on 127.0.0.1.

``--jobs N`` runs N trials at once, each in a worker process of its own with that world
of its own (moto, proxy, engines, store, cluster id): the trials, their seeds and every
check are the same whatever ``N``; only where the kills fall in the controller's work
differs, as the machine is busier. Each progress line says where the trial's time went
(``settle``: waiting for a step's replicas, ``end``: for the delete to finish).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import yaml
from moto.server import ThreadedMotoServer

from autoscaler.spec import OnDrift, WorkloadSpec
from autoscaler.store.db import open_store, session_factory
from autoscaler.store.workloads import delete_workload, ensure_workload
from catalog.model import Offer, ProviderName
from catalog.snapshot import Snapshot, snapshot_path, write_snapshot
from providers.base import CLUSTER_TAG, LAUNCH_ID_TAG
from tests.fakes.ec2_proxy import Ec2Failure, Ec2Proxy, FaultRule

REGION = "us-east-1"
MOTO_AMI = "ami-785db401"
PROJECT = "chaos"
SLUG = "bot"
SCENARIOS = ("launch", "scale_down", "replace", "delete")
FAULTS = (
    "none",
    "capacity",
    "quota",
    "throttle",
    "server_error",
    "lost",
    "timeout",
    "eventual",
)
FLEET_CEILING = 3.1
"""Three A10G machines ($1.006/h) fit; a fourth never may."""
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


def _offer(instance_type: str, gpu: str, price: float) -> Offer:
    return Offer(
        provider=ProviderName.AWS,
        region=REGION,
        zone=f"{REGION}a",
        instance_type=instance_type,
        gpu=gpu,
        gpu_count=1,
        vcpus=4,
        memory_gib=16,
        on_demand_usd_per_hour=price,
    )


OFFERS = (_offer("g5.xlarge", "NVIDIA A10G", 1.006),)
PRICES = {o.instance_type: o.on_demand_usd_per_hour for o in OFFERS}
_LIVE = ("pending", "running", "stopping", "shutting-down", "stopped")
_RUNNING = ("pending", "running")

# --- figures ---------------------------------------------------------------------------


INVARIANTS = ("leaked", "duplicated", "untracked", "false_terminations", "ceiling_overruns")


@dataclass
class TrialResult:
    scenario: str
    fault: str
    kills: int = 0
    machines: int = 0
    observations: int = 0
    peak_usd_per_hour: float = 0.0
    faults_injected: int = 0
    breaches: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in INVARIANTS})
    log: str = ""
    steps: int = 0
    settled: int = 0
    """Steps whose replicas all came up (launched, adopted, running at moto) before the
    next step began: a trial that settles nothing tested little."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Where the trial's time went: each phase's wall seconds (``start``: waiting for a
    restarted controller to reach its loop, ``settle``: for a step's replicas, ``end``:
    for the delete to finish, ``total``), for the progress line."""

    def count(self, invariant: str) -> int:
        return len(self.breaches[invariant])

    @property
    def broken(self) -> bool:
        return any(self.breaches.values())


# --- the world -------------------------------------------------------------------------


class HealthyEngines:
    """Answers 200 to everything: every replica's engine is healthy (so drains happen)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Cloud:
    """moto's EC2 server, the proxy the controller talks through, and a direct client."""

    def __init__(self, *, seed: int) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.proxy = Ec2Proxy(upstream_host=host, upstream_port=port, hang_sec=1.0, seed=seed)
        self.proxy.start()
        self.ec2 = boto3.client(
            "ec2",
            region_name=REGION,
            endpoint_url=f"http://{host}:{port}",
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def machines(self, cluster: str) -> dict[str, tuple[str, str, str]]:
        """instance id -> (state, launch id tag, instance type), as moto really has it."""
        found: dict[str, tuple[str, str, str]] = {}
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
        )
        for page in pages:
            for reservation in page["Reservations"]:
                for raw in reservation.get("Instances", []):
                    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
                    found[raw["InstanceId"]] = (
                        raw["State"]["Name"],
                        tags.get(LAUNCH_ID_TAG, ""),
                        raw.get("InstanceType", ""),
                    )
        return found

    def terminate_behind_the_back(self, cluster: str, rng: random.Random) -> str | None:
        running = [i for i, (s, _, _) in self.machines(cluster).items() if s in _RUNNING]
        if not running:
            return None
        victim = rng.choice(sorted(running))
        self.ec2.terminate_instances(InstanceIds=[victim])
        return victim

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()


@dataclass(frozen=True, slots=True)
class LedgerRow:
    launch_id: str
    instance_id: str | None
    closed: bool
    hourly_usd: float


def read_ledger(db_path: Path) -> list[LedgerRow]:
    """The ledger's rows, read straight from SQLite (no migration, no ORM)."""
    try:
        connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return []
    try:
        rows = connection.execute(
            "SELECT launch_id, instance_id, terminated_confirmed_at IS NOT NULL, hourly_usd "
            "FROM instances"
        ).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        connection.close()
    return [LedgerRow(str(a), b, bool(c), float(d)) for a, b, c, d in rows]


# --- the observer ------------------------------------------------------------------------


class Observer:
    """Checks moto against the ledger every ``interval`` seconds in a thread."""

    def __init__(
        self, *, cloud: Cloud, cluster: str, db_path: Path, result: TrialResult, interval: float
    ) -> None:
        self.cloud = cloud
        self.cluster = cluster
        self.db_path = db_path
        self.result = result
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.observe()
            except Exception as exc:  # a harness problem, reported, never a pass
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def observe(self) -> None:
        ledger = read_ledger(self.db_path)  # first: a row closed before a machine runs
        machines = self.cloud.machines(self.cluster)
        result = self.result
        breaches = result.breaches
        result.observations += 1
        result.machines = max(result.machines, len(machines))
        by_launch = {r.launch_id: r for r in ledger}
        live: dict[str, list[str]] = {}
        running_usd = 0.0
        unknown: list[tuple[str, str]] = []
        for instance_id, (state, launch_id, instance_type) in machines.items():
            if state in _LIVE:
                live.setdefault(launch_id, []).append(instance_id)
            if state not in _RUNNING:
                continue
            running_usd += PRICES.get(instance_type, 0.0)
            row = by_launch.get(launch_id)
            if row is None:
                unknown.append((instance_id, launch_id))
            elif row.closed:
                breaches["false_terminations"].add(instance_id)
        if unknown:  # its intent may have been written after our ledger read: read again
            again = {r.launch_id for r in read_ledger(self.db_path)}
            for instance_id, launch_id in unknown:
                if launch_id not in again:
                    breaches["untracked"].add(instance_id)
        for launch_id, ids in live.items():
            if len(ids) > 1:
                breaches["duplicated"].add(f"{launch_id}: {', '.join(sorted(ids))}")
        held = [r.instance_id for r in ledger if not r.closed and r.instance_id]
        for instance_id in {i for i in held if held.count(i) > 1}:
            breaches["duplicated"].add(f"rows on {instance_id}")
        ledger_usd = sum(r.hourly_usd for r in ledger if not r.closed)
        result.peak_usd_per_hour = max(result.peak_usd_per_hour, running_usd)
        if running_usd > FLEET_CEILING + 1e-9:
            breaches["ceiling_overruns"].add(f"running ${running_usd:.3f}/h")
        if ledger_usd > FLEET_CEILING + 1e-9:
            breaches["ceiling_overruns"].add(f"ledger ${ledger_usd:.3f}/h")

    def leaked(self) -> list[str]:
        """Machines still running (the trial has deleted everything)."""
        machines = self.cloud.machines(self.cluster)
        return sorted(i for i, (state, _, _) in machines.items() if state in _LIVE)


# --- the controller process ----------------------------------------------------------------


STARTED = b"controller for cluster "
"""The line the controller prints once it is set up, just before its loop starts."""


class ControllerProcess:
    def __init__(self, *, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def running_loop(self) -> bool:
        """Whether the latest start has got as far as its loop (its start line is out)."""
        try:
            return self.log_path.read_bytes().count(STARTED) >= self.starts
        except FileNotFoundError:
            return False

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **AWS_ENV},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- a trial ---------------------------------------------------------------------------


def _spec(replicas: int, command: str = "--max-model-len 4096") -> WorkloadSpec:
    return WorkloadSpec.model_validate(
        {
            "name": SLUG,
            "slug": SLUG,
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "command": command,
            "execution_policy_config": {"replicas": replicas},
        }
    )


async def _apply(db_url: str, spec: WorkloadSpec) -> None:
    async with open_store(db_url) as engine, session_factory(engine)() as s, s.begin():
        await ensure_workload(
            s, project=PROJECT, spec=spec, on_drift=OnDrift.RECONCILE, now=datetime.now(UTC)
        )


async def _delete(db_url: str) -> None:
    async with open_store(db_url) as engine, session_factory(engine)() as s, s.begin():
        await delete_workload(s, project=PROJECT, slug=SLUG, now=datetime.now(UTC))


def _fault_rules(fault: str, rng: random.Random) -> list[FaultRule]:
    every = frozenset({"RunInstances", "TerminateInstances", "DescribeInstances"})
    if fault in ("capacity", "quota"):
        return [FaultRule(fault, probability=rng.uniform(0.2, 0.5))]  # type: ignore[arg-type]
    if fault in ("throttle", "server_error", "lost", "timeout"):
        kind: Ec2Failure = fault  # type: ignore[assignment]
        return [FaultRule(kind, actions=every, probability=rng.uniform(0.1, 0.3))]
    return []


@dataclass(frozen=True, slots=True)
class Options:
    kills: int
    observe_sec: float
    settle_sec: float
    end_sec: float
    start_sec: float
    workdir: Path


def _wait(predicate: Callable[[], bool], *, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


def _settled(db_path: Path, cloud: Cloud, cluster: str, replicas: int) -> Callable[[], bool]:
    def check() -> bool:
        rows = [r for r in read_ledger(db_path) if not r.closed]
        if len(rows) != replicas or not all(r.instance_id for r in rows):
            return False
        machines = cloud.machines(cluster)
        return all(machines.get(r.instance_id or "", ("",))[0] == "running" for r in rows)

    return check


class Trial:
    def __init__(
        self, *, number: int, scenario: str, fault: str, cloud: Cloud, seed: int, options: Options
    ) -> None:
        self.scenario = scenario
        self.fault = fault
        self.cloud = cloud
        self.rng = random.Random(seed)
        self.options = options
        self.cluster = f"chaos-{number}-{uuid.uuid4().hex[:6]}"
        self.dir = options.workdir / self.cluster
        self.dir.mkdir(parents=True)
        self.db_path = self.dir / "state.db"
        self.db_url = f"sqlite+aiosqlite:///{self.db_path}"
        self.result = TrialResult(scenario=scenario, fault=fault, log=str(self.dir / "log"))
        self.kills_left = options.kills

    def _config(self, engines: HealthyEngines) -> Path:
        config = {
            "cluster_id": self.cluster,
            "callback_url": "http://127.0.0.1:9",
            "fleet_max_hourly_cost_usd": FLEET_CEILING,
            "tick_sec": 0.3,
            "orphan_grace_sec": 3600,  # a leak must show as one, not be swept
            "unavailable_sec": 1,
            "visibility_grace_sec": 30,
            "providers": {
                "aws": {
                    "regions": [REGION],
                    "endpoint_url": self.cloud.proxy.url,
                    "ami_overrides": {"default": MOTO_AMI},
                    "gateway_cidr": "203.0.113.10/32",
                    "retry_wait_seconds": 0.05,
                    "max_attempts": 2,
                    "engine_address": engines.address,
                }
            },
        }
        path = self.dir / "controller.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _timed(self, phase: str, predicate: Callable[[], bool], *, seconds: float) -> bool:
        started = time.monotonic()
        done = _wait(predicate, seconds=seconds)
        spent = time.monotonic() - started
        self.result.seconds[phase] = self.result.seconds.get(phase, 0.0) + spent
        if phase == "settle":
            self.result.steps += 1
            self.result.settled += done
        return done

    def _kill_soon(self, controller: ControllerProcess) -> None:
        """SIGKILL at a random moment of the step under way, then start again."""
        if self.kills_left <= 0:
            return
        self.kills_left -= 1
        # The moment is drawn in the controller's work, not in its start-up: from its
        # start line (its imports and set-up take seconds on a busy machine).
        self._timed("start", controller.running_loop, seconds=self.options.start_sec)
        time.sleep(self.rng.uniform(0.0, 2.5))  # the random moment itself
        controller.kill(signal.SIGKILL)
        self.result.kills += 1
        controller.start()

    def run(self, engines: HealthyEngines) -> TrialResult:
        started = time.monotonic()
        try:
            return self._run(engines)
        finally:
            self.result.seconds["total"] = time.monotonic() - started

    def _run(self, engines: HealthyEngines) -> TrialResult:
        write_snapshot(
            Snapshot(offers=OFFERS, taken_at=datetime.now(UTC), source="chaos catalog"),
            snapshot_path(self.dir / "data"),
        )
        asyncio.run(_apply(self.db_url, _spec(2 if self.scenario in ("replace", "delete") else 3)))
        argv = [
            sys.executable,
            "-m",
            "autoscaler",
            "controller",
            "--db",
            self.db_url,
            "--config",
            str(self._config(engines)),
            "--data-dir",
            str(self.dir / "data"),
            "--metrics-port",
            "0",
        ]
        controller = ControllerProcess(argv=argv, log_path=self.dir / "log")
        proxy = self.cloud.proxy
        before = sum(proxy.counts.faults.values()) + proxy.counts.hidden
        for rule in _fault_rules(self.fault, self.rng):
            proxy.inject(rule)
        proxy.hide_new_sec = self.rng.uniform(2.0, 8.0) if self.fault == "eventual" else 0.0
        observer = Observer(
            cloud=self.cloud,
            cluster=self.cluster,
            db_path=self.db_path,
            result=self.result,
            interval=self.options.observe_sec,
        )
        try:
            with observer:
                controller.start()
                self._steps(controller)
                asyncio.run(_delete(self.db_url))
                self._kill_soon(controller)
                # end_sec of the restarted controller's work, not of its start-up.
                self._timed("start", controller.running_loop, seconds=self.options.start_sec)
                self._timed("end", lambda: not observer.leaked(), seconds=self.options.end_sec)
                observer.observe()
                for instance_id in observer.leaked():
                    self.result.breaches["leaked"].add(instance_id)
        finally:
            controller.kill(signal.SIGTERM)
            proxy.clear_faults()
            proxy.hide_new_sec = 0.0
        injected = sum(proxy.counts.faults.values()) + proxy.counts.hidden
        self.result.faults_injected = injected - before
        if observer.errors:
            raise RuntimeError(f"observer failed in {self.cluster}: {observer.errors[0]}")
        return self.result

    def _steps(self, controller: ControllerProcess) -> None:
        first = 2 if self.scenario in ("replace", "delete") else 3
        self._kill_soon(controller)  # during the launches
        settle = self.options.settle_sec
        self._timed(
            "settle", _settled(self.db_path, self.cloud, self.cluster, first), seconds=settle
        )
        if self.scenario == "scale_down":
            asyncio.run(_apply(self.db_url, _spec(1)))
            self._kill_soon(controller)
            self._timed(
                "settle", _settled(self.db_path, self.cloud, self.cluster, 1), seconds=settle
            )
        elif self.scenario == "replace":
            asyncio.run(_apply(self.db_url, _spec(2, command="--max-model-len 8192")))
            self.cloud.terminate_behind_the_back(self.cluster, self.rng)
            self._kill_soon(controller)
            self._timed(
                "settle", _settled(self.db_path, self.cloud, self.cluster, 2), seconds=settle
            )


# --- the run ---------------------------------------------------------------------------


@dataclass
class Report:
    results: list[TrialResult]

    def totals(self) -> dict[str, int]:
        return {k: sum(r.count(k) for r in self.results) for k in INVARIANTS}

    @property
    def broken(self) -> bool:
        return any(self.totals().values())

    def table(self) -> str:
        header = (
            f"{'scenario':<11} {'fault':<13} {'trials':>6} {'kills':>6} {'faults':>6} "
            f"{'settled':>7} "
            f"{'machines':>8} {'obs':>6} {'peak$/h':>8} "
            + " ".join(f"{k.replace('_', ' '):>{max(len(k), 6)}}" for k in INVARIANTS)
        )
        lines = [header, "-" * len(header)]
        groups: dict[tuple[str, str], list[TrialResult]] = {}
        for r in self.results:
            groups.setdefault((r.scenario, r.fault), []).append(r)
        for (scenario, fault), rs in sorted(groups.items()):
            lines.append(_line(scenario, fault, rs))
        lines.append("-" * len(header))
        lines.append(_line("all", "", self.results))
        lines.append(f"fleet ceiling ${FLEET_CEILING:.2f}/h")
        for r in self.results:
            if r.broken:
                detail = {k: sorted(v) for k, v in r.breaches.items() if v}
                lines.append(f"BROKEN {r.scenario}/{r.fault}: {detail} (log {r.log})")
        return "\n".join(lines)


def _line(scenario: str, fault: str, rs: list[TrialResult]) -> str:
    return (
        f"{scenario:<11} {fault:<13} {len(rs):>6} {sum(r.kills for r in rs):>6} "
        f"{sum(r.faults_injected for r in rs):>6} "
        f"{f'{sum(r.settled for r in rs)}/{sum(r.steps for r in rs)}':>7} "
        f"{sum(r.machines for r in rs):>8} "
        f"{sum(r.observations for r in rs):>6} "
        f"{max((r.peak_usd_per_hour for r in rs), default=0.0):>8.3f} "
        + " ".join(f"{sum(r.count(k) for r in rs):>{max(len(k), 6)}}" for k in INVARIANTS)
    )


@contextmanager
def _world(seed: int) -> Iterator[tuple[Cloud, HealthyEngines]]:
    cloud = Cloud(seed=seed)
    engines = HealthyEngines()
    try:
        yield cloud, engines
    finally:
        engines.stop()
        cloud.stop()


@dataclass(frozen=True, slots=True)
class TrialPlan:
    number: int
    scenario: str
    fault: str
    seed: int


def plan_trials(
    trials: int, *, seed: int, scenarios: Sequence[str], faults: Sequence[str]
) -> list[TrialPlan]:
    """Scenarios and faults in turn, so every pairing comes up; each trial's own seed
    (its kill moments, fault rates and proxy) drawn from ``seed``."""
    rng = random.Random(seed)
    return [
        TrialPlan(
            number=number,
            scenario=scenarios[number % len(scenarios)],
            fault=faults[(number // len(scenarios) + number) % len(faults)],
            seed=rng.randrange(2**32),
        )
        for number in range(trials)
    ]


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like an error, so every ``finally`` stops its controller."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def run_trial(plan: TrialPlan, options: Options) -> TrialResult:
    """One trial in a world of its own: a moto server, an EC2 proxy, healthy engines."""
    _stop_on_sigterm()
    try:
        with _world(plan.seed) as (cloud, engines):
            trial = Trial(
                number=plan.number,
                scenario=plan.scenario,
                fault=plan.fault,
                cloud=cloud,
                seed=plan.seed,
                options=options,
            )
            return trial.run(engines)
    except SystemExit as stop:
        if multiprocessing.parent_process() is not None:
            # A pool's worker: its controller is stopped; exit, or the pool hands it the
            # next queued trial.
            os._exit(stop.code if isinstance(stop.code, int) else 1)
        raise


def run_trials(
    trials: int,
    *,
    seed: int = 1,
    kills: int = 3,
    jobs: int = 1,
    observe_sec: float = 0.25,
    settle_sec: float = 60.0,
    end_sec: float = 40.0,
    start_sec: float = 120.0,
    workdir: Path | None = None,
    scenarios: Sequence[str] = SCENARIOS,
    faults: Sequence[str] = FAULTS,
    progress: Callable[[int, TrialResult], None] | None = None,
) -> Report:
    """Run ``trials`` trials (see :func:`plan_trials`), ``jobs`` at a time, each in a
    world of its own; the report lists them in their planned order."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    plans = plan_trials(trials, seed=seed, scenarios=scenarios, faults=faults)
    results: dict[int, TrialResult] = {}
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        options = Options(
            kills=kills,
            observe_sec=observe_sec,
            settle_sec=settle_sec,
            end_sec=end_sec,
            start_sec=start_sec,
            workdir=workdir or Path(tmp),
        )
        if jobs == 1:
            for plan in plans:
                results[plan.number] = run_trial(plan, options)
                if progress is not None:
                    progress(plan.number, results[plan.number])
        else:
            # spawn: a worker starts from a clean interpreter, not a copy of this one's
            # threads and sockets.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                running = {pool.submit(run_trial, plan, options): plan for plan in plans}
                try:
                    for future in as_completed(running):
                        number = running[future].number
                        results[number] = future.result()
                        if progress is not None:
                            progress(number, results[number])
                except BaseException:
                    for future in running:
                        future.cancel()
                    for process in pool._processes.values():  # their controllers stop too
                        process.terminate()
                    raise
    return Report([results[plan.number] for plan in plans])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial")
    parser.add_argument(
        "--jobs", type=int, default=1, help="trials run at once, each in its own world"
    )
    parser.add_argument("--observe-sec", type=float, default=0.25)
    parser.add_argument("--keep", type=Path, help="keep every trial's store and log here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    _stop_on_sigterm()

    finished: list[TrialResult] = []

    def progress(number: int, result: TrialResult) -> None:
        finished.append(result)
        done = len(finished)
        state = "BROKEN" if result.broken else "ok"
        spent = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
        print(
            f"[{done}/{args.trials}] trial {number + 1} {result.scenario}/{result.fault}: "
            f"{result.kills} kills, {result.machines} machines, "
            f"{result.settled}/{result.steps} steps settled, {state} ({spent})",
            flush=True,
        )

    try:
        report = run_trials(
            args.trials,
            seed=args.seed,
            kills=args.kills,
            jobs=args.jobs,
            observe_sec=args.observe_sec,
            workdir=args.keep,
            progress=progress,
        )
    except Exception as exc:
        print(f"chaos harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (SystemExit, KeyboardInterrupt):  # stopped (SIGTERM, Ctrl-C): what finished
        report = Report(finished)
        print()
        print(report.table())
        print(
            f"STOPPED EARLY: {len(finished)} of {args.trials} trials finished in "
            f"{time.monotonic() - started:.0f}s (the trials under way were stopped)"
        )
        return 1 if report.broken else 3
    print()
    print(report.table())
    print(f"{len(report.results)} trials in {time.monotonic() - started:.0f}s")
    return 1 if report.broken else 0


if __name__ == "__main__":
    sys.exit(main())
