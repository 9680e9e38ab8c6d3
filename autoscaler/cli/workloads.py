"""Client commands, kubectl-style: apply, get, describe, delete, keys, tokens, secrets.

Exit codes: 0 done; 1 the API refused or could not be reached; 2 bad input (the file or
the spec), with every message naming the field. A file is validated whole before any of
it is applied, so a bad document leaves the stored state untouched.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
import yaml
from pydantic import ValidationError

from autoscaler.cli.output import emit, print_table
from autoscaler.sdk import ApiError, ConfigError, ManagementClient
from autoscaler.spec import APPLY, WorkloadDocument, describe_errors

EXIT_API, EXIT_INPUT = 1, 2

project_option = click.option(
    "--project", "-p", envvar="AUTOSCALER_PROJECT", required=True, help="Project slug."
)
url_option = click.option(
    "--url",
    envvar="AUTOSCALER_URL",
    default="http://127.0.0.1:8001",
    show_default=True,
    help="Management API.",
)
output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table"
)


def register(group: click.Group) -> None:
    for command in (apply, patch, edit, get, describe, delete, keys, tokens, secrets):
        group.add_command(command)


@contextmanager
def _client(url: str, project: str) -> Iterator[ManagementClient]:
    """A client whose failures become clear messages and exit codes."""
    try:
        with ManagementClient.from_env(project=project, url=url) as client:
            yield client
    except ConfigError as exc:
        _fail(str(exc), code=EXIT_INPUT)
    except ApiError as exc:
        lines = [f"error: {exc.message} ({exc.code}, HTTP {exc.status})"]
        lines += [f"  {_detail(d)}" for d in exc.details]
        _fail("\n".join(lines), code=EXIT_INPUT if exc.status in (400, 422) else EXIT_API)
    except httpx.TransportError as exc:
        _fail(f"error: cannot reach the management API at {url}: {exc}", code=EXIT_API)


def _detail(detail: dict[str, Any]) -> str:
    if "old" in detail:
        return f"{detail['path']}: {detail['old']!r} -> {detail['new']!r}"
    return f"{detail.get('path')}: {detail.get('message')} (got {detail.get('value')!r})"


def _fail(message: str, *, code: int) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


# -- apply ----------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The workload documents of a YAML or JSON file: one per YAML document, or a list.

    A file that does not parse, holds no document or holds something other than mappings
    exits with code 2, like any other invalid input.
    """
    text = path.read_text()
    try:
        if path.suffix == ".json":
            loaded: list[Any] = [json.loads(text)]
        else:
            loaded = [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        _fail(f"error: {path}: not valid YAML/JSON: {exc}", code=EXIT_INPUT)
    docs: list[Any] = []
    for item in loaded:
        docs.extend(item if isinstance(item, list) else [item])
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            _fail(f"error: {path}: document {i} is not a mapping of spec fields", code=EXIT_INPUT)
    if not docs:
        _fail(f"error: {path}: no workload documents (the file is empty)", code=EXIT_INPUT)
    return docs


def _validate_all(path: Path, docs: Sequence[dict[str, Any]]) -> list[WorkloadDocument]:
    problems: list[str] = []
    valid: list[WorkloadDocument] = []
    for i, doc in enumerate(docs, 1):
        label = f"{path}: document {i}" + (f" ({doc['slug']})" if "slug" in doc else "")
        try:
            valid.append(WorkloadDocument.model_validate(doc, context={APPLY: True}))
        except ValidationError as exc:
            problems += [
                f"{label}: {d['path']}: {d['message']} (got {d['value']!r})"
                for d in describe_errors(exc)
            ]
    if problems:
        _fail("\n".join(problems), code=EXIT_INPUT)
    return valid


@click.command()
@click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Workload file (YAML or JSON); repeatable.",
)
@click.option(
    "--on-drift",
    type=click.Choice(["reconcile", "fail", "ignore"]),
    help="Override each document's on_drift.",
)
@project_option
@url_option
@output_option
def apply(
    files: tuple[Path, ...], on_drift: str | None, project: str, url: str, output: str
) -> None:
    """Create or update the workloads in FILE(s), by slug."""
    batches = [(path, load_documents(path)) for path in files]
    validated = [(path, docs, _validate_all(path, docs)) for path, docs in batches]
    results: list[dict[str, Any]] = []
    with _client(url, project) as client:
        for _path, docs, parsed in validated:
            for raw, doc in zip(docs, parsed, strict=True):
                body = {k: v for k, v in raw.items() if k != "on_drift"}
                ref = client.ensure(body, on_drift=on_drift or doc.on_drift)
                results.append(
                    {
                        "workload": ref.workload_slug,
                        "action": ref.action,
                        "generation": ref.generation,
                        "diff": ref.diff,
                        "warnings": ref.warnings,
                    }
                )
                for warning in ref.warnings:
                    click.echo(f"warning: {ref.workload_slug}: {warning}", err=True)
    if output != "table":
        emit(results, output)
        return
    for r in results:
        click.echo(f"workload/{r['workload']} {r['action']} (generation {r['generation']})")
        for d in r["diff"]:
            click.echo(f"  {_detail(d)}")


