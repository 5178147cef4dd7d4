"""The docs stay true: the reference is generated from the code and the examples run.

Every fenced ```` ```python ```` block in ``README.md`` and ``docs/*.md`` is a complete
program and is run here in a fresh interpreter, with warnings as errors and asyncio's
debug mode. A block that must not run (none today) is preceded by the line
``<!-- docs-test: skip -->``. Examples bind to port 0 on loopback and finish in well
under a second.

Every ```` ```yaml ```` block is checked too: a Kubernetes manifest's podpatterns
command lines, probes, records, volumes and ports (``tests/manifests.py``), or else a
config file, must be accepted by the same code the command line uses.

A line ``--8<-- "PATH"`` in a block (pymdownx.snippets, paths relative to the
repository) is replaced by the file it names before the block is checked, so the
manifests the docs include from ``docs/examples/`` are checked here like any other.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from podpatterns import reference
from podpatterns.adapter import config as adapter_config
from podpatterns.ambassador import config as amb_config
from podpatterns.cli import EXIT_TABLE
from podpatterns.errors import EXIT_MEANINGS, ExitCode
from tests.manifests import document_problems, load_documents

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
_FENCE = r"^(?P<indent>[ \t]*)```{lang}[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    code: str
    skip: bool

    @property
    def id(self) -> str:
        """``file:line`` of the opening fence, relative to the repository."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_SNIPPET = re.compile(r"""^--8<-- (?P<q>["'])(?P<path>[^"']+)(?P=q)$""")


def include_snippets(code: str, where: str) -> str:
    """Replace each ``--8<-- "PATH"`` line with the file (relative to the repository)."""
    lines = []
    for line in code.splitlines(keepends=True):
        if not line.startswith("--8<--"):
            lines.append(line)
            continue
        m = _SNIPPET.match(line.strip())
        assert m, f'{where}: only `--8<-- "PATH"` lines are supported here: {line!r}'
        included = ROOT / m.group("path")
        assert included.is_file(), f"{where}: {m.group('path')} does not exist"
        lines.append(included.read_text())
    return "".join(lines)


def fenced_blocks(path: Path, lang: str) -> list[Block]:
    """The ```` ```lang ```` blocks of ``path`` with the line numbers of their fences."""
    text = path.read_text()
    blocks = []
    for m in re.finditer(_FENCE.format(lang=lang), text, re.MULTILINE | re.DOTALL):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, m.start()) + 1
        where = f"{path.relative_to(ROOT)}:{line}"
        code = include_snippets(textwrap.dedent(m.group("body")), where)
        blocks.append(Block(path, line, code, before.strip() == SKIP_MARK))
    return blocks


def doc_files() -> list[Path]:
    """README.md and every page in docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


BLOCKS = [b for path in doc_files() for b in fenced_blocks(path, "python")]
YAML_BLOCKS = [b for path in doc_files() for b in fenced_blocks(path, "yaml")]


def test_reference_is_current() -> None:
    """docs/reference.md is exactly what the declarations in the code render to."""
    committed = (DOCS / "reference.md").read_text()
    assert committed == reference.render(), (
        "docs/reference.md is out of date: run `python -m podpatterns.reference --write`"
    )


def test_reference_main_prints_the_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m podpatterns.reference` prints the same Markdown it would write."""
    assert reference.main([]) == 0
    assert capsys.readouterr().out == reference.render()


def test_reference_write(tmp_path: Path) -> None:
    """`--write PATH` writes the rendering to PATH."""
    target = tmp_path / "reference.md"
    assert reference.main(["--write", str(target)]) == 0
    assert target.read_text() == reference.render()


@pytest.mark.parametrize("syntax", reference.VALUE_SYNTAX, ids=lambda v: v.kind)
def test_value_syntax_examples_parse(syntax: reference.ValueSyntax) -> None:
    """Every example value shown in the reference is accepted by its parser."""
    for example in syntax.examples:
        syntax.parse(example)


def test_every_exit_code_is_documented() -> None:
    """Each exit code has a meaning in the reference and a line in `--help`."""
    assert set(EXIT_MEANINGS) == set(ExitCode)
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}\s+\S", EXIT_TABLE, re.MULTILINE), code


def test_library_docs_have_runnable_examples() -> None:
    """docs/library.md carries runnable examples (this suite would not notice them vanish)."""
    assert [b for b in BLOCKS if b.path.name == "library.md" and not b.skip]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_python_example_runs(block: Block, tmp_path: Path) -> None:
    """The example runs to completion without an error, a warning or an unclosed resource."""
    if block.skip:
        pytest.skip(f"{SKIP_MARK} in {block.id}")
    script = tmp_path / f"{block.path.stem}_{block.line}.py"
    script.write_text(block.code)
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}\n{output}"
    for sign in ("Traceback", "Exception ignored", "was never awaited", "Unclosed"):
        assert sign not in proc.stderr, f"{block.id}: {sign!r} on stderr\n{output}"


def test_included_manifests_are_checked() -> None:
    """The manifests docs/examples.md includes reach the yaml checks as their text."""
    included = [b for b in YAML_BLOCKS if b.path.name == "examples.md"]
    assert included
    texts = {p.read_text() for p in (DOCS / "examples").glob("*.yaml")}
    assert {b.code for b in included} == texts


def test_snippet_line_must_name_a_file() -> None:
    """A snippet line naming a missing file fails instead of being checked as text."""
    with pytest.raises(AssertionError, match="does not exist"):
        include_snippets('--8<-- "docs/examples/missing.yaml"\n', "here")


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: b.id)
def test_yaml_example_is_accepted(block: Block) -> None:
    """A manifest's podpatterns command lines and probes, or a config file, are valid as shown."""
    docs = load_documents(block.code)
    assert docs and all(isinstance(d, dict) for d in docs), block.id
    if "apiVersion" not in docs[0]:
        builders = {"ambassador": amb_config.build, "adapter": adapter_config.build}
        builders["adapter" if block.path.name == "adapter.md" else "ambassador"](
            {}, {}, docs[0], block.id
        )
        return
    found, problems = document_problems(docs)
    assert not problems, f"{block.id}:\n" + "\n".join(problems)
    assert any(c.invocations for c in found), f"{block.id}: no podpatterns container"
