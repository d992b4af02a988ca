#!/usr/bin/env python3
"""What a proxied request costs each process, by where the processes run.

The (a) goal compares reverse-proxy with `direct`: wrk against the
upstream alone, both on one CPU. This script runs the same load (wrk,
64 keep-alive connections, 1 KiB responses, the proxy configured as in
bench.py) in three placements:

- direct: wrk and the upstream on CPU 1, no proxy;
- apart: the proxy on CPU 0, wrk and the upstream on CPU 1 (as in (a));
- beside: all three on CPU 1;

and prints requests/s, the user and system CPU time per request of each
process (from /proc/PID/stat, and wrk's own rusage), and the rescheduling
and function-call interrupts of CPUs 0 and 1 per 1,000 requests (x86's
RES and CAL lines of /proc/interrupts). A gap between the apart and
beside rows is what crossing between CPUs costs, which the direct row
never pays.

    python3 bench/placement.py [--rp-bin PATH] [--rounds N] [--duration S]

Needs two CPUs, wrk, taskset, and the release builds of reverse-proxy and
of the benchmark upstream (`bench/run.sh` makes both).
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import types

from bench import CLIENT_CPU, CLK_TCK, HOST, SERVER_CPU, Setup, get, parse_wrk, user_sys_ticks

# Where the proxy runs in each placement; None: no proxy.
PLACEMENTS = (("direct", None), ("apart", SERVER_CPU), ("beside", CLIENT_CPU))
ROLES = ("upstream", "proxy", "wrk")


def cpu_seconds(pid):
    """User and system CPU seconds of a running process, all its threads."""
    user, system = user_sys_ticks(pid)
    return user / CLK_TCK, system / CLK_TCK


def interrupts():
    """Rescheduling and function-call interrupts of the two CPUs used,
    where the kernel reports them under those names."""
    counts = {}
    try:
        with open("/proc/interrupts") as f:
            cpus = f.readline().split()
            columns = [cpus.index(f"CPU{c}") for c in (SERVER_CPU, CLIENT_CPU)]
            for line in f:
                name, _, rest = line.strip().partition(":")
                if name in ("RES", "CAL"):
                    values = rest.split()
                    counts[name] = sum(int(values[i]) for i in columns)
    except (OSError, ValueError, IndexError):
        return {}
    return counts


def wrk(port, duration):
    """Runs wrk on the client CPU; returns its requests, requests/s and
    the user and system seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", "-c64", f"-d{duration}s",
         "-H", f"Host: {HOST}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout + done.stderr
    if done.returncode != 0 or " requests in " not in out:
        sys.exit(f"wrk failed:\n{out}")
    result = parse_wrk(out)
    requests = int(out.split(" requests in ")[0].split()[-1])
    if result["errors"] or requests == 0:
        sys.exit(f"wrk saw errors or no answers:\n{out}")
    return (requests, result["rps"], after.ru_utime - before.ru_utime,
            after.ru_stime - before.ru_stime)


def measure(setup, placement, duration):
    """One placement: (requests/s, µs per request by role, interrupts per
    1,000 requests)."""
    _, proxy_cpu = placement
    try:
        upstream = setup.start_upstream()
        pids = {"upstream": upstream.workers[0]}
        port = upstream.plain
        if proxy_cpu is not None:
            proxy = setup.start_rp("rp", cpu=proxy_cpu)
            port = proxy.plain
            pids["proxy"] = proxy.workers[0]
        if get(port) != (200, 1024):
            sys.exit(f"port {port} does not answer 200 with 1 KiB")
        wrk(port, 1)
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        irq_before = interrupts()
        requests, rps, wrk_user, wrk_sys = wrk(port, duration)
        irq_after = interrupts()
        after = {role: cpu_seconds(pid) for role, pid in pids.items()}
    finally:
        setup.procs.stop_all()
    used = {role: (after[role][0] - before[role][0], after[role][1] - before[role][1])
            for role in pids}
    used["wrk"] = (wrk_user, wrk_sys)
    per_request = {role: (u / requests * 1e6, s / requests * 1e6) for role, (u, s) in used.items()}
    irqs = {k: (irq_after[k] - irq_before[k]) * 1000 / requests
            for k in irq_before if k in irq_after}
    return rps, per_request, irqs


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rp-bin", default="target/release/reverse-proxy")
    parser.add_argument("--upstream-bin", default="target/release/examples/bench_upstream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    args = parser.parse_args()
    if os.cpu_count() < 2 or args.duration < 1:
        sys.exit("needs two CPUs and a duration of at least 1 s")
    print("µs of CPU per request, user/system; interrupts per 1,000 requests")
    print(f"{'placement':9} {'req/s':>8}  " + "  ".join(f"{r:>11}" for r in ROLES)
          + f"  {'RES':>5} {'CAL':>5}")
    with tempfile.TemporaryDirectory(prefix="rp-placement.") as tmp:
        setup = Setup(types.SimpleNamespace(rp_bin=args.rp_bin, upstream_bin=args.upstream_bin),
                      tmp)
        for _ in range(args.rounds):
            for placement in PLACEMENTS:
                rps, cpu, irqs = measure(setup, placement, args.duration)
                cells = [f"{cpu[r][0]:5.2f}/{cpu[r][1]:5.2f}" if r in cpu else "–" for r in ROLES]
                irq_cells = [f"{irqs[k]:5.1f}" if k in irqs else f"{'–':>5}" for k in ("RES", "CAL")]
                print(f"{placement[0]:9} {rps:8,.0f}  " + "  ".join(f"{c:>11}" for c in cells)
                      + "  " + " ".join(irq_cells), flush=True)


if __name__ == "__main__":
    main()
