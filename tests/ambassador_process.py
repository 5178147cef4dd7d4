"""``podpatterns ambassador`` as a real child process (a :class:`tests.proc.Proc`).

The listen and admin ports are 0 and read back from ``route_listening`` and
``admin_listening``; the admin endpoint's metrics are read from ``GET /metrics``.
"""

from __future__ import annotations

import contextlib
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.parser import text_string_to_metric_families

from podpatterns.options import HostPort, parse_hostport
from tests.proc import Event, Proc
from tests.waiting import wait_until

__all__ = ["AmbassadorProcess", "Event", "run_ambassador"]


class AmbassadorProcess(Proc):
    """A running ambassador: a :class:`Proc` with its addresses and its metrics."""

    listen = HostPort("", 0)
    admin = HostPort("", 0)

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of ``GET /metrics``: (name, labels, value)."""
        url = f"http://{self.admin}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.metrics()
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def wait_metric(self, name: str, ok: Callable[[float], bool], what: str) -> float:
        """Poll ``GET /metrics`` until the sum of ``name`` satisfies ``ok``; return it."""

        def check() -> tuple[float] | None:  # a tuple: 0.0 is a value, and false
            value = self.metric(name)
            return (value,) if ok(value) else None

        [value] = wait_until(check, f"{name} to be {what}")
        return value

    def wait_idle(self) -> None:
        """Return once no connection is open through the ambassador."""
        self.wait_metric("podpatterns_ambassador_connections_active", lambda n: n == 0, "0")


@contextlib.contextmanager
def run_ambassador(
    upstreams: Sequence[str],
    *extra: str,
    prefix: Sequence[str] = (),
    listen: str = "127.0.0.1:0",
) -> Iterator[AmbassadorProcess]:
    """Start the ambassador and yield it once it listens.

    It listens on ``listen`` (127.0.0.1 port 0 by default; ``amb.listen`` is set for a
    TCP address) and serves admin on 127.0.0.1 port 0, logs JSON, has no shutdown delay.

    Args:
        upstreams: ``HOST:PORT`` of each ``--upstream``.
        extra: more command-line arguments.
        prefix: a command that execs the rest (``unshare ...``).
        listen: the ``--listen`` address (``unix:PATH`` too).

    On exit it is SIGKILLed if the test did not stop it already.
    """
    args = ["ambassador", "--listen", listen]
    for upstream in upstreams:
        args += ["--upstream", upstream]
    args += ["--admin", "127.0.0.1:0", "--shutdown-delay", "0"]
    amb = AmbassadorProcess(*args, *extra, prefix=prefix, stdout=subprocess.DEVNULL)
    try:
        listening = amb.wait_event("route_listening")["listen"]
        if not listen.startswith("unix:"):
            amb.listen = parse_hostport(listening)
        amb.admin = parse_hostport(amb.wait_event("admin_listening")["address"])
        yield amb
    finally:
        amb.stop()
