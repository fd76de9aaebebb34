//! `--admin`: `/healthz`, `/routes`, `/metrics` and the status page, read
//! from a real router with a real etcd and real backends.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{Backend, Etcd, Router, TempDir, eventually, free_port};
use serde_json::Value;

const D: &str = "/domains";

/// A GET on the admin port: (status, content type, body).
fn admin_get(port: u16, path: &str) -> (u16, String, String) {
    let resp = common::agent(Duration::from_secs(10))
        .get(format!("http://127.0.0.1:{port}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path} on the admin port: {e}"));
    let status = resp.status().as_u16();
    let kind = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = String::new();
    resp.into_body()
        .into_reader()
        .read_to_string(&mut body)
        .expect("an admin body");
    (status, kind, body)
}

fn routes_json(port: u16) -> Value {
    let (status, kind, body) = admin_get(port, "/routes");
    assert_eq!((status, kind.as_str()), (200, "application/json"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/routes: {e}: {body}"))
}

/// One sample of the Prometheus text format: its labels and value.
#[derive(Debug, Clone)]
struct Sample {
    labels: HashMap<String, String>,
    value: f64,
}

/// A small parser of the text format, version 0.0.4: every line is a
/// comment (`# HELP`, `# TYPE`) or `name{label="value",...} number`.
/// Panics on anything else, so a malformed exposition fails the test.
fn parse_prometheus(text: &str) -> HashMap<String, Vec<Sample>> {
    let mut out: HashMap<String, Vec<Sample>> = HashMap::new();
    let mut typed: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type {kind}"
            );
            assert!(
                typed.insert(name.into(), kind.into()).is_none(),
                "{name} typed twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "line {line:?}");
        let name_end = line.find(['{', ' ']).expect("a name");
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "name {name:?}"
        );
        let mut rest = &line[name_end..];
        let mut labels = HashMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                let (start, c) = chars.next().expect("a label or }");
                if c == '}' {
                    end = Some(start + 1);
                    break;
                }
                let eq = body[start..].find('=').expect("label=") + start;
                let key = body[start..eq].trim_start_matches(',').to_string();
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().expect("a closing quote") {
                        (_, '"') => break,
                        (_, '\\') => match chars.next().expect("an escape").1 {
                            'n' => value.push('\n'),
                            c => value.push(c),
                        },
                        (_, c) => value.push(c),
                    }
                }
                labels.insert(key, value);
                if chars.peek().is_some_and(|(_, c)| *c == ',') {
                    chars.next();
                }
                let _ = end;
            }
            rest = &body[end.expect("}")..];
        }
        let value = rest.trim();
        let value: f64 = if value == "NaN" {
            f64::NAN
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"))
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "{name} has no # TYPE");
        out.entry(name.to_string())
            .or_default()
            .push(Sample { labels, value });
    }
    out
}

