#!/usr/bin/env python3
"""Counts the short pauses of each CPU: time in which it ran nothing of ours.

    python3 bench/pauses.py [SECONDS]

Run it with nothing else running (no benchmark, no build). One process per
CPU, pinned to it, reads the clock in a loop for SECONDS (default 5); a gap
of more than 0.2 ms between two readings is time that CPU spent elsewhere:
on an interrupt, on a kernel thread, or, on a virtual machine, on nothing
of this machine's at all, because the hypervisor ran something else.
`stall_watch.py` catches the pauses of 25 ms and more during a
measurement; the shorter ones seen here are not retaken, and with 64
connections held up by each, they move p99 by as much as the proxies
differ (see "p99 in checks of 12 rounds, and the short pauses" in
docs/performance.md).

It prints one line per CPU: the gaps, their total, how many lasted at
least 0.5, 1, 2, 5 and 25 ms, and the longest.
"""

import multiprocessing
import os
import queue
import sys
import time

GAP_NS = 200_000
BOUNDS_MS = (0.5, 1, 2, 5, 25)


def spin(cpu, seconds, out):
    os.sched_setaffinity(0, {cpu})
    gaps = []
    last = time.perf_counter_ns()
    end = last + int(seconds * 1e9)
    while last < end:
        now = time.perf_counter_ns()
        if now - last > GAP_NS:
            gaps.append((now - last) / 1e6)
        last = now
    out.put((cpu, gaps))


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    cpus = sorted(os.sched_getaffinity(0))
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=spin, args=(cpu, seconds, out)) for cpu in cpus]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=seconds + 30) for _ in procs)
    except queue.Empty:
        sys.exit("pauses.py: a CPU's probe did not report (could it pin itself to its CPU?)")
    for p in procs:
        p.join()
    for cpu in cpus:
        gaps = results[cpu]
        counts = " ".join(f">={b} ms: {sum(g >= b for g in gaps)}" for b in BOUNDS_MS)
        print(f"CPU {cpu}, {seconds:g} s: gaps over {GAP_NS / 1e6:g} ms: {len(gaps)}, "
              f"{sum(gaps):.1f} ms in all; {counts}; longest {max(gaps, default=0):.2f} ms")


if __name__ == "__main__":
    main()
