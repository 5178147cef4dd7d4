"""Benchmark the ambassador's PostgreSQL route (``--protocol postgres``) with pgbench.

Everything runs on 127.0.0.1. pgbench and the PostgreSQL 15 servers are pinned to core 0,
the proxy under test alone to core 1 (docs: /work/shared/BENCHMARKS.md's method, as in
bench/ambassador.py, whose helpers this imports). Two throw-away clusters are started
with the tests' helper (tests/peers.py): one plaintext with trust authentication, one
that takes only TLS with SCRAM (``ssl = on``, a trustme-made chain, ``hostssl`` only).

Contenders, each a separate process on core 1:

- direct: pgbench straight to the plaintext server; direct-tls: pgbench to the TLS
  server with ``sslmode=verify-full`` (libpq's own TLS);
- tcp: ``podpatterns ambassador --protocol tcp`` (the byte relay);
- postgres: ``--protocol postgres`` (the startup handler, then the same relays);
- postgres-tls: ``--protocol postgres --upstream-tls`` to the TLS server (the ambassador
  verifies the server; pgbench speaks plaintext with ``sslmode=disable`` to it);
- postgres-metrics, postgres-tls-metrics: the same two with ``--pg-metrics`` (query
  metrics: the relayed messages are framed and counted), select test only;
- haproxy, haproxy-tuned: HAProxy 2.6 ``mode tcp``, stock and ``tune.bufsize 262144``.

Tests: ``select`` is ``pgbench -n -S`` over persistent connections (every contender);
``connect`` is ``pgbench -n -S -C``, a new connection per transaction (direct, direct-tls,
tcp, postgres, postgres-tls). Each repetition runs every contender once per test,
round-robin with the starting contender rotated. Proxy CPU is utime+stime(+children) of
the proxy PID from /proc/PID/stat before and after each run. Ratios are paired within a
repetition, then the median is taken.

Usage: ``.venv/bin/python bench/postgres.py [--reps N] [--seconds S] [--write-docs]``;
writes bench/results/postgres-latest.json, and with ``--write-docs`` the section
"PostgreSQL through the ambassador" of docs/benchmarks.md and docs/img/postgres-bench.png
(bench/ambassador.py keeps that section when it rewrites the file). ``--render JSON``
reports a saved run again without measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from bench.ambassador import (  # noqa: E402
    DOC_PATH,
    FOREIGN_MAX_SHARE,
    LOAD_CORE,
    RESULTS_DIR,
    VENV_BIN,
    Foreign,
    Ports,
    Procs,
    _haproxy,
    _podpatterns,
    cpu_seconds,
    doc_section,
    fmt,
    log,
    median,
    proxy_cpu,
    tool_version,
)
from tests.peers import (  # noqa: E402
    PG_SERVER_NAME,
    PostgresServer,
    pg_tls,
    run_postgres,
)

HEADING = "## PostgreSQL through the ambassador"
PLOT_PATH = ROOT / "docs" / "img" / "postgres-bench.png"
TARGET_PG_VS_TCP = 0.97  # issue 11: startup-only postgres mode vs the byte relay, tps
TARGET_TLS_VS_DIRECT_TLS = 0.9  # issue 11: TLS via the ambassador vs libpq's own TLS
TARGET_METRICS_VS_PG = 0.85  # issue 11: --pg-metrics vs postgres mode without it, tps


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    server: str  # "plain" or "tls": which cluster it reaches
    # builds the proxy's argv for (listen, upstream port, tmp); None: pgbench goes direct
    argv: Callable[[int, int, Path], list[str]] | None
    peer: str | None  # the row its ratio is taken against
    tests: tuple[str, ...] = ("select", "connect")


def _ambassador(*extra: str) -> Callable[[int, int, Path], list[str]]:
    base = _podpatterns("auto")

    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        return [*base(listen, upstream, tmp), *extra]

    return argv


def ca_path(tmp: Path) -> Path:
    """The CA file, alone in its directory as in a mounted Secret: the ambassador watches
    that directory, and the proxies' logs in ``tmp`` must not wake it."""
    return tmp / "tls" / "ca.pem"


