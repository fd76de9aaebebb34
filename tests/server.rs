//! The server front against clients and backends that misbehave: framing,
//! keep-alive and pipelining, limits, truncated bodies. After each, the
//! router must still serve.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{Backend, Etcd, Pattern, RawBackend, Router, peak_rss_kib, raw_exchange};

const D: &str = "/domains";
const HOST: &str = "front.example.com";
const T: Duration = Duration::from_secs(10);

fn setup() -> (Etcd, Backend, Router) {
    let etcd = Etcd::start();
    let b = Backend::start("fb");
    etcd.put(&format!("{D}/{HOST}/r"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends(HOST, &["fb"]);
    (etcd, b, router)
}

fn still_serving(router: &Router) {
    assert_eq!(
        router.get(HOST, "/").status,
        200,
        "the router stopped serving"
    );
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let (_etcd, _b, router) = setup();
    let mut pipelined = String::new();
    for path in ["/status/201", "/status/202", "/status/203"] {
        pipelined.push_str(&format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n"));
    }
    pipelined.push_str(&format!(
        "GET /status/204 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    ));
    let out = raw_exchange(&router.addr(), pipelined.as_bytes(), T);
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| out.get(i + 9..i + 12))
        .collect();
    assert_eq!(statuses, ["201", "202", "203", "204"], "{out}");
}

#[test]
fn oversized_and_malformed_heads_get_their_status() {
    let (_etcd, _b, router) = setup();
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
        "a".repeat(10_000)
    );
    assert!(raw_exchange(&router.addr(), long_target.as_bytes(), T).starts_with("HTTP/1.1 414"));
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    assert!(raw_exchange(&router.addr(), big_header.as_bytes(), T).starts_with("HTTP/1.1 431"));
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n{many}\r\n");
    assert!(raw_exchange(&router.addr(), many.as_bytes(), T).starts_with("HTTP/1.1 431"));
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"G E T / HTTP/1.1\r\n\r\n",
    ] {
        let out = raw_exchange(&router.addr(), garbage, T);
        assert!(out.starts_with("HTTP/1.1 400"), "{garbage:?}: {out}");
    }
    router.wait_event("router.request", |e| {
        e["status"] == 431 && e["error"].is_string()
    });
    still_serving(&router);
}

#[test]
fn a_huge_claimed_body_costs_nothing_and_the_router_lives() {
    let (_etcd, b, router) = setup();
    // A terabyte claimed for a host without routes: answered, connection
    // closed, nothing allocated for the claim.
    let out = raw_exchange(
        &router.addr(),
        b"POST / HTTP/1.1\r\nHost: nobody.example.com\r\nContent-Length: 1099511627776\r\n\r\nabc",
        T,
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    // A client that claims 5000 bytes, sends 100 and half-closes: the
    // request is refused and the backend's answer discarded.
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5000\r\n\r\n"
    )
    .unwrap();
    s.write_all(&[b'x'; 100]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    router.wait_event("router.request", |e| {
        e["error"] == "request body incomplete"
    });
    assert!(b.seen.lock().unwrap().iter().all(|s| s.body_len != 5000));
    still_serving(&router);
    assert!(peak_rss_kib(router.pid()) < 200 * 1024);
}

#[test]
fn expect_continue_is_not_invited_when_the_answer_is_already_known() {
    let (_etcd, _b, router) = setup();
    let out = raw_exchange(
        &router.addr(),
        b"PUT / HTTP/1.1\r\nHost: nobody.example.com\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n",
        T,
    );
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(!out.contains("100 Continue"), "{out}");
}

#[test]
fn a_backend_dying_mid_body_never_looks_like_a_complete_answer() {
    let etcd = Etcd::start();
    let sized = RawBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b");
    let chunked =
        RawBackend::start(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    etcd.put(&format!("{D}/sized.example.com/r"), &sized.url());
    etcd.put(&format!("{D}/chunked.example.com/r"), &chunked.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("route.add", |e| e["domain"] == "sized.example.com");
    router.wait_event("route.add", |e| e["domain"] == "chunked.example.com");
    // Known length: fewer bytes than promised, then the connection closes.
    let out = raw_exchange(
        &router.addr(),
        b"GET / HTTP/1.1\r\nHost: sized.example.com\r\n\r\n",
        T,
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("only ten b"), "{out:?}");
    // Chunked: no terminating chunk, then the connection closes.
    let out = raw_exchange(
        &router.addr(),
        b"GET / HTTP/1.1\r\nHost: chunked.example.com\r\n\r\n",
        T,
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("hello"), "{out:?}");
    assert!(
        !out.ends_with("0\r\n\r\n"),
        "truncated body looks complete: {out:?}"
    );
    router.wait_event("router.request", |e| {
        e["host"] == "chunked.example.com"
            && e["error"]
                .as_str()
                .is_some_and(|s| s.contains("backend body"))
    });
}

#[test]
fn http10_clients_get_streamed_bodies_in_flat_memory() {
    let (_etcd, _b, router) = setup();
    const SIZE: u64 = 128 * 1024 * 1024;
    let base = peak_rss_kib(router.pid());
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /chunked/{SIZE} HTTP/1.0\r\nHost: {HOST}\r\nTE: identity\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1);
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    let n = std::io::copy(&mut s, &mut std::io::sink()).unwrap();
    assert_eq!(n, SIZE);
    let peak = peak_rss_kib(router.pid());
    assert!(
        peak < base + 64 * 1024,
        "peak RSS grew from {base} KiB to {peak} KiB"
    );
}

#[test]
fn a_body_partly_sent_to_a_failing_backend_is_never_replayed() {
    let etcd = Etcd::start();
    // Reads the request head, then closes without an answer.
    let dropper = RawBackend::start(b"");
    let good = Backend::start("good");
    etcd.put(&format!("{D}/replay.example.com/a"), &dropper.url());
    etcd.put(&format!("{D}/replay.example.com/b"), &good.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("route.add", |e| {
        e["key"] == format!("{D}/replay.example.com/a")
    });
    router.wait_event("route.add", |e| {
        e["key"] == format!("{D}/replay.example.com/b")
    });
    // Within what the router drains before closing after its 502
    // (256 KiB): a larger body could still be on its way when the
    // connection closes, and the client would see a broken pipe instead of
    // the answer.
    let body = vec![b'z'; 192 * 1024];
    let mut ok = 0;
    for _ in 0..6 {
        let r = common::request(
            &router.addr(),
            "POST",
            "replay.example.com",
            "/upload",
            &[],
            Some(&body),
        );
        match r.status {
            200 => ok += 1,
            502 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ok, 3, "round robin over one failing and one good backend");
    // Every request that reached the good backend was answered by it: none
    // was retried there after its body had gone to the failing one.
    assert_eq!(good.count(), ok);
}

#[test]
fn a_backend_that_cannot_be_connected_to_in_time_is_504() {
    let etcd = Etcd::start();
    // A listener that never accepts, with its queue filled: further
    // connection attempts hang in SYN-SENT.
    let full = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = full.local_addr().unwrap();
    let mut held = Vec::new();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
        assert!(held.len() < 10_000, "the listen queue never filled");
    }
    etcd.put(
        &format!("{D}/hang.example.com/r"),
        &format!("http://{addr}"),
    );
    let router = Router::start(&etcd.url(), &["--connect-timeout", "1"]);
    router.wait_event("route.add", |_| true);
    let r = router.get("hang.example.com", "/");
    assert_eq!(r.status, 504);
    router.wait_event("router.request", |e| {
        e["status"] == 504 && e["error"].as_str().is_some_and(|s| s.contains("connect"))
    });
}

#[test]
fn big_uploads_with_unknown_length_stream_too() {
    let (_etcd, b, router) = setup();
    const SIZE: u64 = 64 * 1024 * 1024;
    let base = peak_rss_kib(router.pid());
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = SIZE;
    while left > 0 {
        let n = Pattern {
            left: left.min(1 << 20),
        }
        .read(&mut chunk)
        .unwrap();
        write!(s, "{n:x}\r\n").unwrap();
        s.write_all(&chunk[..n]).unwrap();
        s.write_all(b"\r\n").unwrap();
        left -= n as u64;
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.ends_with(&SIZE.to_string()), "{out}");
    assert_eq!(b.last_seen().body_len, SIZE);
    assert!(peak_rss_kib(router.pid()) < base + 64 * 1024);
}

#[test]
fn a_refused_framing_closes_the_connection_so_its_body_is_never_a_request() {
    let (_etcd, b, router) = setup();
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let attack = format!(
        "POST / HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {n}, {n}\r\n\r\n{smuggled}",
        n = smuggled.len()
    );
    let out = raw_exchange(&router.addr(), attack.as_bytes(), T);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("Connection: close"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    let te = format!(
        "POST / HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    let out = raw_exchange(&router.addr(), te.as_bytes(), T);
    assert!(out.starts_with("HTTP/1.1 501"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    let expect = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nExpect: teapot\r\n\r\n");
    assert!(raw_exchange(&router.addr(), expect.as_bytes(), T).starts_with("HTTP/1.1 417"));
    assert!(b.seen.lock().unwrap().iter().all(|s| s.url != "/smuggled"));
    still_serving(&router);
}

#[test]
fn streamed_answers_are_passed_on_as_they_come() {
    let etcd = Etcd::start();
    let drip = RawBackend::start_parts(&[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n",
        b"7\r\nsecond\n\r\n0\r\n\r\n",
    ]);
    etcd.put(&format!("{D}/drip.example.com/r"), &drip.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("route.add", |_| true);
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: drip.example.com\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // The first part arrives while the backend still holds the rest: the
    // router does not wait for a buffer to fill or for the end.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first") {
        let n = s
            .read(&mut buf)
            .expect("the first part before the backend finished");
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    drip.release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("second") && text.ends_with("0\r\n\r\n"),
        "{text}"
    );
}

#[test]
fn targets_are_forwarded_byte_for_byte_even_what_the_uri_grammar_forbids() {
    let (_etcd, b, router) = setup();
    let out = raw_exchange(
        &router.addr(),
        format!(
            "GET /a|b?x={{1}}&y=\"q\"&z=`<>` HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        T,
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // As nginx passes them: rewriting them would change what the
    // backend's own parser (and any signature over the URL) sees.
    assert_eq!(b.last_seen().url, "/a|b?x={1}&y=\"q\"&z=`<>`");
}

#[test]
fn a_silent_connection_is_closed_after_the_header_deadline() {
    let (_etcd, _b, router) = setup();
    let mut s = TcpStream::connect(router.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected bytes: {:?}", &buf[..n]),
        Err(e) => panic!("not closed: {e}"),
    }
    still_serving(&router);
}