def _echo_ref(ref: Any, output: str) -> None:
    result = {
        "workload": ref.workload_slug,
        "action": ref.action,
        "generation": ref.generation,
        "diff": ref.diff,
        "warnings": ref.warnings,
    }
    if output != "table":
        emit(result, output)
        return
    click.echo(f"workload/{ref.workload_slug} {ref.action} (generation {ref.generation})")
    for d in ref.diff:
        click.echo(f"  {_detail(d)}")


@click.command()
@click.argument("slug")
@click.option(
    "--patch",
    "text",
    required=True,
    help='A JSON merge patch, in JSON or YAML: \'{"execution_policy_config": {"replicas": 2}}\'.',
)
@click.option(
    "--on-drift",
    type=click.Choice(["reconcile", "fail", "ignore"]),
    default="reconcile",
    show_default=True,
)
@project_option
@url_option
@output_option
def patch(slug: str, text: str, on_drift: str, project: str, url: str, output: str) -> None:
    """Change part of a workload with a JSON merge patch (null removes a key)."""
    try:
        changes = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        _fail(f"error: --patch is not valid JSON/YAML: {exc}", code=EXIT_INPUT)
    if not isinstance(changes, dict) or not changes:
        _fail("error: --patch must be a non-empty mapping of spec fields", code=EXIT_INPUT)
    with _client(url, project) as client:
        ref = client.update(slug, changes, on_drift=on_drift)
    _echo_ref(ref, output)


@click.command()
@click.argument("slug")
@project_option
@url_option
@output_option
def edit(slug: str, project: str, url: str, output: str) -> None:
    """Edit a workload's spec in $VISUAL or $EDITOR; saving applies it (unchanged: nothing)."""
    with _client(url, project) as client:
        spec = client.get(slug)["spec"]
        before = yaml.safe_dump(spec, sort_keys=False)
        after = click.edit(before, extension=".yaml")
        if after is None or after == before:
            click.echo(f"workload/{slug} unchanged (edit cancelled)")
            return
        try:
            doc = yaml.safe_load(after)
        except yaml.YAMLError as exc:
            _fail(f"error: the edited spec is not valid YAML: {exc}", code=EXIT_INPUT)
        if not isinstance(doc, dict):
            _fail("error: the edited spec is not a mapping of spec fields", code=EXIT_INPUT)
        if doc.get("slug", slug) != slug:
            _fail(f"error: edit cannot change the slug ({slug!r})", code=EXIT_INPUT)
        ref = client.ensure({**doc, "slug": slug})
    _echo_ref(ref, output)


# -- get / describe / delete ---------------------------------------------------------------


def _policy_summary(spec: dict[str, Any]) -> str:
    config = spec.get("execution_policy_config") or {}
    policy = spec.get("execution_policy", "fixed")
    if policy == "fixed":
        return f"fixed x{config.get('replicas', 1)}"
    if policy == "scheduled":
        return f"scheduled {config.get('cron') or config.get('window')}"
    ceiling = config.get("max_hourly_cost_usd")
    limit = f" <= ${ceiling}/h" if ceiling else ""
    return f"autoscaling {config.get('min_workers', 0)}-{config.get('max_workers')}{limit}"


def serving_summary(spec: dict[str, Any]) -> str | None:
    """The endpoint type, per-replica concurrency and throughput floor of a stored spec,
    in words (``None`` when it sets none of them)."""
    parts: list[str] = []
    kind = spec.get("endpoint_type")
    if kind is not None:
        parts.append(f"{kind} endpoint" + (" (jobs only)" if kind == "async" else ""))
    if spec.get("per_worker") is not None:
        parts.append(f"{spec['per_worker']} request(s) at once per replica (per_worker)")
    floor = (spec.get("execution_policy_config") or {}).get("min_throughput_rate")
    if floor is not None:
        parts.append(f"at least {floor:g} tokens/s (min_throughput_rate)")
    return ", ".join(parts) or None