def _ambassador_tls(*extra: str) -> Callable[[int, int, Path], list[str]]:
    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        return _ambassador(
            "--protocol",
            "postgres",
            "--upstream-tls",
            "--tls-ca",
            str(ca_path(tmp)),
            "--tls-server-name",
            PG_SERVER_NAME,
            *extra,
        )(listen, upstream, tmp)

    return argv


CONTENDERS: tuple[Contender, ...] = (
    Contender("direct", "direct (no proxy)", "plain", None, None),
    Contender("direct-tls", "direct, libpq TLS verify-full", "tls", None, "direct"),
    Contender(
        "tcp", "ambassador --protocol tcp", "plain", _ambassador("--protocol", "tcp"), "direct"
    ),
    Contender(
        "postgres",
        "ambassador --protocol postgres",
        "plain",
        _ambassador("--protocol", "postgres"),
        "tcp",
    ),
    Contender(
        "postgres-tls",
        "ambassador --protocol postgres --upstream-tls",
        "tls",
        _ambassador_tls(),
        "direct-tls",
    ),
    Contender(
        "postgres-metrics",
        "ambassador --protocol postgres --pg-metrics",
        "plain",
        _ambassador("--protocol", "postgres", "--pg-metrics"),
        "postgres",
        ("select",),
    ),
    Contender(
        "postgres-tls-metrics",
        "ambassador --protocol postgres --upstream-tls --pg-metrics",
        "tls",
        _ambassador_tls("--pg-metrics"),
        "postgres-tls",
        ("select",),
    ),
    Contender(
        "haproxy", "HAProxy 2.6 stock mode tcp", "plain", _haproxy(""), "direct", ("select",)
    ),
    Contender(
        "haproxy-tuned",
        "HAProxy tune.bufsize 262144",
        "plain",
        _haproxy("    tune.bufsize 262144"),
        "direct",
        ("select",),
    ),
)
BY_KEY = {c.key: c for c in CONTENDERS}
TESTS = ("select", "connect")


@dataclass(frozen=True)
class Settings:
    reps: int
    seconds: int
    clients: int = 8
    threads: int = 2
    scale: int = 1

    def pgbench(self, test: str) -> list[str]:
        """The pgbench arguments of ``test`` (without the connection, which is in env)."""
        argv = ["-n", "-S", "-c", str(self.clients), "-j", str(self.threads)]
        argv += ["-T", str(self.seconds)]
        return [*argv, "-C"] if test == "connect" else argv


# -- servers --------------------------------------------------------------------------------


def pgbench_env(server: PostgresServer, port: int, tls_direct: bool, ca: Path) -> dict[str, str]:
    env = server.env(port)
    env["PGAPPNAME"] = "podpatterns-bench"
    if tls_direct:
        # libpq verifies the name in host= and connects to hostaddr=
        env.update(
            PGHOST=PG_SERVER_NAME,
            PGHOSTADDR=server.host,
            PGSSLMODE="verify-full",
            PGSSLROOTCERT=str(ca),
        )
    else:
        env["PGSSLMODE"] = "disable"
    return env


