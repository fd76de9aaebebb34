#!/usr/bin/env python3
"""What idle keep-alive connections cost the router: starts the binary given
on a free loopback port (no etcd needed: every request is answered 503 and
the connection kept), opens N connections, sends one request on each and
reads its answer, then reports the router's RSS and thread count from
/proc before and while they are held open. Stops the router by PID.

    scripts/idle-connections.py target/release/httprouter [N=10000]
"""
import os
import resource
import signal
import socket
import subprocess
import sys
import time


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_answer(conn):
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = conn.recv(4096)
        if not chunk:
            raise RuntimeError(f"closed after {got!r}")
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(4096)
    return head.split(b" ", 2)[1]


def main():
    binary = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    router = subprocess.Popen(
        [binary, "--listen", f"127.0.0.1:{port}", "--etcdurl", "http://127.0.0.1:1",
         "--logfile", "/dev/null", "--max-connections", str(count + 16)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held = []
    try:
        request = b"GET / HTTP/1.1\r\nHost: idle.invalid\r\n\r\n"
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(request)
                    read_answer(c)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(0.5)
        rss_before = status(router.pid, "VmRSS")
        threads_before = status(router.pid, "Threads")
        for _ in range(count):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(request)
            read_answer(c)
            held.append(c)
        time.sleep(0.5)
        rss = status(router.pid, "VmRSS")
        threads = status(router.pid, "Threads")
        grown = rss - rss_before
        print(f"{binary}: {count} idle keep-alive connections: "
              f"RSS {rss_before} -> {rss} KiB (+{grown / 1024:.1f} MiB, "
              f"{grown / count:.2f} KiB each), threads {threads_before} -> {threads}")
    finally:
        for c in held:
            c.close()
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(timeout=15)
        except subprocess.TimeoutExpired:
            router.kill()


if __name__ == "__main__":
    main()
