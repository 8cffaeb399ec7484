"""Packaging: the wheel carries the compiled extensions; without a compiler the build says how
to get the pure-Python build instead; with ERQ_NO_EXTENSIONS=1 it builds a pure wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from erq._compat import COMPILED_TWINS

from conftest import FAST_MODULES

ROOT = Path(__file__).resolve().parent.parent


# Directories that a build or a test run leaves in a source tree (ci/test.sh's .venv-test, an
# in-place build's build/ and erq.egg-info, ...): no source lives there.
LEFT_BY_BUILDS = {"build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}


def source_files(root: Path) -> list[str]:
    """The source files under root, relative to it.

    In a git checkout, what git tracks or would track. An unpacked sdist has no git, and its
    suite must run too (MANIFEST.in ships it for that): there, every file outside the
    directories builds and test runs leave.
    """
    if (root / ".git").exists():
        return subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    names = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [
            d
            for d in subdirs
            if d not in LEFT_BY_BUILDS and not d.endswith(".egg-info") and not d.startswith(".venv")
        ]
        names += [str(Path(directory, f).relative_to(root)) for f in files]
    return names


@pytest.fixture
def source_tree(tmp_path_factory) -> Path:
    """A fresh copy of the sources per test: builds never touch the working tree or share objects."""
    dest = tmp_path_factory.mktemp("src")
    for name in source_files(ROOT):
        src = ROOT / name
        if (
            not src.is_file()
            or name.endswith((".so", ".c", ".pyc"))
            or name.startswith("benchmarks/RESULTS")
        ):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    return dest


def build_wheel(tree: Path, out: Path, **env_overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ERQ_NO_EXTENSIONS", None)
    env.update(env_overrides)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(tree),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def wheel_names(out: Path) -> list[str]:
    (wheel,) = out.glob("erq-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_contains_the_compiled_extensions(source_tree, tmp_path):
    result = build_wheel(source_tree, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    names = wheel_names(tmp_path)
    for module in (*FAST_MODULES, *COMPILED_TWINS):
        assert any(
            n.startswith(f"erq/_fast/{module}.") and n.endswith((".so", ".pyd")) for n in names
        ), names
    assert "erq/_parser_py.py" in names
    for twin in ("_records_py", "_replay_py", "_append_py"):  # the journal codec's twins
        assert f"erq/journal/{twin}.py" in names, names
    assert "erq/journal/_fsync_py.py" in names
    assert "erq/example.toml" in names  # for `erq example-config`
    for module in COMPILED_TWINS:  # the pure source of each compiled twin ships too
        assert f"erq/{module}_py.py" in names, names
    # Cython's generated C, and the note of its mode, are build products, not the package's.
    assert not [n for n in names if n.endswith((".c", ".cython-mode"))]


def test_no_compiler_stops_with_the_pure_python_switch(source_tree, tmp_path):
    result = build_wheel(source_tree, tmp_path, CC="/bin/false", LDSHARED="/bin/false")
    assert result.returncode != 0
    assert "ERQ_NO_EXTENSIONS=1" in result.stdout + result.stderr
    # From an index pip would cache the pure wheel and give it to later installs of the version.
    assert "ERQ_NO_EXTENSIONS=1 pip install --no-cache-dir erq" in result.stdout + result.stderr


def test_pure_python_build_has_no_extensions(source_tree, tmp_path):
    result = build_wheel(source_tree, tmp_path, ERQ_NO_EXTENSIONS="1", CC="/bin/false")
    assert result.returncode == 0, result.stdout + result.stderr
    names = wheel_names(tmp_path)
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    assert "erq/_fast/_parser.pyx" in names  # sources travel for reference; nothing compiled


def test_a_change_of_cython_debug_mode_generates_the_c_again(source_tree):
    """ERQ_CYTHON_DEBUG=1 (line tracing, -O0) and back: cythonize judges by timestamps alone,
    so the C of the other mode stayed, and with it the objects compiled from it."""
    ring_c = source_tree / "erq" / "_fast" / "_ring.c"

    def traced(**env_overrides: str) -> bool:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERQ_")}
        done = subprocess.run(
            [sys.executable, "setup.py", "--name"],  # cythonizes, as every setup.py command
            cwd=source_tree,
            env={**env, **env_overrides},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return "__Pyx_TraceLine" in ring_c.read_text()

    assert not traced()
    assert traced(ERQ_CYTHON_DEBUG="1")
    assert not traced()


def test_the_source_distribution_carries_the_example_config_and_a_runnable_suite(
    source_tree, tmp_path
):
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
        cwd=source_tree,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (sdist,) = tmp_path.glob("erq-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    for wanted in (
        "erq/example.toml",
        "tests/conftest.py",
        "tests/support.py",
        "tests/protocol_driver.py",
        "ci/test.sh",
        ".ci/run",
        "benchmarks/run_e2e.py",
    ):
        assert wanted in names, wanted
    # No build products: setup.py's cythonize wrote erq/_fast/*.c into the tree just now, and a
    # wheel built from this sdist must make its own from the .pyx.
    assert not [n for n in names if n.endswith((".so", ".pyc", ".c"))]
    assert "erq/_fast/_parser.pyx" in names and "erq/_fast/crc32c.h" in names


def test_an_unpacked_sdist_lists_its_sources_without_git(tmp_path):
    """The sdist's suite builds from its own files: no `git ls-files` there, no build products."""
    for name in (
        "setup.py",
        "PKG-INFO",
        "erq/_fast/_parser.pyx",
        "erq/_fast/_parser.c",  # left out by source_tree, as in a checkout
        "tests/conftest.py",
        "build/lib/erq/cli.py",
        "erq.egg-info/SOURCES.txt",
        ".venv-test/bin/python",
        "tests/__pycache__/conftest.cpython-311.pyc",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert sorted(source_files(tmp_path)) == [
        "PKG-INFO",
        "erq/_fast/_parser.c",
        "erq/_fast/_parser.pyx",
        "setup.py",
        "tests/conftest.py",
    ]


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_the_release_wheels_are_built_for_each_python_of_the_classifiers():
    config = pyproject()
    prefix = "Programming Language :: Python :: 3."
    minors = sorted(
        int(c.removeprefix(prefix))
        for c in config["project"]["classifiers"]
        if c.startswith(prefix)
    )
    assert minors, "no Python version classifiers"
    build = config["tool"]["cibuildwheel"]["build"]
    build = build.split() if isinstance(build, str) else build
    assert sorted(build) == sorted(f"cp3{m}-*" for m in minors)


def test_the_release_wheels_test_the_installed_cython_build():
    """cibuildwheel's test runs existing tests, on the wheel's own extensions."""
    cibw = pyproject()["tool"]["cibuildwheel"]
    # No environment of the build or the test (nor a per-platform one) picks the pure build.
    for table in (cibw, *(cibw.get(p, {}) for p in ("linux", "macos", "windows"))):
        for key in ("environment", "test-environment"):
            assert "ERQ_NO_EXTENSIONS" not in str(table.get(key, "")), (key, table[key])
    command = cibw["test-command"]
    command = " && ".join(command) if isinstance(command, list) else command
    assert "erq.IMPLEMENTATION != 'cython'" in command  # the exit status says which build runs
    # The tests named are copied beside the installed wheel (test-sources), and they exist.
    sources = cibw["test-sources"]
    named = [word for word in command.split() if word.startswith("tests/")]
    assert named, command
    for path in named:
        assert (ROOT / path).is_file(), path
        assert any(path == s or path.startswith(s.rstrip("/") + "/") for s in sources), path
    # No erq/ beside them: the test imports the installed package, not a checkout.
    assert not [s for s in sources if s.split("/")[0] in ("erq", ".")], sources