@click.command()
@click.argument("slug", required=False)
@click.option(
    "-l",
    "--selector",
    help="Only workloads whose labels match, e.g. 'team=search,tier!=batch'.",
)
@project_option
@url_option
@output_option
def get(slug: str | None, selector: str | None, project: str, url: str, output: str) -> None:
    """List workloads (those matching -l), or show one."""
    if slug and selector is not None:
        _fail("error: give a workload slug or a -l selector, not both", code=EXIT_INPUT)
    with _client(url, project) as client:
        items = [client.get(slug)] if slug else client.list(labels=selector)
    if output != "table":
        emit(items[0] if slug else items, output)
        return
    print_table(
        [
            "SLUG",
            "NAME",
            "MODEL",
            "BACKEND",
            "POLICY",
            "STATUS",
            "READY",
            "GEN",
            "UPDATED",
            "LABELS",
        ],
        [
            [
                w["slug"],
                w["name"],
                w["spec"]["model"],
                w["spec"]["backend"],
                _policy_summary(w["spec"]),
                w["status"]["phase"],
                _ready_of(w["status"]),
                str(w["generation"]),
                w["updated_at"][:19],
                ",".join(f"{k}={v}" for k, v in (w["spec"].get("labels") or {}).items()) or "-",
            ]
            for w in items
        ],
    )


def _ready_of(status: dict[str, Any]) -> str:
    desired = status["desired"]
    return f"{status['ready']}/{'-' if desired is None else desired}"


@click.command()
@click.argument("slug")
@click.option("--limit", default=10, show_default=True, help="How many recent decisions.")
@project_option
@url_option
@output_option
def describe(slug: str, limit: int, project: str, url: str, output: str) -> None:
    """Show a workload with its replicas and recent decisions."""
    with _client(url, project) as client:
        workload = client.get(slug)
        replicas = client.replicas(slug)
        decisions = client.decisions(slug, limit=limit)
        measured = client.signals(slug)
    if output != "table":
        emit(
            {**workload, "replicas": replicas, "decisions": decisions, "signals": measured},
            output,
        )
        return
    spec = workload["spec"]
    click.echo(f"Workload:    {workload['project']}/{workload['slug']} ({workload['name']})")
    click.echo(f"Model:       {spec['model']} on {spec['backend']} ({spec['task_type']})")
    click.echo(f"Policy:      {_policy_summary(spec)}")
    if (serving := serving_summary(spec)) is not None:
        click.echo(f"Serving:     {serving}")
    click.echo(f"Generation:  {workload['generation']}   spec {workload['spec_hash'][:12]}")
    click.echo(f"Updated:     {workload['updated_at']}")
    status = workload.get("status") or {}
    if status:
        wanted = "-" if status["desired"] is None else status["desired"]
        click.echo(
            f"Status:      {status['phase']}: {status['ready']} ready of {wanted} desired"
            + (f", {status['starting']} starting" if status["starting"] else "")
        )
        click.echo(f"Phase:       {status['actual_phase']} (desired {status['desired_phase']})")
        click.echo(f"Endpoint:    {status['endpoint']}")
        if status.get("last_error"):
            click.echo(f"Last error:  {status['last_error']} (at {status['last_error_at']})")
        if status.get("note"):
            click.echo(f"Note:        {status['note']}")
    click.echo("\nSpec:")
    click.echo(_indent(yaml.safe_dump(spec, sort_keys=False)))
    click.echo(f"Replicas ({len(replicas)}):")
    print_table(
        ["LAUNCH", "PHASE", "DESIRED", "OFFER", "GPU", "SPOT", "$/H", "AGE", "ENGINE", "URL"],
        [
            [
                r["launch_id"],
                r["actual_phase"],
                r["desired_phase"],
                r["offer"],
                f"{r['gpu']} x{r['gpu_count']}",
                "yes" if r["spot"] else "no",
                f"{r['hourly_usd']:.3f}",
                _age(r["age_sec"]),
                r.get("engine") or "-",
                r["url"] or "-",
            ]
            for r in replicas
        ],
        empty="  (none)",
    )
    for r in replicas:
        if r.get("last_error"):
            click.echo(f"  {r['launch_id']}: {r['last_error']}")
        if r.get("engine_reason") and r["phase"] not in ("terminated", "failed"):
            click.echo(f"  {r['launch_id']}: {r['engine']}: {r['engine_reason']}")
        if r.get("role"):
            click.echo(f"  {r['launch_id']}: {r['role']} of replica group {r['group']}")
        if r["phase"] in ("parking", "parked") and r.get("park_mode"):
            running = r.get("running_usd_per_hour")
            price = f", ${running:.3f}/h running" if running is not None else ""
            click.echo(f"  {r['launch_id']}: warm pool: {r['park_mode']}{price}")
        if r.get("command") and r["phase"] != "terminated":
            click.echo(f"  {r['launch_id']}: command: {r['command']}")
    starts = start_times_summary(replicas)
    if starts:
        click.echo("\nStart times (median seconds to ready, by offer and path):")
        for line in starts:
            click.echo(f"  {line}")
    click.echo("\n" + _measured(measured))
    click.echo(f"\nRecent decisions ({len(decisions)}):")
    print_table(
        ["AT", "KIND", "ACTED", "$/H DELTA", "REASON"],
        [
            [
                d["at"][:19],
                d["kind"],
                "yes" if d["acted"] else "no",
                f"{d['cost_delta_usd_per_hour']:+.3f}",
                d["reason"],
            ]
            for d in decisions
        ],
        empty="  (none)",
    )