def init_pgbench(server: PostgresServer, scale: int) -> None:
    """pgbench's tables as the superuser (unix socket on the TLS server); the login role
    of the TLS server may read them."""
    pgbench = server.tool("pgbench")
    done = subprocess.run(
        [pgbench, "-i", "-q", "-s", str(scale)],
        env=server.admin_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pgbench -i exited {done.returncode}: {done.stderr[-500:]}")
    if server.user != "postgres":
        grant = f"grant select on all tables in schema public to {server.user}"
        if server.query(grant) is None:
            raise RuntimeError("cannot grant the pgbench tables")


TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def pgbench(cfg: Settings, test: str, env: dict[str, str], tool: str) -> dict[str, Any]:
    argv = [tool, *cfg.pgbench(test)]
    res = subprocess.run(
        ["taskset", "-c", LOAD_CORE, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=cfg.seconds + 60,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {res.returncode}: {res.stderr[-800:]}")
    tps, done = TPS.search(res.stdout), PROCESSED.search(res.stdout)
    if tps is None or done is None:
        raise RuntimeError(f"pgbench: unexpected output {res.stdout[-500:]!r}")
    failed = FAILED.search(res.stdout)
    return {
        "tps": float(tps.group(1)),
        "transactions": int(done.group(1)),
        "failed": int(failed.group(1)) if failed else 0,
    }


# -- the run -------------------------------------------------------------------------------


@dataclass
class Endpoint:
    port: int
    pid: int | None
    env: dict[str, str]


def run(cfg: Settings, tmp: Path) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], float]:
    """Every repetition of every test through every contender; the raw results."""
    ca = trustme.CA()
    ca_path(tmp).parent.mkdir()
    ca.cert_pem.write_to_path(str(ca_path(tmp)))
    procs = Procs(tmp)
    ports = Ports()
    foreign = Foreign(FOREIGN_MAX_SHARE)
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    # the servers inherit this process's affinity: core 0
    with run_postgres() as plain, run_postgres(pg_tls(ca)) as tls:
        try:
            servers = {"plain": plain, "tls": tls}
            for server in servers.values():
                init_pgbench(server, cfg.scale)
            eps: dict[str, Endpoint] = {}
            for c in CONTENDERS:
                server = servers[c.server]
                if c.argv is None:
                    env = pgbench_env(server, server.port, c.server == "tls", ca_path(tmp))
                    eps[c.key] = Endpoint(server.port, None, env)
                    continue
                listen = ports.take()
                proc = procs.start(c.key, c.argv(listen, server.port, tmp), "1")
                procs.wait_listening(c.key, proc, listen)
                eps[c.key] = Endpoint(listen, proc.pid, pgbench_env(server, listen, False, tmp))
            tool = plain.tool("pgbench")
            # one short warm-up through each, so that no run pays for a cold cache
            warm = dataclasses.replace(cfg, seconds=1)
            for key, ep in eps.items():
                pgbench(warm, "select", ep.env, tool)
                log(f"warm-up {key} ok")
            for rep in range(cfg.reps):
                for test in TESTS:
                    order = [c.key for c in CONTENDERS if test in c.tests]
                    shift = rep % len(order)
                    for key in order[shift:] + order[:shift]:
                        ep = eps[key]
                        before = foreign.snapshot()
                        start = time.monotonic()
                        res: dict[str, Any] = {}
                        with proxy_cpu(ep.pid, res):
                            res.update(pgbench(cfg, test, ep.env, tool))
                        res["foreign_cpu_share"] = round(
                            foreign.used(before, foreign.snapshot()) / (time.monotonic() - start),
                            3,
                        )
                        cpu = res["cpu_s"]
                        res["cpu_us_per_txn"] = (
                            None if cpu is None else cpu / max(1, res["transactions"]) * 1e6
                        )
                        res["rep"] = rep
                        raw.setdefault(test, {}).setdefault(key, []).append(res)
                    log(
                        f"rep {rep + 1}/{cfg.reps} {test}: "
                        + ", ".join(
                            f"{k} {raw[test][k][-1]['tps']:.0f}" for k in order if k in raw[test]
                        )
                    )
            # the proxies' total CPU, as a sanity check on the per-run figures
            for key, ep in eps.items():
                if ep.pid is not None:
                    raw.setdefault("total_cpu_s", {})[key] = [{"cpu_s": cpu_seconds(ep.pid)}]
        finally:
            procs.stop_all()
    return raw, foreign.waited_s


# -- aggregation and report ----------------------------------------------------------------

Raw = dict[str, dict[str, list[dict[str, Any]]]]


def med(raw: Raw, test: str, key: str, metric: str) -> float | None:
    return median([r.get(metric) for r in raw.get(test, {}).get(key, [])])


def ratios(raw: Raw, test: str, key: str, base: str, metric: str) -> list[float]:
    """``key``'s figure divided by ``base``'s in the same repetition, per repetition."""
    by_rep = {r["rep"]: r.get(metric) for r in raw.get(test, {}).get(base, [])}
    return [
        r[metric] / by_rep[r["rep"]]
        for r in raw.get(test, {}).get(key, [])
        if r.get(metric) is not None and by_rep.get(r["rep"])
    ]


def paired(raw: Raw, test: str, key: str, base: str, metric: str) -> float | None:
    """The median over repetitions of :func:`ratios`."""
    return median(ratios(raw, test, key, base, metric))


def rfmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def xfmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}x"


