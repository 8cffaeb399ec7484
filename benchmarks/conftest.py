"""Micro-benchmarks run each hot path on both builds: ``pytest benchmarks/ --benchmark-only``."""

import importlib

import pytest


@pytest.fixture(params=["c", "py"])
def impl(request):
    return request.param


def load(impl: str, fast: str, twin: str):
    return importlib.import_module(f"erq._fast.{fast}" if impl == "c" else f"erq.{twin}")
