//! The log sinks: stdout (the other tests read it), `--logfile` and
//! `--logurl`, each line one JSON object with the common fields.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use common::{Backend, Etcd, Router, TempDir, eventually};
use serde_json::Value;

const D: &str = "/domains";

fn check_common_fields(line: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(v["service"], "httprouter", "{line}");
    common::check_event(&v);
    assert!(v["event"].is_string(), "{line}");
    let ts = v["timestamp"].as_str().expect("timestamp");
    // RFC 3339, UTC, with fractions: 2026-11-26T21:36:00.762817Z
    assert_eq!(ts.len(), 27, "{ts}");
    assert!(
        ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.',
        "{ts}"
    );
    v
}

#[test]
fn log_file_is_appended_and_private() {
    let etcd = Etcd::start();
    let b = Backend::start("lf");
    etcd.put(&format!("{D}/lf.example.com/r"), &b.url());
    let dir = TempDir::new("logfile");
    let path = dir.path().join("router.log");
    let path_str = path.to_str().unwrap().to_string();
    let mut router = Router::start(&etcd.url(), &["-logfile", &path_str]);
    eventually("the route", || {
        (router.get("lf.example.com", "/").status == 200).then_some(())
    });
    assert!(
        router.lines.lock().unwrap().is_empty(),
        "nothing on stdout with --logfile"
    );
    assert!(router.terminate().success());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    let events: Vec<Value> = text.lines().map(check_common_fields).collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for want in [
        "service.start",
        "route.add",
        "etcd.listen",
        "router.request",
        "service.stop",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // A second run appends to what the first wrote (and SIGINT stops it
    // as cleanly as SIGTERM).
    let mut router = Router::start(&etcd.url(), &["--logfile", &path_str]);
    router.signal("-INT");
    assert!(router.wait_exit().success());
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("\"service.start\"").count(), 2);
    assert!(text.starts_with(&events_first_line(&events)));
}

fn events_first_line(events: &[Value]) -> String {
    format!("{{\"timestamp\":{}", events[0]["timestamp"])
}

/// A collector that stores every POSTed body; `fail_first` answers 503 to
/// the first N posts.
struct Collector {
    url: String,
    bodies: Arc<Mutex<Vec<String>>>,
    _server: Arc<tiny_http::Server>,
}

fn collector(fail_first: usize) -> Collector {
    collector_failing(move |seen| seen <= fail_first)
}

/// A collector that answers 503 to the POSTs for which `fails(n)` holds
/// (n counts them from 1), and stores the bodies of the others.
fn collector_failing(fails: impl Fn(usize) -> bool + Send + 'static) -> Collector {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}/ingest", server.server_addr().to_ip().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let (s, b) = (Arc::clone(&server), Arc::clone(&bodies));
    std::thread::spawn(move || {
        let mut seen = 0;
        while let Ok(mut rq) = s.recv() {
            let mut body = String::new();
            let _ = std::io::Read::read_to_string(rq.as_reader(), &mut body);
            seen += 1;
            if fails(seen) {
                let _ = rq.respond(tiny_http::Response::empty(503));
                continue;
            }
            b.lock().unwrap().push(body);
            let _ = rq.respond(tiny_http::Response::empty(204));
        }
    });
    Collector {
        url,
        bodies,
        _server: server,
    }
}

#[test]
fn log_url_receives_batches_and_survives_a_failing_collector() {
    let etcd = Etcd::start();
    let b = Backend::start("lu");
    etcd.put(&format!("{D}/lu.example.com/r"), &b.url());
    let c = collector(2);
    let mut router = Router::start(&etcd.url(), &["--logurl", &c.url]);
    eventually("the route", || {
        (router.get("lu.example.com", "/").status == 200).then_some(())
    });
    for _ in 0..20 {
        assert_eq!(router.get("lu.example.com", "/").status, 200);
    }
    // After two refused POSTs the lines still arrive (retried with backoff).
    eventually("request lines at the collector", || {
        let all = c.bodies.lock().unwrap().join("");
        (all.matches("\"router.request\"").count() >= 21).then_some(())
    });
    assert!(router.terminate().success());
    let all = c.bodies.lock().unwrap().join("");
    let events: Vec<Value> = all.lines().map(check_common_fields).collect();
    assert!(events.iter().any(|e| e["event"] == "service.start"));
    assert!(
        events.iter().any(|e| e["event"] == "service.stop"),
        "flushed at shutdown"
    );
    let posts = c.bodies.lock().unwrap().len();
    assert!(
        posts < events.len(),
        "lines are batched: {posts} posts for {} lines",
        events.len()
    );
}

