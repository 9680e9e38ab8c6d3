"""The nginx reference proxy of ``bench.gateway``: its config, and that nginx accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench.gateway import find_nginx, nginx_config, parse_args


def test_config_streams_sse_through_a_keepalive_upstream(tmp_path: Path) -> None:
    conf = nginx_config(prefix=tmp_path, port=8123, upstream_url="http://127.0.0.1:41234")
    assert "listen 127.0.0.1:8123;" in conf
    assert "server 127.0.0.1:41234;" in conf
    assert "proxy_buffering off;" in conf
    assert "proxy_http_version 1.1;" in conf
    assert 'proxy_set_header Connection "";' in conf
    assert "keepalive 256;" in conf
    # Everything nginx writes stays under the prefix, so it runs without root.
    assert f"pid {tmp_path / 'nginx.pid'};" in conf
    assert f"proxy_temp_path {tmp_path / 'proxy'};" in conf


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1:1", "http://127.0.0.1", "127.0.0.1:80", "http://:80"]
)
def test_config_rejects_an_upstream_without_http_host_and_port(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match=r"upstream_url .*expected http://HOST:PORT"):
        nginx_config(prefix=tmp_path, port=8123, upstream_url=url)


@pytest.mark.parametrize("port", [0, 65536])
def test_config_rejects_a_port_out_of_range(tmp_path: Path, port: int) -> None:
    with pytest.raises(ValueError, match=f"port {port}: expected 1-65535"):
        nginx_config(prefix=tmp_path, port=port, upstream_url="http://127.0.0.1:1")


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = find_nginx(None)
    if nginx is None:
        pytest.skip("nginx is not installed (the bench skips its row the same way)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_config(prefix=tmp_path, port=8123, upstream_url="http://127.0.0.1:1"))
    checked = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_no_nginx_found_means_the_row_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    assert find_nginx(None) is None
    assert find_nginx("/opt/nginx/sbin/nginx") == "/opt/nginx/sbin/nginx"


def test_an_nginx_that_is_not_executable_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nginx")
    with pytest.raises(SystemExit):
        parse_args(["--nginx", missing])
    assert f"--nginx {missing!r}: not an executable file" in capsys.readouterr().err
