"""Bad input on the command line and in config files: exit 2 and one line that names the
option, the value and what is expected; never a traceback, never a Python message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from podpatterns.commands import COMMANDS
from podpatterns.errors import ConfigError
from tests.proc import run

LOOP = "127.0.0.1"
AMB = ("ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9")


def one_line_error(*args: str, want: str, env: dict[str, str] | None = None) -> None:
    """Run ``podpatterns ARGS``: exit 2, exactly one stderr line, containing ``want``."""
    out = run(*args, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1, out.stderr
    assert want in lines[0], lines[0]
    assert "Traceback" not in out.stderr


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A directory, a regular file, a non-UTF-8 file and a text file that is not PEM."""
    (tmp_path / "dir").mkdir()
    plain = tmp_path / "plain.txt"
    plain.write_text("not a certificate\n")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"listen: 127.0.0.1:0  # caf\xe9\n")
    return {"dir": tmp_path / "dir", "plain": plain, "latin": latin}


def test_config_file_that_is_not_utf8(files: dict[str, Path]) -> None:
    """A config file in another encoding is named, with the byte offset, not a traceback."""
    one_line_error(*AMB, "--config", str(files["latin"]), want="is not UTF-8 text (byte 26)")


@pytest.mark.parametrize(
    ("args", "want"),
    [
        ((*AMB[:3], "--upstream", f"{LOOP}:²"), f"--upstream: '{LOOP}:²' is not a valid port"),
        ((*AMB, "--connect-timeout", "-1s"), "--connect-timeout: expected a value (a value"),
        ((*AMB, "--connect-timeout=-1s"), "--connect-timeout: '-1s' is not a duration"),
        ((*AMB, "--health-dir", ".", "--exit-with", "Main"), "--exit-with: 'Main' is not a"),
        ((*AMB, "--health-dir", ".", "--exit-with", "main_app"), "is not a container name"),
        (("wait", "--for", f"http://{LOOP}:99999/"), "has no valid port (1-65535)"),
        (("wait", "--for", f"http://{LOOP}:abc/"), "has no valid port (1-65535)"),
        (("wait", "--health-dir", "/nonexistent-dir", "--for", "ready:main"), "does not exist"),
        (("demo", "--connections", "0"), "--connections: '0' is out of range"),
        (("demo", "--connections", "-1"), "--connections: '-1' is out of range (1-100000)"),
        (("demo", "--megabytes=-5"), "--megabytes: '-5' is out of range"),
    ],
    ids=[
        "superscript-port",
        "negative-duration-as-flag",
        "negative-duration",
        "exit-with-uppercase",
        "exit-with-underscore",
        "url-port-too-big",
        "url-port-not-a-number",
        "wait-missing-health-dir",
        "demo-zero-connections",
        "demo-negative-connections",
        "demo-negative-megabytes",
    ],
)
def test_bad_flags(args: tuple[str, ...], want: str) -> None:
    """Each bad flag value exits 2 with one line naming it."""
    one_line_error(*args, want=want)


def test_bad_flags_needing_files(files: dict[str, Path], tmp_path: Path) -> None:
    """Paths of the wrong kind and contradictions are refused at configuration time."""
    d, plain = str(files["dir"]), str(files["plain"])
    one_line_error(*AMB, "--health-dir", plain, want=f"--health-dir: {plain!r} is not a directory")
    one_line_error("wait", "--health-dir", plain, "--for", "ready:main", want="is not a directory")
    one_line_error(
        "health", "--health-dir", d, "--name", "app", "--probe", f"http://{LOOP}:99999/",
        want="--probe: 'http://127.0.0.1:99999/' has no valid port",
    )  # fmt: skip
    one_line_error(
        "reload", "--watch", d, "--http-post", f"http://{LOOP}:abc/", want="--http-post:"
    )
    one_line_error(
        "reload", "--watch", d, "--exec", "true", "--signal", "usr1",
        want="--signal: only sent with --pid-file FILE; this reload notifies by --exec",
    )  # fmt: skip
    one_line_error(
        "run", "--health-dir", d, "--name", "app", "--ready-probe", f"http://{LOOP}:0/", "--",
        "true", want="--ready-probe:",
    )  # fmt: skip


def test_tls_files_are_named(files: dict[str, Path]) -> None:
    """A TLS file that is missing or not PEM is named in the error, with a short reason."""
    tls = (*AMB, "--upstream-tls", "--admin", "off")
    out = run(*tls, "--tls-ca", "/nonexistent/ca.pem")
    assert out.returncode == 2
    assert "--tls-ca: '/nonexistent/ca.pem': cannot load: No such file or directory" in out.stderr
    out = run(*tls, "--tls-ca", str(files["plain"]))
    assert out.returncode == 2
    assert f"--tls-ca: {str(files['plain'])!r}: cannot load: not valid PEM" in out.stderr
    assert "_ssl.c" not in out.stderr and "Traceback" not in out.stderr


def build(command: str, text: str) -> object:
    """The config ``podpatterns COMMAND --config FILE`` builds from the YAML ``text``."""
    return COMMANDS[command].build({}, {}, yaml.safe_load(text), "amb.yaml")


def test_yaml_off_means_off_where_off_is_a_value() -> None:
    """An unquoted ``off`` (YAML's false) turns off what ``off`` documents."""
    base = f"listen: {LOOP}:0\nupstream: [{LOOP}:9]\n"
    config = build("ambassador", base + "admin: off\nproxy_protocol: off\nidle_timeout: off\n")
    assert config.runtime.admin is None  # type: ignore[attr-defined]
    route = config.routes[0]  # type: ignore[attr-defined]
    assert route.proxy_protocol == "off" and route.idle_timeout is None


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("balance: no\n", "amb.yaml: balance: YAML read an unquoted off/no/false as a boolean"),
        ("drain_timeout: null\n", "amb.yaml: drain_timeout: has no value (YAML null)"),
        ("exit_with: yes\nhealth_dir: .\n", "exit_with: YAML read an unquoted on/yes/true"),
    ],
)
def test_yaml_booleans_and_nulls_are_named(text: str, want: str) -> None:
    """A YAML boolean or null where a value is expected says what YAML did, not 'false'."""
    with pytest.raises(ConfigError) as info:
        build("ambassador", f"listen: {LOOP}:0\nupstream: [{LOOP}:9]\n" + text)
    assert want in str(info.value)
    assert "'false'" not in str(info.value) and "'None'" not in str(info.value)