def table(raw: Raw, test: str) -> list[str]:
    lines = [
        "| path | tps | tps ÷ peer (peer) | tps ÷ direct | proxy CPU us/txn "
        "| CPU ÷ tcp mode | CPU ÷ HAProxy stock | runs (foreign > 10%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in CONTENDERS:
        if test not in c.tests or c.key not in raw.get(test, {}):
            continue  # (a saved run from before this contender existed)
        runs = raw[test][c.key]
        busy = sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in runs)
        peer = (
            "—" if c.peer is None else f"{rfmt(paired(raw, test, c.key, c.peer, 'tps'))} ({c.peer})"
        )
        direct = "—" if c.key == "direct" else rfmt(paired(raw, test, c.key, "direct", "tps"))
        cpu = med(raw, test, c.key, "cpu_us_per_txn")
        has_cpu = cpu is not None
        vs_tcp = rfmt(paired(raw, test, c.key, "tcp", "cpu_us_per_txn")) if has_cpu else "—"
        vs_ha = (
            rfmt(paired(raw, test, c.key, "haproxy", "cpu_us_per_txn"))
            if has_cpu and "haproxy" in raw[test]
            else "—"
        )
        lines.append(
            f"| {c.label} | {fmt(med(raw, test, c.key, 'tps'))} | {peer} | {direct} "
            f"| {fmt(cpu)} | {vs_tcp} | {vs_ha} | {len(runs)} ({busy}) |"
        )
    return lines


#: issue 11's targets: (what, contender, the contender it is divided by, goal)
TARGETS = (
    ("startup-only postgres mode vs tcp mode, tps", "postgres", "tcp", TARGET_PG_VS_TCP),
    (
        "TLS via the ambassador vs libpq's own TLS direct, tps",
        "postgres-tls",
        "direct-tls",
        TARGET_TLS_VS_DIRECT_TLS,
    ),
    (
        "query metrics (`--pg-metrics`) vs postgres mode without, tps",
        "postgres-metrics",
        "postgres",
        TARGET_METRICS_VS_PG,
    ),
    (
        "query metrics over TLS vs TLS without, tps",
        "postgres-tls-metrics",
        "postgres-tls",
        TARGET_METRICS_VS_PG,
    ),
)

#: Context for the TLS target, select test (not targets): the hop without TLS, and TLS
#: without the hop.
CONTEXT = (
    (
        "TLS via the ambassador vs the ambassador's plaintext byte relay (the same hop)",
        "postgres-tls",
        "tcp",
    ),
    (
        "TLS via the ambassador vs stock HAProxy, plaintext (the same hop)",
        "postgres-tls",
        "haproxy",
    ),
    ("the ambassador's plaintext byte relay vs direct (the hop alone)", "tcp", "direct"),
    ("libpq's own TLS vs plaintext, both direct (TLS alone)", "direct-tls", "direct"),
)


def runs_in(key: str, test: str) -> bool:
    return key in BY_KEY and test in BY_KEY[key].tests


def targets(raw: Raw) -> list[dict[str, Any]]:
    out = []
    for test in TESTS:
        for name, key, base, goal in TARGETS:
            if not (runs_in(key, test) and runs_in(base, test)):
                continue
            each = ratios(raw, test, key, base, "tps")
            value = median(each)
            out.append(
                {
                    "test": test,
                    "target": name,
                    "goal": goal,
                    "value": value,
                    "per_rep": [round(x, 3) for x in each],
                    "met": value is not None and value >= goal,
                }
            )
    return out


