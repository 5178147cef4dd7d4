"""Start-up cost of each component: CPU time and wall time from exec to the first 200
from ``/startupz``.

Runs the entrypoints the images run, with the arguments tests/e2e/test_images.py gives
them (the ambassador, the adapter, and ``reload`` of the tools image), either from the
venv's ``podpatterns`` script or, with ``--root DIR``, from a slimmed tree ``chroot``-ed
into (DIR is the root of an image: ``podman image mount IMAGE``, copied or mounted).
For every run it polls ``/startupz`` every 5 ms and, at the first 200, reads the
process's utime + stime from /proc/PID/stat (user + system CPU time, every thread, 10 ms
ticks): the CPU a start costs, which a loaded machine barely changes, unlike the wall
time, which is printed beside it. The component is then stopped with SIGTERM.

Runs are interleaved across components; medians (and min-max) of ``--runs`` runs each.
The 1-minute load average before and after is printed: the wall times mean little
above a load of about 1 on 2 cores. Usage::

    .venv/bin/python bench/startup.py [--runs 7] [--root DIR]... [--core 1] [--idle 10]

With ``--idle S``, the first run of each component stays up S seconds after ready and its
VmRSS is reported (the images' RSS when DIR is an image's root: same interpreter,
libraries and bytecode).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
COMPONENTS = {
    "ambassador": ["ambassador", "--listen", "127.0.0.1:{listen}", "--upstream", "127.0.0.1:9"],
    "adapter": ["adapter", "--path", "{data}/*.log", "--sink", "stdout", "--checkpoint-dir",
                "{data}/cp"],
    "reload": ["reload", "--watch", "{data}", "--signal", "hup", "--pid-file", "{data}/app.pid"],
}  # fmt: skip


def free_port() -> int:
    """A port nothing listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def startupz(port: int) -> int | None:
    """The status of GET /startupz, or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /startupz HTTP/1.0\r\nHost: x\r\n\r\n")
            return int(sock.recv(64).split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_start(
    command: list[str], port: int, within: float = 30.0, idle: float = 0.0
) -> tuple[float, float, float]:
    """Start ``command``; (CPU seconds, wall seconds) at its first 200 from /startupz,
    and its RSS in MiB ``idle`` seconds later."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while time.monotonic() - started < within:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                sys.exit(f"startup: {command} exited {proc.returncode}: {err[-2000:]}")
            if startupz(port) == 200:
                wall = time.monotonic() - started
                cpu = cpu_seconds(proc.pid)
                time.sleep(idle)  # a measured idle window, not a wait for an event
                return cpu, wall, rss_mib(proc.pid)
            time.sleep(0.005)
        sys.exit(f"startup: no 200 from /startupz of {command} within {within} s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--root",
        type=Path,
        action="append",
        help="chroot into this tree (an image's root); several: runs interleaved, to compare",
    )
    parser.add_argument("--core", help="pin the component to this CPU (taskset -c)")
    parser.add_argument("--only", choices=sorted(COMPONENTS), action="append")
    parser.add_argument(
        "--idle", type=float, default=0.0, help="also report RSS this many seconds after ready"
    )
    args = parser.parse_args()
    pin: list[str] = ["taskset", "-c", args.core] if args.core else []
    # (label, command prefix, podpatterns path, data dir as the command names it, as here)
    setups: list[tuple[str, list[str], str, str, Path]] = []
    for root in args.root or []:
        host_data = Path(tempfile.mkdtemp(prefix="startup-", dir=root / "tmp"))
        prefix = [*pin, "chroot", "--userspec=65532:65532", str(root)]
        where = f"chroot {root}"
        setups.append(
            (where, prefix, "/podpatterns/bin/podpatterns", f"/tmp/{host_data.name}", host_data)
        )
    if not setups:
        host_data = Path(tempfile.mkdtemp(prefix="startup-"))
        podpatterns = str(Path(sys.executable).parent / "podpatterns")
        setups.append(("venv", pin, podpatterns, str(host_data), host_data))
    for *_, host_data in setups:
        host_data.chmod(0o777)
    names = args.only or sorted(COMPONENTS)
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        for _ in range(args.runs):
            for where, prefix, podpatterns, data, _host in setups:
                for name in names:
                    port, listen = free_port(), free_port()
                    words = [w.format(listen=listen, data=data) for w in COMPONENTS[name]]
                    command = [*prefix, podpatterns, *words, "--admin", f"127.0.0.1:{port}"]
                    idle = args.idle if not results.get((where, name)) else 0.0  # first run
                    results.setdefault((where, name), []).append(
                        one_start(command, port, idle=idle)
                    )
    finally:
        for *_, host_data in setups:
            shutil.rmtree(host_data, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for (where, name), runs in results.items():
        cpu = sorted(r[0] * 1000 for r in runs)
        wall = sorted(r[1] * 1000 for r in runs)
        print(
            f"{where} {name}: CPU to ready median {statistics.median(cpu):.0f} ms"
            f" ({cpu[0]:.0f}-{cpu[-1]:.0f}), wall median {statistics.median(wall):.0f} ms"
            f" ({wall[0]:.0f}-{wall[-1]:.0f}), {len(runs)} runs"
            + (f"; RSS {runs[0][2]:.1f} MiB {args.idle:g} s after ready" if args.idle else "")
        )


if __name__ == "__main__":
    main()
