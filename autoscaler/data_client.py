"""Python client of the gateway (the data plane): text, chat, streaming, embeddings, jobs.

>>> client = DataClient.from_env(project="acme")
>>> bot = client.endpoint("support-bot", api_key="ik_live_…")
>>> answer = bot.generate_text(prompt="Hello", temperature=0.2, max_tokens=64)
>>> answer.text, answer.model
>>> for piece in bot.stream_chat(messages=[{"role": "user", "content": "Hi"}]):
...     print(piece, end="")
>>> bot.embed(input=["a", "b"]).embeddings
>>> job = bot.submit_job(body={"query": "q", "documents": ["a", "b"]})  # a reranker
>>> bot.job_result(job.id).result

The gateway holds a request while a scaled-to-zero workload boots (up to its cold-start
deadline), so the default read timeout is generous. Error answers raise
:class:`GatewayError` with the gateway's code, message and ``Retry-After``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
#: Above the gateway's default cold-start hold (300 s), so a held request is not cut short.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=330.0, write=60.0, pool=10.0)


class GatewayError(Exception):
    """An error answer of the gateway or of the replica behind it."""

    def __init__(
        self, status: int, code: str | None, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code or 'error'}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class ConfigError(Exception):
    """The client is missing a setting (project or key)."""


@dataclass(frozen=True, slots=True)
class TextResult:
    text: str
    model: str
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    embeddings: list[list[float]]
    model: str
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Job:
    """An async job; ``result`` is the replica's answer once ``status`` is final."""

    id: str
    status: str
    route: str
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")


class DataClient:
    """Synchronous client of one gateway for one project. Close it or use ``with``."""

    def __init__(
        self,
        *,
        url: str,
        project: str,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not project:
            raise ConfigError("no project: pass project=… or set AUTOSCALER_PROJECT")
        self.project = project
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, transport=transport)

    @classmethod
    def from_env(
        cls, project: str | None = None, *, url: str | None = None, **kwargs: Any
    ) -> DataClient:
        """Read ``AUTOSCALER_GATEWAY_URL`` (default 127.0.0.1:8000) and ``AUTOSCALER_PROJECT``."""
        return cls(
            url=url or os.environ.get("AUTOSCALER_GATEWAY_URL", DEFAULT_GATEWAY_URL),
            project=project or os.environ.get("AUTOSCALER_PROJECT", ""),
            **kwargs,
        )

    def endpoint(self, slug: str, *, api_key: str) -> Endpoint:
        """One workload, used with one of its data keys (``ik_live_…``)."""
        if not api_key:
            raise ConfigError(f"no data key for {slug!r}: pass api_key='ik_live_…'")
        endpoint = Endpoint(self._http, path=f"/endpoint/{self.project}/{slug}/v1", api_key=api_key)
        # The endpoint shares this client's connections: it keeps the client alive, so
        # ``DataClient.from_env(...).endpoint(...)`` works after the client's last name goes.
        endpoint.client = self
        return endpoint

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __del__(self) -> None:
        # Scripts written like the product's samples never close their clients; the
        # pooled connections close with the client instead of leaking sockets.
        http = getattr(self, "_http", None)
        if http is not None:
            http.close()


