"""Make a self-contained podpatterns tree from a virtual environment.

    python3 images/slim.py VENV OUT [--prefix /podpatterns]

Run by the builder stage of images/Containerfile with the virtual environment's own
interpreter, after podpatterns is installed in VENV. OUT receives a tree that must end up
at PREFIX (the images put it there; the copy-in init container copies it into a volume
the app container mounts there):

    bin/python3        the interpreter, with its ELF interpreter (the dynamic loader) set to
                       PREFIX/lib/ld-linux-*.so.* and its RPATH to PREFIX/lib, so it starts
                       where no loader or shared library is installed: a scratch image
    bin/podpatterns    the entry point, a ``#!PREFIX/bin/python3`` script: the kernel
                       runs a ``#!`` line itself, no shell is needed (see ENTRY)
    bin/podpatterns-copy-into DEST
                       copies the tree into DEST (the copy-in init container)
    etc/ssl/ca-certificates.crt
                       the CA certificates (--ca-bundle), for the copy-in in an app
                       image that has none
    lib/               the loader and the shared libraries that python3 and the extension
                       modules need (their ldd closure), stripped
    lib/pythonX.Y/     the part of the standard library that podpatterns and its
                       dependencies import, as bytecode without sources
    lib/pythonX.Y/...  the packages of VENV (site-packages, or what this interpreter's
                       site module reads for PREFIX), as bytecode without sources

Which standard modules: every module of every installed package is imported (its
``__main__`` and tests excepted), and so is every absolute ``import`` found in their
sources, including those inside functions (lazy imports such as ``ssl`` or ``grpc``). The
standard library files those imports loaded are kept: whole top-level packages (their
lazy submodules come along), single modules, and the extension modules that were loaded.
``encodings`` is kept and imported whole (codecs are looked up by name at run time:
``idna`` for every host name, which needs ``stringprep``). The tests of tests/e2e run
every command in the images built from this tree.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import py_compile
import shutil
import ssl
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

# Standard packages never kept, even if some optional code path imports them.
EXCLUDED = {
    "test", "tkinter", "idlelib", "turtle", "turtledemo", "lib2to3", "ensurepip",
    "pydoc_data", "distutils", "venv", "pip", "setuptools", "_distutils_hack", "__pycache__",
    "site-packages", "dist-packages", "sitecustomize", "this", "antigravity",
}  # fmt: skip
ALWAYS = {"encodings"}
# Extension modules that --stdlib=all still leaves out: the interpreter's own tests, and
# terminal, audio and database modules that pull in large libraries.
UNUSED = ("_test", "_xx", "xx", "_ctypes_test", "_curses", "readline", "_dbm", "_gdbm",
          "audioop", "ossaudiodev", "nis", "_tkinter")  # fmt: skip
SOURCES = {".py", ".pyi", ".pyx", ".pxd", ".pxi", ".c", ".h", ".cpp"}

# Run by the venv's interpreter: import everything, print what the imports loaded.
TRACE = r"""
import importlib, json, pkgutil, sys
names, site = json.load(sys.stdin)
def load(name):
    try:
        importlib.import_module(name)
    except BaseException:  # optional dependencies that are not installed, and worse
        pass
for name in names:
    load(name)
for top in list(names):
    module = sys.modules.get(top)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []) or [], top + "."):
        parts = info.name.split(".")
        if "__main__" in parts or any(p in ("test", "tests", "testing") for p in parts):
            continue
        load(info.name)
json.dump({n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}, sys.stdout)
"""


# bin/podpatterns. The same as the console script (podpatterns.__main__, which holds
# SIGTERM and SIGINT while importing: held here from the first line), plus CA certificates
# for a process in which OpenSSL would find none: the copy-in, in an app image without
# OpenSSL's default files. Then, unless SSL_CERT_FILE or SSL_CERT_DIR is set, the app
# image's /etc/ssl/certs/ca-certificates.crt is used if it has one, else the tree's own
# bundle, for every default context (``load_default_certs``) of this process only: the
# environment the app's command inherits is left as it is. In the images, and in app
# images with OpenSSL's default files, nothing changes.
ENTRY = """\
import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM, signal.SIGINT}})

import os

if not (os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")) and not any(
    os.path.exists(p) for p in {openssl!r}
):
    _bundle = next((p for p in {bundles!r} if os.path.isfile(p)), None)
    if _bundle:
        import ssl

        def _set_default_verify_paths(self, cafile=_bundle):
            self.load_verify_locations(cafile=cafile)

        ssl.SSLContext.set_default_verify_paths = _set_default_verify_paths

