//! Proxying: what passes through unchanged (bodies, statuses, bytes) and
//! what does not (hop-by-hop headers), with big bodies in flat memory.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{
    Backend, Etcd, GZIP_HELLO, Pattern, RawBackend, Router, peak_rss_kib, raw_exchange, request,
};

const D: &str = "/domains";
const HOST: &str = "proxy.example.com";

fn setup() -> (Etcd, Backend, Router) {
    let etcd = Etcd::start();
    let b = Backend::start("pb");
    etcd.put(&format!("{D}/{HOST}/r"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends(HOST, &["pb"]);
    (etcd, b, router)
}

#[test]
fn statuses_pass_through_and_redirects_are_not_followed() {
    let (_etcd, _b, router) = setup();
    for code in [201, 204, 304, 404, 418, 500, 503] {
        let r = router.get(HOST, &format!("/status/{code}"));
        assert_eq!(r.status, code);
        assert_eq!(
            r.backend.as_deref(),
            Some("pb"),
            "status {code} came from the backend"
        );
    }
    let r = router.get(HOST, "/redirect");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location").as_deref(), Some("/elsewhere"));
}

#[test]
fn encoded_bodies_arrive_byte_for_byte_and_hop_by_hop_headers_are_dropped() {
    let (_etcd, b, router) = setup();
    let r = request(
        &router.addr(),
        "GET",
        HOST,
        "/gzip",
        &[
            ("Accept-Encoding", "gzip"),
            ("Connection", "X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, GZIP_HELLO);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let seen = b.last_seen();
    assert_eq!(seen.header("accept-encoding").as_deref(), Some("gzip"));
    for h in [
        "x-drop-me",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
    ] {
        assert_eq!(seen.header(h), None, "{h} was forwarded");
    }
}

#[test]
fn backend_hop_by_hop_headers_do_not_reach_the_client() {
    let etcd = Etcd::start();
    let raw = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\n\
          Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\
          Content-Length: 2\r\n\r\nok",
    );
    etcd.put(&format!("{D}/raw.example.com/r"), &raw.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("route.add", |_| true);
    let r = router.get("raw.example.com", "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("x-kept").as_deref(), Some("yes"));
    for h in ["x-hop", "keep-alive", "proxy-connection"] {
        assert_eq!(r.header(h), None, "{h} reached the client");
    }
}

#[test]
fn head_requests_and_methods_pass_through() {
    let (_etcd, b, router) = setup();
    let r = request(&router.addr(), "HEAD", HOST, "/bytes/1000", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length").as_deref(), Some("1000"));
    for method in ["DELETE", "OPTIONS", "PATCH", "PROPFIND"] {
        let r = request(&router.addr(), method, HOST, "/m", &[], Some(b"xyz"));
        assert_eq!(r.status, 200, "{method}");
        let seen = b.last_seen();
        assert_eq!(seen.method, method);
        assert_eq!(seen.body_len, 3, "{method}");
    }
}

#[test]
fn chunked_bodies_stream_both_ways() {
    let (_etcd, b, router) = setup();
    // A chunked download of unknown length.
    let r = router.get(HOST, "/chunked/300000");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 300_000);
    // A chunked upload, written by hand.
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    for _ in 0..10 {
        write!(s, "1000\r\n").unwrap();
        s.write_all(&[b'a'; 0x1000]).unwrap();
        write!(s, "\r\n").unwrap();
    }
    write!(s, "0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("40960"), "{out}");
    assert_eq!(b.last_seen().body_len, 40_960);
}

#[test]
fn expect_100_continue_is_answered() {
    let (_etcd, b, router) = setup();
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "PUT /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"));
    s.write_all(b"hello").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains("200 OK"), "{out}");
    assert_eq!(b.last_seen().body_len, 5);
    assert_eq!(b.last_seen().header("expect"), None);
}

/// 256 MiB each way must not grow the router's memory: bodies stream.
#[test]
fn big_bodies_stream_in_flat_memory() {
    let (_etcd, b, router) = setup();
    const SIZE: u64 = 256 * 1024 * 1024;
    let base = peak_rss_kib(router.pid());

    // Download.
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "GET /bytes/{SIZE} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            // A signal to the test process (rare, seen once) is no failure.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("download: {e}"),
        }
    }
    assert!(total > SIZE, "got {total} bytes");

    // Upload with a known length.
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    std::io::copy(&mut Pattern { left: SIZE }, &mut s).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.ends_with(&SIZE.to_string()), "{out}");
    assert_eq!(b.last_seen().body_len, SIZE);

    let peak = peak_rss_kib(router.pid());
    assert!(
        peak < base + 64 * 1024,
        "peak RSS grew from {base} KiB to {peak} KiB while moving 2 x 256 MiB"
    );
}

#[test]
fn backend_connections_are_reused() {
    let etcd = Etcd::start();
    let b = Backend::start("pooled");
    let counter = common::Forwarder::start(b.addr);
    etcd.put(&format!("{D}/pool.example.com/r"), &counter.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("pool.example.com", &["pooled"]);
    let before = counter.accepted.load(std::sync::atomic::Ordering::SeqCst);
    for path in [
        "/",
        "/bytes/100000",
        "/chunked/1000",
        "/status/204",
        "/status/304",
        "/",
    ] {
        let r = router.get("pool.example.com", path);
        assert!(r.status < 400, "{path}: {}", r.status);
        let r = request(&router.addr(), "HEAD", "pool.example.com", path, &[], None);
        assert!(r.status < 400, "HEAD {path}: {}", r.status);
    }
    let opened = counter.accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        opened <= 1,
        "12 sequential requests opened {opened} backend connections"
    );
}

#[test]
fn large_known_lengths_keep_their_framing() {
    let (_etcd, _b, router) = setup();
    let out = raw_exchange(
        &router.addr(),
        format!("HEAD /bytes/5000000 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(10),
    );
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("content-length: 5000000"), "{out}");
    assert!(!lower.contains("transfer-encoding"), "{out}");
}
