"""End to end with a real nginx writing its access log through the adapter."""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.adapter_harness import read_ndjson
from tests.peers import need
from tests.proc import Proc
from tests.waiting import wait_until

pytestmark = pytest.mark.peer

CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log {d}/logs/access.log combined;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{
    listen unix:{d}/nginx.sock;
    location / {{ return 200 "ok\\n"; }}
    location /missing {{ return 404; }}
  }}
}}
"""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (nginx listens on one: no port to choose)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        self.sock = s


def test_real_nginx_access_log_is_parsed_and_shipped(tmp_path: Path) -> None:
    """Every request nginx logs arrives parsed (method, path, status, agent), with redaction."""
    binary = need("nginx")
    (tmp_path / "logs").mkdir()
    (tmp_path / "tmp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONF.format(d=tmp_path))
    nginx = Proc(
        "-c", str(conf), "-p", str(tmp_path), program=(binary,), tail=(), stdout=subprocess.DEVNULL
    )  # fmt: skip
    adapter = Proc(
        "adapter",
        "--path",
        str(tmp_path / "logs" / "*.log"),
        "--parse",
        "nginx",
        "--redact",
        "email",
        "--sink",
        "file",
        "--sink-path",
        str(tmp_path / "out.ndjson"),
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
    )
    try:
        sock = tmp_path / "nginx.sock"
        wait_until(
            lambda: sock.exists() or nginx.p.poll() is not None, f"nginx to listen on {sock}"
        )
        assert nginx.p.poll() is None, nginx.log_text()
        adapter.wait_event("adapter_started")
        for i in range(200):
            conn = UnixHTTPConnection(str(sock))
            path = f"/missing/{i}" if i % 10 == 0 else f"/item/{i}?by=ann@example.org"
            conn.request("GET", path, headers={"User-Agent": f"test-agent/{i}"})
            conn.getresponse().read()
            conn.close()
        wait_until(
            lambda: len(read_ndjson(tmp_path / "out.ndjson")) >= 200, "every access-log line"
        )
        adapter.signal(signal.SIGTERM)
        assert adapter.wait(15) == 0
    finally:
        adapter.stop()
        nginx.terminate()
        nginx.stop()
    records = read_ndjson(tmp_path / "out.ndjson")
    assert len(records) == 200
    assert all("parse_error" not in r for r in records)
    statuses = sorted({r["status"] for r in records})
    assert statuses == [200, 404]
    agents = {r["user_agent"] for r in records}
    assert agents == {f"test-agent/{i}" for i in range(200)}
    assert all("ann@example.org" not in r["path"] for r in records)
    assert all(r["method"] == "GET" and r["protocol"] == "HTTP/1.1" for r in records)
