#!/usr/bin/env python3
"""The benchmark driver behind bench/run.sh: reverse-proxy, nginx and HAProxy
side by side on one machine, configured alike, measured interleaved.

Every peer runs pinned to CPU 0 (one worker each); the upstream and the load
generators run on CPU 1. Each case runs once per peer per round, the peer
order rotating between rounds, and the table reports the median of the
rounds with ratios to nginx, then each round's ratios (paired). See
docs/performance.md for what each row means and how the peers are
configured.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field, replace

from stall_watch import TICK_MS, steal_ticks

SERVER_CPU = "0"
CLIENT_CPU = "1"
HOST = "bench.test"
# Requests per second and burst of a rate limit that no load here reaches.
UNREACHED_LIMIT = (1000000, 1000000)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

TLS_NA = "n/a (TLS not available in this build)"
RL_NA = "n/a (rate limiter not available in this build)"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nofile_limit():
    """What this process (and so every peer it starts) may open."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def haproxy_maxconn():
    # HAProxy reserves two descriptors per connection and will not start if
    # the limit cannot hold them.
    return (nofile_limit() - 200) // 2


def default_idle_conns():
    """10 000, or what every peer can hold under this descriptor limit."""
    return max(100, min(10000, haproxy_maxconn() - 500))


def wait_port(port, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def get(port, path="/", tls=False, timeout=5.0):
    """One request; returns (status, body length)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock = raw
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(raw, server_hostname=HOST)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, len(body)


# --------------------------------------------------------------------------
# Processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    stdout_path: str


class Procs:
    """Every process this run started, so all of them are stopped at exit."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.all = []

    def start(self, name, argv, cpu, stdout_name=None):
        out_path = os.path.join(self.tmp, stdout_name or f"{name}.out")
        out = open(out_path, "ab")
        err = open(os.path.join(self.tmp, f"{name}.err"), "ab")
        popen = subprocess.Popen(
            ["taskset", "-c", cpu, *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
        out.close()
        err.close()
        proc = Proc(name, popen, out_path)
        self.all.append(proc)
        return proc

    def stop(self, proc):
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if proc in self.all:
            self.all.remove(proc)

    def stop_all(self):
        for proc in list(self.all):
            self.stop(proc)

    def stderr(self, name):
        try:
            with open(os.path.join(self.tmp, f"{name}.err"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def user_sys_ticks(pid):
    """User and system clock ticks of a process, all its threads; zero
    for one that has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]), int(fields[12])


def steal_ticks_both():
    """The steal time of the peers' CPU and the load generator's so far."""
    return steal_ticks(SERVER_CPU) + steal_ticks(CLIENT_CPU)


def cpu_ticks(pids):
    return sum(sum(user_sys_ticks(pid)) for pid in pids)


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------
# Peers


@dataclass
class Peer:
    """One server under test, reachable on a plain and/or a TLS port."""

    name: str
    plain: int | None = None
    tls: int | None = None
    procs: list = field(default_factory=list)
    # The processes that do the serving (nginx's worker, not its master).
    workers: list = field(default_factory=list)
    log_path: str | None = None
    # reverse-proxy serves TLS from a second process with its own log.
    tls_log_path: str | None = None


class Setup:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.procs = Procs(tmp)
        self.cert = os.path.join(tmp, "cert.pem")
        self.key = os.path.join(tmp, "key.pem")
        self.combined = os.path.join(tmp, "combined.pem")
        self.upstream_port = None
        self.tls_available = None
        self.rl_available = None
        # For wrk: loopback for the URL's host name (see RESOLVE_LUA).
        self.resolve_lua = os.path.join(tmp, "resolve.lua")
        with open(self.resolve_lua, "w") as f:
            f.write(RESOLVE_LUA)

    # -- shared pieces --

    def make_cert(self):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "7",
             "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=DNS:{HOST}"],
            check=True, capture_output=True,
        )
        with open(self.combined, "w") as out:
            for path in (self.cert, self.key):
                with open(path) as f:
                    out.write(f.read())

    def start_upstream(self):
        port = free_port()
        proc = self.procs.start(
            "upstream", [self.args.upstream_bin, f"127.0.0.1:{port}"], CLIENT_CPU
        )
        if not wait_port(port, proc.popen):
            sys.exit(f"upstream did not start: {self.procs.stderr('upstream')}")
        self.upstream_port = port
        return Peer("direct", plain=port, procs=[proc], workers=[proc.popen.pid])

    # -- reverse-proxy --

    def rp_config(self, port, *, tls, access_log=True, level="warn", rate_limit=None):
        lines = [
            "[server]",
            f'bind_addr = "127.0.0.1:{port}"',
            f'log_level = "{level}"',
            "worker_threads = 1",
            "max_connections = 100000",
            "idle_timeout_secs = 600",
        ]
        if access_log:
            lines.append(f'access_log = "{access_log}"')
        if tls:
            lines += [
                "[server.tls]", 'mode = "manual"',
                "[[server.tls.certs]]", f'hosts = ["{HOST}"]',
                f'cert = "{self.cert}"', f'key = "{self.key}"',
            ]
        else:
            lines += ["[server.tls]", 'mode = "off"']
        if rate_limit:
            rps, burst = rate_limit
            lines += ["[rate_limit]", "enabled = true",
                      f"requests_per_second = {rps}", f"burst = {burst}"]
        else:
            lines += ["[rate_limit]", "enabled = false"]
        lines += ["[[sites]]", f'host = "{HOST}"',
                  f'upstream = "http://127.0.0.1:{self.upstream_port}"']
        return "\n".join(lines) + "\n"

    def start_rp(self, name, *, tls=False, access_log=True, level="warn", rate_limit=None,
                 binary=None, cpu=SERVER_CPU):
        port = free_port()
        log_path = os.path.join(self.tmp, f"{name}-access.log") if access_log else None
        conf = os.path.join(self.tmp, f"{name}.toml")
        with open(conf, "w") as f:
            f.write(self.rp_config(port, tls=tls, access_log=log_path, level=level,
                                   rate_limit=rate_limit))
        proc = self.procs.start(name, [binary or self.args.rp_bin, "--config", conf], cpu)
        if not wait_port(port, proc.popen):
            err = self.procs.stderr(name)
            self.procs.stop(proc)
            if tls and "not supported by this build" in err:
                return None
            sys.exit(f"{name} did not start:\n{err}")
        peer = Peer("reverse-proxy", procs=[proc], workers=[proc.popen.pid], log_path=log_path)
        if tls:
            peer.tls = port
        else:
            peer.plain = port
        return peer

    # -- nginx --

    def start_nginx(self, name="nginx"):
        plain, tls = free_port(), free_port()
        prefix = os.path.join(self.tmp, name)
        os.makedirs(prefix, exist_ok=True)
        log_path = os.path.join(self.tmp, f"{name}-access.log")
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(
                prefix=prefix, log=log_path, upstream=self.upstream_port,
                plain=plain, tls=tls, cert=self.cert, key=self.key, nofile=nofile_limit(),
            ))
        proc = self.procs.start(name, ["nginx", "-p", prefix, "-c", conf, "-g", "daemon off;"],
                                SERVER_CPU)
        if not (wait_port(plain, proc.popen) and wait_port(tls, proc.popen)):
            sys.exit(f"nginx did not start:\n{self.procs.stderr(name)}")
        workers = []
        for _ in range(50):
            workers = children(proc.popen.pid)
            if workers:
                break
            time.sleep(0.05)
        return Peer("nginx", plain=plain, tls=tls, procs=[proc],
                    workers=workers or [proc.popen.pid], log_path=log_path)

    # -- HAProxy --

    def start_haproxy(self, name="haproxy"):
        plain, tls = free_port(), free_port()
        conf = os.path.join(self.tmp, f"{name}.cfg")
        with open(conf, "w") as f:
            f.write(HAPROXY_CONF.format(
                upstream=self.upstream_port, plain=plain, tls=tls, pem=self.combined,
                maxconn=haproxy_maxconn(),
            ))
        # HAProxy logs to stdout, which is the access log file here.
        log_name = f"{name}-access.log"
        proc = self.procs.start(name, ["haproxy", "-db", "-f", conf], SERVER_CPU,
                                stdout_name=log_name)
        if not (wait_port(plain, proc.popen) and wait_port(tls, proc.popen)):
            sys.exit(f"haproxy did not start:\n{self.procs.stderr(name)}")
        return Peer("haproxy", plain=plain, tls=tls, procs=[proc],
                    workers=[proc.popen.pid], log_path=proc.stdout_path)

    def stop(self, peer):
        for proc in peer.procs:
            self.procs.stop(proc)

    def check(self, peer):
        """Every peer must answer the same bytes before it is measured."""
        for port, tls in ((peer.plain, False), (peer.tls, True)):
            if port is None:
                continue
            for path, want in (("/", 1024), ("/10m", 10 * 1024 * 1024)):
                status, length = get(port, path, tls=tls)
                if (status, length) != (200, want):
                    sys.exit(f"{peer.name} {'https' if tls else 'http'} {path}: "
                             f"status {status}, {length} bytes (want 200, {want})")


NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {nofile}; }}
http {{
    log_format bench '$time_iso8601 INFO REQUEST client_ip=$remote_addr host=$host '
                     'method=$request_method path=$uri status=$status '
                     'upstream=$upstream_addr duration_ms=$request_time';
    access_log {log} bench;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 600s;
    keepalive_requests 1000000000;
    upstream up {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        keepalive_requests 1000000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{plain};
        listen 127.0.0.1:{tls} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn {maxconn}
    log stdout format raw local0
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 600s
    timeout server 60s
    timeout http-keep-alive 600s
    timeout http-request 10s
frontend fe
    bind 127.0.0.1:{plain}
    bind 127.0.0.1:{tls} ssl crt {pem} alpn h2,http/1.1
    http-request capture req.hdr(host) len 64
    log-format "%t INFO REQUEST client_ip=%ci host=%[capture.req.hdr(0)] method=%HM path=%HPO status=%ST upstream=%si:%sp duration_ms=%Ta"
    option forwardfor
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Real-IP %[src]
    default_backend be
backend be
    http-reuse always
    server up 127.0.0.1:{upstream}
"""

# wrk resolves the URL's host itself; this points it at loopback while the
# URL keeps bench.test, so SNI and Host name the configured site.
RESOLVE_LUA = """\
function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


# --------------------------------------------------------------------------
# Load generators

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_wrk(out):
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    r["rps"] = float(m.group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    if m:
        r["bps"] = float(m.group(1)) * SIZES[m.group(2)]
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            r[key] = float(m.group(1)) * UNITS[m.group(2)]
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    r["errors"] = errors
    return r


def parse_h2load(out):
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not m:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    r = {"rps": float(m.group(1))}
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, (\d+) errored", out)
    r["errors"] = int(m.group(1)) + int(m.group(2)) if m else 0
    m = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if m:
        r["errors"] += sum(int(x) for x in m.groups())
    return r


# The peers that are reverse-proxy builds: their TLS listener is a
# separate instance, with its own worker process.
RP_BUILDS = ("reverse-proxy", "rp-baseline")


@dataclass
class Case:
    key: str
    label: str
    tool: str  # wrk | h2load | idle
    tls: bool = False
    conns: int = 64
    path: str = "/"
    close: bool = False
    metrics: tuple = ("rps", "p50", "p99", "cpu", "per_cpu")
    peers: tuple = ("reverse-proxy", "nginx", "haproxy")


# A measurement during which the load generator's CPU stood still this long
# at once, or the peer's lost this long to the hypervisor, is taken again
# (see stall_watch.py), up to MEASURE_ATTEMPTS times in all. Waiting for
# its turn on the busy CPU, the watcher sees gaps mostly under 20 ms; the
# pauses it is there for last about 100.
STALL_MS = 25.0
MEASURE_ATTEMPTS = 3
STALL_WATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stall_watch.py")


def run_load(setup, case, peer, duration):
    """One measurement of `case` against `peer`, made again when the load
    generator's CPU stood still during it or the peer's was taken by the
    hypervisor: `retaken` counts the ones thrown away, `stall_ms` is the
    longest such pause during the one kept."""
    for attempt in range(MEASURE_ATTEMPTS):
        watch = subprocess.Popen(["taskset", "-c", CLIENT_CPU, sys.executable, STALL_WATCH,
                                  SERVER_CPU], stdout=subprocess.PIPE, text=True)
        try:
            if watch.stdout.readline() != "ready\n":
                raise RuntimeError(f"{STALL_WATCH} did not start")
            result = measure(setup, case, peer, duration)
        finally:
            watch.terminate()
            try:
                out, _ = watch.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                watch.kill()
                out, _ = watch.communicate()
        gap, stolen = (float(x) for x in out.split())
        stall = max(gap, stolen)
        if stall < STALL_MS:
            break
        log(f"  {peer.name} {case.key}: CPU {CLIENT_CPU} stood still for {gap:.0f} ms, "
            f"CPU {SERVER_CPU} lost {stolen:.0f} ms to the hypervisor; "
            + ("measuring again" if attempt + 1 < MEASURE_ATTEMPTS else "keeping this one"))
    result["retaken"] = attempt
    result["stall_ms"] = stall
    return result


def measure(setup, case, peer, duration):
    port = peer.tls if case.tls else peer.plain
    scheme = "https" if case.tls else "http"
    url = f"{scheme}://{HOST}:{port}{case.path}"
    if case.tool == "wrk":
        argv = ["wrk", "-t1", f"-c{case.conns}", f"-d{duration}s", "--latency",
                "-s", setup.resolve_lua, url]
        if case.close:
            argv[1:1] = ["-H", "Connection: close"]
        parse = parse_wrk
    else:
        argv = ["h2load", "-t1", f"-c{case.conns}", "-m10", f"-D{duration}",
                "--warm-up-time=1", f"--connect-to=127.0.0.1:{port}", url]
        parse = parse_h2load
    before = cpu_ticks(peer.workers)
    stolen_before = steal_ticks_both()
    started = time.monotonic()
    done = subprocess.run(["taskset", "-c", CLIENT_CPU, *argv],
                          capture_output=True, text=True, timeout=duration + 60)
    elapsed = time.monotonic() - started
    used = (cpu_ticks(peer.workers) - before) / CLK_TCK
    result = parse(done.stdout + done.stderr)
    # h2load's warm-up second is outside its figures but inside `elapsed`.
    result["cpu"] = 100.0 * used / elapsed
    # Pauses too short for a retake still move p99: kept, so that rounds
    # whose p99s differ can be compared with what the hypervisor took
    # (over the load generator's whole run, h2load's warm-up included).
    result["stolen_ms"] = (steal_ticks_both() - stolen_before) * TICK_MS
    if result.get("errors"):
        log(f"  warning: {peer.name} {case.key}: {result['errors']} errors")
    return result


def idle_rss(setup, peer, tls, n):
    port = peer.tls if tls else peer.plain
    for _ in range(20):
        get(port, tls=tls)
    time.sleep(0.5)
    before = rss_bytes(peer.workers)
    argv = ["taskset", "-c", CLIENT_CPU, sys.executable, setup.idle_script,
            "127.0.0.1", str(port), str(n)] + (["--tls"] if tls else [])
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = 0
        for line in client.stdout:
            if line.startswith("FAILED"):
                log(f"  warning: {peer.name} idle: {line.strip()}")
            if line.startswith("READY"):
                ready = int(line.split()[1])
                break
        time.sleep(1.0)
        after = rss_bytes(peer.workers)
    finally:
        client.stdin.close()
        client.wait(60)
    if ready < n * 0.99:
        log(f"  warning: {peer.name} idle: only {ready} of {n} connections opened")
    return {"kb_per_conn": (after - before) / max(ready, 1) / 1024, "open": ready}


# --------------------------------------------------------------------------
# The run


def build_cases(args):
    cases = [
        Case("a64", "(a) HTTP/1.1 keep-alive 1 KiB, 64 conns", "wrk", conns=64,
             peers=("direct", "reverse-proxy", "nginx", "haproxy")),
        Case("a256", "(a) HTTP/1.1 keep-alive 1 KiB, 256 conns", "wrk", conns=256,
             peers=("direct", "reverse-proxy", "nginx", "haproxy")),
        Case("b64", "(b) HTTPS HTTP/1.1 1 KiB, 64 conns", "wrk", tls=True, conns=64),
        Case("b256", "(b) HTTPS HTTP/1.1 1 KiB, 256 conns", "wrk", tls=True, conns=256),
        Case("h2", "(b) HTTP/2 over TLS, 64 conns x 10 streams", "h2load", tls=True,
             conns=64, metrics=("rps", "cpu", "per_cpu")),
        Case("c", "(c) 10 MiB streaming, plain, 8 conns", "wrk", conns=8, path="/10m",
             metrics=("gbps", "cpu", "gb_per_cpu"), peers=("direct", "reverse-proxy", "nginx", "haproxy")),
        Case("ctls", "(c) 10 MiB streaming, TLS, 8 conns", "wrk", tls=True, conns=8,
             path="/10m", metrics=("gbps", "cpu", "gb_per_cpu")),
        Case("d", "(d) new TLS connections (full handshake), 32 conns", "wrk", tls=True,
             conns=32, close=True, metrics=("rps", "cpu", "per_cpu")),
    ]
    variants = [
        Case("f_base", "(f) reverse-proxy: access log to file (as in (a))", "wrk",
             conns=64, peers=("rp-filelog",)),
        Case("f_nolog", "(f) reverse-proxy: no access log", "wrk", conns=64,
             peers=("rp-nolog",)),
        Case("f_stdout", "(f) reverse-proxy: access log to file and stdout (log_level = info)",
             "wrk", conns=64, peers=("rp-stdout",)),
        Case("f_rl", "(f) reverse-proxy: rate limiter on, limit never reached", "wrk",
             conns=64, peers=("rp-ratelimit",)),
    ]
    only = set(args.only.split(",")) if args.only else None
    if args.baseline_bin:
        # An A/B of two builds: the load cases (plain ones unless asked),
        # each with the two builds and nginx.
        only = only or {"a64", "a256", "c"}
        ab = ("reverse-proxy", "rp-baseline", "nginx")
        return [replace(c, peers=ab) for c in cases if c.key in only]
    return [c for c in cases + variants if only is None or c.key in only]


def in_round_order(cases, rnd):
    """The cases of round `rnd`: the (f) variants rotate which goes
    first, as the peers of a case do, so that no variant is always the
    one measured right after the heavier cases."""
    variants = [c for c in cases if c.key.startswith("f_")]
    return [c for c in cases if c not in variants] + rotated(variants, rnd)


def rotated(items, rnd):
    """`items` with the one at `rnd` (modulo their number) first."""
    shift = rnd % len(items) if items else 0
    return items[shift:] + items[:shift]


def rate_limiter_works(setup):
    """The limiter is there if a 1 req/s limit turns some of 10 requests away."""
    peer = setup.start_rp("rp-probe", access_log=False, rate_limit=(1, 1))
    try:
        statuses = [get(peer.plain)[0] for _ in range(10)]
    finally:
        setup.stop(peer)
    return 429 in statuses


def median(values):
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rp-bin", default="target/release/reverse-proxy")
    parser.add_argument("--baseline-bin",
                        help="another reverse-proxy build to compare with: runs the plain "
                             "HTTP cases (or the load cases --only names), with this build "
                             "as an extra column")
    parser.add_argument("--rp-log-level", default="warn",
                        help="log_level of the main reverse-proxy instances; at the default "
                             "(warn) access lines go to the access log file only")
    parser.add_argument("--upstream-bin", default="target/release/examples/bench_upstream")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per case, one round: checks the script works")
    parser.add_argument("--rounds", type=int, help="rounds per case (median); default 5")
    parser.add_argument("--duration", type=int, help="seconds per measurement; default 8")
    parser.add_argument("--idle-conns", type=int,
                        help="connections for (e); default 10000 (less if ulimit -n is low)")
    parser.add_argument("--only", help="comma-separated case keys, e.g. a64,f_nolog,e")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: print the tables of a run saved with --json "
                             "(other options are ignored)")
    args = parser.parse_args()
    if args.render:
        print(render_saved(args))
        return
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (2 if args.quick else 8)
    idle_n = args.idle_conns or (500 if args.quick else default_idle_conns())
    want_e = not args.baseline_bin and (args.only is None or "e" in args.only.split(","))

    tmp = tempfile.mkdtemp(prefix="rp-bench.")
    setup = Setup(args, tmp)
    setup.idle_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "idle_conns.py")
    cases = build_cases(args)
    results = {}  # (case key, peer name) -> list of dicts
    notes = {"binaries": {"reverse-proxy": args.rp_bin}}
    if args.baseline_bin:
        notes["binaries"]["rp-baseline"] = args.baseline_bin
    idle = {}
    try:
        setup.make_cert()
        peers = {"direct": setup.start_upstream()}
        peers["reverse-proxy"] = setup.start_rp("rp", level=args.rp_log_level)
        rp_tls = setup.start_rp("rp-tls", tls=True)
        setup.tls_available = rp_tls is not None
        if rp_tls:
            peers["reverse-proxy"].tls = rp_tls.tls
            peers["reverse-proxy"].procs += rp_tls.procs
            peers["reverse-proxy"].tls_workers = rp_tls.workers
            peers["reverse-proxy"].tls_log_path = rp_tls.log_path
        peers["nginx"] = setup.start_nginx()
        peers["haproxy"] = setup.start_haproxy()
        if args.baseline_bin:
            base = setup.start_rp("rp-baseline", binary=args.baseline_bin,
                                  level=args.rp_log_level)
            base.name = "rp-baseline"
            base_tls = setup.start_rp("rp-baseline-tls", tls=True,
                                      binary=args.baseline_bin)
            if base_tls:
                base.tls = base_tls.tls
                base.procs += base_tls.procs
                base.tls_workers = base_tls.workers
                base.tls_log_path = base_tls.log_path
            peers["rp-baseline"] = base
        # The (f) variants are instances of their own, started alike, so
        # that none of them has served the other cases before; and only
        # when measured, so that idle instances do not share CPU 0 with
        # the other cases for nothing.
        setup.rl_available = False
        if any(c.key.startswith("f_") for c in cases):
            peers["rp-filelog"] = setup.start_rp("rp-filelog", level=args.rp_log_level)
            peers["rp-nolog"] = setup.start_rp("rp-nolog", access_log=False)
            peers["rp-stdout"] = setup.start_rp("rp-stdout", level="info")
            setup.rl_available = rate_limiter_works(setup)
            if setup.rl_available:
                peers["rp-ratelimit"] = setup.start_rp("rp-ratelimit",
                                                       rate_limit=UNREACHED_LIMIT)
        for name in ("reverse-proxy", "nginx", "haproxy"):
            setup.check(peers[name])
        log(f"peers up in {tmp}; TLS in this build: {setup.tls_available}; "
            f"rate limiter: {setup.rl_available}")

        def runnable(case, name):
            if name not in peers:
                return False
            if case.tls and peers[name].tls is None:
                return False
            return True

        def workers_for(case, name):
            peer = peers[name]
            if case.tls and name in RP_BUILDS:
                return Peer(peer.name, tls=peer.tls, workers=peer.tls_workers)
            return peer

        # Warm every listener once so the first round is not the cold one
        # (a quick run only checks that everything works).
        for case in [] if args.quick else cases:
            for name in case.peers:
                if runnable(case, name):
                    measure(setup, case, workers_for(case, name), 1)

        for rnd in range(rounds):
            for case in in_round_order(cases, rnd):
                for name in rotated(list(case.peers), rnd):
                    if not runnable(case, name):
                        continue
                    r = run_load(setup, case, workers_for(case, name), duration)
                    if case.path == "/10m":
                        r["gbps"] = r["rps"] * 10 * 1024 * 1024 / 1e9
                    if r["cpu"] > 0:
                        # What a whole core of this peer would serve: the
                        # figure that survives a machine busy with other work.
                        r["per_cpu"] = r["rps"] / (r["cpu"] / 100.0)
                        if "gbps" in r:
                            r["gb_per_cpu"] = r["gbps"] / (r["cpu"] / 100.0)
                    results.setdefault((case.key, name), []).append(r)
                    log(f"round {rnd + 1}/{rounds} {case.key:8} {name:14} "
                        + " ".join(f"{k}={v:.2f}" for k, v in r.items()
                                   if k not in ("errors", "retaken")))

        # Every instance that logs to a file, so that a log that was not
        # written shows.
        log_lines = {}
        for name, peer in peers.items():
            paths = [p for p in (peer.log_path, peer.tls_log_path) if p]
            if paths:
                log_lines[name] = 0
                for path in paths:
                    with open(path, "rb") as f:
                        log_lines[name] += sum(1 for _ in f)
        notes["access log lines"] = log_lines
        retaken, kept, stolen = {}, {}, {}
        for (_, name), rounds_of_peer in results.items():
            retaken[name] = retaken.get(name, 0) + sum(r["retaken"] for r in rounds_of_peer)
            kept[name] = kept.get(name, 0) + sum(r["stall_ms"] >= STALL_MS for r in rounds_of_peer)
            stolen.setdefault(name, []).extend(r["stolen_ms"] for r in rounds_of_peer)
        notes["measured again, a CPU stood still"] = retaken
        if any(kept.values()):
            notes["kept although a CPU stood still"] = kept
        notes["ms taken by the hypervisor from both CPUs per load measurement, median"] = {
            name: f"{statistics.median(ms):.0f}" for name, ms in stolen.items()
        }

        if want_e:
            # Fresh processes: memory freed by earlier load would otherwise
            # be reused by the idle connections and hide their cost.
            for name in list(peers):
                if name != "direct":
                    setup.stop(peers[name])
            for rnd in range(rounds):
                for tls in (False, True):
                    for name in ("reverse-proxy", "nginx", "haproxy"):
                        if tls and name == "reverse-proxy" and not setup.tls_available:
                            continue
                        if name == "reverse-proxy":
                            peer = setup.start_rp("rp-idle", tls=tls)
                        elif name == "nginx":
                            peer = setup.start_nginx("nginx-idle")
                        else:
                            peer = setup.start_haproxy("haproxy-idle")
                        try:
                            r = idle_rss(setup, peer, tls, idle_n)
                        finally:
                            setup.stop(peer)
                        idle.setdefault((tls, name), []).append(r)
                        log(f"round {rnd + 1}/{rounds} e-{'tls' if tls else 'plain':5} "
                            f"{name:14} {r['kb_per_conn']:.2f} KiB/conn ({r['open']} open)")
    finally:
        setup.procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    table = render(cases, results, idle, setup, rounds, duration, idle_n, notes)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "rounds": rounds, "duration": duration, "idle_conns": idle_n,
                "results": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
                "idle": {f"{'tls' if k[0] else 'plain'}/{k[1]}": v for k, v in idle.items()},
                "notes": notes,
            }, f, indent=1)


METRIC_NAMES = {
    "rps": "req/s", "p50": "p50 ms", "p99": "p99 ms", "cpu": "peer CPU %",
    "gbps": "GB/s", "per_cpu": "per CPU-second", "gb_per_cpu": "GB per CPU-second",
}


def fmt(value, metric):
    if value is None:
        return "–"
    if metric in ("rps", "per_cpu"):
        return f"{value:,.0f}"
    if metric == "cpu":
        return f"{value:.0f}"
    return f"{value:.2f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def render(cases, results, idle, setup, rounds, duration, idle_n, notes):
    idle_peers = {name for (_, name) in idle}
    columns = [n for n in ("direct", "reverse-proxy", "rp-baseline", "nginx", "haproxy")
               if any(n in c.peers for c in cases) or n in idle_peers]
    ratios = [(a, b) for a, b in (("reverse-proxy", "rp-baseline"), ("reverse-proxy", "nginx"),
                                  ("haproxy", "nginx")) if a in columns and b in columns]
    head = ["case", "metric"] + columns + [f"{a} / {b}".replace("reverse-proxy", "rp")
                                           for a, b in ratios]
    rows = []
    variants = [c for c in cases if c.key.startswith("f_")]
    for case in cases:
        if case in variants:
            continue
        for metric in case.metrics:
            cell = {}
            for name in columns:
                vals = [r.get(metric) for r in results.get((case.key, name), [])]
                cell[name] = median([v for v in vals if v is not None])
            texts = []
            for name in columns:
                if name not in case.peers:
                    texts.append("")
                elif case.tls and name == "reverse-proxy" and not setup.tls_available:
                    texts.append(TLS_NA)
                else:
                    texts.append(fmt(cell[name], metric))
            rows.append([case.label, METRIC_NAMES[metric]] + texts
                        + [ratio(cell.get(a), cell.get(b)) for a, b in ratios])
    for tls in (False, True):
        label = f"(e) idle keep-alive memory, {idle_n} conns, {'TLS' if tls else 'plain'}"
        cell = {n: median([r["kb_per_conn"] for r in idle.get((tls, n), [])])
                for n in ("reverse-proxy", "nginx", "haproxy")}
        if not any(v is not None for v in cell.values()):
            continue
        texts = []
        for name in columns:
            if name == "reverse-proxy" and tls and not setup.tls_available:
                texts.append(TLS_NA)
            else:
                texts.append(fmt(cell[name], "kb") if name in cell else "")
        rows.append([label, "KiB/conn"] + texts
                    + [ratio(cell.get(a), cell.get(b)) for a, b in ratios])
    out = [f"rounds: {rounds} (median), {duration} s per measurement; "
           f"peers on CPU {SERVER_CPU}, upstream and load generator on CPU {CLIENT_CPU}", ""]
    out += markdown_table(head, rows)
    # Goal (b) is judged against HAProxy too.
    pairs = ratios + [(a, b) for a, b in (("reverse-proxy", "haproxy"),)
                      if a in columns and b in columns]
    paired = paired_rows(cases, variants, results, pairs)
    if paired:
        out += ["", "Paired: each round's ratio of two peers measured in that round (a few "
                "measurements apart at most), median over the rounds; `ahead` counts the "
                "rounds in which the first peer was better.", ""]
        out += markdown_table(
            ["case", "metric"] + [f"{a} / {b}".replace("reverse-proxy", "rp") for a, b in pairs]
            + [f"{a} ahead of {b}".replace("reverse-proxy", "rp") for a, b in pairs], paired)
    if variants:
        base = median([r["rps"] for r in results.get(("f_base", "rp-filelog"), [])])
        vrows = []
        for case in variants:
            name = case.peers[0]
            vals = results.get((case.key, name), [])
            if case.key == "f_rl" and not setup.rl_available:
                vrows.append([case.label, RL_NA, "", "", "", ""])
                continue
            rps = median([r["rps"] for r in vals])
            p99 = median([r["p99"] for r in vals if "p99" in r])
            cpu = median([r["cpu"] for r in vals])
            per_cpu = median([r["per_cpu"] for r in vals if "per_cpu" in r])
            vrows.append([case.label, fmt(rps, "rps"), fmt(p99, "p99"), fmt(cpu, "cpu"),
                          fmt(per_cpu, "per_cpu"), ratio(rps, base)])
        out += [""] + markdown_table(
            ["variant (HTTP/1.1, 64 conns)", "req/s", "p99 ms", "CPU %", "per CPU-second",
             "req/s ratio to file log"], vrows)
    for key, value in notes.items():
        out.append("")
        out.append(f"{key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
    return "\n".join(out)


def render_saved(args):
    """The tables of a run saved with `--json`, as the current `render`
    prints them."""
    with open(args.render) as f:
        saved = json.load(f)
    results = {tuple(k.split("/", 1)): v for k, v in saved["results"].items()}
    if ("f_base", "reverse-proxy") in results:
        # Runs before the (f) variants had instances of their own measured
        # the file-log variant on the main instance.
        results[("f_base", "rp-filelog")] = results.pop(("f_base", "reverse-proxy"))
    idle = {(k.split("/", 1)[0] == "tls", k.split("/", 1)[1]): v
            for k, v in saved["idle"].items()}
    keys = {key for key, _ in results}
    if idle:
        keys.add("e")
    if keys & {"f_base", "f_nolog", "f_stdout"}:
        # Kept so that a build without the limiter shows its "n/a" row.
        keys.add("f_rl")
    args.only = ",".join(keys)
    args.baseline_bin = any(name == "rp-baseline" for _, name in results)
    tls_keys = {c.key for c in build_cases(types.SimpleNamespace(only=None, baseline_bin=None))
                if c.tls}
    setup = types.SimpleNamespace(
        tls_available=any(key in tls_keys and name == "reverse-proxy" for key, name in results)
        or (True, "reverse-proxy") in idle,
        rl_available=("f_rl", "rp-ratelimit") in results,
    )
    return render(build_cases(args), results, idle, setup, saved["rounds"], saved["duration"],
                  saved["idle_conns"], saved["notes"])


# Metrics compared round by round; for latency lower is better.
PAIRED_METRICS = ("rps", "gbps", "p99", "per_cpu", "gb_per_cpu")


def paired_rows(cases, variants, results, ratios):
    """The ratios of each round, whose peers ran a few measurements apart
    at most, rather than of medians over rounds minutes apart: on a
    machine whose speed drifts, the pairs cancel most of the drift."""
    rows = []
    for case in cases:
        if case in variants:
            continue
        for metric in case.metrics:
            if metric not in PAIRED_METRICS:
                continue
            medians, ahead = [], []
            for a, b in ratios:
                pairs = [(ra.get(metric), rb.get(metric)) for ra, rb in
                         zip(results.get((case.key, a), []), results.get((case.key, b), []))]
                pairs = [(x, y) for x, y in pairs if x is not None and y]
                if not pairs:
                    medians.append("–")
                    ahead.append("–")
                    continue
                medians.append(f"{median([x / y for x, y in pairs]):.2f}")
                better = sum(1 for x, y in pairs if (x < y if metric == "p99" else x > y))
                ahead.append(f"{better}/{len(pairs)}")
            rows.append([case.label, METRIC_NAMES[metric]] + medians + ahead)
    return rows


def markdown_table(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in rows]


if __name__ == "__main__":
    main()