def start_times_summary(replicas: list[dict[str, Any]]) -> list[str]:
    """One line per offer: each path's median seconds from asking to ready and how many
    replicas it is measured on (launch: bought fresh; start: a stopped machine; wake: a
    sleeping engine)."""
    by_offer: dict[str, dict[str, list[float]]] = {}
    for r in replicas:
        start = r.get("start")
        if start:
            paths = by_offer.setdefault(r["offer"], {})
            paths.setdefault(start["path"], []).append(float(start["seconds"]))
    lines = []
    for offer, paths in sorted(by_offer.items()):
        parts = [
            f"{path} {statistics.median(values):.0f}s (n={len(values)})"
            for path, values in sorted(paths.items())
        ]
        lines.append(f"{offer}: " + ", ".join(parts))
    return lines


def _measured(found: dict[str, Any]) -> str:
    """The gateway's and the engines' last measurement, a line each."""
    if found.get("at") is None:
        return "Measured:    nothing yet (no request, or no engine scrape so far)"
    window = f"{found['window_sec'] / 60:g} min"
    lines = [f"Measured at {found['at'][:19]} (TTFT over the last {window}):"]
    g = found.get("gateway") or {}
    lines.append(
        f"  gateway:  TTFT p50 {_secs(g.get('ttft_p50_s'))} p95 {_secs(g.get('ttft_p95_s'))} "
        f"({g.get('ttft_samples', 0)} timed, {g.get('unstreamed_answers', 0)} answered "
        f"unstreamed), {g.get('request_rate', 0.0):.2f} req/s, "
        f"{g.get('in_flight', 0)} in flight, {g.get('queued', 0)} queued"
    )
    e = found.get("engines")
    if e is None:
        lines.append("  engines:  not scraped (no ready replica exports /metrics)")
    else:
        kv = e.get("kv_cache_usage")
        lines.append(
            f"  engines:  TTFT p50 {_secs(e.get('ttft_p50_s'))} p95 {_secs(e.get('ttft_p95_s'))} "
            f"({e.get('ttft_samples', 0)} first tokens), {e.get('waiting', 0)} waiting, "
            f"{e.get('running', 0)} running, KV cache "
            f"{'-' if kv is None else f'{kv:.0%}'} over {e.get('replicas', 0)} replica(s)"
        )
    return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@click.command()
@click.argument("slugs", nargs=-1, required=True)
@project_option
@url_option
def delete(slugs: tuple[str, ...], project: str, url: str) -> None:
    """Delete workloads: their replicas are drained and terminated, their keys revoked."""
    with _client(url, project) as client:
        for slug in slugs:
            client.delete(slug)
            click.echo(f"workload/{slug} deleted")


# -- keys and tokens --------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Data keys (ik_live_…) for the gateway, one workload each."""


