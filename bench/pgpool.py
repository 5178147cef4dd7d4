"""Benchmark the ambassador's connection pool (``--pg-pool``) against pgbouncer 1.18.

Everything runs on 127.0.0.1. pgbench and the PostgreSQL 15 server are pinned to core 0,
the proxy under test alone to core 1 (/work/shared/BENCHMARKS.md's method, as in
bench/postgres.py, whose helpers this imports). The server takes only TLS with SCRAM
(``ssl = on``, a trustme-made chain, ``hostssl`` only): the case a pool is for, where
every new server connection costs a TLS handshake and a SCRAM exchange.

Contenders, each a separate process on core 1 (the app side is plaintext on loopback and
holds no password, except direct-tls):

- direct-tls: pgbench straight to the server, ``sslmode=verify-full``, SCRAM-SHA-256-PLUS;
- no-pool: ``ambassador --protocol postgres --upstream-tls --pg-password-file`` (a TLS
  handshake and SCRAM per app connection, by the ambassador);
- session, transaction: the same with ``--pg-pool session`` / ``transaction``;
- pgbouncer-session, pgbouncer-transaction: pgbouncer 1.18 (Debian), ``auth_type trust``
  for the app, the password in its auth_file for SCRAM to the server,
  ``server_tls_sslmode verify-ca`` (pgbouncer 1.18 cannot connect to an address while
  verifying another name; the ambassador verifies the name, ``verify-full``).

Tests: ``connect`` is ``pgbench -n -S -C`` (a new connection per transaction, every
contender); ``select`` is ``pgbench -n -S -c 16`` over persistent connections
(direct-tls, transaction, pgbouncer-transaction, and the session rows for context).
Each repetition runs every contender once per test, round-robin with the starting
contender rotated; ratios are paired within a repetition, then the median is taken.

Usage: ``.venv/bin/python bench/pgpool.py [--reps N] [--seconds S] [--write-docs]``
(``./dev bench-pgpool``); writes bench/results/pgpool-latest.json, and with
``--write-docs`` the section "PostgreSQL connection pooling" of docs/benchmarks.md and
docs/img/pgpool-bench.png. ``--render JSON`` reports a saved run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
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
    HOST,
    LOAD_CORE,
    RESULTS_DIR,
    VENV_BIN,
    Foreign,
    Ports,
    Procs,
    fmt,
    log,
    median,
    proxy_cpu,
    tool_version,
)
from bench.postgres import (  # noqa: E402
    FAILED,
    PROCESSED,
    TPS,
    Raw,
    ca_path,
    init_pgbench,
    med,
    pgbench_env,
    ratios,
    rfmt,
    write_section,
    xfmt,
)
from tests.peers import PG_SERVER_NAME, pg_tls, run_postgres  # noqa: E402

HEADING = "## PostgreSQL connection pooling"
PLOT_PATH = ROOT / "docs" / "img" / "pgpool-bench.png"
PROXY_CORE = "1"
POOL_SIZE = 20  # both pools: pgbouncer's default_pool_size, the ambassador's --pg-pool-size

Argv = Callable[[int, int, Path], list[str]]


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    argv: Argv | None  # the proxy's argv for (listen, upstream port, tmp); None: direct
    tests: tuple[str, ...] = ("connect", "select")


def _ambassador(*extra: str) -> Argv:
    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        return [
            str(VENV_BIN / "podpatterns"),
            "ambassador",
            "--listen",
            f"{HOST}:{listen}",
            "--upstream",
            f"{HOST}:{upstream}",
            "--admin",
            "off",
            "--log-level",
            "warning",
            "--shutdown-delay",
            "0",
            "--drain-timeout",
            "2s",
            "--protocol",
            "postgres",
            "--upstream-tls",
            "--tls-ca",
            str(ca_path(tmp)),
            "--tls-server-name",
            PG_SERVER_NAME,
            "--pg-password-file",
            str(tmp / "secret" / "password"),
            "--pg-pool-size",
            str(POOL_SIZE),
            *extra,
        ]

    return argv


PGBOUNCER_CONF = """\
[databases]
postgres = host={host} port={upstream} dbname=postgres

