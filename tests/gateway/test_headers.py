"""What crosses the proxy: hop-by-hop headers dropped, the caller's key swapped out."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.proxy import forwarded_headers, response_headers


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def test_request_loses_hop_by_hop_headers_and_the_callers_key() -> None:
    incoming = headers(
        Authorization="Bearer ik_live_secret",
        Connection="keep-alive, X-Private-Hop",
        X_Private_Hop="1",
        Keep_Alive="timeout=5",
        TE="trailers",
        Transfer_Encoding="chunked",
        Host="gateway:8000",
        Content_Type="application/json",
        Accept="text/event-stream",
    )
    out = forwarded_headers(incoming, engine_key="engine-key")
    assert out == [
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("Authorization", "Bearer engine-key"),
    ]


def test_request_without_an_engine_key_carries_no_authorization() -> None:
    out = forwarded_headers(headers(Authorization="Bearer ik_live_secret"), engine_key=None)
    assert [k for k, _ in out if k.lower() == "authorization"] == []


def test_response_keeps_content_headers_only() -> None:
    upstream = headers(
        Content_Type="text/event-stream",
        Transfer_Encoding="chunked",
        Connection="close",
        Content_Length="12",
        X_Request_Id="abc",
    )
    assert dict(response_headers(upstream)) == {
        "Content-Type": "text/event-stream",
        "X-Request-Id": "abc",
    }
