"""What bench/postgres.py and bench/pgpool.py share: the PostgreSQL servers' setup, the
pgbench runner, the interleaved repetitions, the ratios, the report's plumbing.

Both scripts follow /work/shared/BENCHMARKS.md's method: this process, pgbench and the
PostgreSQL servers pinned to core 0 (:func:`pin_load_core`; the servers and pgbench
inherit it or are started with ``taskset``), each proxy under test alone on core 1
(``bench.ambassador.Procs.start``). Each repetition runs every contender once per test,
round-robin with the starting contender rotated (:func:`measure`); ratios are paired
within a repetition, then the median is taken (:func:`ratios`).

The ambassador is run from a source tree (:func:`podpatterns_argv`): this checkout's by
default, so that a bench run from a worktree measures that worktree's code, not the
package the virtualenv was installed from; another checkout with ``--baseline``.
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
from typing import Any, Protocol

from bench.ambassador import (
    DOC_PATH,
    FOREIGN_MAX_SHARE,
    LOAD_CORE,
    RESULTS_DIR,
    Foreign,
    code_commit,
    doc_section,
    fmt,
    log,
    median,
    proxy_cpu,
)
from tests.peers import PG_SERVER_NAME, PostgresServer

PG_BIN = "/usr/lib/postgresql/15/bin"

#: test -> contender -> one dict per repetition (tps, transactions, cpu_s, rep, ...)
Raw = dict[str, dict[str, list[dict[str, Any]]]]
#: A proxy's argv for (listen port, upstream port, the run's temporary directory).
Argv = Callable[[int, int, Path], list[str]]


class Settings(Protocol):
    """What the shared code needs of a script's settings."""

    @property
    def reps(self) -> int: ...

    @property
    def seconds(self) -> int: ...

    def pgbench(self, test: str) -> list[str]:
        """The pgbench arguments of ``test`` (the connection is in the environment)."""
        ...


# -- servers ---------------------------------------------------------------------------------


def ca_path(tmp: Path) -> Path:
    """The CA file, alone in its directory as in a mounted Secret: the ambassador watches
    that directory, and the proxies' logs in ``tmp`` must not wake it."""
    return tmp / "tls" / "ca.pem"


