"""CRC32C throughput of the journal codec against google-crc32c, in one run on the same buffers.

    taskset -c 1 python benchmarks/crc32c_throughput.py            # erq's C CRC (crc32c.h)
    ERQ_NO_EXTENSIONS=1 python benchmarks/crc32c_throughput.py     # the pure twin (google-crc32c)

Each figure is the median of several timeit repeats, erq's and google_crc32c.value's taking
turns; the last column is the median of erq's rate over google's in each turn, so that a noisy
machine still gives a comparable ratio.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import google_crc32c

import erq.journal.codec as codec

SIZES = {"64 B": 64, "1 KiB": 1 << 10, "64 KiB": 64 << 10, "1 MiB": 1 << 20}


def rates(fns, data: bytes, repeats: int, budget: float) -> list[list[float]]:
    """Bytes per second of each fn(data), ``repeats`` timings of ~``budget`` s each, the
    functions taking turns (so that a busy spell of the machine hits them alike)."""
    timers = [timeit.Timer(lambda fn=fn: fn(data)) for fn in fns]
    numbers = [max(1, int(t.autorange()[0] * budget / 0.2)) for t in timers]
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for timer, number, rates_ in zip(timers, numbers, out, strict=True):
            rates_.append(len(data) * number / timer.timeit(number))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.2, help="seconds per timing")
    args = parser.parse_args()
    print(f"erq: {codec.CRC32C_IMPLEMENTATION}; google-crc32c: {google_crc32c.implementation}")
    print("| size | erq GB/s | google-crc32c GB/s | erq / google |")
    print("|---|---|---|---|")
    for label, size in SIZES.items():
        data = bytes(range(256)) * (size // 256) or bytes(range(size))
        assert codec.crc32c(data) == google_crc32c.value(data)
        ours, ref = rates((codec.crc32c, google_crc32c.value), data, args.repeats, args.budget)
        ratio = statistics.median(o / r for o, r in zip(ours, ref, strict=True))
        ours, ref = statistics.median(ours), statistics.median(ref)
        print(f"| {label} | {ours / 1e9:.2f} | {ref / 1e9:.2f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
