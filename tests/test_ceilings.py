"""The benchmark runner's machine ceilings (``benchmarks/ceilings.py``) measure and clean up.

They are what RESULTS.md sets the 64 KiB and ``fsync = "always"`` bars against, so each is run
here briefly on the suite's temporary directory: it returns a positive rate and leaves no file
behind. Nothing here asserts a speed.
"""

from __future__ import annotations

import errno
import importlib.util
import os

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("ceilings", ROOT / "benchmarks" / "ceilings.py")
ceilings = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceilings)

CAP = 64 * ceilings.MIB


def _direct(directory) -> float:
    try:
        return ceilings.direct_write_bandwidth(directory, 0.3, CAP)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # the file system refuses O_DIRECT
            pytest.skip(f"O_DIRECT refused under {directory}")
        raise


@pytest.mark.parametrize(
    "measure",
    [
        lambda d: ceilings.disk_write_bandwidth(d, 0.3, CAP),
        lambda d: ceilings.disk_write_bandwidth(d, 0.3, CAP, reuse_cache=True),
        _direct,
        lambda d: ceilings.fdatasync_rate(d, 0.3, CAP),
    ],
    ids=["page_cache", "page_cache_reused", "direct", "fdatasync"],
)
def test_a_ceiling_returns_a_positive_rate_and_removes_its_file(tmp_path, measure):
    assert measure(tmp_path) > 0
    assert os.listdir(tmp_path) == []
