"""The docs site builds with `mkdocs build --strict`, and shows what is generated.

Strict mode with the ``validation`` settings in mkdocs.yml turns every warning into a
failure: a broken link or anchor, a page missing from the nav, a snippet include that
does not resolve, a docstring griffe cannot parse. The build runs once per session
(about 3 s) into a temporary directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.proc import outputs, run_python

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built site; the test fails with mkdocs' output if the build warns."""
    out = tmp_path_factory.mktemp("site")
    proc = run_python(
        *("-m", "mkdocs", "build", "--strict", "--site-dir", str(out)),
        cwd=ROOT,
        env={"NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner
        timeout=120,
    )
    output = outputs(proc)
    assert proc.returncode == 0, f"mkdocs build --strict exited {proc.returncode}\n{output}"
    assert "WARNING" not in proc.stderr, output
    return out


def page(site: Path, name: str) -> str:
    """The HTML of one page of the built site (``name`` as in the URL)."""
    return (site / name / "index.html").read_text()


def test_site_builds_strict(site: Path) -> None:
    """Every page of the nav is built."""
    for name in ("patterns", "ambassador", "adapter", "health", "reload", "runtime", "api"):
        assert (site / name / "index.html").is_file(), name


def test_option_tables_are_on_component_pages(site: Path) -> None:
    """Component pages show their generated option tables (flag and environment variable)."""
    assert "--drain-timeout" in page(site, "runtime")
    assert "PODPATTERNS_DRAIN_TIMEOUT" in page(site, "runtime")
    assert "--connect-timeout" in page(site, "ambassador")
    assert "PODPATTERNS_CHECKPOINT_DIR" in page(site, "adapter")
    assert "--exit-with-quit" not in page(site, "reload")  # runtime options stay on runtime


def test_api_reference_is_generated_from_docstrings(site: Path) -> None:
    """The API pages carry classes rendered by mkdocstrings, with their docstrings."""
    runtime = page(site, "api/runtime")
    assert 'id="podpatterns.runtime.RuntimeConfig"' in runtime
    assert "Settings every component shares" in runtime  # RuntimeConfig's docstring
    assert 'id="podpatterns.health.Writer"' in page(site, "api/health")
    assert ":class:`" not in runtime  # Sphinx roles became links


def test_changelog_is_included(site: Path) -> None:
    """The changelog page includes CHANGELOG.md, with its links made relative to docs/."""
    html = page(site, "changelog")
    assert "Keep a Changelog" in html
    assert "Unreleased" in html
    assert 'href="docs/' not in html


def test_benchmark_plots_are_published(site: Path) -> None:
    """The benchmark pages reference their plots and the images are copied."""
    assert 'src="../img/ambassador-bench.png"' in page(site, "benchmarks")
    assert 'src="../img/adapter-bench.png"' in page(site, "adapter-benchmarks")
    assert (site / "img" / "ambassador-bench.png").stat().st_size > 0
    assert (site / "img" / "adapter-bench.png").stat().st_size > 0
