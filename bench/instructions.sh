#!/usr/bin/env bash
# CPU instructions per proxied request, counted by valgrind: a figure that,
# unlike req/s on a shared machine, does not move from run to run, so small
# changes on the request path can be compared.
#
#   bench/instructions.sh BINARY [BINARY ...]
#
# For each binary: HTTP/1.1 keep-alive GETs of 1 KiB through the proxy (one
# worker thread, access log to a file, rate limiter off), driven by h2load
# with 16 connections. The proxy runs under `valgrind --tool=cachegrind`
# twice, for N1 and N2 requests; the difference divided by N2 - N1 is the
# cost of one request with start-up and shutdown cancelled out.
# ACCESS_LOG=off measures without the access log file; RATE_LIMIT=on with
# the rate limiter on (a limit the run never reaches); CONNS=N drives it
# with N connections instead of 16; PROTOCOL=h2 with HTTP/2 over TLS (10
# streams per connection, an ECDSA P-256 certificate made for the run;
# 5 000 and 25 000 requests).
# Needs valgrind, h2load and openssl (Debian: valgrind, nghttp2-client,
# openssl) and `cargo build --release --example bench_upstream`.
set -euo pipefail

PROTOCOL=${PROTOCOL:-h1}
case $PROTOCOL in
h1) N1=${N1:-2000} N2=${N2:-10000} ;;
h2) N1=${N1:-5000} N2=${N2:-25000} ;;
*) echo "PROTOCOL is h1 or h2" >&2; exit 2 ;;
esac
ACCESS_LOG=${ACCESS_LOG:-on}
RATE_LIMIT=${RATE_LIMIT:-off}
UPSTREAM_BIN=${UPSTREAM_BIN:-target/release/examples/bench_upstream}
[ $# -ge 1 ] || { echo "usage: $0 BINARY [BINARY ...]" >&2; exit 2; }

tmp=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

if [ "$PROTOCOL" = h2 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=bench.test \
        -addext subjectAltName=DNS:bench.test 2>"$tmp/openssl.txt" \
        || { cat "$tmp/openssl.txt" >&2; exit 1; }
fi

upstream_port=$(free_port)
"$UPSTREAM_BIN" "127.0.0.1:$upstream_port" >/dev/null &
pids+=($!)
wait_port "$upstream_port"

# Prints the instructions the proxy executed while serving $2 requests.
count() {
    local binary=$1 requests=$2 port
    port=$(free_port)
    cat >"$tmp/config.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$port"
log_level = "warn"
worker_threads = 1
$([ "$ACCESS_LOG" = off ] || echo "access_log = \"$tmp/access.log\"")
[server.tls]
$(if [ "$PROTOCOL" = h2 ]; then
    printf 'mode = "manual"\n[[server.tls.certs]]\nhosts = ["bench.test"]\n'
    printf 'cert = "%s"\nkey = "%s"\n' "$tmp/cert.pem" "$tmp/key.pem"
else
    echo 'mode = "off"'
fi)
[rate_limit]
$(if [ "$RATE_LIMIT" = on ]; then
    printf 'requests_per_second = 1000000\nburst = 1000000\n'
else
    echo 'enabled = false'
fi)
[[sites]]
host = "bench.test"
upstream = "http://127.0.0.1:$upstream_port"
EOF
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \
        "$binary" --config "$tmp/config.toml" >/dev/null 2>"$tmp/valgrind.txt" &
    local pid=$!
    wait_port "$port"
    if [ "$PROTOCOL" = h2 ]; then
        h2load -n "$requests" -c "${CONNS:-16}" -m 10 --connect-to="127.0.0.1:$port" \
            https://bench.test/ >"$tmp/h2load.txt"
    else
        h2load --h1 -n "$requests" -c "${CONNS:-16}" -H ':authority: bench.test' \
            "http://127.0.0.1:$port/" >"$tmp/h2load.txt"
    fi
    grep -q "$requests succeeded" "$tmp/h2load.txt" \
        || { cat "$tmp/h2load.txt" >&2; exit 1; }
    kill -TERM "$pid"
    wait "$pid" || true
    sed -n 's/.*I *refs: *//p' "$tmp/valgrind.txt" | tr -d ,
}

printf '%-40s %14s\n' binary instr/request
for binary in "$@"; do
    low=$(count "$binary" "$N1")
    high=$(count "$binary" "$N2")
    printf '%-40s %14d\n' "$binary" $(((high - low) / (N2 - N1)))
done