def section(cfg: Settings, raw: Raw, meta: dict[str, Any]) -> str:
    sel, con = cfg.pgbench("select"), cfg.pgbench("connect")
    out = [
        HEADING,
        "",
        "Produced by `bench/postgres.py` (do not edit by hand; re-run it). pgbench against "
        "PostgreSQL 15 on loopback, through each path below; medians of interleaved "
        "repetitions. Every ratio is paired within a repetition (the two runs were minutes "
        "apart at most) and the median over repetitions is given; the peer is the path a "
        "row should be judged against: tcp mode against direct, postgres mode against tcp "
        "mode, TLS via the ambassador against libpq's own TLS direct to the same server.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; podpatterns code at {meta['commit']}.",
        f"- Machine: {meta['cpus']} vCPU, Linux {meta['kernel']}, loopback only; pgbench "
        "and both PostgreSQL servers pinned to core 0 (taskset / inherited affinity), "
        "the proxy under test alone on core 1.",
        f"- **Noisy figures.** The machine was shared with other developers' test runs: "
        f"load average {meta['load_before']} before and {meta['load_after']} after (1, 5, "
        f"15 min); {meta['busy_runs']} of {meta['runs']} runs had other processes using "
        f"more than 10% of a core meanwhile (from /proc, per run; no run was left out and "
        f"none waited for quiet). Absolute tps are not comparable with other days; the "
        f"paired ratios of interleaved runs are what count.",
        f"- Repetitions: {cfg.reps}, each running every path once per test, round-robin "
        "with the starting path rotated.",
        f"- select: `pgbench {shlex.join(sel)}` (persistent connections, "
        f"scale {cfg.scale}); connect: `pgbench {shlex.join(con)}` (a new connection, "
        "startup and authentication per transaction).",
        "- Servers: a plaintext cluster with trust authentication (direct, tcp, postgres, "
        "HAProxy) and a TLS-only cluster (`ssl = on`, a trustme chain for "
        f"`{PG_SERVER_NAME}`, `hostssl` with SCRAM) for direct-tls (`sslmode=verify-full`, "
        "SCRAM-SHA-256-PLUS) and postgres-tls (the ambassador verifies the server with "
        "`--tls-ca` and `--tls-server-name`; pgbench speaks plaintext with "
        "`sslmode=disable` and SCRAM to it).",
        f"- Proxies: podpatterns ambassador with `--splice auto --admin off --log-level "
        f"warning`, otherwise defaults; {meta['versions']['haproxy']}, `nbthread 1`, "
        "`mode tcp`. Proxy CPU is utime+stime of the proxy PID from /proc/PID/stat "
        "before and after each run, divided by the transactions pgbench reports.",
        f"- {meta['versions']['pgbench']}; {meta['versions']['postgres']}.",
        "- `--pg-metrics` rows (select test): the same routes with query metrics on, "
        "which frame and count every relayed message (`--pg-drain transaction`, the "
        "default, frames them already in every postgres row).",
        "",
        f"![pgbench through the ambassador]({PLOT_PATH.relative_to(DOC_PATH.parent)})",
        "",
        f"### Select-only, persistent connections (`pgbench {shlex.join(sel)}`)",
        "",
        *table(raw, "select"),
        "",
        f"### A new connection per transaction (`pgbench {shlex.join(con)}`)",
        "",
        *table(raw, "connect"),
        "",
        "### Targets",
        "",
        "| test | target | goal | measured (paired median) | per repetition | met |",
        "|---|---|---|---|---|---|",
    ]
    for t in meta["targets"]:
        each = ", ".join(f"{x:.2f}" for x in t["per_rep"])
        out.append(
            f"| {t['test']} | {t['target']} | ≥ {t['goal']:.2f}x | {xfmt(t['value'])} "
            f"| {each} | {'yes' if t['met'] else '**no**'} |"
        )
    out += [
        "",
        "### Context for the TLS target (select test; not targets)",
        "",
        "| ratio of tps | measured (paired median) | per repetition |",
        "|---|---|---|",
    ]
    for name, key, base in CONTEXT:
        rs = ratios(raw, "select", key, base, "tps")
        out.append(f"| {name} | {xfmt(median(rs))} | {', '.join(f'{x:.2f}' for x in rs)} |")
    out += [
        "",
        "The TLS target compares a proxied path with an unproxied one. Any proxied path "
        "pays for the extra hop first (two more loopback round trips and cross-core "
        "wake-ups per transaction, with pgbench latency-bound at 8 clients): the byte "
        "relay and HAProxy lose most of direct's tps without any TLS, so the target row "
        "mostly measures that hop. The first context row is the cost of TLS through the "
        "ambassador over the same hop; it is context for the target, which stays as the "
        "issue states it.",
        "",
        "A target is met when the median of the paired ratios reaches it; the per-"
        "repetition ratios show how far the noise of the shared machine reaches, and a "
        "median within that spread of the goal is not a firm verdict either way.",
        "",
        "The targets are stated for the select test (persistent connections); the "
        "connect rows show what a new session costs through each path. Raw per-run "
        "figures: `bench/results/postgres-latest.json`.",
    ]
    return "\n".join(out) + "\n"