def pgbench_env(server: PostgresServer, port: int, tls_direct: bool, ca: Path) -> dict[str, str]:
    """pgbench's environment for ``port``: libpq's own TLS (verify-full) when
    ``tls_direct``, else plaintext (a proxy on loopback)."""
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
    """One pgbench run of ``test`` on the load core: tps, transactions, failed."""
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


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where pgbench connects for one contender, and the PID whose CPU is counted."""

    port: int
    pid: int | None
    env: dict[str, str]


def measure(
    cfg: Settings,
    eps: dict[str, Endpoint],
    order: Callable[[str], list[str]],
    tests: Sequence[str],
    tool: str,
) -> Raw:
    """A warm-up through each endpoint (which also fills each pool), then every
    repetition of every test through the contenders ``order(test)`` names, round-robin
    with the starting contender rotated; the raw results."""
    warm = dataclasses.replace(cfg, seconds=1)  # type: ignore[type-var]
    for key, ep in eps.items():
        pgbench(warm, "select", ep.env, tool)
        log(f"warm-up {key} ok")
    foreign = Foreign(FOREIGN_MAX_SHARE)
    raw: Raw = {}
    for rep in range(cfg.reps):
        for test in tests:
            keys = order(test)
            shift = rep % len(keys)
            for key in keys[shift:] + keys[:shift]:
                ep = eps[key]
                before = foreign.snapshot()
                start = time.monotonic()
                res: dict[str, Any] = {}
                with proxy_cpu(ep.pid, res):
                    res.update(pgbench(cfg, test, ep.env, tool))
                res["foreign_cpu_share"] = round(
                    foreign.used(before, foreign.snapshot()) / (time.monotonic() - start), 3
                )
                cpu = res["cpu_s"]
                res["cpu_us_per_txn"] = (
                    None if cpu is None else cpu / max(1, res["transactions"]) * 1e6
                )
                res["load1"] = round(os.getloadavg()[0], 2)
                res["rep"] = rep
                raw.setdefault(test, {}).setdefault(key, []).append(res)
            log(
                f"rep {rep + 1}/{cfg.reps} {test} (load {os.getloadavg()[0]:.2f}): "
                + ", ".join(f"{k} {raw[test][k][-1]['tps']:.0f}" for k in keys if k in raw[test])
            )
    return raw


# -- aggregation -------------------------------------------------------------------------------


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


def busy(runs: Sequence[dict[str, Any]]) -> int:
    """Runs during which other processes used more than FOREIGN_MAX_SHARE of a core."""
    return sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in runs)


# -- report --------------------------------------------------------------------------------------


def write_section(text: str, heading: str) -> None:
    """Put ``text`` in place of the section ``heading`` of docs/benchmarks.md (or last)."""
    doc = DOC_PATH.read_text()
    where = doc_section(doc, heading)
    if where is None:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        doc = doc[: where[0]] + text + ("\n" + doc[where[1] :] if where[1] < len(doc) else "")
    DOC_PATH.write_text(doc)


#: (test, metric, title) of one panel of a plot.
Panel = tuple[str, str, str]


def plot(
    raw: Raw,
    path: Path,
    panels: Sequence[Panel],
    keys: Callable[[str], list[str]],
    colors: dict[str, str],
    title: str,
    title_size: int,
) -> None:
    """One bar chart per panel: the median of ``metric`` per contender of ``test``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.8))
    for ax, (test, metric, name) in zip(axes.flat, panels, strict=True):
        ks = [k for k in keys(test) if k in raw.get(test, {})]
        vals = [med(raw, test, k, metric) for k in ks]
        xs = [i for i, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, color=[colors.get(ks[i], "#bcbd22") for i in xs])
        ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(ks)), ks, fontsize=7, rotation=30, ha="right")
        ax.set_title(name, fontsize=title_size)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metadata(script: str, argv: Sequence[str], versions: dict[str, str]) -> dict[str, Any]:
    """Command, date, machine, the commit of podpatterns/, the load, peer versions."""
    return {
        "command": shlex.join([".venv/bin/python", f"bench/{script}.py", *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "commit": code_commit(),
        "load_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": versions,
    }


# -- the command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """One benchmark script's fixed parts, for :func:`main`."""

    name: str  # bench/NAME.py, bench/results/NAME-latest.json
    doc: str | None  # the module docstring (its first paragraph is the description)
    dev: str  # the ./dev command that installs the peers
    peers: tuple[str, ...]  # executables it needs besides taskset
    tests: tuple[str, ...]
    versions: Callable[[], dict[str, str]]
    #: (settings, the run's temporary directory, the --baseline checkout) -> raw results
    run: Callable[[Any, Path, Path | None], Raw]
    settings: Callable[..., Any]  # the script's Settings class
    #: (settings, raw, meta, write_docs): print the section, write docs if asked
    finish: Callable[[Any, Raw, dict[str, Any], bool], None]
    baseline_help: str | None = None  # None: no --baseline option


def main(script: Script, argv: Sequence[str] | None) -> int:
    """Parse the options, run, save bench/results/NAME-latest.json, report."""
    parser = argparse.ArgumentParser(
        description=script.doc.split("\n\n")[0] if script.doc else None
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T (default 10)")
    parser.add_argument(
        "--write-docs", action="store_true", help="write docs/benchmarks.md and the plot"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help=f"no run: report a saved bench/results/{script.name}-latest.json again",
    )
    if script.baseline_help is not None:
        parser.add_argument("--baseline", type=Path, metavar="DIR", help=script.baseline_help)
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    if args.reps < 1 or args.seconds < 1:
        parser.error("--reps and --seconds must be positive")
    baseline: Path | None = getattr(args, "baseline", None)
    if baseline is not None:
        baseline = baseline.resolve()
        if not (baseline / "podpatterns" / "__init__.py").is_file():
            parser.error(f"--baseline: {str(baseline)!r} is not a podpatterns checkout")
    missing = [t for t in ("taskset", *script.peers) if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: missing {' '.join(missing)} ({script.dev})")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs two CPUs (load on core 0, proxy on core 1)")
    if args.render is not None:  # the report again, from a saved run
        saved = json.loads(args.render.read_text())
        cfg = script.settings(**saved["settings"])
        script.finish(cfg, saved["raw"], saved["meta"], args.write_docs)
        return 0
    cfg = script.settings(reps=args.reps, seconds=args.seconds)
    # A SIGTERM unwinds like Ctrl-C, so every process we started is stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # pgbench and the servers inherit core 0
    meta = metadata(script.name, args_list, script.versions())
    if baseline is not None:
        meta["baseline"] = str(baseline)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"podpatterns-{script.name}-") as tmpname:
        os.chmod(tmpname, 0o755)  # pgbouncer runs as postgres and reads its files here
        raw = script.run(cfg, Path(tmpname), baseline)
    meta["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    runs = [r for t in script.tests for reps in raw[t].values() for r in reps]
    meta["runs"] = len(runs)
    meta["busy_runs"] = busy(runs)
    meta["failed_transactions"] = sum(r["failed"] for r in runs)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{script.name}-latest.json"
    results = {"meta": meta, "settings": dataclasses.asdict(cfg), "raw": raw}
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    script.finish(cfg, raw, meta, args.write_docs)
    log(f"done in {meta['elapsed_s']} s; results in {out}")
    return 0


def tool_versions(*extra: tuple[str, list[str]]) -> dict[str, str]:
    """pgbench's and postgres's versions, and those of ``extra`` (name, argv)."""
    from bench.ambassador import tool_version

    versions = {name: tool_version(argv) for name, argv in extra}
    versions["pgbench"] = tool_version([f"{PG_BIN}/pgbench", "--version"])
    versions["postgres"] = tool_version([f"{PG_BIN}/postgres", "--version"])
    return versions
