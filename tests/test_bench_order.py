"""The e2e runner's server order (``benchmarks/scenarios.py``: ``rotated``): over as many
repetitions as servers, each server runs once in each place, so that what a run leaves to the
next (on the benchmark VM, memory freed by the previous run's deleted journal) favours none."""

from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT

_NAME = "erq_benchmark_scenarios"
_spec = importlib.util.spec_from_file_location(_NAME, ROOT / "benchmarks" / "scenarios.py")
scenarios = importlib.util.module_from_spec(_spec)
sys.modules[_NAME] = scenarios  # its dataclasses look their module up there
_spec.loader.exec_module(scenarios)


def test_each_server_takes_each_place_once_over_as_many_repetitions():
    servers = ["cython", "python", "memcached"]
    orders = [scenarios.rotated(servers, rep) for rep in range(3)]
    assert orders[0] == servers  # the first repetition in the given order
    for order in orders:
        assert sorted(order) == sorted(servers)
    for place in range(3):
        assert sorted(order[place] for order in orders) == sorted(servers)
    assert scenarios.rotated(servers, 3) == servers  # and round again
    assert scenarios.rotated([], 5) == [] and scenarios.rotated(["erq"], 7) == ["erq"]
