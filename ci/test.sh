#!/usr/bin/env bash
# Install everything the test suite needs into a fresh virtual environment, build the
# Cython extensions, and run the whole suite on both implementations.
#
#   bash ci/test.sh            # what .ci/run and the README use
#   bash ci/test.sh -k parser  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's libmemcached-tools (memccp, memccat, memcstat) are driven by the client tests;
# strace shows which system calls the fsync worker makes (test_fsync_worker.py); fuse3 mounts
# the file system whose writes fail on demand (test_sync_errors.py).
missing=""
command -v memccp >/dev/null 2>&1 || missing+=" libmemcached-tools"
command -v strace >/dev/null 2>&1 || missing+=" strace"
command -v fusermount3 >/dev/null 2>&1 || missing+=" fuse3"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        # shellcheck disable=SC2086
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    else
        echo "ci/test.sh: missing:$missing; install (apt-get install$missing)" >&2
        exit 1
    fi
fi

VENV=${ERQ_TEST_VENV:-.venv-test}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
# The editable install builds erq/_fast in place; make sure it really did (no silent fallback).
python -c "import erq, sys; print('erq', erq.__version__, 'implementation:', erq.IMPLEMENTATION); sys.exit(erq.IMPLEMENTATION != 'cython')"
ruff check erq tests benchmarks setup.py
ruff format --check erq tests benchmarks setup.py
exec python -m pytest "$@"
