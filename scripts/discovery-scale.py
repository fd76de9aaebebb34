#!/usr/bin/env python3
"""Discovery at scale, against a real etcd (v3, no v2) on loopback.

    [API=v2] scripts/discovery-scale.py [ROUTER_BINARY] [DOMAINS]

Loads DOMAINS (default 10,000) domains of 3 routes each, starts the router
and reports:
  - the time from start to the first request served for the last domain,
  - the router's peak RSS (VmHWM) after start-up and after everything below,
  - write -> served latency of single changes (median, p99 of 200 new
    domains) at this size, the measure of a change costing the changed
    domain, not the table,
  - a burst of 5,000 changes written within about a second: how long until
    the last one is served, and whether any resync happened,
  - whether any log line was dropped and how many route events were logged.
API=v2 writes through v2 instead (etcd started with --enable-v2; loading is
slower, one PUT per key). Needs etcd (Debian etcd-server) and python3. Every
process is stopped on exit.
"""

import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROUTER = sys.argv[1] if len(sys.argv) > 1 else "target/release/httprouter"
DOMAINS = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
API = os.environ.get("API", "v3")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(s):
    return base64.b64encode(s.encode()).decode()


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def put_many(etcd_url, pairs):
    """Writes (key, value) pairs: v3 transactions of 120, or v2 PUTs on 8 threads."""
    if API == "v3":
        for i in range(0, len(pairs), 120):
            post(f"{etcd_url}/v3/kv/txn", {"success": [
                {"request_put": {"key": b64(k), "value": b64(v)}} for k, v in pairs[i:i + 120]]})
        return
    def worker(part):
        for k, v in part:
            put_one(etcd_url, k, v)
    threads = [threading.Thread(target=worker, args=(pairs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def put_one(etcd_url, key, value):
    if API == "v3":
        post(f"{etcd_url}/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return
    data = urllib.parse.urlencode({"value": value}).encode()
    req = urllib.request.Request(f"{etcd_url}/v2/keys{key}", data, method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def get_status(port, host):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = s.recv(4096)
        return data, int(data.split(b" ", 2)[1]) if data else 0
    finally:
        s.close()


def backend(port):
    """A backend that answers its port, for every request."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)

    def serve():
        while True:
            c, _ = srv.accept()
            try:
                c.recv(65536)
                body = str(port).encode()
                c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            c.close()

    threading.Thread(target=serve, daemon=True).start()


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def served_by(port, host, want):
    data, status = get_status(port, host)
    return status == 200 and data.endswith(str(want).encode())


def main():
    tmp = tempfile.mkdtemp(prefix="httprouter-scale-")
    try:
        cport, pport, rport, aport = free_port(), free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{cport}"
        PROCS.append(subprocess.Popen(
            ["etcd", "--name=s", f"--data-dir={tmp}/etcd", f"--listen-client-urls={etcd_url}",
             f"--advertise-client-urls={etcd_url}", f"--listen-peer-urls=http://127.0.0.1:{pport}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{pport}",
             f"--initial-cluster=s=http://127.0.0.1:{pport}", "--log-level=error",
             "--quota-backend-bytes=8589934592", f"--enable-v2={'true' if API == 'v2' else 'false'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{etcd_url}/version", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        b1, b2 = free_port(), free_port()
        backend(b1)
        backend(b2)
        keys = [f"/domains/d{d}.example.com/r{r}" for d in range(DOMAINS) for r in range(3)]
        put_many(etcd_url, [(k, f"http://127.0.0.1:{b1}") for k in keys])
        log = f"{tmp}/router.log"
        started = time.monotonic()
        router = subprocess.Popen([ROUTER, "--listen", f"127.0.0.1:{rport}", "--etcdurl", etcd_url,
                                   "--logfile", log, "--admin", f"127.0.0.1:{aport}"])
        PROCS.append(router)
        last = f"d{DOMAINS - 1}.example.com"
        while True:
            try:
                if served_by(rport, last, b1):
                    break
            except OSError:
                pass
            time.sleep(0.005)
        first = time.monotonic() - started
        rss_start = vm_hwm(router.pid)
        print(f"{API}, {DOMAINS} domains x 3 routes: first request for the last domain served {first:.2f} s after start; "
              f"peak RSS {rss_start:.1f} MiB")

        # A new domain each time: one request tells whether it is served.
        lat = []
        for i in range(200):
            host = f"lat{i}.example.com"
            put_one(etcd_url, f"/domains/{host}/r", f"http://127.0.0.1:{b2}")
            t_written = time.monotonic()
            while not served_by(rport, host, b2):
                pass
            lat.append((time.monotonic() - t_written) * 1000)
        lat.sort()
        print(f"write -> served at {DOMAINS} domains: median {statistics.median(lat):.2f} ms, "
              f"p99 {lat[int(len(lat) * 0.99) - 1]:.2f} ms (200 new domains; one polling request is about 0.1 ms)")

        t0 = time.monotonic()
        burst = [f"/domains/burst{i}.example.com/r" for i in range(5000)]
        put_many(etcd_url, [(k, f"http://127.0.0.1:{b2}") for k in burst])
        written = time.monotonic() - t0
        while not served_by(rport, "burst4999.example.com", b2):
            time.sleep(0.001)
        done = time.monotonic() - t0
        time.sleep(1)
        rss_end = vm_hwm(router.pid)
        events = [json.loads(l) for l in open(log)]
        names = {}
        for e in events:
            names[e["event"]] = names.get(e["event"], 0) + 1
        listed = sum(len(e.get("items", [])) for e in events if e["event"] == "route.bulk")
        print(f"burst of 5,000 changes written in {written:.2f} s: the last served {done:.2f} s after the first write; "
              f"resyncs: {names.get('etcd.resync', 0)}")
        print(f"peak RSS after all of it: {rss_end:.1f} MiB; log.dropped lines: {names.get('log.dropped', 0)}; "
              f"route events: {names.get('route.add', 0)} route.add, {names.get('route.change', 0)} route.change, "
              f"{names.get('route.bulk', 0)} route.bulk lines listing {listed}")

        # The admin side over the whole table: each page once, then 6 of
        # the table-wide ones at once (the most that may wait for their
        # turn; they are rendered and sent one at a time).
        for path in ["/healthz", "/metrics", "/routes", "/"]:
            t0 = time.monotonic()
            body = urllib.request.urlopen(f"http://127.0.0.1:{aport}{path}", timeout=60).read()
            print(f"admin {path}: {len(body) / 1024:.0f} KiB in {(time.monotonic() - t0) * 1000:.0f} ms")
        before = vm_hwm(router.pid)
        def fetch(path):
            urllib.request.urlopen(f"http://127.0.0.1:{aport}{path}", timeout=60).read()
        t0 = time.monotonic()
        threads = [threading.Thread(target=fetch, args=(p,)) for p in ["/routes", "/metrics"] * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"admin: 6 table-wide pages at once in {(time.monotonic() - t0) * 1000:.0f} ms; "
              f"peak RSS {before:.1f} -> {vm_hwm(router.pid):.1f} MiB")
    finally:
        for p in PROCS:
            p.send_signal(signal.SIGTERM)
        for p in PROCS:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
