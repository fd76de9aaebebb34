//! Bounds on what a client can make the router hold: slow and endless
//! heads, a thousand half-sent requests, the connection cap, idle
//! keep-alive connections. Others are served meanwhile.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Backend, Etcd, Router};

const D: &str = "/domains";
const HOST: &str = "limits.example.com";

fn setup(extra: &[&str]) -> (Etcd, Backend, Router) {
    let etcd = Etcd::start();
    let b = Backend::start("lb");
    etcd.put(&format!("{D}/{HOST}/r"), &b.url());
    let router = Router::start(&etcd.url(), extra);
    router.wait_backends(HOST, &["lb"]);
    (etcd, b, router)
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Everything the server sends until it closes (or 20 s pass).
fn read_all(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Lets this test process hold a thousand sockets whatever the soft limit.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the calls only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[test]
fn a_client_dripping_its_head_gets_408_while_others_are_served() {
    let (_etcd, _b, router) = setup(&["--header-timeout", "1"]);
    let mut drip = TcpStream::connect(router.addr()).unwrap();
    drip.write_all(b"GET / HTTP/1.1\r\nHost: ").unwrap();
    let started = Instant::now();
    // One byte every 100 ms: always something new, never a whole head.
    let mut cut_off = false;
    for _ in 0..100 {
        if drip.write_all(b"x").is_err() {
            cut_off = true;
            break;
        }
        assert_eq!(router.get(HOST, "/").status, 200);
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let answer = read_all(&mut drip);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "cut off: {cut_off}; {answer}"
    );
    let logged = router.wait_event("router.request", |e| e["status"] == 408);
    assert_eq!(logged["error"], "request head not received in time");
}

#[test]
fn an_endless_header_is_refused_at_the_limit_in_bounded_memory() {
    let (_etcd, _b, router) = setup(&[]);
    let before = common::peak_rss_kib(router.pid());
    let mut clients: Vec<std::thread::JoinHandle<(u64, String)>> = Vec::new();
    for _ in 0..8 {
        let addr = router.addr();
        clients.push(std::thread::spawn(move || {
            let mut conn = TcpStream::connect(addr).unwrap();
            conn.set_write_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            conn.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Endless: ").as_bytes())
                .unwrap();
            let chunk = [b'a'; 4096];
            let mut sent = 0u64;
            // Streams until the router stops reading (a full socket buffer
            // times the write out) or closes; capped at 64 MiB.
            while sent < 64 << 20 && conn.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
            }
            (sent, read_all(&mut conn))
        }));
    }
    for c in clients {
        let (sent, answer) = c.join().unwrap();
        assert!(sent < 64 << 20, "the router kept reading an endless header");
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
    router.wait_event("router.request", |e| e["status"] == 431);
    let grown = common::peak_rss_kib(router.pid()).saturating_sub(before);
    eprintln!("peak RSS growth for 8 endless headers: {grown} KiB");
    assert!(grown < 16 * 1024, "peak RSS grew by {grown} KiB");
    assert_eq!(router.get(HOST, "/").status, 200);
}

#[test]
fn a_thousand_half_sent_requests_cost_bounded_memory() {
    raise_fd_limit();
    let (_etcd, _b, router) = setup(&["--header-timeout", "60"]);
    let pid = router.pid();
    assert_eq!(router.get(HOST, "/").status, 200);
    let base_threads = threads(pid);
    let before = common::rss_kib(pid);
    let mut held = Vec::new();
    for i in 0..1000 {
        let mut conn = TcpStream::connect(router.addr()).unwrap();
        conn.write_all(
            format!("POST /upload HTTP/1.1\r\nHost: {HOST}\r\nX-Client: {i}\r\nX-Half: ")
                .as_bytes(),
        )
        .unwrap();
        held.push(conn);
    }
    // The listen backlog is first in, first out: a request served on a
    // 1001st connection means the thousand before it were accepted.
    // Others are still served, on the 1001st connection.
    assert_eq!(router.get(HOST, "/").status, 200);
    let after = common::rss_kib(pid);
    let per_conn = after.saturating_sub(before) as f64 / 1000.0;
    let during = threads(pid);
    eprintln!(
        "1000 half-sent requests: RSS {before} KiB -> {after} KiB ({per_conn:.1} KiB each), threads {base_threads} -> {during}"
    );
    // Waiting heads are the poller's: they hold no thread.
    assert!(
        during <= base_threads + 8,
        "{during} threads, {base_threads} before"
    );
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    drop(held);
    common::eventually("the threads to end", || {
        (threads(pid) <= base_threads + 10).then_some(())
    });
    assert_eq!(router.get(HOST, "/").status, 200);
}

#[test]
fn at_the_cap_idle_connections_make_room_and_busy_ones_make_others_wait() {
    let (_etcd, _b, router) = setup(&["--max-connections", "2", "--header-timeout", "2"]);
    let keep_alive_request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes();
    // Two keep-alive connections, idle after one request each: the cap.
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(router.addr()).unwrap();
            c.write_all(&keep_alive_request).unwrap();
            let mut buf = [0u8; 512];
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let n = c.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            c
        })
        .collect();
    // A third client is served: an idle connection gives way.
    assert_eq!(router.get(HOST, "/").status, 200);
    let saturated = router.wait_event("server.saturated", |_| true);
    assert_eq!(saturated["max_connections"], 2);
    let closed = idle
        .iter_mut()
        .filter(|c| {
            c.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            matches!((&**c).read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    assert!(closed >= 1, "no idle connection was closed");
    drop(idle);

    // Two connections in the middle of a head are not idle: a third waits
    // for a slot, which the header timeout frees.
    let mut busy: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(router.addr()).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: ").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(router.get(HOST, "/waited").status, 200);
    for c in &mut busy {
        let answer = read_all(c);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    // The third was served only once a 408 had freed a slot: a 408 is
    // logged before its connection lets go of the slot, so its line comes
    // first.
    router.wait_event("router.request", |e| e["path"] == "/waited");
    let requests = router.events_named("router.request");
    let first_408 = requests.iter().position(|e| e["status"] == 408);
    let waited = requests.iter().position(|e| e["path"] == "/waited");
    assert!(first_408 < waited && first_408.is_some(), "{requests:?}");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    let (_etcd, _b, router) = setup(&["--keepalive-timeout", "1"]);
    let mut c = TcpStream::connect(router.addr()).unwrap();
    c.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .unwrap();
    // The answer, then the close (well before the test's 20 s timeout).
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).expect("closed by the router");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains("Connection: close"), "{answer}");
}

#[test]
fn empty_lines_do_not_keep_a_connection_open() {
    let (_etcd, _b, router) = setup(&["--keepalive-timeout", "1", "--header-timeout", "2"]);
    let mut c = TcpStream::connect(router.addr()).unwrap();
    c.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    // An empty line every 300 ms, each alone allowed before a request line.
    for _ in 0..40 {
        let _ = c.write_all(b"\r\n");
        if let Ok(0) = c.read(&mut buf) {
            closed = true;
            break;
        }
    }
    assert!(closed, "empty lines kept the connection open");
    assert_eq!(router.get(HOST, "/").status, 200);
}

/// Five hundred uploads in progress (their heads sent, their bodies
/// trickling, their backend holding on) take no turn from a normal request
/// to another domain.
#[test]
fn slow_uploads_do_not_stop_a_normal_request() {
    raise_fd_limit();
    let (etcd, _b, router) = setup(&[]);
    // A backend that takes uploads and never reads or answers them.
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in sink.incoming() {
            held.push(conn);
        }
    });
    etcd.put(
        &format!("{D}/uploads.example.com/r"),
        &format!("http://{sink_addr}"),
    );
    common::eventually("the upload route", || {
        router
            .events_named("route.add")
            .iter()
            .any(|e| e["domain"] == "uploads.example.com")
            .then_some(())
    });
    let uploads: Vec<TcpStream> = (0..500)
        .map(|_| {
            let mut conn = TcpStream::connect(router.addr()).unwrap();
            conn.write_all(
                b"POST /up HTTP/1.1\r\nHost: uploads.example.com\r\nContent-Length: 1000000\r\n\r\nfirst bytes",
            )
            .unwrap();
            conn
        })
        .collect();
    assert_eq!(router.get(HOST, "/").status, 200);
    drop(uploads);
    assert_eq!(router.get(HOST, "/").status, 200);
}

/// Reads one answer with a `Content-Length` off a kept connection.
fn read_answer(conn: &mut TcpStream) -> String {
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn two_thousand_idle_keep_alive_connections_hold_no_thread_and_little_memory() {
    raise_fd_limit();
    let (_etcd, _b, router) = setup(&[]);
    let pid = router.pid();
    assert_eq!(router.get(HOST, "/").status, 200);
    let base_threads = threads(pid);
    let before = common::rss_kib(pid);
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let mut c = TcpStream::connect(router.addr()).unwrap();
            c.write_all(request.as_bytes()).unwrap();
            let answer = read_answer(&mut c);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            c
        })
        .collect();
    let during = threads(pid);
    let after = common::rss_kib(pid);
    eprintln!(
        "2000 idle keep-alive connections: threads {base_threads} -> {during}, RSS {before} KiB -> {after} KiB ({:.1} KiB each)",
        after.saturating_sub(before) as f64 / 2000.0
    );
    assert!(during < 200, "{during} threads ({base_threads} before)");
    assert!(
        after.saturating_sub(before) < 12 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // Served at once, by a worker the idle ones do not hold.
    assert_eq!(router.get(HOST, "/").status, 200);
    drop(idle);
}
