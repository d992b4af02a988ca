#!/usr/bin/env python3
"""What a proxied request costs each process, by where the processes run.

The (a) goal compares reverse-proxy with `direct`: wrk against the
upstream alone, both on one CPU. This script runs the same load (wrk,
64 keep-alive connections, 1 KiB responses) in three placements:

- direct: wrk and the upstream on CPU 1, no proxy;
- split: the proxy on CPU 0, wrk and the upstream on CPU 1 (as in (a));
- one CPU: all three on CPU 1;

and prints requests/s, the user and system CPU time per request of each
process (from /proc/PID/stat, and wrk's own rusage), and the rescheduling
and function-call interrupts per 1,000 requests (from /proc/interrupts).
A gap between the split and one-CPU rows is what crossing between CPUs
costs, which the direct row never pays.

    python3 bench/placement.py [--rp-bin PATH] [--rounds N] [--duration S]

Needs wrk and `cargo build --release --example bench_upstream`.
"""

import argparse
import os
import subprocess
import tempfile

from bench import HOST, free_port, wait_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
PLACEMENTS = (("direct", "1", None, "1"), ("split", "1", "0", "1"), ("one CPU", "1", "1", "1"))


def cpu_seconds(pid):
    """User and system CPU seconds of a running process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def interrupts():
    """Rescheduling and function-call interrupts, summed over the CPUs."""
    counts = {}
    with open("/proc/interrupts") as f:
        for line in f:
            name, _, rest = line.strip().partition(":")
            if name in ("RES", "CAL"):
                counts[name] = sum(int(v) for v in rest.split() if v.isdigit())
    return counts


def pinned(cpu, argv, **kwargs):
    return subprocess.Popen(["taskset", "-c", cpu] + argv, stdout=subprocess.DEVNULL, **kwargs)


def wrk(cpu, port, duration):
    """Runs wrk to the end; returns (requests, user s, system s)."""
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, "wrk", "-t1", "-c64", f"-d{duration}s", "-H", f"Host: {HOST}",
         f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or " requests in " not in out:
        raise SystemExit(f"wrk failed:\n{out}")
    requests = int(out.split(" requests in ")[0].split()[-1])
    return requests, usage.ru_utime, usage.ru_stime


def measure(args, tmp, placement):
    name, upstream_cpu, proxy_cpu, wrk_cpu = placement
    upstream_port = free_port()
    procs = {"upstream": pinned(upstream_cpu, [args.upstream_bin, f"127.0.0.1:{upstream_port}"])}
    try:
        if not wait_port(upstream_port, procs["upstream"]):
            raise SystemExit(f"the upstream ({args.upstream_bin}) did not start")
        port = upstream_port
        if proxy_cpu is not None:
            port = free_port()
            conf = os.path.join(tmp, "config.toml")
            with open(conf, "w") as f:
                f.write(f'[server]\nbind_addr = "127.0.0.1:{port}"\nlog_level = "warn"\n'
                        f'worker_threads = 1\naccess_log = "{tmp}/access.log"\n'
                        '[server.tls]\nmode = "off"\n[rate_limit]\nenabled = false\n'
                        f'[[sites]]\nhost = "{HOST}"\n'
                        f'upstream = "http://127.0.0.1:{upstream_port}"\n')
            procs["proxy"] = pinned(proxy_cpu, [args.rp_bin, "--config", conf])
            if not wait_port(port, procs["proxy"]):
                raise SystemExit(f"the proxy ({args.rp_bin}) did not start")
        wrk(wrk_cpu, port, 1)
        before = {role: cpu_seconds(p.pid) for role, p in procs.items()}
        irq_before = interrupts()
        requests, wrk_user, wrk_sys = wrk(wrk_cpu, port, args.duration)
        irq_after = interrupts()
        after = {role: cpu_seconds(p.pid) for role, p in procs.items()}
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)
    used = {role: (after[role][0] - before[role][0], after[role][1] - before[role][1])
            for role in procs}
    used["wrk"] = (wrk_user, wrk_sys)
    per_request = {role: (u / requests * 1e6, s / requests * 1e6) for role, (u, s) in used.items()}
    irqs = {k: (irq_after[k] - irq_before[k]) * 1000 / requests for k in irq_before}
    return name, requests / args.duration, per_request, irqs


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rp-bin", default="target/release/reverse-proxy")
    parser.add_argument("--upstream-bin", default="target/release/examples/bench_upstream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    print("µs of CPU per request, user/system; interrupts per 1,000 requests")
    print(f"{'placement':9} {'req/s':>8}  {'upstream':>11}  {'proxy':>11}  {'wrk':>11}  "
          f"{'RES':>5} {'CAL':>5}")
    with tempfile.TemporaryDirectory(prefix="rp-placement.") as tmp:
        for _ in range(args.rounds):
            for placement in PLACEMENTS:
                name, rps, cpu, irqs = measure(args, tmp, placement)
                cells = [f"{cpu[role][0]:5.2f}/{cpu[role][1]:5.2f}" if role in cpu else "–"
                         for role in ("upstream", "proxy", "wrk")]
                print(f"{name:9} {rps:8,.0f}  {cells[0]:>11}  {cells[1]:>11}  {cells[2]:>11}  "
                      f"{irqs.get('RES', 0):5.1f} {irqs.get('CAL', 0):5.1f}", flush=True)


if __name__ == "__main__":
    main()
