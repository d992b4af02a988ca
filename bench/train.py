#!/usr/bin/env python3
"""The load a profile-guided build learns from (`bench/pgo.sh`).

Runs every load case of bench.py that reverse-proxy serves -- HTTP/1.1
keep-alive plain and over TLS, HTTP/2 over TLS, new TLS connections,
10 MiB streaming -- plus the keep-alive case with the rate limiter on,
through instances of the given binary configured as in bench.py, then
stops them with SIGTERM. An instrumented build writes its profile as it
exits, so every instance must exit cleanly; a load that fails, or an
instance that does not exit with 0 or reports a failed profile write,
fails the run.

    python3 bench/train.py --rp-bin PATH [--duration S]

Needs two CPUs, wrk, h2load, openssl, taskset and the release build of the
benchmark upstream (`cargo build --release --example bench_upstream`).
"""

import argparse
import shutil
import sys
import tempfile
import types

from bench import UNREACHED_LIMIT, Setup, build_cases, log, measure, rate_limiter_works


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rp-bin", required=True)
    parser.add_argument("--upstream-bin", default="target/release/examples/bench_upstream")
    parser.add_argument("--duration", type=int, default=3, help="seconds per load; default 3")
    args = parser.parse_args()

    cases = [c for c in build_cases(types.SimpleNamespace(only=None, baseline_bin=None))
             if not c.key.startswith("f_")]
    # The limiter's path, through an instance of its own as in (f).
    limited = next(c for c in cases if c.key == "a64")

    tmp = tempfile.mkdtemp(prefix="rp-train.")
    setup = Setup(args, tmp)
    failed = []
    try:
        setup.make_cert()
        setup.start_upstream()
        plain = setup.start_rp("rp")
        tls = setup.start_rp("rp-tls", tls=True)
        if tls is None:
            sys.exit(f"{args.rp_bin} has no TLS; a profile without it would be partial")
        if not rate_limiter_works(setup):
            sys.exit(f"{args.rp_bin} has no rate limiter; a profile without it would be partial")
        rate_limited = setup.start_rp("rp-ratelimit", rate_limit=UNREACHED_LIMIT)
        runs = [(c, tls if c.tls else plain) for c in cases] + [(limited, rate_limited)]
        for peer in (plain, tls, rate_limited):
            setup.check(peer)
        for case, peer in runs:
            r = measure(setup, case, peer, args.duration)
            log(f"{case.key:5} {peer.procs[0].name:13} {r['rps']:.0f} req/s")
            if r.get("errors") or not r["rps"]:
                failed.append(f"{case.key}: {r.get('errors', 0)} errors, {r['rps']:.0f} req/s")
        for peer in (plain, tls, rate_limited):
            proc = peer.procs[0]
            setup.procs.stop(proc)
            err = setup.procs.stderr(proc.name)
            # The profile runtime reports a failed write but exits with 0.
            if proc.popen.returncode != 0 or "LLVM Profile Error" in err:
                failed.append(f"{proc.name} exited with {proc.popen.returncode}:\n{err}")
    finally:
        setup.procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        sys.exit("training load failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
