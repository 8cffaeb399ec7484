"""Build erq's Cython hot paths (erq/_fast), or nothing when ERQ_NO_EXTENSIONS=1.

The extensions are the default. A machine without a C compiler gets a build error that
names the switch to the pure-Python twins instead of a silently slower server.
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = os.environ.get("ERQ_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("ERQ_CYTHON_DEBUG", "") not in ("", "0")
# The mode the C in erq/_fast was last generated in. cythonize and build_ext judge by timestamps
# alone: after a build in the other mode they kept its C (with or without line tracing) and its
# -O0 or -O3 objects. A change of mode generates all the C again, and the newer C compiles again.
BUILD_MODE = "debug" if DEBUG else "release"
MODE_STAMP = Path("erq/_fast/.cython-mode")
FAST_MODULES = ["_parser", "_ring", "_records", "_replay", "_append", "_fsync", "_clock", "_wire"]
if sys.platform.startswith("linux"):
    FAST_MODULES.append("_epoll")  # the client sockets' epoll set (erq.listener)
# "One source compiled twice": erq/_fast/<name>.py is a link to a pure-Python module of erq,
# compiled with the C types of erq/_fast/<name>.pxd; the module's selector imports one build
# or the other.
COMPILED_TWINS = sorted(
    p.stem for p in Path("erq/_fast").glob("_*.py") if p.with_suffix(".pxd").exists()
)

NO_COMPILER_HELP = """
erq: building the Cython extensions failed ({error}).
erq needs a C compiler (gcc or clang) and the Python headers for its fast build.
To install the portable pure-Python build instead, set ERQ_NO_EXTENSIONS=1 for the install:

    ERQ_NO_EXTENSIONS=1 pip install .                     (in a checkout)
    ERQ_NO_EXTENSIONS=1 pip install --no-cache-dir erq    (from an index)

(--no-cache-dir: pip keeps a wheel it built from an index's sdist and installs it again for
the same version, whatever the switch says: a pure wheel would go to later installs that
could build the extensions, and a compiled one kept earlier would come instead of this.)
"""


class BuildExt(build_ext):
    """Turn a missing compiler into a message that names the pure-Python switch."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # DistutilsPlatformError, CompileError, ...
            raise SystemExit(NO_COMPILER_HELP.format(error=exc)) from exc

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise SystemExit(NO_COMPILER_HELP.format(error=exc)) from exc


def mode_changed() -> bool:
    """True unless the C in erq/_fast was last generated in this build's mode (a fresh tree has
    no C to keep: generating it all costs nothing more there)."""
    try:
        return MODE_STAMP.read_text() != BUILD_MODE
    except FileNotFoundError:
        return True


def extensions():
    if NO_EXTENSIONS:
        print("erq: ERQ_NO_EXTENSIONS set, installing the pure-Python build", file=sys.stderr)
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    # -g0: no debug info (Python's own CFLAGS ask for -g), 13 of the extensions' 16 MB; the
    # symbols that perf, py-spy and callgrind name functions by stay.
    compile_args = ["-O3", "-g0"] if not DEBUG else ["-O0", "-g"]
    macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    sources = {name: f"erq/_fast/{name}.pyx" for name in FAST_MODULES}
    sources.update({name: f"erq/_fast/{name}.py" for name in COMPILED_TWINS})
    exts = [
        Extension(
            f"erq._fast.{name}",
            [source],
            extra_compile_args=compile_args,
            define_macros=macros,
        )
        for name, source in sources.items()
    ]
    print("erq: building the Cython extensions (accelerated build)", file=sys.stderr)
    built = cythonize(
        exts,
        force=mode_changed(),
        language_level=3,
        annotate=DEBUG,
        compiler_directives={"linetrace": DEBUG, "embedsignature": True},
    )
    MODE_STAMP.write_text(BUILD_MODE)
    return built


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
