"""What the app's own password costs on the loopback leg (``--pg-client-auth``).

A new connection per transaction (``pgbench -n -S -C``) through a session pool, so that
the server's TLS and SCRAM are paid once per pooled connection and what is left is the
app's leg: no check (``trust``), SCRAM-SHA-256 from a plain password file, from a
``pg_authid`` verifier, and a cleartext password; beside them pgbouncer 1.18 in session
mode with ``auth_type = trust`` and ``auth_type = scram-sha-256`` (the same password in
its userlist). Same method as bench/pgpool.py, whose contenders' pieces this reuses:
pgbench and the PostgreSQL 15 server (TLS + SCRAM only) on core 0, each proxy alone on
core 1, every contender once per repetition, round-robin, the starting one rotated;
ratios paired within a repetition, then the median.

Usage: ``.venv/bin/python bench/pg_client_auth.py [--reps N] [--seconds S]``; prints a
table and writes bench/results/pg-client-auth-latest.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from bench import pgcommon  # noqa: E402
from bench.ambassador import (  # noqa: E402
    FOREIGN_MAX_SHARE,
    LOAD_CORE,
    RESULTS_DIR,
    Ports,
    Procs,
    median,
)
from bench.pgcommon import (  # noqa: E402
    Argv,
    Endpoint,
    Raw,
    ca_path,
    init_pgbench,
    pgbench_env,
    ratios,
)
from bench.pgpool import PROXY_CORE, Settings, _ambassador, _pgbouncer  # noqa: E402
from podpatterns.ambassador.pgauth import ScramVerifier  # noqa: E402
from tests.peers import pg_tls, run_postgres  # noqa: E402

APP_PASSWORD = "app-side-bench-pw"


def _client_auth(file: str, *extra: str) -> Argv:
    """The session-pool ambassador asking the app for the password in ``file``."""
    pooled = _ambassador("--pg-pool", "session")

    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        return [
            *pooled(listen, upstream, tmp),
            "--pg-client-auth",
            "password-file",
            "--pg-client-password-file",
            str(tmp / "client" / file),
            *extra,
        ]

    return argv


def _pgbouncer_scram() -> Argv:
    """pgbouncer session mode whose clients authenticate with SCRAM-SHA-256: the app's
    password is the userlist's, which is also the server's (pgbouncer has one list)."""
    plain = _pgbouncer("session")

    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        # its own directory: the trust contender has tmp/pgbouncer-session
        own = tmp / "pgbouncer-scram"
        own.mkdir(mode=0o755)
        for name in ("tls", "secret"):
            (own / name).symlink_to(tmp / name)
        out = plain(listen, upstream, own)
        conf = Path(out[-1])
        conf.write_text(conf.read_text().replace("auth_type = trust", "auth_type = scram-sha-256"))
        return out

    return argv


#: (key, label, argv, whether the app sends a password)
CONTENDERS: tuple[tuple[str, str, Argv, bool], ...] = (
    (
        "trust",
        "ambassador session pool, --pg-client-auth trust",
        _ambassador("--pg-pool", "session"),
        False,
    ),
    ("scram", "... password-file, scram-sha-256 (plain file)", _client_auth("password"), True),
    (
        "scram-verifier",
        "... scram-sha-256, pg_authid verifier file",
        _client_auth("verifier"),
        True,
    ),
    (
        "password",
        "... --pg-client-auth-method password (cleartext)",
        _client_auth("password", "--pg-client-auth-method", "password"),
        True,
    ),
    ("pgbouncer-trust", "pgbouncer 1.18 session, auth_type trust", _pgbouncer("session"), False),
    (
        "pgbouncer-scram",
        "pgbouncer 1.18 session, auth_type scram-sha-256",
        _pgbouncer_scram(),
        True,
    ),
)


def run(cfg: Settings, tmp: Path) -> Raw:
    """Every repetition of ``pgbench -S -C`` through every contender."""
    ca = trustme.CA()
    ca_path(tmp).parent.mkdir()
    ca.cert_pem.write_to_path(str(ca_path(tmp)))
    procs, ports = Procs(tmp), Ports()
    with run_postgres(pg_tls(ca)) as server:
        try:
            assert server.password is not None
            (tmp / "secret").mkdir()
            (tmp / "secret" / "password").write_text(server.password)
            (tmp / "client").mkdir()
            (tmp / "client" / "password").write_text(APP_PASSWORD)
            (tmp / "client" / "verifier").write_text(ScramVerifier.make(APP_PASSWORD).text())
            init_pgbench(server, cfg.scale)
            eps: dict[str, Endpoint] = {}
            for key, _, argv, sends in CONTENDERS:
                listen = ports.take()
                proc = procs.start(key, argv(listen, server.port, tmp), PROXY_CORE)
                procs.wait_listening(key, proc, listen)
                env = pgbench_env(server, listen, False, ca_path(tmp))
                env.pop("PGPASSWORD", None)
                if sends:  # pgbouncer's app password is its userlist's: the server's
                    env["PGPASSWORD"] = server.password if "pgbouncer" in key else APP_PASSWORD
                eps[key] = Endpoint(listen, proc.pid, env)
            keys = [c[0] for c in CONTENDERS]
            return pgcommon.measure(
                cfg, eps, lambda _test: keys, ("connect",), server.tool("pgbench")
            )
        finally:
            procs.stop_all()


def table(raw: Raw) -> list[str]:
    """A markdown table: tps, proxy CPU per connection, ratios to trust and pgbouncer."""
    rows = [
        "| contender | tps (median) | proxy CPU us per connection | vs trust "
        "| vs pgbouncer scram |",
        "|---|---|---|---|---|",
    ]
    for key, label, _, _ in CONTENDERS:
        reps = raw["connect"][key]
        tps = median([r["tps"] for r in reps])
        cpu = median([r["cpu_us_per_txn"] for r in reps])
        vs_trust = median(ratios(raw, "connect", key, "trust", "tps"))
        vs_bouncer = median(ratios(raw, "connect", key, "pgbouncer-scram", "tps"))
        rows.append(f"| {label} | {tps:.0f} | {cpu:.0f} | {vs_trust:.2f}x | {vs_bouncer:.2f}x |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T (default 10)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.seconds < 1:
        parser.error("--reps and --seconds must be positive")
    missing = [t for t in ("pgbouncer", "taskset") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"bench: missing {' '.join(missing)}")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs two CPUs (load on core 0, proxy on core 1)")
    cfg = Settings(reps=args.reps, seconds=args.seconds)
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # pgbench and the server inherit core 0
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="podpatterns-pg-client-auth-") as tmpname:
        os.chmod(tmpname, 0o755)  # pgbouncer runs as postgres and reads its files here
        raw = run(cfg, Path(tmpname))
    runs = [r for reps in raw["connect"].values() for r in reps]
    meta = {
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "busy_runs": sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in runs),
        "failed_transactions": sum(r["failed"] for r in runs),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "pg-client-auth-latest.json"
    results = {"meta": meta, "settings": dataclasses.asdict(cfg), "raw": raw}
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print("\n".join(table(raw)))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