@keys.command("create")
@click.argument("slug")
@click.option("--name", default="", help="A label to recognise the key by.")
@project_option
@url_option
@output_option
def keys_create(slug: str, name: str, project: str, url: str, output: str) -> None:
    """Make a data key; its secret is printed this once."""
    with _client(url, project) as client:
        key = client.create_key(slug, name=name)
    _show_secret(key.id, key.secret, output)


@keys.command("list")
@click.argument("slug")
@project_option
@url_option
@output_option
def keys_list(slug: str, project: str, url: str, output: str) -> None:
    """List a workload's data keys (never their secrets)."""
    with _client(url, project) as client:
        items = client.list_keys(slug)
    if output != "table":
        emit(items, output)
        return
    print_table(
        ["ID", "PREFIX", "NAME", "CREATED", "REVOKED"],
        [
            [k["id"], k["prefix"] + "…", k["name"], k["created_at"][:19], _short(k["revoked_at"])]
            for k in items
        ],
        empty="(no keys)",
    )


@keys.command("revoke")
@click.argument("slug")
@click.argument("key_id")
@project_option
@url_option
def keys_revoke(slug: str, key_id: str, project: str, url: str) -> None:
    """Revoke a data key; the gateway refuses it within seconds."""
    with _client(url, project) as client:
        client.revoke_key(slug, key_id)
    click.echo(f"key/{key_id} revoked")


@click.group()
def tokens() -> None:
    """Control tokens (ik_sdk_…) for the management API."""


@tokens.command("create")
@click.option("--name", default="", help="A label to recognise the token by.")
@project_option
@url_option
@output_option
def tokens_create(name: str, project: str, url: str, output: str) -> None:
    """Make a control token for a project (needs an admin token); printed this once."""
    with _client(url, project) as client:
        token = client.create_project_token(name=name)
    _show_secret(token.id, token.secret, output)


@click.group()
def secrets() -> None:
    """Stored secrets (a Hugging Face token) that workloads name: hf_token_secret."""


@secrets.command("create")
@click.argument("name")
@click.option(
    "--from-file",
    "from_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the value from this file (one line; a final newline is dropped).",
)
@click.option("--from-stdin", is_flag=True, help="Read the value from standard input.")
@click.option(
    "--replace",
    is_flag=True,
    help="Replace the value of a stored secret (also one workloads use): running replicas "
    "keep the value they booted with, new ones get this one.",
)
@project_option
@url_option
def secrets_create(
    name: str, from_file: Path | None, from_stdin: bool, replace: bool, project: str, url: str
) -> None:
    """Store a secret (or, with --replace, a stored secret's new value); its value is never
    printed, listed or shown again."""
    if (from_file is None) == (not from_stdin):
        _fail("give exactly one of --from-file PATH or --from-stdin", code=EXIT_INPUT)
    text = from_file.read_text() if from_file is not None else sys.stdin.read()
    value = text.removesuffix("\n").removesuffix("\r")
    if not value or "\n" in value or "\r" in value:
        _fail("the secret must be one non-empty line (a Hugging Face token is)", code=EXIT_INPUT)
    with _client(url, project) as client:
        if replace:
            client.replace_secret(name, value)
        else:
            client.create_secret(name, value)
    click.echo(f"secret/{name} {'replaced' if replace else 'created'}")


@secrets.command("list")
@project_option
@url_option
@output_option
def secrets_list(project: str, url: str, output: str) -> None:
    """List the project's secrets: names and creation times, never values."""
    with _client(url, project) as client:
        items = client.list_secrets()
    if output != "table":
        emit(items, output)
        return
    print_table(
        ["NAME", "CREATED"],
        [[item["name"], item["created_at"][:19]] for item in items],
        empty="(no secrets)",
    )


@secrets.command("delete")
@click.argument("name")
@project_option
@url_option
def secrets_delete(name: str, project: str, url: str) -> None:
    """Delete a secret no workload refers to."""
    with _client(url, project) as client:
        client.delete_secret(name)
    click.echo(f"secret/{name} deleted")


def _show_secret(token_id: str, secret: str, output: str) -> None:
    if output != "table":
        emit({"id": token_id, "secret": secret}, output)
        return
    click.echo(f"id:     {token_id}")
    click.echo(f"secret: {secret}")
    click.echo("(the secret is shown only now; store it safely)", err=True)


def _short(value: str | None) -> str:
    return value[:19] if value else "-"