from podpatterns.__main__ import main

main()
"""
# Where most app images keep their CA certificates (Debian, Ubuntu, Alpine, distroless).
APP_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def imported_names(site: Path) -> tuple[list[str], list[str]]:
    """The top-level modules installed in ``site``, and every absolute import in them."""
    tops = []
    for entry in sorted(site.iterdir()):
        name = entry.name
        if name.endswith((".dist-info", ".libs", ".pth")) or name == "__pycache__":
            continue
        if entry.is_dir() and name.isidentifier():
            tops.append(name)
        elif entry.suffix in (".py", ".so"):
            tops.append(name.split(".", 1)[0])
    found: set[str] = set()
    for path in site.rglob("*.py"):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return [t for t in tops if t not in EXCLUDED], sorted(found)


def trace(python: Path, site: Path) -> dict[str, str | None]:
    """Import every installed module and every module they name: ``{name: file}``."""
    tops, names = imported_names(site)
    # the packages kept whole are imported whole too, for what their modules import
    # (encodings.idna needs stringprep, and only asyncio's getaddrinfo asks for it)
    names = sorted(ALWAYS) + [n for n in names if n.split(".")[0] not in EXCLUDED]
    done = subprocess.run(
        [str(python), "-c", TRACE],
        input=json.dumps([tops + names, str(site)]),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        # no output from the modules imported, and no bytecode written
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    loaded: dict[str, str | None] = json.loads(done.stdout)
    missing = [t for t in tops if t not in loaded]
    if missing:
        sys.exit(f"slim: could not import {missing} from {site}")
    return loaded


def compile_tree(src: Path, dst: Path, shown: Path, keep: set[str] | None = None) -> None:
    """Copy ``src`` to ``dst``: ``.py`` files as sourceless bytecode, other sources left
    out, the rest as they are. ``shown`` is the path tracebacks name for ``src``."""
    for path in sorted(src.rglob("*")) if src.is_dir() else [src]:
        rel = path.relative_to(src) if src.is_dir() else Path(path.name)
        if "__pycache__" in rel.parts or (keep is not None and str(rel) not in keep):
            continue
        if path.is_dir() and not path.is_symlink():
            continue
        target = (dst / rel) if src.is_dir() else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            py_compile.compile(
                str(path),
                cfile=str(target.with_suffix(".pyc")),
                dfile=str(shown / rel if src.is_dir() else shown),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        elif path.suffix not in SOURCES:
            shutil.copy2(path, target, follow_symlinks=False)


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def needed(elf: Path) -> dict[str, Path]:
    """The shared libraries ``elf`` loads, by the name it asks for (``ldd``)."""
    done = subprocess.run(
        ["ldd", str(elf)], capture_output=True, text=True, check=False, timeout=60
    )
    found = {}
    for line in done.stdout.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if arrow and rest.startswith("/"):
            found[name] = Path(rest.split(" (", 1)[0])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--prefix", type=Path, default=Path("/podpatterns"))
    parser.add_argument(
        "--stdlib",
        choices=("imported", "all"),
        default="imported",
        help="keep the standard modules imported (default), or all of them (for transforms"
        " that import others); tests, tkinter, idlelib and the like are never kept",
    )
    parser.add_argument("--copy-into", type=Path, default=Path(__file__).with_name("copy_into.py"))
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        default=Path(APP_BUNDLE),
        help="the CA certificates the tree carries (default: this system's)",
    )
    args = parser.parse_args()
    venv, out, prefix = args.venv.resolve(), args.out, args.prefix
    venv_python = venv / "bin" / "python3"
    base_python = Path(os.path.realpath(sys._base_executable))  # type: ignore[attr-defined]
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    dynload = stdlib / "lib-dynload"  # platstdlib names the venv's own lib/
    site = Path(sysconfig.get_path("purelib"))
    # where the base interpreter's site module looks for packages under PREFIX
    site_dirs = subprocess.run(
        [str(base_python), "-I", "-S", "-c",
         f"import site; print(site.getsitepackages([{str(prefix)!r}])[-1])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    out_site = out / Path(site_dirs).relative_to(prefix)
    out_stdlib = out / "lib" / version
    if out.exists():
        shutil.rmtree(out)

    loaded = trace(venv_python, site)
    keep_tops: set[str] = set(ALWAYS)
    extensions: set[Path] = set()
    for file in loaded.values():
        if not file:
            continue
        path = Path(file).resolve()
        if dynload in path.parents:
            extensions.add(path)
        elif stdlib in path.parents:
            keep_tops.add(path.relative_to(stdlib).parts[0])
    if args.stdlib == "all":
        names = (p.name.removesuffix(".py") for p in stdlib.iterdir())
        keep_tops.update(n for n in names if n.isidentifier())
        extensions.update(p for p in dynload.glob("*.so") if not p.name.startswith(UNUSED))
    keep_tops.discard("lib-dynload")
    for top in sorted(keep_tops - EXCLUDED):
        src = stdlib / top
        if not src.exists() and (stdlib / f"{top}.py").exists():
            src = stdlib / f"{top}.py"
        if not src.exists():
            continue
        shown = prefix / "lib" / version / src.name
        if src.is_dir():
            compile_tree(src, out_stdlib / src.name, shown)
            for tests in (out_stdlib / src.name).rglob("test*"):
                if tests.is_dir() and tests.name in ("test", "tests", "idle_test"):
                    shutil.rmtree(tests)
        else:
            compile_tree(src, out_stdlib / src.name, shown)
    (out_stdlib / "lib-dynload").mkdir(parents=True, exist_ok=True)
    for ext in sorted(extensions):
        shutil.copy2(ext, out_stdlib / "lib-dynload" / ext.name)
    compile_tree(site, out_site, prefix / out_site.relative_to(out))

    # The interpreter, its loader, and the closure of the shared libraries.
    (out / "bin").mkdir(parents=True, exist_ok=True)
    (out / "lib").mkdir(parents=True, exist_ok=True)
    python = out / "bin" / "python3"
    shutil.copy2(base_python, python)
    loader = Path(
        subprocess.run(
            ["patchelf", "--print-interpreter", str(base_python)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    shutil.copy2(os.path.realpath(loader), out / "lib" / loader.name)
    elves = [base_python] + [p for p in out.rglob("*.so*") if p.is_file() and is_elf(p)]
    libs: dict[str, Path] = {"libgcc_s.so.1": Path()}  # glibc dlopens it to unwind threads
    pending = list(elves)
    while pending:
        for name, path in needed(pending.pop()).items():
            if venv in path.parents or site in path.parents:
                continue  # a library a wheel bundles, found through its own RUNPATH
            if name in libs and libs[name].name:
                continue
            libs[name] = path
            pending.append(path)
    if not libs["libgcc_s.so.1"].name:
        found = [Path(p) for p in ("/lib", "/usr/lib") for p in Path(p).rglob("libgcc_s.so.1")]
        libs["libgcc_s.so.1"] = found[0]
    for name, path in libs.items():
        shutil.copy2(os.path.realpath(path), out / "lib" / name)
    for elf in [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p)]:
        if elf.name != loader.name:
            subprocess.run(["strip", "--strip-unneeded", str(elf)], check=True, timeout=120)
        if elf.parent != out / "lib":
            # The extension modules' own RUNPATH (a wheel's bundled libraries) hides the
            # interpreter's RPATH from them: they get the tree's lib/ too.
            subprocess.run(
                ["patchelf", "--add-rpath", str(prefix / "lib"), str(elf)],
                check=True, timeout=120,
            )  # fmt: skip
    subprocess.run(
        ["patchelf", "--set-interpreter", str(prefix / "lib" / loader.name),
         "--force-rpath", "--set-rpath", str(prefix / "lib"), str(python)],
        check=True, timeout=120,
    )  # fmt: skip

    # The CA certificates, for the copy-in in an app image without any (see ENTRY).
    bundle = out / "etc" / "ssl" / "ca-certificates.crt"
    bundle.parent.mkdir(parents=True)
    shutil.copy2(args.ca_bundle, bundle)
    paths = ssl.get_default_verify_paths()

    # The entry points: #! scripts, which the kernel runs without a shell.
    shebang = f"#!{prefix}/bin/python3\n"
    scripts = {
        "podpatterns": ENTRY.format(
            openssl=(paths.openssl_cafile, paths.openssl_capath),
            bundles=(APP_BUNDLE, str(prefix / bundle.relative_to(out))),
        ),
        "podpatterns-copy-into": args.copy_into.read_text(),
    }
    for name, body in scripts.items():
        script = out / "bin" / name
        script.write_text(shebang + body)
        script.chmod(0o755)
    (out / "bin" / "python").symlink_to("python3")
    for path in out.rglob("*"):
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"slim: {out} ({size / 1e6:.1f} MB), standard packages: {sorted(keep_tops)}")


if __name__ == "__main__":
    main()
