"""Fixtures for AWS tests: moto's EC2 server over HTTP, and the injecting proxy in front.

Loaded for every test through ``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

from tests.fakes.ec2_proxy import Ec2Proxy


@pytest.fixture(scope="module")
def moto_server() -> Iterator[ThreadedMotoServer]:
    """moto's server on 127.0.0.1 and a free port, for one test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxy(moto_server: ThreadedMotoServer) -> Iterator[Ec2Proxy]:
    """:class:`Ec2Proxy` in front of moto: ClientToken dedupe and injected EC2 errors."""
    host, port = moto_server.get_host_and_port()
    proxy = Ec2Proxy(upstream_host=host, upstream_port=port)
    proxy.start()
    yield proxy
    proxy.stop()
