"""``benchmarks/instructions.py`` drives the protocol in process with a fake transport: each
of its shapes must still run on both builds (a plain run, no valgrind), so that a change to
the server's connection set-up or request path cannot quietly break the tool that PROFILE.md's
instruction counts come from. Nothing here counts or times anything."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location(
    "instructions", ROOT / "benchmarks" / "instructions.py"
)
instructions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(instructions)


@pytest.mark.parametrize("shape", sorted(instructions.SHAPES))
def test_every_shape_runs(impl, shape):
    env = dict(os.environ)
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "instructions.py"), "--run", shape, "64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