fn metrics(port: u16) -> HashMap<String, Vec<Sample>> {
    let (status, kind, body) = admin_get(port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    promtool_check(&body);
    parse_prometheus(&body)
}

/// Prometheus's own linter, where installed (Debian's `prometheus`
/// package has `promtool`): the text must pass `promtool check metrics`.
fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("feed promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of `name` with exactly these labels (0 when absent).
fn value(m: &HashMap<String, Vec<Sample>>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.get(name)
        .into_iter()
        .flatten()
        .find(|s| {
            s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map_or(0.0, |s| s.value)
}

#[test]
fn the_parser_reads_the_format_and_refuses_what_is_not() {
    let m = parse_prometheus(
        "# HELP a x\n# TYPE a counter\na{d=\"q\\\"\\\\\",c=\"5xx\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n",
    );
    assert_eq!(value(&m, "a", &[("d", "q\"\\"), ("c", "5xx")]), 3.0);
    assert_eq!(value(&m, "h_count", &[]), 2.0);
    assert!(std::panic::catch_unwind(|| parse_prometheus("b 1\n")).is_err());
}

#[test]
fn endpoints_before_and_after_the_first_table() {
    let mut etcd = Etcd::planned();
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let router = Router::start(&etcd.url(), &["--admin", &admin_addr, "--eject-after", "1"]);
    // No etcd yet: not ready, and it says why.
    let (status, _, text) = admin_get(admin, "/healthz");
    assert_eq!(status, 503, "{text}");
    assert!(text.starts_with("not ready"), "{text}");
    let r = routes_json(admin);
    assert_eq!(r["loaded"], false);
    assert_eq!(r["domains_count"], 0);

    etcd.spawn();
    let (a1, a2) = (Backend::start("a1"), Backend::start("a2"));
    etcd.put(&format!("{D}/a.example.com/one"), &a1.url());
    etcd.put(&format!("{D}/a.example.com/two"), &a2.url());
    // A backend that refuses: ejected after one failure.
    let dead = format!("http://127.0.0.1:{}", free_port());
    etcd.put(&format!("{D}/down.example.com/gone"), &dead);
    // One that refuses and one that answers: a failed connect is retried
    // on the other.
    let m1 = Backend::start("m1");
    etcd.put(&format!("{D}/mixed.example.com/dead"), &dead);
    etcd.put(&format!("{D}/mixed.example.com/live"), &m1.url());
    router.wait_backends("a.example.com", &["a1", "a2"]);
    router.wait_route("down.example.com");
    for key in ["dead", "live"] {
        router.wait_event("route.add", |e| {
            e["key"] == format!("{D}/mixed.example.com/{key}")
        });
    }
    let (status, _, text) = admin_get(admin, "/healthz");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.starts_with("ok: 3 domains, 5 routes from etcd"),
        "{text}"
    );
    for _ in 0..4 {
        assert_eq!(router.get("mixed.example.com", "/").status, 200);
    }

    for _ in 0..10 {
        assert_eq!(router.get("a.example.com", "/").status, 200);
    }
    assert_eq!(router.get("down.example.com", "/").status, 502);
    assert_eq!(router.get("nobody.example.com", "/").status, 503);

    // /routes: every backend with its state, and where etcd stands.
    let r = routes_json(admin);
    assert_eq!(r["loaded"], true);
    assert_eq!(r["source"], "etcd");
    assert_eq!(r["state"], "watching");
    assert_eq!(r["domains_count"], 3);
    assert!(r["revision"].as_u64().is_some_and(|n| n > 0), "{r}");
    assert!(r["last_event_age_secs"].as_f64().is_some_and(|a| a >= 0.0));
    let sync = router.wait_event("etcd.sync", |_| true);
    assert_eq!(r["synced"]["digest"], sync["digest"]);
    let a = r["domains"]["a.example.com"]["backends"]
        .as_array()
        .expect("a's backends");
    assert_eq!(a.len(), 2);
    assert_eq!(a[0]["url"], a1.url());
    assert_eq!(a[0]["key"], format!("{D}/a.example.com/one"));
    assert!(a.iter().all(|b| b["state"] == "in_rotation"), "{r}");
    let down = &r["domains"]["down.example.com"]["backends"][0];
    assert_eq!(down["state"], "ejected", "{r}");
    assert!(down["ejected_until"].is_string(), "{down}");

    // /metrics: the counts of what was just sent.
    let m = metrics(admin);
    let a_2xx = value(
        &m,
        "httprouter_requests_total",
        &[("code_class", "2xx"), ("domain", "a.example.com")],
    );
    // wait_backends sent some of its own before these ten.
    assert!(a_2xx >= 10.0, "{a_2xx}");
    let served = a1.count() + a2.count();
    assert_eq!(a_2xx as usize, served);
    assert_eq!(
        value(
            &m,
            "httprouter_requests_total",
            &[("code_class", "5xx"), ("domain", "down.example.com")],
        ),
        1.0
    );
    assert!(
        value(
            &m,
            "httprouter_requests_total",
            &[("code_class", "5xx"), ("domain", "")],
        ) >= 1.0
    );
    let down_label = [("domain", "down.example.com")];
    assert_eq!(
        value(&m, "httprouter_backend_failures_total", &down_label),
        1.0
    );
    assert_eq!(
        value(&m, "httprouter_backend_ejections_total", &down_label),
        1.0
    );
    let mixed = [("domain", "mixed.example.com")];
    assert_eq!(value(&m, "httprouter_retries_total", &mixed), 1.0);
    assert_eq!(value(&m, "httprouter_backend_failures_total", &mixed), 1.0);
    assert_eq!(
        value(
            &m,
            "httprouter_requests_total",
            &[("code_class", "2xx"), ("domain", "mixed.example.com")],
        ),
        4.0
    );
    // A domain with nothing of a kind still has the series, at zero.
    assert_eq!(
        m["httprouter_retries_total"]
            .iter()
            .find(|s| s.labels["domain"] == "a.example.com")
            .map(|s| s.value),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "httprouter_backends", &[("state", "ejected")]),
        2.0
    );
    // The histogram: cumulative buckets, +Inf equal to the count, which
    // counts every answer.
    let buckets = &m["httprouter_request_duration_seconds_bucket"];
    let values: Vec<f64> = buckets.iter().map(|s| s.value).collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf");
    let count = value(&m, "httprouter_request_duration_seconds_count", &[]);
    assert_eq!(*values.last().unwrap(), count);
    let answered: f64 = m["httprouter_requests_total"].iter().map(|s| s.value).sum();
    assert_eq!(count, answered);
    assert_eq!(value(&m, "httprouter_table_loaded", &[]), 1.0);
    assert_eq!(value(&m, "httprouter_etcd_watching", &[]), 1.0);
    assert_eq!(
        value(&m, "httprouter_log_events_total", &[("event", "route.add")]),
        5.0
    );
    let build = &m["httprouter_build_info"][0];
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build.value, 1.0);
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "httprouter_connections_open",
        "httprouter_log_dropped_total",
        "httprouter_retries_total",
        "httprouter_etcd_errors_total",
        "httprouter_etcd_resyncs_total",
    ] {
        assert!(m.contains_key(name), "{name} missing");
    }
    assert!(value(&m, "process_resident_memory_bytes", &[]) > 1e6);

    // A domain that leaves the table leaves the metrics.
    etcd.delete(&format!("{D}/down.example.com/gone"));
    router.wait_event("route.remove", |e| e["domain"] == "down.example.com");
    let m = metrics(admin);
    assert!(
        m.values()
            .flatten()
            .all(|s| s.labels.get("domain").map(String::as_str) != Some("down.example.com")),
        "down.example.com still in /metrics"
    );
    assert!(routes_json(admin)["domains"]["down.example.com"].is_null());

    // Read-only, and nothing else is served.
    let raw = common::raw_exchange(
        &admin_addr,
        b"POST /routes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert!(raw.contains("Allow: GET, HEAD\r\n"), "{raw}");
    assert_eq!(admin_get(admin, "/nothing").0, 404);
    let raw = common::raw_exchange(
        &admin_addr,
        b"\x16\x03\x01garbage\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(router.get("a.example.com", "/").status, 200);
}

#[test]
fn healthz_is_ready_from_the_state_file_while_etcd_is_down() {
    let dir = TempDir::new("admin-state");
    let state = dir.path().join("routes.json");
    let state = state.to_str().unwrap();
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let b = Backend::start("sf");
    {
        let etcd = Etcd::start();
        etcd.put(&format!("{D}/sf.example.com/r"), &b.url());
        let mut router = Router::start(&etcd.url(), &["--state-file", state]);
        router.wait_backends("sf.example.com", &["sf"]);
        assert!(router.terminate().success());
    }
    let down = format!("http://127.0.0.1:{}", free_port());
    let router = Router::start(&down, &["--state-file", state, "--admin", &admin_addr]);
    router.wait_event("state.load", |_| true);
    let (status, _, text) = admin_get(admin, "/healthz");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("from the state file"), "{text}");
    let r = routes_json(admin);
    assert_eq!(r["source"], "state_file");
    assert_eq!(r["state"], "failing");
    assert!(r["last_error"]["error"].is_string(), "{r}");
}

#[test]
fn admin_answers_while_every_proxy_connection_is_busy() {
    let etcd = Etcd::start();
    let slow = Backend::start("slow");
    etcd.put(&format!("{D}/slow.example.com/r"), &slow.url());
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let router = Router::start(
        &etcd.url(),
        &[
            "--admin",
            &admin_addr,
            "--max-connections",
            "4",
            "--workers",
            "1",
        ],
    );
    router.wait_backends("slow.example.com", &["slow"]);
    let before = slow.count();
    // Four connections held by a backend that takes 6 s: the proxy takes
    // no more (the fifth waits in the backlog).
    let held: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut c = TcpStream::connect(router.addr()).expect("connect");
            c.write_all(b"GET /slow/6000 HTTP/1.1\r\nHost: slow.example.com\r\n\r\n")
                .expect("send");
            c
        })
        .collect();
    eventually("four requests at the backend", || {
        (slow.count() >= before + 4).then_some(())
    });
    let (status, _, text) = admin_get(admin, "/healthz");
    assert_eq!(status, 200, "{text}");
    eventually("four connections open", || {
        let m = metrics(admin);
        (value(&m, "httprouter_connections_open", &[]) == 4.0).then_some(())
    });
    let (status, _, page) = admin_get(admin, "/");
    assert_eq!(status, 200);
    assert!(page.contains("slow.example.com"));
    drop(held);
}

