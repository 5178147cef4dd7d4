"""The docs stay true: the reference is generated from the code and the examples run.

Every fenced ```` ```python ```` block in ``README.md`` and ``docs/*.md`` is a complete
program and is run here in a fresh interpreter, with warnings as errors and asyncio's
debug mode. A block that must not run (none today) is preceded by the line
``<!-- docs-test: skip -->``. Examples bind to port 0 on loopback and finish in well
under a second. Every block (skipped ones too: typing is not running) is also checked
with ``mypy --strict``, as a user's own code would be: one mypy run over all pages, one
test per page, each error reported at its line in the page.

Every ```` ```yaml ```` block is checked too: a Kubernetes manifest's podpatterns
command lines, probes, records, volumes and ports (``tests/manifests.py``), or else a
config file, must be accepted by the same code the command line uses. The manifests
docs/examples.md includes from ``docs/examples/`` are checked that way as well.

Pages may include other files with a pymdownx.snippets line (``--8<-- "PATH"``, PATH
relative to the repository root, as in mkdocs.yml); the included text is checked as part
of the page, and a failing block is reported at its line in the included file.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from mypy import api as mypy_api

from podpatterns import reference
from podpatterns.adapter import config as adapter_config
from podpatterns.ambassador import config as amb_config
from podpatterns.cli import EXIT_TABLE
from podpatterns.errors import EXIT_MEANINGS, ExitCode
from tests.manifests import document_problems, load_documents
from tests.proc import outputs, run_python

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


# pymdownx.snippets' one-line include; its other forms (line ranges, sections, the
# block form) are not used here, and a page that starts to use them fails loudly.
_SNIPPET = re.compile(r"^(?P<indent>[ \t]*)--8<--[ \t]+\"(?P<file>[^\"]+)\"[ \t]*$")
_SNIPPET_ANY = re.compile(r"^[ \t]*;?--8<--")

# One line of a page after includes are expanded: (text, file it comes from, line there).
Line = tuple[str, Path, int]


def expanded_lines(path: Path, seen: tuple[Path, ...] = ()) -> list[Line]:
    """The lines of ``path`` with every snippet include replaced by the included lines.

    Included lines keep the indentation of the include line, as pymdownx.snippets does.
    """
    if path in seen:
        raise ValueError(f"snippet include cycle: {' -> '.join(map(str, (*seen, path)))}")
    out: list[Line] = []
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        m = _SNIPPET.match(line.rstrip("\n"))
        if m is None:
            assert not _SNIPPET_ANY.match(line), f"{path}:{number}: unsupported snippet form"
            out.append((line, path, number))
            continue
        included = ROOT / m["file"]
        assert included.is_file(), f"{path}:{number}: included file {m['file']} not found"
        for text, where, at in expanded_lines(included, (*seen, path)):
            indented = m["indent"] + text if text.strip() else text
            out.append((indented if indented.endswith("\n") else indented + "\n", where, at))
    return out


def fenced_blocks(path: Path, lang: str) -> list[Block]:
    """The ```` ```lang ```` blocks of ``path`` (includes expanded), each with the file and
    line number of its fence."""
    lines = expanded_lines(path)
    text = "".join(line for line, _, _ in lines)
    blocks = []
    for m in re.finditer(_FENCE.format(lang=lang), text, re.MULTILINE | re.DOTALL):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        _, where, line = lines[text.count("\n", 0, m.start())]
        code = textwrap.dedent(m.group("body"))
        blocks.append(Block(where, line, code, before.strip() == SKIP_MARK))
    return blocks


def doc_files() -> list[Path]:
    """README.md and every page in docs/ and its subfolders."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _unique(blocks: list[Block]) -> list[Block]:
    """Blocks once each, also when a file is included by several pages."""
    return list({b.id: b for b in blocks}.values())


BLOCKS = _unique([b for path in doc_files() for b in fenced_blocks(path, "python")])
YAML_BLOCKS = _unique([b for path in doc_files() for b in fenced_blocks(path, "yaml")])


def test_reference_is_current() -> None:
    """docs/reference.md is exactly what the declarations in the code render to."""
    committed = (DOCS / "reference.md").read_text()
    assert committed == reference.render(), (
        "docs/reference.md is out of date: run `python -m podpatterns.reference --write`"
    )


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_option_sections_are_current(page: Path) -> None:
    """Every `generated:options` section of a page is what its declarations render to."""
    text = page.read_text()
    assert reference.refresh_sections(text) == text, (
        f"{page.relative_to(ROOT)}: option tables out of date: "
        "run `python -m podpatterns.reference --write`"
    )


def test_every_option_section_is_on_a_page() -> None:
    """Each component's option table appears on exactly one page of the docs."""
    shown = [name for page in doc_files() for name in reference.section_names(page.read_text())]
    assert sorted(shown) == sorted(reference.option_sections())


def test_stale_option_section_is_refreshed() -> None:
    """A hand-edited table between the markers is replaced by the rendering."""
    stale = "<!-- generated:options wait -->\n| old |\n<!-- end generated:options -->\n"
    fresh = reference.refresh_sections(stale)
    assert "| old |" not in fresh
    assert "`--timeout DURATION`" in fresh
    assert reference.refresh_sections(fresh) == fresh


def test_unknown_option_section_is_an_error() -> None:
    """A marker naming no declared section fails instead of being left alone."""
    with pytest.raises(ValueError, match="'nope'"):
        reference.refresh_sections(
            "<!-- generated:options nope -->\n<!-- end generated:options -->\n"
        )


def test_write_refreshes_pages_next_to_the_reference(tmp_path: Path) -> None:
    """`--write PATH` also rewrites stale option sections of the Markdown files beside PATH."""
    page = tmp_path / "page.md"
    page.write_text("# P\n\n<!-- generated:options reload -->\n<!-- end generated:options -->\n")
    assert reference.main(["--write", str(tmp_path / "reference.md")]) == 0
    assert "`--watch DIR`" in page.read_text()
    assert reference.refresh_sections(page.read_text()) == page.read_text()


def test_snippet_includes_are_expanded(tmp_path: Path) -> None:
    """A block in a file included with `--8<--` is found, with its own file and line."""
    included = tmp_path / "included.md"
    included.write_text("text\n\n```python\nprint(1)\n```\n")
    page = tmp_path / "page.md"
    page.write_text(f'# Page\n\n--8<-- "{included}"\n')
    (block,) = fenced_blocks(page, "python")
    assert (block.path, block.line, block.code) == (included, 3, "print(1)\n")


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
    proc = run_python("-X", "dev", "-W", "error", str(script), cwd=tmp_path, timeout=60)
    output = outputs(proc)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}\n{output}"
    for sign in ("Traceback", "Exception ignored", "was never awaited", "Unclosed"):
        assert sign not in proc.stderr, f"{block.id}: {sign!r} on stderr\n{output}"


def type_errors(blocks: Sequence[Block], workdir: Path) -> dict[Path, list[str]]:
    """Run ``mypy --strict`` once over ``blocks``; its errors by page, as ``file:line: ...``.

    Each block is its own module (a complete program); no project configuration is read,
    so the examples are checked the way a user's code would be. A mypy failure that is
    not about a block (a crash, a bad option) is raised.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mypy.ini"
    config.write_text("[mypy]\n")
    modules: dict[str, Block] = {}
    for n, block in enumerate(blocks):
        module = workdir / f"block_{n}_{block.path.stem.replace('-', '_')}_{block.line}.py"
        module.write_text(block.code)
        modules[module.name] = block
    stdout, stderr, status = mypy_api.run(
        [
            "--strict",
            "--config-file",
            str(config),
            "--cache-dir",
            str(workdir / ".mypy_cache"),
            "--no-error-summary",
            "--show-error-codes",
            *(str(workdir / name) for name in modules),
        ]
    )
    errors: dict[Path, list[str]] = {}
    for line in stdout.splitlines():
        m = re.match(r"^(?:.*/)?(?P<module>block_[^/:]+\.py):(?P<line>\d+): (?P<text>.*)$", line)
        assert m is not None, f"mypy said something not about a block:\n{stdout}{stderr}"
        block = modules[m["module"]]
        shown = block.path.relative_to(ROOT) if block.path.is_relative_to(ROOT) else block.path
        where = f"{shown}:{block.line + int(m['line'])}"
        errors.setdefault(block.path, []).append(f"{where}: {m['text']}")
    assert status == (1 if errors else 0), f"mypy exited {status}\n{stdout}{stderr}"
    return errors


# Pages (and included files) with Python examples, each checked as the user's code.
TYPED_PAGES = sorted({b.path for b in BLOCKS})


@pytest.fixture(scope="module")
def docs_type_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, list[str]]:
    """The type errors of every Python example, by page (one mypy run for all)."""
    return type_errors(BLOCKS, tmp_path_factory.mktemp("mypy-docs"))


def test_typed_pages_include_the_library_guides() -> None:
    """The library and health guides are among the type-checked pages."""
    assert {DOCS / "library.md", DOCS / "health.md"} <= set(TYPED_PAGES)


@pytest.mark.parametrize("page", TYPED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_type_check(page: Path, docs_type_errors: dict[Path, list[str]]) -> None:
    """The page's Python examples pass `mypy --strict` as a user's code would."""
    assert not docs_type_errors.get(page), "\n".join(docs_type_errors[page])


def test_a_type_error_in_an_example_is_reported(tmp_path: Path) -> None:
    """A block with a type error fails the check, at its line in the page."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```python\nfrom podpatterns.options import HostPort\n\n"
        "port: str = HostPort('127.0.0.1', 0).port\n```\n\n"
        "```python\nprint('fine')\n```\n"
    )
    errors = type_errors(fenced_blocks(page, "python"), tmp_path / "mypy")
    (problem,) = errors[page]
    assert problem.startswith(f"{page}:6: error: Incompatible types in assignment")
    assert "[assignment]" in problem