[pgbouncer]
listen_addr = {host}
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
pool_mode = {mode}
default_pool_size = {size}
max_client_conn = 1000
server_tls_sslmode = verify-ca
server_tls_ca_file = {dir}/ca.pem
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
logfile =
"""


def _pgbouncer(mode: str) -> Argv:
    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        # pgbouncer refuses to run as root: -u postgres, with files that user can read
        conf_dir = tmp / f"pgbouncer-{mode}"
        conf_dir.mkdir(mode=0o755)
        shutil.copy(ca_path(tmp), conf_dir / "ca.pem")
        password = (tmp / "secret" / "password").read_text()
        (conf_dir / "userlist.txt").write_text(f'"{APP_USER}" "{password}"\n')
        conf = conf_dir / "pgbouncer.ini"
        conf.write_text(
            PGBOUNCER_CONF.format(
                host=HOST, upstream=upstream, listen=listen, mode=mode, size=POOL_SIZE, dir=conf_dir
            )
        )
        user: list[str] = []
        if os.geteuid() == 0:
            for path in (conf_dir, *conf_dir.iterdir()):
                shutil.chown(path, "postgres", "postgres")
            user = ["-u", "postgres"]
        return ["pgbouncer", *user, str(conf)]

    return argv


APP_USER = "app"  # tests.peers.PostgresTLS's login role

CONTENDERS: tuple[Contender, ...] = (
    Contender("direct-tls", "direct, libpq TLS verify-full + SCRAM", None),
    Contender(
        "no-pool", "ambassador, no pool (TLS + SCRAM per connection)", _ambassador(), ("connect",)
    ),
    Contender("session", "ambassador --pg-pool session", _ambassador("--pg-pool", "session")),
    Contender(
        "transaction", "ambassador --pg-pool transaction", _ambassador("--pg-pool", "transaction")
    ),
    Contender("pgbouncer-session", "pgbouncer 1.18 pool_mode session", _pgbouncer("session")),
    Contender(
        "pgbouncer-transaction", "pgbouncer 1.18 pool_mode transaction", _pgbouncer("transaction")
    ),
)
BY_KEY = {c.key: c for c in CONTENDERS}
TESTS = ("connect", "select")


@dataclass(frozen=True)
class Settings:
    reps: int
    seconds: int
    connect_clients: int = 8
    select_clients: int = 16
    threads: int = 2
    scale: int = 1

    def pgbench(self, test: str) -> list[str]:
        """The pgbench arguments of ``test`` (the connection is in the environment)."""
        clients = self.connect_clients if test == "connect" else self.select_clients
        argv = ["-n", "-S", "-c", str(clients), "-j", str(self.threads), "-T", str(self.seconds)]
        return [*argv, "-C"] if test == "connect" else argv


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


@dataclass
class Endpoint:
    port: int
    pid: int | None
    env: dict[str, str]


def run(cfg: Settings, tmp: Path) -> Raw:
    """Every repetition of every test through every contender; the raw results."""
    ca = trustme.CA()
    ca_path(tmp).parent.mkdir()
    ca.cert_pem.write_to_path(str(ca_path(tmp)))
    procs = Procs(tmp)
    ports = Ports()
    foreign = Foreign(FOREIGN_MAX_SHARE)
    raw: Raw = {}
    with run_postgres(pg_tls(ca)) as server:  # inherits this process's affinity: core 0
        try:
            assert server.password is not None
            (tmp / "secret").mkdir()
            (tmp / "secret" / "password").write_text(server.password)
            init_pgbench(server, cfg.scale)
            eps: dict[str, Endpoint] = {}
            for c in CONTENDERS:
                if c.argv is None:
                    env = pgbench_env(server, server.port, True, ca_path(tmp))
                    eps[c.key] = Endpoint(server.port, None, env)
                    continue
                listen = ports.take()
                proc = procs.start(c.key, c.argv(listen, server.port, tmp), PROXY_CORE)
                procs.wait_listening(c.key, proc, listen)
                env = pgbench_env(server, listen, False, tmp)
                env.pop("PGPASSWORD", None)  # the app holds no password
                eps[c.key] = Endpoint(listen, proc.pid, env)
            tool = server.tool("pgbench")
            warm = dataclasses.replace(cfg, seconds=1)
            for key, ep in eps.items():  # also fills each pool before the first run
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
                        + ", ".join(f"{k} {raw[test][k][-1]['tps']:.0f}" for k in order)
                    )
        finally:
            procs.stop_all()
    return raw


#: (test, what, contender, the contender it is divided by, goal): issue 14's targets
TARGETS = (
    (
        "connect",
        "session pool vs direct (TLS + SCRAM per connection), tps",
        "session",
        "direct-tls",
        5.0,
    ),
    (
        "connect",
        "session pool vs pgbouncer session, one core each, tps",
        "session",
        "pgbouncer-session",
        1.0,
    ),
    (
        "select",
        "transaction pool vs pgbouncer transaction, persistent -c 16, tps",
        "transaction",
        "pgbouncer-transaction",
        0.8,
    ),
)
CONTEXT = (
    (
        "connect",
        "transaction pool vs pgbouncer transaction, tps",
        "transaction",
        "pgbouncer-transaction",
    ),
    ("connect", "no pool vs direct, tps", "no-pool", "direct-tls"),
    ("select", "session pool vs pgbouncer session, tps", "session", "pgbouncer-session"),
    ("select", "transaction pool vs direct, tps", "transaction", "direct-tls"),
)


def targets(raw: Raw) -> list[dict[str, Any]]:
    out = []
    for test, name, key, base, goal in TARGETS:
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


def table(raw: Raw, test: str) -> list[str]:
    lines = [
        "| path | tps | tps ÷ direct-tls | proxy CPU us/txn | runs (foreign > 10%) |",
        "|---|---|---|---|---|",
    ]
    for c in CONTENDERS:
        runs = raw.get(test, {}).get(c.key)
        if not runs:
            continue
        busy = sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in runs)
        direct = (
            "—" if c.argv is None else rfmt(median(ratios(raw, test, c.key, "direct-tls", "tps")))
        )
        lines.append(
            f"| {c.label} | {fmt(med(raw, test, c.key, 'tps'))} | {direct} "
            f"| {fmt(med(raw, test, c.key, 'cpu_us_per_txn'))} | {len(runs)} ({busy}) |"
        )
    return lines


def section(cfg: Settings, raw: Raw, meta: dict[str, Any]) -> str:
    con, sel = cfg.pgbench("connect"), cfg.pgbench("select")
    out = [
        HEADING,
        "",
        "Produced by `bench/pgpool.py` (do not edit by hand; re-run it). pgbench against a "
        "PostgreSQL 15 server that takes only TLS with SCRAM, on loopback, through the "
        "ambassador's pool (`--pg-pool`) and through pgbouncer 1.18; medians of interleaved "
        "repetitions, ratios paired within a repetition.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; podpatterns code at {meta['commit']}.",
        f"- Machine: {meta['cpus']} vCPU, Linux {meta['kernel']}, loopback only; pgbench and "
        "the server pinned to core 0, the proxy under test alone on core 1 (one core "
        "each: pgbouncer is single-threaded, the ambassador one event loop).",
        f"- **Noisy figures.** Shared machine: load average {meta['load_before']} before and "
        f"{meta['load_after']} after (1, 5, 15 min); {meta['busy_runs']} of {meta['runs']} "
        "runs had other processes using more than 10% of a core meanwhile (none left out).",
        f"- Repetitions: {cfg.reps}. connect: `pgbench {shlex.join(con)}` (a new connection "
        f"per transaction); select: `pgbench {shlex.join(sel)}` (persistent connections).",
        "- The app side of every proxy is plaintext on loopback with no password (trust); "
        "the proxies log in to the server with SCRAM-SHA-256 over TLS (the ambassador with "
        "`--pg-password-file`, verify-full; pgbouncer with its auth_file, "
        "`server_tls_sslmode verify-ca`). direct-tls is pgbench itself with "
        "`sslmode=verify-full` and SCRAM-SHA-256-PLUS. Both pools: 20 server connections "
        "at most, `DISCARD ALL` as the session-mode reset.",
        f"- Proxy CPU: utime+stime of the proxy PID (/proc/PID/stat) per run, divided by "
        f"the transactions. {meta['versions']['pgbouncer']}; {meta['versions']['pgbench']}; "
        f"{meta['versions']['postgres']}.",
        "",
        f"![pgbench through the pools]({PLOT_PATH.relative_to(DOC_PATH.parent)})",
        "",
        f"### A new connection per transaction (`pgbench {shlex.join(con)}`)",
        "",
        *table(raw, "connect"),
        "",
        f"### Persistent connections (`pgbench {shlex.join(sel)}`)",
        "",
        *table(raw, "select"),
        "",
        "### Targets (issue 14)",
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
        "### Context (not targets)",
        "",
        "| test | ratio | measured | per repetition |",
        "|---|---|---|---|",
    ]
    for test, name, key, base in CONTEXT:
        rs = ratios(raw, test, key, base, "tps")
        out.append(
            f"| {test} | {name} | {xfmt(median(rs))} | {', '.join(f'{x:.2f}' for x in rs)} |"
        )
    out += [
        "",
        "Raw per-run figures: `bench/results/pgpool-latest.json`.",
    ]
    return "\n".join(out) + "\n"


def plot(raw: Raw, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "direct-tls": "#999999",
        "no-pool": "#6baed6",
        "session": "#1f77b4",
        "transaction": "#08306b",
        "pgbouncer-session": "#d62728",
        "pgbouncer-transaction": "#ff9896",
    }
    panels = [
        ("connect", "tps", "pgbench -S -C tps (higher is better)"),
        ("connect", "cpu_us_per_txn", "proxy CPU us per transaction, -C (lower is better)"),
        ("select", "tps", "pgbench -S -c 16 tps, persistent (higher is better)"),
        ("select", "cpu_us_per_txn", "proxy CPU us per transaction, -S (lower is better)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8))
    for ax, (test, metric, title) in zip(axes.flat, panels, strict=True):
        keys = [c.key for c in CONTENDERS if test in c.tests]
        vals = [med(raw, test, k, metric) for k in keys]
        xs = [i for i, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, color=[colors[keys[i]] for i in xs])
        ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(keys)), keys, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=9)
    fig.suptitle("PostgreSQL pools: podpatterns ambassador vs pgbouncer 1.18, TLS + SCRAM server")
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
        "command": shlex.join([".venv/bin/python", "bench/pgpool.py", *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "commit": commit,
        "load_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": {
            "pgbouncer": tool_version(["pgbouncer", "--version"]),
            "pgbench": tool_version([f"{pg}/pgbench", "--version"]),
            "postgres": tool_version([f"{pg}/postgres", "--version"]),
        },
    }


def finish(cfg: Settings, raw: Raw, meta: dict[str, Any], write_docs: bool) -> None:
    """Print the section; with ``write_docs`` also put it and the plot into docs/."""
    meta["targets"] = targets(raw)
    text = section(cfg, raw, meta)
    if write_docs:
        write_section(text, HEADING)
        plot(raw, PLOT_PATH)
    sys.stdout.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T (default 10)")
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and the plot"
    )
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="no run: report a saved run again"
    )
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    if args.reps < 1 or args.seconds < 1:
        parser.error("--reps and --seconds must be positive")
    missing = [t for t in ("pgbouncer", "taskset") if shutil.which(t) is None]
    if missing or not (VENV_BIN / "podpatterns").exists():
        raise SystemExit(
            f"bench: missing {' '.join(missing) or 'podpatterns'} (./dev bench-pgpool)"
        )
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs two CPUs (load on core 0, proxy on core 1)")
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        finish(Settings(**saved["settings"]), saved["raw"], saved["meta"], args.write_docs)
        return 0
    cfg = Settings(reps=args.reps, seconds=args.seconds)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop our processes
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # pgbench and the server inherit core 0
    meta = metadata(args_list)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="podpatterns-pgpool-") as tmpname:
        os.chmod(tmpname, 0o755)  # pgbouncer runs as postgres and reads its files here
        raw = run(cfg, Path(tmpname))
    meta["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    runs = [r for t in TESTS for reps in raw[t].values() for r in reps]
    meta["runs"] = len(runs)
    meta["busy_runs"] = sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in runs)
    meta["failed_transactions"] = sum(r["failed"] for r in runs)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "pgpool-latest.json"
    results = {"meta": meta, "settings": dataclasses.asdict(cfg), "raw": raw}
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    finish(cfg, raw, meta, args.write_docs)
    log(f"done in {meta['elapsed_s']} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