/// A collector down for 20 s (long enough for the retries to back off to
/// 16 s) while far more than the 8 MiB buffer is logged: memory stays
/// bounded, and once the collector is back the count of dropped lines
/// reaches it.
#[test]
fn log_url_outage_costs_bounded_memory_and_reports_what_it_dropped() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let etcd = Etcd::start();
    let b = Backend::start("out");
    etcd.put(&format!("{D}/out.example.com/r"), &b.url());
    let down = Arc::new(AtomicBool::new(true));
    let c = {
        let down = Arc::clone(&down);
        collector_failing(move |_| down.load(Ordering::SeqCst))
    };
    let outage = std::time::Instant::now();
    let router = Router::start(&etcd.url(), &["--logurl", &c.url]);
    eventually("the route", || {
        (router.get("out.example.com", "/").status == 200).then_some(())
    });
    let base = common::rss_kib(router.pid());
    // 12,000 lines of about 6 KiB: 72 MiB of log, nine times the buffer.
    let agent = "a".repeat(6 * 1024);
    let sent: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (0..3000)
                        .filter(|_| {
                            common::request(
                                &router.addr(),
                                "GET",
                                "out.example.com",
                                "/",
                                &[("User-Agent", &agent)],
                                None,
                            )
                            .status
                                == 200
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(sent, 12_000);
    while outage.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let grown = common::peak_rss_kib(router.pid()).saturating_sub(base);
    // The 8 MiB buffer, the batch being retried, the queue and the
    // allocator's arenas; not the 72 MiB.
    assert!(
        grown < 32 * 1024,
        "72 MiB logged while the collector was down grew RSS by {grown} KiB"
    );
    assert!(
        c.bodies.lock().unwrap().is_empty(),
        "the collector was down"
    );
    down.store(false, Ordering::SeqCst);
    // The next retry is at most 30 s away.
    let report = common::eventually_within(
        "log.dropped at the collector",
        std::time::Duration::from_secs(45),
        || {
            let all = c.bodies.lock().unwrap().join("");
            all.lines()
                .map(check_common_fields)
                .find(|e| e["event"] == "log.dropped")
        },
    );
    let dropped = report["dropped_total"].as_u64().expect("dropped_total");
    let all = c.bodies.lock().unwrap().join("");
    let delivered = all.matches("\"router.request\"").count() as u64;
    eprintln!(
        "logurl outage: {sent} lines of 6 KiB logged, peak RSS +{grown} KiB, {delivered} delivered, {dropped} dropped and reported"
    );
    assert!(dropped > 0, "{report}");
    // Every line is either delivered or counted (a few are still on their
    // way in later batches).
    assert!(
        delivered + dropped <= 12_001 + 10 && delivered > 0,
        "delivered {delivered}, dropped {dropped}"
    );
    assert!(
        delivered * 6 * 1024 < 9 * 1024 * 1024,
        "more than the buffer was kept: {delivered} lines"
    );
}

#[test]
fn stdout_lines_are_json_with_the_common_fields() {
    let etcd = Etcd::start();
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("etcd.listen", |_| true);
    assert_eq!(router.get("x.example.com", "/").status, 503);
    let e = router.wait_event("router.request", |_| true);
    for field in [
        "host",
        "method",
        "path",
        "status",
        "upstream",
        "duration_ms",
        "bytes",
        "client_ip",
        "user_agent",
    ] {
        assert!(e.get(field).is_some(), "{field} missing: {e}");
    }
    for line in router.lines.lock().unwrap().iter() {
        check_common_fields(line);
    }
}

/// Requests sent from another thread while `during` runs; how many were
/// answered 200 (every one is logged as a `router.request`).
fn requests_while(router: &Router, host: &str, during: impl FnOnce()) -> usize {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = router.addr();
    let (flag, host) = (Arc::clone(&stop), host.to_string());
    let load = std::thread::spawn(move || {
        let mut ok = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if common::request(&addr, "GET", &host, "/", &[], None).status == 200 {
                ok += 1;
            }
        }
        ok
    });
    during();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().expect("the load thread")
}