/// Chromium, where installed (Debian's `chromium`).
fn browser() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|b| b.to_string())
}

#[test]
fn the_status_page_in_a_headless_browser() {
    let Some(chromium) = browser() else {
        eprintln!(
            "SKIPPED: no chromium installed (apt-get install chromium) to load the status page"
        );
        return;
    };
    let etcd = Etcd::start();
    let (up, other) = (Backend::start("up"), Backend::start("other"));
    etcd.put(&format!("{D}/page.example.com/up"), &up.url());
    let dead = format!("http://127.0.0.1:{}", free_port());
    etcd.put(&format!("{D}/page.example.com/zz-down"), &dead);
    etcd.put(&format!("{D}/other.example.com/r"), &other.url());
    let admin = free_port();
    let router = Router::start(
        &etcd.url(),
        &[
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--eject-after",
            "1",
            "--eject-for",
            "300",
        ],
    );
    router.wait_route("other.example.com");
    router.wait_route("page.example.com");
    eventually("the dead backend ejected", || {
        router.get("page.example.com", "/");
        (!router.events_named("backend.eject").is_empty()).then_some(())
    });
    for _ in 0..5 {
        router.get("page.example.com", "/");
    }
    let dir = TempDir::new("chromium");
    let shot = dir.path().join("status.png");
    let out = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1200,900",
            &format!("--user-data-dir={}", dir.path().join("profile").display()),
            &format!("--screenshot={}", shot.display()),
            "--dump-dom",
            &format!("http://127.0.0.1:{admin}/"),
        ])
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed: {}\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What a person looks for: the domains, their backends and states,
    // the rates and etcd's state.
    for want in [
        "page.example.com",
        "other.example.com",
        &up.url(),
        &dead,
        "in rotation",
        "ejected until",
        "watching",
        "requests/s",
    ] {
        assert!(dom.contains(want), "{want:?} missing from the page:\n{dom}");
    }
    assert!(!dom.contains("<script"), "the page has a script");
    // The browser parsed it into the table a person sees: one row per
    // domain, one item per backend.
    assert_eq!(dom.matches("class=\"domain\"").count(), 2, "{dom}");
    assert_eq!(dom.matches("class=\"backend\"").count(), 3, "{dom}");
    let png = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(png > 1000, "no screenshot ({png} bytes)");
}

