#!/usr/bin/env bash
# Side-by-side benchmark of reverse-proxy, nginx and HAProxy on this machine.
#
#   bench/run.sh            full run: 5 rounds x 8 s per case, 10 000 idle conns,
#                           of the profile-guided build where it can be made
#   bench/run.sh --quick    a few seconds per case: checks the script still works
#
# Any further arguments go to bench/bench.py (--only, --rounds, --duration,
# --markdown FILE, --json FILE, --keep, --rp-bin PATH). What is measured and
# how the peers are configured: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if (($(nproc) < 2)); then
    echo "bench/run.sh needs 2 CPUs: one for the proxies, one for the load" >&2
    exit 1
fi

# --- Debian packages ----------------------------------------------------------
packages=(nginx haproxy wrk nghttp2-client openssl python3 util-linux procps)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}" >&2
    # The benchmark runs its own nginx and HAProxy on loopback; keep the
    # packages' system services from starting on port 80.
    policy=/usr/sbin/policy-rc.d
    added_policy=false
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=true
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if $added_policy; then rm -f "$policy"; fi
fi

# --- Build ------------------------------------------------------------------------
# A full run measures the profile-guided build (bench/pgo.sh) where rustc's
# llvm-profdata is installed. A quick run, RP_PGO=0, or a run given the
# binaries to measure (--rp-bin, --baseline-bin) or measuring nothing
# (--render) does not make it.
pgo=${RP_PGO:-1}
for arg in "$@"; do
    case $arg in --qui* | --rp-bin* | --baseline-bin* | --render*) pgo=0 ;; esac
done
rp_bin=()
if [[ -z ${RP_SKIP_BUILD:-} ]]; then
    # Two invocations: building the example pulls in dev-dependency features,
    # and the binary measured must be the one that ships.
    cargo build --release --locked --bin reverse-proxy >&2
    cargo build --release --locked --example bench_upstream >&2
    if [[ $pgo == 1 ]]; then
        if bash bench/pgo.sh --check; then
            rp_bin=(--rp-bin "$(bash bench/pgo.sh)")
        else
            echo "no llvm-profdata (rustup component add llvm-tools): measuring the plain release build" >&2
        fi
    fi
fi

# (e) holds 10 000 client and 10 000 server sockets open at once.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

export PYTHONDONTWRITEBYTECODE=1
exec python3 bench/bench.py "${rp_bin[@]}" "$@"