/// The answered (200) requests logged in `paths`.
fn request_lines(paths: &[&std::path::Path]) -> usize {
    let mut n = 0;
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            // Every line whole: none torn across the reopen.
            let v = check_common_fields(line);
            if v["event"] == "router.request" && v["status"] == 200 {
                n += 1;
            }
        }
    }
    n
}

/// A router logging to `router.log` in a fresh directory, serving
/// `<name>.example.com`, which has answered once. Etcd and the backend
/// live as long as it.
struct LogFileRouter {
    _etcd: Etcd,
    _backend: Backend,
    dir: TempDir,
    path: std::path::PathBuf,
    router: Router,
}

fn log_file_router(name: &str) -> LogFileRouter {
    let etcd = Etcd::start();
    let backend = Backend::start(name);
    let host = format!("{name}.example.com");
    etcd.put(&format!("{D}/{host}/r"), &backend.url());
    let dir = TempDir::new(name);
    let path = dir.path().join("router.log");
    let router = Router::start(&etcd.url(), &["--logfile", path.to_str().unwrap()]);
    eventually("the route", || {
        (router.get(&host, "/").status == 200).then_some(())
    });
    LogFileRouter {
        _etcd: etcd,
        _backend: backend,
        dir,
        path,
        router,
    }
}

/// logrotate's way: the file is moved, then SIGHUP. Under load, every
/// request is logged once, whole, in the old file or the new one.
#[test]
fn sighup_reopens_the_log_file_and_loses_no_line() {
    let mut t = log_file_router("rot");
    let path = t.path.clone();
    let rotated = t.dir.path().join("router.log.1");
    let sent = requests_while(&t.router, "rot.example.com", || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::rename(&path, &rotated).expect("rename");
        std::thread::sleep(std::time::Duration::from_millis(100));
        t.router.signal("-HUP");
        eventually("the new log file", || path.exists().then_some(()));
        std::thread::sleep(std::time::Duration::from_millis(300));
    }) + 1; // and the one that found the route
    assert!(
        t.router.terminate().success(),
        "SIGHUP must not end the router"
    );
    let new = std::fs::read_to_string(&path).expect("the reopened file");
    assert!(new.contains("\"log.reopen\""), "{new}");
    assert!(new.contains("\"reason\":\"sighup\""), "{new}");
    assert_eq!(request_lines(&[&rotated, &path]), sent);
}

/// Moved (or deleted) without a signal: the router notices within about a
/// second and writes to a new file at the path.
#[test]
fn a_log_file_moved_without_a_signal_is_reopened() {
    let mut t = log_file_router("mv");
    let path = t.path.clone();
    let moved = t.dir.path().join("router.log.old");
    std::fs::rename(&path, &moved).expect("rename");
    eventually("a new log file at the path", || {
        t.router.get("mv.example.com", "/");
        std::fs::read_to_string(&path)
            .ok()
            .filter(|t| t.contains("\"router.request\""))
    });
    assert!(t.router.terminate().success());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"reason\":\"deleted_or_moved\""), "{text}");
}

/// A scanner trying hosts: the `503 no route` lines are limited per
/// second, and what was left out is counted in `log.suppressed`; other
/// requests are all logged.
#[test]
fn unknown_host_misses_are_rate_limited_with_a_count() {
    let etcd = Etcd::start();
    let b = Backend::start("known");
    etcd.put(&format!("{D}/known.example.com/r"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("known.example.com", &["known"]);
    for i in 0..200 {
        assert_eq!(router.get(&format!("scan{i}.example.com"), "/").status, 503);
    }
    for _ in 0..30 {
        assert_eq!(router.get("known.example.com", "/counted").status, 200);
    }
    let mut router = router;
    assert!(router.terminate().success());
    let requests = router.events_named("router.request");
    let misses = requests
        .iter()
        .filter(|e| e["status"] == 503 && e["host"].as_str().is_some_and(|h| h.starts_with("scan")))
        .count() as u64;
    let hits = requests.iter().filter(|e| e["path"] == "/counted").count();
    let suppressed: u64 = router
        .events_named("log.suppressed")
        .iter()
        .map(|e| e["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(hits, 30, "every other request is logged");
    assert_eq!(misses + suppressed, 200);
    assert!(suppressed > 0, "200 misses fit in a few seconds at most");
}