#[test]
fn silent_admin_clients_cost_seconds_and_no_refusal() {
    let etcd = Etcd::start();
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let router = Router::start(&etcd.url(), &["--admin", &admin_addr]);
    router.wait_event("etcd.sync", |_| true);
    // Every admin slot taken by a client that sends half a head and waits.
    let silent: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(&admin_addr).expect("connect");
            c.write_all(b"GET /healthz HTTP/1.1\r\n").expect("send");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // The next one waits in the backlog until a slot frees (the silent
    // ones get 408 after 5 s), and is answered, not refused.
    let (status, _, text) = admin_get(admin, "/healthz");
    assert_eq!(status, 200, "{text}");
    for mut c in silent {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
}

/// Clients that ask for a large table-wide page and never read it hold its
/// turn for the whole write deadline: the others wait at most their head
/// deadline or are told to retry, and `/healthz` is still answered.
#[test]
fn readers_that_never_read_cannot_starve_healthz() {
    let dir = TempDir::new("admin-slow-readers");
    let state = dir.path().join("routes.json");
    // 20,000 domains: a /metrics of about 11 MiB, far past what the
    // sockets buffer, so its writes block while nobody reads.
    let leaves: Vec<(String, String)> = (0..20_000)
        .map(|i| {
            (
                format!("{D}/d{i}.example.com/r"),
                "http://127.0.0.1:9".to_string(),
            )
        })
        .collect();
    httprouter::state_file::save(
        &state,
        "v2",
        D,
        7,
        leaves.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .expect("a state file");
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let down = format!("http://127.0.0.1:{}", free_port());
    let router = Router::start(
        &down,
        &[
            "--state-file",
            state.to_str().unwrap(),
            "--admin",
            &admin_addr,
        ],
    );
    router.wait_event("state.load", |_| true);
    let stalled: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut c = TcpStream::connect(&admin_addr).expect("connect");
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
                .expect("send");
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Before the turn had a bound, each stalled reader ahead cost 10 s.
    let resp = common::agent(Duration::from_secs(30))
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .call()
        .expect("/healthz answered while table-wide pages stall");
    assert_eq!(resp.status().as_u16(), 200);
    // Some of the stalled ones were told to come back.
    let busy = stalled
        .into_iter()
        .filter_map(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
            let mut head = [0u8; 64];
            let n = c.read(&mut head).ok()?;
            Some(String::from_utf8_lossy(&head[..n]).into_owned())
        })
        .filter(|h| h.starts_with("HTTP/1.1 503"))
        .count();
    assert!(busy >= 4, "{busy} of 10 were answered 503");
}

#[test]
fn an_admin_side_beyond_loopback_is_warned_about() {
    let etcd = Etcd::start();
    let port = free_port();
    let router = Router::start(&etcd.url(), &["--admin", &format!("0.0.0.0:{port}")]);
    let start = router.wait_event("admin.start", |_| true);
    assert_eq!(start["listen"], format!("0.0.0.0:{port}"));
    let w = router.wait_event("service.warning", |e| e.get("admin").is_some());
    assert!(
        w["message"]
            .as_str()
            .unwrap_or("")
            .contains("no authentication"),
        "{w}"
    );
    // On loopback, no such warning.
    let quiet = Router::start(
        &etcd.url(),
        &["--admin", &format!("127.0.0.1:{}", free_port())],
    );
    quiet.wait_event("admin.start", |_| true);
    quiet.wait_event("service.start", |_| true);
    assert!(
        quiet
            .events_named("service.warning")
            .iter()
            .all(|e| e.get("admin").is_none())
    );
}
