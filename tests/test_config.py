"""Config: one declaration per option, three sources, the same typed object."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from podpatterns.ambassador import AMBASSADOR_OPTIONS
from podpatterns.ambassador import config as amb_config
from podpatterns.errors import ConfigError
from podpatterns.options import (
    HostPort,
    add_arguments,
    parse_duration,
    parse_hostport,
    parse_size,
)
from tests.proc import run

# A non-default value for every option, as a user would type it.
SAMPLES: dict[str, str] = {
    "config": "",  # the file itself; not a value in the config object
    "admin": "127.0.0.1:9999",
    "drain_timeout": "45s",
    "shutdown_delay": "500ms",
    "log_level": "debug",
    "log_format": "json",
    "loop": "asyncio",
    "health_dir": "/shared/health",
    "exit_with": "app",
    "exit_with_code": "7",
    "exit_with_quit": "http://127.0.0.1:9091/quitquitquit",
    "listen": "127.0.0.1:6432",
    "upstream": "db1.example.com:5432,db2.example.com:5432",
    "balance": "round_robin",
    "connect_timeout": "2.5s",
    "connect_retries": "5",
    "retry_backoff": "50ms",
    "retry_backoff_max": "1m",
    "dns_refresh": "10s",
    "fail_cooldown": "3s",
    "health_check_interval": "5s",
    "health_check_timeout": "1s",
    "max_connections": "100",
    "on_limit": "reject",
    "idle_timeout": "10m",
    "half_close_timeout": "1m",
    "max_lifetime": "1h",
    "max_lifetime_jitter": "5m",
    "upstream_tls": "true",
    "tls_ca": "/etc/ca.pem",
    "tls_cert": "/etc/client.pem",
    "tls_key": "/etc/client.key",
    "tls_server_name": "db.internal",
    "tls_insecure_skip_verify": "true",
    "proxy_protocol": "v2",
    "splice": "off",
    "buffer_size": "64KiB",
    "ready_requires_upstream": "true",
    "drain_close": "fin",
    "tcp_keepalive": "false",
    "tcp_nodelay": "false",
    "protocol": "postgres",
    "startup_timeout": "20s",
    "pg_sslmode": "require",  # the one mode --tls-insecure-skip-verify agrees with
    "pg_tls_negotiation": "direct",
    "listen_tls_cert": "/etc/server.pem",
    "listen_tls_key": "/etc/server.key",
    "pg_drain": "off",
    "pg_metrics": "true",
    "pg_slow_query": "250ms",
    "pg_password_file": "/etc/db-password/password",
    "pg_password_command": "gcloud sql generate-login-token",  # see ALTERNATIVES
    "pg_password_command_ttl": "5m",
    "pg_auth_methods": "scram-sha-256,md5",
    "pg_client_auth": "password-file",
    "pg_client_auth_method": "password",
    "pg_client_password_file": "/etc/app-password/password",
    "pg_target_session_attrs": "read-write",
    "pg_health_user": "app",
    "pg_health_database": "app",
    "pg_close_on_role_change": "true",
    "pg_pool": "transaction",  # see ALTERNATIVES
    "pg_pool_size": "5",
    "pg_pool_min_idle": "1",
    "pg_pool_idle_timeout": "30s",
    "pg_pool_max_lifetime": "10m",
    "pg_pool_wait": "2s",
    "pg_pool_reset_query": "RESET ALL",
    "pg_pool_max_prepared": "50",
    "pg_pool_max_client_prepared": "500",
    "pg_upstream_trust": "true",
}

#: Sampled options that exclude another sample (--pg-password-command and
#: --pg-password-file; --pg-pool), left out
#: of the one config built from all the samples.
ALTERNATIVES = ("pg_password_command", "pg_pool")


def _flags(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, AMBASSADOR_OPTIONS)
    return vars(parser.parse_args(argv))


def _argv(values: dict[str, str]) -> list[str]:
    argv: list[str] = []
    for opt in AMBASSADOR_OPTIONS:
        if opt.name not in values:
            continue
        raw = values[opt.name]
        if opt.flag:
            argv.append(opt.cli if raw == "true" else "--no-" + opt.cli[2:])
        elif opt.multiple:
            for item in raw.split(","):
                argv += [opt.cli, item]
        else:
            argv += [opt.cli, raw]
    return argv


def test_every_option_has_a_sample() -> None:
    """The samples cover every declared option (a new option needs one)."""
    assert set(SAMPLES) == {o.name for o in AMBASSADOR_OPTIONS}


def test_flags_env_and_file_build_the_same_config(tmp_path: Path) -> None:
    """Every option given as flag, as env var or in the YAML file gives one config object."""
    values = {k: v for k, v in SAMPLES.items() if k not in ("config", *ALTERNATIVES)}
    from_flags = amb_config.build(_flags(_argv(values)), {}, {})
    env = {o.env: values[o.name] for o in AMBASSADOR_OPTIONS if o.name in values}
    from_env = amb_config.build({}, env, {})
    file_data: dict[str, Any] = {}
    for o in AMBASSADOR_OPTIONS:
        if o.name in values:
            raw = values[o.name]
            file_data[o.name] = raw.split(",") if o.multiple else raw
    path = tmp_path / "amb.yaml"
    path.write_text(yaml.safe_dump(file_data))
    from_file = amb_config.build({}, {}, yaml.safe_load(path.read_text()))
    assert from_flags == from_env == from_file
    route = from_flags.routes[0]
    assert route.upstream == (HostPort("db1.example.com", 5432), HostPort("db2.example.com", 5432))
    assert route.connect_timeout == 2.5
    assert route.buffer_size == 64 * 1024
    assert route.tcp_nodelay is False
    assert from_flags.runtime.admin == HostPort("127.0.0.1", 9999)
    assert from_flags.runtime.shutdown_delay == 0.5


def test_yaml_native_types_are_accepted() -> None:
    """YAML numbers and booleans mean the same as their strings."""
    cfg = amb_config.build(
        {},
        {},
        {
            "listen": "127.0.0.1:1",
            "upstream": "db:1",
            "connect_timeout": 3,
            "upstream_tls": True,
            "max_connections": 7,
        },
    )
    assert cfg.routes[0].connect_timeout == 3.0
    assert cfg.routes[0].upstream_tls is True
    assert cfg.routes[0].max_connections == 7


def test_precedence_flags_over_env_over_file() -> None:
    """Flags beat environment variables, which beat the file, which beats defaults."""
    base = {
        "listen": "127.0.0.1:1",
        "upstream": ["file:1"],
        "connect_timeout": "1s",
        "idle_timeout": "1s",
        "dns_refresh": "1s",
    }
    env = {
        "PODPATTERNS_UPSTREAM": "env:1",
        "PODPATTERNS_CONNECT_TIMEOUT": "2s",
        "PODPATTERNS_IDLE_TIMEOUT": "2s",
    }
    flags = _flags(["--connect-timeout", "3s"])
    route = amb_config.build(flags, env, base).routes[0]
    assert route.connect_timeout == 3.0  # flag
    assert route.idle_timeout == 2.0  # env over file
    assert route.upstream == (HostPort("env", 1),)
    assert route.dns_refresh == 1.0  # file over default
    assert route.fail_cooldown == 10.0  # default


def test_routes_in_file_inherit_top_level_settings() -> None:
    """Several routes from the file share top-level settings unless they set their own."""
    cfg = amb_config.build(
        {},
        {"PODPATTERNS_IDLE_TIMEOUT": "5m"},
        {
            "connect_timeout": "2s",
            "routes": [
                {"name": "db", "listen": "127.0.0.1:5432", "upstream": ["db.example.com:5432"]},
                {
                    "name": "cache",
                    "listen": "unix:/shared/redis.sock",
                    "upstream": ["redis.example.com:6379"],
                    "connect_timeout": "500ms",
                },
            ],
        },
    )
    db, cache = cfg.routes
    assert (db.name, cache.name) == ("db", "cache")
    assert db.connect_timeout == 2.0
    assert cache.connect_timeout == 0.5
    assert db.idle_timeout == cache.idle_timeout == 300.0
    assert str(cache.listen) == "unix:/shared/redis.sock"


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (
            {
                "routes": [
                    {"name": "a", "listen": "127.0.0.1:1", "upstream": ["x:1"]},
                    {"name": "a", "listen": "127.0.0.1:2", "upstream": ["x:1"]},
                ]
            },
            "duplicate name 'a'",
        ),
        (
            {
                "routes": [
                    {"name": "a", "listen": "127.0.0.1:1", "upstream": ["x:1"]},
                    {"name": "b", "listen": "127.0.0.1:1", "upstream": ["x:1"]},
                ]
            },
            "duplicate listen '127.0.0.1:1'",
        ),
        ({"routes": [{"name": "a", "listen": "127.0.0.1:1"}]}, "route 'a': --upstream: missing"),
        ({"routes": "db"}, "routes must be a non-empty list"),
        (
            {"listen": "127.0.0.1:1", "upstream": "x:1", "tls_cert": "/c"},
            "--tls-cert and --tls-key: give both",
        ),
        ({"listen": "relative.sock", "upstream": "x:1"}, "listen: 'relative.sock' is not"),
        ({"listen": "unix:db.sock", "upstream": "x:1"}, "needs an absolute socket path"),
        (
            {"listen": "127.0.0.1:1", "upstream": "x:1", "upstream_tls": "maybe"},
            "'maybe' is not a boolean",
        ),
        (
            {"listen": "127.0.0.1:1", "upstream": "x:1", "dns_refresh": "0s"},
            "--dns-refresh: must be > 0",
        ),
        (
            {"listen": "127.0.0.1:1", "routes": [{"listen": "127.0.0.1:2", "upstream": "x:1"}]},
            "--listen: cannot be combined with routes",
        ),
        ({"config": "/other.yaml"}, "a config file cannot name another one"),
    ],
)
def test_invalid_files_name_the_field(file: dict[str, Any], message: str) -> None:
    """Invalid config files raise ConfigError naming the route or field."""
    with pytest.raises(ConfigError, match=None) as info:
        amb_config.build({}, {}, file)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2", 2.0), ("1.5s", 1.5)],
)
def test_durations(text: str, value: float) -> None:
    """Durations accept ms, s, m, h and bare seconds."""
    assert parse_duration(text) == value


def test_bad_values_raise_value_error_with_expectation() -> None:
    """Parsers say what was expected."""
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    with pytest.raises(ValueError, match="valid port"):
        parse_hostport("db:0")
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert parse_hostport("[::1]:5432") == HostPort("::1", 5432)
    assert str(HostPort("::1", 5432)) == "[::1]:5432"


SESSION_POOL = {
    "listen": "127.0.0.1:6432",
    "upstream": "db.example.com:5432",
    "protocol": "postgres",
    "pg_pool": "session",
    "pg_upstream_trust": "true",
}


@pytest.mark.parametrize(
    ("name", "value"),
    [("pg_pool_max_prepared", "50"), ("pg_pool_max_client_prepared", "500")],
)
def test_statement_bounds_with_a_session_pool_are_refused(name: str, value: str) -> None:
    """--pg-pool-max-prepared and --pg-pool-max-client-prepared, which a session pool
    would ignore, are refused with it: one line naming the option, the value and the
    mode they need; a transaction pool takes them."""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as info:
        amb_config.build({}, {}, {**SESSION_POOL, name: value})
    message = str(info.value)
    assert message.startswith(f"{flag}: {value} only applies with --pg-pool transaction"), message
    assert "\n" not in message
    env = {"PODPATTERNS_" + name.upper(): value}
    with pytest.raises(ConfigError, match=f"^{flag}: {value} only applies"):
        amb_config.build({}, env, SESSION_POOL)
    route = amb_config.build({}, {}, {**SESSION_POOL, "pg_pool": "transaction", name: value})
    assert getattr(route.routes[0], name) == int(value)


def test_session_pool_takes_the_statement_bounds_defaults() -> None:
    """A session pool without the statement bounds, or with their defaults spelled out
    (the declared ones), is accepted."""
    defaults = {o.name: o.default for o in AMBASSADOR_OPTIONS}
    assert amb_config.build({}, {}, SESSION_POOL).routes[0].pg_pool == "session"
    spelled = {
        **SESSION_POOL,
        "pg_pool_max_prepared": str(defaults["pg_pool_max_prepared"]),
        "pg_pool_max_client_prepared": str(defaults["pg_pool_max_client_prepared"]),
    }
    assert amb_config.build({}, {}, spelled).routes[0].pg_pool == "session"


def test_statement_bound_with_a_session_pool_exits_2() -> None:
    """From the command line: exit 2 and the one-line error, no traceback."""
    done = run("ambassador", *_argv({**SESSION_POOL, "pg_pool_max_prepared": "50"}))
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pg-pool-max-prepared: 50 only applies" in lines[0], lines
    assert "Traceback" not in done.stderr
