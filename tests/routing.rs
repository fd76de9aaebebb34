//! Host-based routing and round robin, against a real etcd and real
//! backends: the original tool's scenarios and the failure answers.

mod common;

use std::time::Duration;

use common::{Backend, Etcd, Router, raw_exchange, request};

const D: &str = "/domains";

#[test]
fn unknown_host_gets_503_with_a_text_body_and_a_log_event() {
    let etcd = Etcd::start();
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("etcd.listen", |_| true);
    let r = router.get("unknown.example.com", "/");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no route"), "{}", r.text());
    router.wait_event("router.request", |e| {
        e["status"] == 503 && e["host"] == "unknown.example.com"
    });
}

#[test]
fn two_backends_alternate() {
    let etcd = Etcd::start();
    let (b1, b2) = (Backend::start("b1"), Backend::start("b2"));
    etcd.put(&format!("{D}/rr.example.com/b1"), &b1.url());
    etcd.put(&format!("{D}/rr.example.com/b2"), &b2.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("rr.example.com", &["b1", "b2"]);
    let got: Vec<String> = (0..10)
        .map(|_| router.get("rr.example.com", "/").backend.unwrap())
        .collect();
    for pair in got.windows(2) {
        assert_ne!(pair[0], pair[1], "not alternating: {got:?}");
    }
}

#[test]
fn keys_with_and_without_port_and_any_case_match() {
    let etcd = Etcd::start();
    let (b1, b2) = (Backend::start("plain"), Backend::start("withport"));
    etcd.put(&format!("{D}/Case.Example.com/r"), &b1.url());
    etcd.put(&format!("{D}/case.example.com:8080/r"), &b2.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("case.example.com", &["plain"]);
    assert_eq!(
        router.get("CASE.example.com.", "/").backend.as_deref(),
        Some("plain")
    );
    assert_eq!(
        router.get("case.example.com:9999", "/").backend.as_deref(),
        Some("plain")
    );
    assert_eq!(
        router.get("case.example.com:8080", "/").backend.as_deref(),
        Some("withport")
    );
}

#[test]
fn client_details_reach_the_backend() {
    let etcd = Etcd::start();
    let b = Backend::start("b");
    etcd.put(&format!("{D}/hdr.example.com/b"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("hdr.example.com", &["b"]);
    let r = request(
        &router.addr(),
        "GET",
        "hdr.example.com",
        "/some/path?x=1&y=%20",
        &[
            ("User-Agent", "router-test/1.0"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Custom", "kept"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    let seen = b.last_seen();
    assert_eq!(seen.url, "/some/path?x=1&y=%20");
    assert_eq!(seen.header("host").as_deref(), Some("hdr.example.com"));
    assert_eq!(
        seen.header("user-agent").as_deref(),
        Some("router-test/1.0")
    );
    // The client is not a trusted proxy: its forwarding headers are
    // replaced by the router's own.
    assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("hdr.example.com")
    );
    assert_eq!(seen.header("x-custom").as_deref(), Some("kept"));
    let logged = router.wait_event("router.request", |e| {
        e["host"] == "hdr.example.com" && e["path"] == "/some/path?x=1&y=%20"
    });
    assert_eq!(logged["user_agent"], "router-test/1.0");
    assert_eq!(logged["client_ip"], "127.0.0.1");
    assert_eq!(logged["method"], "GET");
    assert_eq!(logged["upstream"], b.url());
    assert!(logged["duration_ms"].as_f64().is_some());
    assert_eq!(logged["status"], 200);
    assert_eq!(logged["bytes"], 1);
}

#[test]
fn a_dead_backend_next_to_a_live_one_costs_no_request() {
    let etcd = Etcd::start();
    let live = Backend::start("live");
    let dead_port = common::free_port();
    etcd.put(
        &format!("{D}/mixed.example.com/a-dead"),
        &format!("http://127.0.0.1:{dead_port}"),
    );
    etcd.put(&format!("{D}/mixed.example.com/b-live"), &live.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("route.add", |e| {
        e["key"] == format!("{D}/mixed.example.com/b-live")
    });
    router.wait_event("route.add", |e| {
        e["key"] == format!("{D}/mixed.example.com/a-dead")
    });
    for _ in 0..10 {
        let r = router.get("mixed.example.com", "/");
        assert_eq!(r.status, 200);
        assert_eq!(r.backend.as_deref(), Some("live"));
    }
}

#[test]
fn all_backends_down_is_502_and_a_slow_backend_is_504() {
    let etcd = Etcd::start();
    let slow = Backend::start("slow");
    let dead_port = common::free_port();
    etcd.put(
        &format!("{D}/down.example.com/r"),
        &format!("http://127.0.0.1:{dead_port}"),
    );
    etcd.put(&format!("{D}/slow.example.com/r"), &slow.url());
    let router = Router::start(&etcd.url(), &["--response-timeout", "1"]);
    router.wait_backends("slow.example.com", &["slow"]);
    let r = router.get("down.example.com", "/");
    assert_eq!(r.status, 502);
    assert!(r.text().contains("backend"), "{}", r.text());
    let r = router.get("slow.example.com", "/slow/3000");
    assert_eq!(r.status, 504);
    router.wait_event("router.request", |e| {
        e["status"] == 502 && e["error"].is_string()
    });
    router.wait_event("router.request", |e| {
        e["status"] == 504 && e["error"].is_string()
    });
    // And the router keeps serving.
    assert_eq!(router.get("slow.example.com", "/").status, 200);
}

#[test]
fn requests_without_a_usable_host_get_400() {
    let etcd = Etcd::start();
    let router = Router::start(&etcd.url(), &[]);
    let t = Duration::from_secs(5);
    let no_host = raw_exchange(
        &router.addr(),
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        t,
    );
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    let two_hosts = raw_exchange(
        &router.addr(),
        b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\nConnection: close\r\n\r\n",
        t,
    );
    assert!(two_hosts.starts_with("HTTP/1.1 400"), "{two_hosts}");
    let bad_host = raw_exchange(
        &router.addr(),
        b"GET / HTTP/1.1\r\nHost: a b/c\r\nConnection: close\r\n\r\n",
        t,
    );
    assert!(bad_host.starts_with("HTTP/1.1 400"), "{bad_host}");
    let garbage = raw_exchange(&router.addr(), b"\x00\x01garbage\r\n\r\n", t);
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    let bad_length = raw_exchange(
        &router.addr(),
        b"POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd",
        t,
    );
    assert!(bad_length.starts_with("HTTP/1.1 400"), "{bad_length}");
    // Still serving.
    assert_eq!(router.get("nothing.example.com", "/").status, 503);
}

#[test]
fn absolute_form_targets_route_by_their_authority() {
    let etcd = Etcd::start();
    let b = Backend::start("abs");
    etcd.put(&format!("{D}/abs.example.com/r"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("abs.example.com", &["abs"]);
    let out = raw_exchange(
        &router.addr(),
        b"GET http://abs.example.com/p?q=1 HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(b.last_seen().url, "/p?q=1");
}

#[test]
fn forwarding_headers_from_a_trusted_proxy_are_kept() {
    let etcd = Etcd::start();
    let b = Backend::start("b");
    etcd.put(&format!("{D}/trust.example.com/b"), &b.url());
    let router = Router::start(
        &etcd.url(),
        &["--trusted-proxies", "10.0.0.0/8,127.0.0.0/8"],
    );
    router.wait_backends("trust.example.com", &["b"]);
    let r = request(
        &router.addr(),
        "GET",
        "trust.example.com",
        "/",
        &[
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example.com"),
        ],
        None,
    );
    assert_eq!(r.status, 200);
    let seen = b.last_seen();
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("public.example.com")
    );
}
