#!/usr/bin/env python3
"""Reports the longest time this process's CPU stood still, in ms.

bench.py runs it on the load generator's CPU during each measurement. On
the small VMs the benchmark is made for, that CPU now and then runs none
of the benchmark's processes for about 100 ms; it shows on a process that
only sleeps, whichever peer is measured. wrk corrects its latencies for
coordinated omission: a reply that took 100 ms also counts as the replies
that would have come in those 100 ms, so one such pause turns a round's
p99 from about 1 ms into tens of ms.

It wakes every 5 ms and prints "ready" once started; on SIGTERM it prints
the longest gap between two wake-ups and exits.
"""

import signal
import time

stopped = False


def stop(_signum, _frame):
    global stopped
    stopped = True


signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
last = time.monotonic()
longest = 0.0
while not stopped:
    time.sleep(0.005)
    now = time.monotonic()
    longest = max(longest, now - last)
    last = now
print(f"{longest * 1000:.1f}", flush=True)
