#!/usr/bin/env python3
"""Reports how long the benchmark's CPUs stood still, in ms.

    stall_watch.py PEER_CPU

bench.py runs it on the load generator's CPU during each measurement. On
the small VMs the benchmark is made for, the hypervisor now and then runs
one of the two CPUs not at all for about 100 ms (the CPU's `steal` time in
/proc/stat rises by that much). wrk corrects its latencies for
coordinated omission: a reply that took 100 ms also counts as the replies
that would have come in those 100 ms, so one such pause turns a round's
p99 from about 1 ms into tens of ms, whichever peer is being measured.

It wakes every 5 ms: a long gap between two wake-ups is time its own CPU
stood still, for any reason. Every tenth wake-up it also reads the steal
time of PEER_CPU, where the measured peer runs and where nothing of this
script's may run. It prints "ready" once started; on SIGTERM it prints
the longest gap and the most steal time of PEER_CPU within about 100 ms,
and exits. bench.py also imports `steal_ticks` and `TICK_MS` from it.
"""

import os
import signal
import sys
import time

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
STEAL_FIELD = 8  # after the "cpuN" label


def steal_ticks(cpu):
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return int(line.split()[STEAL_FIELD])
    raise SystemExit(f"no cpu{cpu} in /proc/stat")


def main():
    stopped = False

    def stop(_signum, _frame):
        nonlocal stopped
        stopped = True

    peer_cpu = sys.argv[1]
    signal.signal(signal.SIGTERM, stop)
    steals = [steal_ticks(peer_cpu)] * 3
    print("ready", flush=True)
    last = time.monotonic()
    longest = 0.0
    most_stolen = 0
    wakeups = 0
    while not stopped:
        time.sleep(0.005)
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
        wakeups += 1
        if wakeups % 10 == 0:
            steals = steals[1:] + [steal_ticks(peer_cpu)]
            most_stolen = max(most_stolen, steals[-1] - steals[0])
    print(f"{longest * 1000:.1f} {most_stolen * TICK_MS:.0f}", flush=True)


if __name__ == "__main__":
    main()