class Endpoint:
    """The OpenAI-compatible routes of one workload."""

    client: DataClient | None = None
    """The data client whose connections this endpoint uses."""

    def __init__(self, http: httpx.Client, *, path: str, api_key: str) -> None:
        self._http = http
        self._path = path
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._model: str | None = None

    # -- text ----------------------------------------------------------------------

    def generate_text(
        self,
        *,
        prompt: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> TextResult:
        body = self._body(model, prompt=prompt, temperature=temperature, max_tokens=max_tokens)
        data = self._post("completions", {**body, **extra})
        choice = data["choices"][0]
        return TextResult(
            text=choice.get("text", ""),
            model=data.get("model", body["model"]),
            finish_reason=choice.get("finish_reason"),
            usage=data.get("usage") or {},
        )

    def chat(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        temperature: float | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> TextResult:
        body = self._body(
            model, messages=list(messages), temperature=temperature, max_tokens=max_tokens
        )
        data = self._post("chat/completions", {**body, **extra})
        choice = data["choices"][0]
        return TextResult(
            text=choice["message"].get("content") or "",
            model=data.get("model", body["model"]),
            finish_reason=choice.get("finish_reason"),
            usage=data.get("usage") or {},
        )

    def stream_chat(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        temperature: float | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> Iterator[str]:
        """The answer's text, piece by piece as the replica generates it."""
        body = self._body(
            model, messages=list(messages), temperature=temperature, max_tokens=max_tokens
        )
        for event in self._stream("chat/completions", {**body, **extra, "stream": True}):
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    def stream_text(
        self,
        *,
        prompt: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        **extra: Any,
    ) -> Iterator[str]:
        body = self._body(model, prompt=prompt, temperature=temperature, max_tokens=max_tokens)
        for event in self._stream("completions", {**body, **extra, "stream": True}):
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    yield choice["text"]

    # -- embeddings ----------------------------------------------------------------

    def embed(self, *, input: Sequence[str], model: str | None = None) -> EmbeddingResult:
        body = self._body(model, input=list(input))
        data = self._post("embeddings", body)
        rows = sorted(data["data"], key=lambda row: row.get("index", 0))
        return EmbeddingResult(
            embeddings=[row["embedding"] for row in rows],
            model=data.get("model", body["model"]),
            usage=data.get("usage") or {},
        )

    # -- async jobs ----------------------------------------------------------------

    def submit_job(self, *, body: Mapping[str, Any], route: str | None = None) -> Job:
        """Queue ``body`` for ``route`` (default: the workload's modality); returns at once."""
        payload: dict[str, Any] = {"body": {"model": self.model(), **body}}
        if route is not None:
            payload["route"] = route
        return _job(self._post("jobs", payload))

    def job(self, job_id: str) -> Job:
        return _job(self._request("GET", f"jobs/{job_id}").json())

    def job_result(self, job_id: str, *, timeout: float = 600.0, poll_sec: float = 0.5) -> Job:
        """Wait for the job to finish (``succeeded`` or ``failed``) and return it."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.done:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:g} s")
            time.sleep(poll_sec)

    # -- plumbing ------------------------------------------------------------------

    def model(self) -> str:
        """The workload's model name (asked once, from ``/v1/models``)."""
        if self._model is None:
            data = self._request("GET", "models").json()
            self._model = str(data["data"][0]["id"])
        return self._model

    def _body(self, model: str | None, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        body["model"] = model or self.model()
        return body

    def _post(self, route: str, body: Mapping[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = self._request("POST", route, json=body).json()
        return data

    def _request(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(
            method, f"{self._path}/{route}", headers=self._headers, **kwargs
        )
        if response.is_error:
            raise _gateway_error(response)
        return response

    def _stream(self, route: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        url = f"{self._path}/{route}"
        with self._http.stream("POST", url, json=body, headers=self._headers) as response:
            if response.is_error:
                response.read()
                raise _gateway_error(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event: dict[str, Any] = json.loads(data)
                if event.get("error"):
                    error = event["error"]
                    raise GatewayError(502, error.get("code"), error.get("message", str(error)))
                yield event


def _job(data: Mapping[str, Any]) -> Job:
    return Job(
        id=data["id"],
        status=data["status"],
        route=data["route"],
        result=data.get("result"),
        error=data.get("error"),
    )


def _gateway_error(response: httpx.Response) -> GatewayError:
    retry_after = response.headers.get("Retry-After")
    try:
        error = response.json()["error"]
        code, message = error.get("code"), str(error.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = None, response.text[:500] or "no body"
    return GatewayError(
        response.status_code,
        code,
        message,
        retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
    )