def write_section(text: str, heading: str = HEADING) -> None:
    """Put ``text`` in place of the section ``heading`` of docs/benchmarks.md (or last)."""
    doc = DOC_PATH.read_text()
    where = doc_section(doc, heading)
    if where is None:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        doc = doc[: where[0]] + text + ("\n" + doc[where[1] :] if where[1] < len(doc) else "")
    DOC_PATH.write_text(doc)


def plot(raw: Raw, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "direct": "#999999",
        "direct-tls": "#cccccc",
        "tcp": "#6baed6",
        "postgres": "#1f77b4",
        "postgres-tls": "#08306b",
        "postgres-metrics": "#2ca02c",
        "postgres-tls-metrics": "#176117",
        "haproxy": "#d62728",
        "haproxy-tuned": "#ff9896",
    }
    panels = [
        ("select", "tps", "pgbench -S tps (higher is better)"),
        ("select", "cpu_us_per_txn", "proxy CPU us per transaction, -S (lower is better)"),
        ("connect", "tps", "pgbench -S -C tps, new connection each (higher is better)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (test, metric, title) in zip(axes.flat, panels, strict=True):
        keys = [c.key for c in CONTENDERS if test in c.tests]
        vals = [med(raw, test, k, metric) for k in keys]
        xs = [i for i, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, color=[colors[keys[i]] for i in xs])
        ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(keys)), keys, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
    fig.suptitle("pgbench through the podpatterns ambassador, loopback, 2 vCPU (medians)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metadata(argv: Sequence[str]) -> dict[str, Any]:
    def git(*args: str) -> str:
        res = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return res.stdout.strip() or "?"

    commit = git("log", "-1", "--format=%h", "--", "podpatterns")
    if git("status", "--porcelain", "--", "podpatterns") != "?":
        commit += " + uncommitted changes"
    pg = "/usr/lib/postgresql/15/bin"
    return {
        "command": shlex.join([".venv/bin/python", "bench/postgres.py", *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "commit": commit,
        "load_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": {
            "haproxy": tool_version(["haproxy", "-v"]).split(" - ")[0],
            "pgbench": tool_version([f"{pg}/pgbench", "--version"]),
            "postgres": tool_version([f"{pg}/postgres", "--version"]),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T (default 10)")
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and the plot"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="no run: report a saved bench/results/postgres-latest.json again",
    )
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    if args.reps < 1 or args.seconds < 1:
        parser.error("--reps and --seconds must be positive")
    missing = [t for t in ("haproxy", "taskset") if shutil.which(t) is None]
    if missing or not (VENV_BIN / "podpatterns").exists():
        raise SystemExit(f"bench: missing {' '.join(missing) or 'podpatterns'} (./dev bench)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs two CPUs (load on core 0, proxy on core 1)")
    if args.render is not None:  # the report again, from a saved run
        saved = json.loads(args.render.read_text())
        finish(Settings(**saved["settings"]), saved["raw"], saved["meta"], args.write_docs)
        return 0
    cfg = Settings(reps=args.reps, seconds=args.seconds)
    # A SIGTERM unwinds like Ctrl-C, so every process we started is stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # pgbench and the servers inherit core 0
    meta = metadata(args_list)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="podpatterns-pgbench-") as tmpname:
        raw, _ = run(cfg, Path(tmpname))
    meta["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    runs = [r for t in TESTS for reps in raw[t].values() for r in reps]
    meta["runs"] = len(runs)
    meta["busy_runs"] = sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in runs)
    meta["failed_transactions"] = sum(r["failed"] for r in runs)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "postgres-latest.json"
    results = {"meta": meta, "settings": dataclasses.asdict(cfg), "raw": raw}
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    finish(cfg, raw, meta, args.write_docs)
    log(f"done in {meta['elapsed_s']} s; results in {out}")
    return 0


def finish(cfg: Settings, raw: Raw, meta: dict[str, Any], write_docs: bool) -> None:
    """Print the section; with ``write_docs`` also put it and the plot into docs/."""
    meta["targets"] = targets(raw)
    text = section(cfg, raw, meta)
    if write_docs:
        write_section(text)
        plot(raw, PLOT_PATH)
    sys.stdout.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
