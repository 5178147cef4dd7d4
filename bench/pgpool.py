"""Benchmark the ambassador's connection pool (``--pg-pool``) against pgbouncer 1.18.

Everything runs on 127.0.0.1. pgbench and the PostgreSQL 15 server are pinned to core 0,
the proxy under test alone to core 1 (/work/shared/BENCHMARKS.md's method, as in
bench/postgres.py; the shared parts are bench/pgcommon.py). The server takes only TLS with SCRAM
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

With ``--baseline DIR`` (another checkout, e.g. ``git worktree add /tmp/base main``) the
session and transaction pools of that checkout's ambassador run too, as contenders
``session-base`` and ``transaction-base`` in the same rounds, and the report compares
this checkout with it (same run, same load).

Usage: ``.venv/bin/python bench/pgpool.py [--reps N] [--seconds S] [--baseline DIR]
[--write-docs]`` (``./dev bench-pgpool``); writes bench/results/pgpool-latest.json, and
with ``--write-docs`` the section "PostgreSQL connection pooling" of docs/benchmarks.md
and docs/img/pgpool-bench.png. ``--render JSON`` reports a saved run again.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from bench import pgcommon  # noqa: E402
from bench.ambassador import (  # noqa: E402
    DOC_PATH,
    HOST,
    Ports,
    Procs,
    fmt,
    median,
    podpatterns_argv,
    tool_version,
)
from bench.pgcommon import (  # noqa: E402
    Argv,
    Endpoint,
    Raw,
    busy,
    ca_path,
    init_pgbench,
    med,
    pgbench_env,
    ratios,
    rfmt,
    xfmt,
)
from tests.peers import PG_SERVER_NAME, pg_tls, run_postgres  # noqa: E402

HEADING = "## PostgreSQL connection pooling"
PLOT_PATH = ROOT / "docs" / "img" / "pgpool-bench.png"
PROXY_CORE = "1"
POOL_SIZE = 20  # both pools: pgbouncer's default_pool_size, the ambassador's --pg-pool-size
MAX_CONNECTIONS = 300  # the server's max_connections


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    argv: Argv | None  # the proxy's argv for (listen, upstream port, tmp); None: direct
    tests: tuple[str, ...] = ("connect", "select")


def _ambassador(*extra: str, tree: Path = ROOT) -> Argv:
    """The ambassador of the checkout ``tree`` with the pool flags ``extra``."""

    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        return [
            *podpatterns_argv(tree),
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
TESTS = ("connect", "select")


def baseline_contenders(tree: Path) -> tuple[Contender, ...]:
    """The session and transaction pools of the ``--baseline`` checkout ``tree``."""
    return (
        Contender(
            "session-base",
            "ambassador --pg-pool session, --baseline",
            _ambassador("--pg-pool", "session", tree=tree),
        ),
        Contender(
            "transaction-base",
            "ambassador --pg-pool transaction, --baseline",
            _ambassador("--pg-pool", "transaction", tree=tree),
        ),
    )


def contenders(raw: Raw | None = None, baseline: Path | None = None) -> list[Contender]:
    """This run's contenders: the baseline's too when there is one (or ``raw`` has them)."""
    out = list(CONTENDERS)
    base = baseline_contenders(baseline or ROOT)
    saved = raw is not None and any(c.key in raw.get(t, {}) for t in TESTS for c in base)
    if baseline is not None or saved:
        out[4:4] = base  # after the pools of this checkout, before pgbouncer
    return out


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


def run(cfg: Settings, tmp: Path, baseline: Path | None = None) -> Raw:
    """Every repetition of every test through every contender; the raw results."""
    ca = trustme.CA()
    ca_path(tmp).parent.mkdir()
    ca.cert_pem.write_to_path(str(ca_path(tmp)))
    procs = Procs(tmp)
    ports = Ports()
    every = contenders(baseline=baseline)
    # inherits this process's affinity: core 0. Up to POOL_SIZE server connections per
    # pool (six with --baseline), direct-tls's 16 and no-pool's 8: over the default 100.
    with run_postgres(pg_tls(ca), settings=(f"max_connections={MAX_CONNECTIONS}",)) as server:
        try:
            assert server.password is not None
            (tmp / "secret").mkdir()
            (tmp / "secret" / "password").write_text(server.password)
            init_pgbench(server, cfg.scale)
            eps: dict[str, Endpoint] = {}
            for c in every:
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
            return pgcommon.measure(
                cfg,
                eps,
                lambda test: [c.key for c in every if test in c.tests],
                TESTS,
                server.tool("pgbench"),
            )
        finally:
            procs.stop_all()


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
    for c in contenders(raw):
        runs = raw.get(test, {}).get(c.key)
        if not runs:
            continue
        direct = (
            "—" if c.argv is None else rfmt(median(ratios(raw, test, c.key, "direct-tls", "tps")))
        )
        lines.append(
            f"| {c.label} | {fmt(med(raw, test, c.key, 'tps'))} | {direct} "
            f"| {fmt(med(raw, test, c.key, 'cpu_us_per_txn'))} | {len(runs)} ({busy(runs)}) |"
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
    if meta.get("baseline"):
        out += ["", *baseline_table(raw, meta["baseline"])]
    out += [
        "",
        "Raw per-run figures: `bench/results/pgpool-latest.json`.",
    ]
    return "\n".join(out) + "\n"


#: (test, this checkout's contender, the baseline's, pgbouncer's) for --baseline
VERSUS_BASELINE = (
    ("connect", "session", "session-base", "pgbouncer-session"),
    ("connect", "transaction", "transaction-base", "pgbouncer-transaction"),
    ("select", "session", "session-base", "pgbouncer-session"),
    ("select", "transaction", "transaction-base", "pgbouncer-transaction"),
)


def baseline_table(raw: Raw, baseline: str) -> list[str]:
    """This checkout's pools against the ``--baseline`` checkout's, run in the same
    rounds: tps and CPU per transaction, and each against pgbouncer."""
    lines = [
        f"### This checkout vs `--baseline {baseline}`",
        "",
        "| test | pool | tps ÷ baseline | CPU/txn ÷ baseline | ÷ pgbouncer, this "
        "| ÷ pgbouncer, baseline | per repetition (this ÷ pgbouncer) |",
        "|---|---|---|---|---|---|---|",
    ]
    for test, key, base, peer in VERSUS_BASELINE:
        if key not in raw.get(test, {}) or base not in raw.get(test, {}):
            continue
        each = ", ".join(f"{x:.2f}" for x in ratios(raw, test, key, peer, "tps"))
        lines.append(
            f"| {test} | {key} | {xfmt(median(ratios(raw, test, key, base, 'tps')))} "
            f"| {xfmt(median(ratios(raw, test, key, base, 'cpu_us_per_txn')))} "
            f"| {xfmt(median(ratios(raw, test, key, peer, 'tps')))} "
            f"| {xfmt(median(ratios(raw, test, base, peer, 'tps')))} | {each} |"
        )
    return lines


COLORS = {
    "direct-tls": "#999999",
    "no-pool": "#6baed6",
    "session": "#1f77b4",
    "transaction": "#08306b",
    "session-base": "#9ecae1",
    "transaction-base": "#4292c6",
    "pgbouncer-session": "#d62728",
    "pgbouncer-transaction": "#ff9896",
}


def plot(raw: Raw, path: Path) -> None:
    pgcommon.plot(
        raw,
        path,
        [
            ("connect", "tps", "pgbench -S -C tps (higher is better)"),
            ("connect", "cpu_us_per_txn", "proxy CPU us per transaction, -C (lower is better)"),
            ("select", "tps", "pgbench -S -c 16 tps, persistent (higher is better)"),
            ("select", "cpu_us_per_txn", "proxy CPU us per transaction, -S (lower is better)"),
        ],
        lambda test: [c.key for c in contenders(raw) if test in c.tests],
        COLORS,
        "PostgreSQL pools: podpatterns ambassador vs pgbouncer 1.18, TLS + SCRAM server",
        9,
    )


def finish(cfg: Settings, raw: Raw, meta: dict[str, Any], write_docs: bool) -> None:
    """Print the section; with ``write_docs`` also put it and the plot into docs/."""
    meta["targets"] = targets(raw)
    text = section(cfg, raw, meta)
    if write_docs:
        pgcommon.write_section(text, HEADING)
        plot(raw, PLOT_PATH)
    sys.stdout.write(text)


SCRIPT = pgcommon.Script(
    name="pgpool",
    doc=__doc__,
    dev="./dev bench-pgpool",
    peers=("pgbouncer",),
    tests=TESTS,
    versions=lambda: {
        "pgbouncer": tool_version(["pgbouncer", "--version"]),
        **pgcommon.tool_versions(),
    },
    run=run,
    settings=Settings,
    finish=finish,
    baseline_help="another checkout: its session and transaction pools run in the same rounds",
)


def main(argv: Sequence[str] | None = None) -> int:
    return pgcommon.main(SCRIPT, argv)


if __name__ == "__main__":
    raise SystemExit(main())
