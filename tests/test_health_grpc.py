"""gRPC health probes (``grpc://``) against real grpcio servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from podpatterns.health.reader import read_record
from podpatterns.health.records import Phase
from podpatterns.health.targets import GrpcTarget, Outcome, check_within, parse_target
from tests.proc import Proc, run
from tests.waiting import eventually

LOOP = "127.0.0.1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def grpc_server(with_health: bool = True) -> AsyncIterator[tuple[Any, int]]:
    """A grpcio aio server on loopback port 0; yield its HealthServicer (or None) and port."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer() if with_health else None
    if servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{LOOP}:0")
    await server.start()
    try:
        yield servicer, port
    finally:
        await server.stop(None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOP, 0))
        return int(sock.getsockname()[1])


def test_parse_grpc_targets() -> None:
    """grpc://HOST:PORT parses, with ?service=NAME; unknown options and no port do not."""
    target = parse_target("grpc://127.0.0.1:50051")
    assert target == GrpcTarget(LOOP, 50051, "grpc://127.0.0.1:50051", "")
    target = parse_target("GRPC://localhost:9000?service=pkg.Svc")
    assert isinstance(target, GrpcTarget)
    assert (target.host, target.port, target.service) == ("localhost", 9000, "pkg.Svc")
    assert target.label == "grpc://localhost:9000?service=pkg.Svc"
    assert parse_target("grpc://[::1]:1").label == "grpc://[::1]:1"
    with pytest.raises(ValueError, match="unknown option 'svc'"):
        parse_target("grpc://127.0.0.1:1?svc=x")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_target("grpc://127.0.0.1")


async def test_serving_passes_and_not_serving_fails_then_flips() -> None:
    """SERVING passes; NOT_SERVING fails naming the status; switching back flips it."""
    async with grpc_server() as (servicer, port):
        probe = parse_target(f"grpc://{LOOP}:{port}")
        await servicer.set("", SERVING)
        assert await check_within(probe, 2) == Outcome(True, "grpc status SERVING")
        await servicer.set("", NOT_SERVING)
        out = await check_within(probe, 2)
        assert not out.ok and out.reason == "grpc status NOT_SERVING"
        await servicer.set("", SERVING)
        assert (await check_within(probe, 2)).ok


async def test_per_service_status_and_unknown_service() -> None:
    """?service= asks for that service's status; an unknown service fails (NOT_FOUND)."""
    async with grpc_server() as (servicer, port):
        await servicer.set("", SERVING)
        await servicer.set("pkg.Up", SERVING)
        await servicer.set("pkg.Down", NOT_SERVING)
        base = f"grpc://{LOOP}:{port}?service="
        assert (await check_within(parse_target(base + "pkg.Up"), 2)).ok
        down = await check_within(parse_target(base + "pkg.Down"), 2)
        assert not down.ok and down.reason == "grpc status NOT_SERVING"
        unknown = await check_within(parse_target(base + "pkg.Nope"), 2)
        assert not unknown.ok and unknown.reason.startswith("grpc error NOT_FOUND")


async def test_nothing_listening_fails_unavailable_within_timeout() -> None:
    """A port with nothing listening fails with UNAVAILABLE, well within the timeout."""
    probe = parse_target(f"grpc://{LOOP}:{free_port()}")
    start = time.monotonic()
    out = await check_within(probe, 2)
    assert not out.ok and out.reason.startswith("grpc error UNAVAILABLE"), out.reason
    assert time.monotonic() - start < 2


async def test_unresponsive_peer_times_out() -> None:
    """A peer that accepts but never speaks HTTP/2 fails with the probe's timeout."""
    with socket.socket() as sock:
        sock.bind((LOOP, 0))
        sock.listen()
        probe = parse_target(f"grpc://{LOOP}:{sock.getsockname()[1]}")
        out = await check_within(probe, 0.3)
    assert not out.ok
    assert out.reason in ("no answer within 0.3s", "grpc error DEADLINE_EXCEEDED"), out.reason


async def test_server_without_health_service_fails_unimplemented() -> None:
    """A gRPC server that has no health service fails with UNIMPLEMENTED."""
    async with grpc_server(with_health=False) as (_, port):
        out = await check_within(parse_target(f"grpc://{LOOP}:{port}"), 2)
    assert not out.ok and out.reason.startswith("grpc error UNIMPLEMENTED"), out.reason


async def test_health_cli_turns_ready_once_serving(procs: list[Proc], tmp_path: Path) -> None:
    """podpatterns health --probe grpc://... writes ready once the server is SERVING."""
    async with grpc_server() as (servicer, port):
        await servicer.set("", NOT_SERVING)
        # the prober is a subprocess; this loop serves the gRPC server between polls
        p = Proc(
            "health",
            "--health-dir", str(tmp_path), "--name", "app", "--admin", f"{LOOP}:0",
            "--probe", f"grpc://{LOOP}:{port}", "--probe-interval", "100ms",
            "--shutdown-delay", "0",
        )  # fmt: skip
        procs.append(p)
        await eventually(lambda: _check_message(tmp_path) == "grpc status NOT_SERVING")
        rec = read_record(tmp_path, "app").record
        assert rec is not None and rec.phase is Phase.STARTING
        await servicer.set("", SERVING)
        await eventually(lambda: _phase(tmp_path) is Phase.READY)
        p.stop()


def _check_message(tmp_path: Path) -> str | None:
    rec = read_record(tmp_path, "app").record
    return rec.checks[0].message if rec is not None and rec.checks else None


def _phase(tmp_path: Path) -> Phase | None:
    rec = read_record(tmp_path, "app").record
    return rec.phase if rec is not None else None


async def test_wait_cli_exits_0_once_serving(procs: list[Proc]) -> None:
    """podpatterns wait --for grpc://... blocks on NOT_SERVING and exits 0 once SERVING."""
    async with grpc_server() as (servicer, port):
        await servicer.set("", NOT_SERVING)
        p = Proc("wait", "--progress-interval", "100ms", "--for", f"grpc://{LOOP}:{port}", tail=())
        procs.append(p)
        blocked = await asyncio.to_thread(p.wait_event, "wait_blocked")
        assert blocked["reason"] == "grpc status NOT_SERVING", blocked
        await servicer.set("", SERVING)
        assert await asyncio.to_thread(p.wait, 10) == 0


def test_missing_extra_is_a_config_error(tmp_path: Path) -> None:
    """Without grpcio installed, a grpc:// target is a usage error naming the extra (exit 2)."""
    # sitecustomize hides grpc from this interpreter, as if the extra were not installed
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['grpc'] = None\n")
    out = run("wait", "--for", "grpc://127.0.0.1:1", env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().endswith(
        "--for: 'grpc://127.0.0.1:1' needs the grpc extra (pip install 'podpatterns[grpc]')"
    )
    assert (
        run("wait", "--for", f"file:{tmp_path}", env={"PYTHONPATH": str(tmp_path)}).returncode == 0
    )