def test_included_manifests_are_checked() -> None:
    """The manifests docs/examples.md includes reach the yaml checks as their text."""
    included = [b for b in YAML_BLOCKS if b.path.name == "examples.md"]
    texts = {p.read_text() for p in (DOCS / "examples").glob("*.yaml")}
    assert texts
    assert {b.code for b in included} == texts


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: b.id)
def test_yaml_example_is_accepted(block: Block) -> None:
    """A manifest's podpatterns command lines and probes, or a config file, are valid as shown."""
    docs = load_documents(block.code)
    assert docs and all(isinstance(d, dict) for d in docs), block.id
    if "apiVersion" not in docs[0]:
        builders = {"ambassador": amb_config.build, "adapter": adapter_config.build}
        builders["adapter" if block.path.name.startswith("adapter") else "ambassador"](
            {}, {}, docs[0], block.id
        )
        return
    found, problems = document_problems(docs)
    assert not problems, f"{block.id}:\n" + "\n".join(problems)
    assert any(c.invocations for c in found), f"{block.id}: no podpatterns container"


def test_image_build_commands_match_the_containerfile() -> None:
    """The `podman build` lines shown to users name real targets and the package version."""
    from tests.e2e.engine import TARGETS, VERSION

    containerfile = (ROOT / "images" / "Containerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", containerfile, re.MULTILINE))
    assert set(TARGETS) <= stages
    default = re.search(r"^ARG VERSION=(\S+)$", containerfile, re.MULTILINE)
    assert default is not None and default.group(1) == VERSION
    pattern = re.compile(
        r"podman build -f images/Containerfile --target (\S+) +-t podpatterns-(\S+):(\S+) \."
    )
    for source in (containerfile, (DOCS / "images.md").read_text()):
        shown = pattern.findall(source)
        assert {target for target, _, _ in shown} == set(TARGETS)
        for target, name, version in shown:
            assert (name, version) == (target, VERSION)
