//! The admin side (`--admin ADDR`): `/healthz`, `/routes`, `/metrics` and
//! a status page at `/`.
//!
//! It has its own listener and threads, apart from the poller and the
//! workers, so it answers while the proxy side is saturated. It only reads:
//! the route table, discovery's [`Status`], the counters ([`Metrics`],
//! each domain's [`DomainStats`](crate::metrics::DomainStats), the log's
//! event counts); no request changes anything. Each connection gets one
//! answer and is closed. At most [`ADMIN_MAX_CONNECTIONS`] are served at
//! once, each within [`ADMIN_READ_SECS`] to send its request, so a slow
//! or hostile client of the admin port costs a thread for seconds at most.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value, json};

use crate::discovery::{Status, StatusView};
use crate::event::Event;
use crate::health::now_ms;
use crate::log::{Logger, rfc3339};
use crate::metrics::{Metrics, RATE_SAMPLES, RATE_WINDOW};
use crate::routes::{Domain, RouteTable, SharedTable};
use crate::{prometheus, status_page};

/// Admin connections served at once; more are answered 503 at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 8;
/// A request head must arrive within this.
pub const ADMIN_READ_SECS: u64 = 5;
const ADMIN_WRITE_SECS: u64 = 10;
const ADMIN_HEAD_MAX_BYTES: usize = 16 * 1024;

/// Version and commit, for `/metrics` and the page.
#[derive(Debug, Clone, Copy)]
pub struct Build {
    pub version: &'static str,
    pub commit: &'static str,
}

/// What the admin side reads.
#[derive(Clone)]
pub struct Sources {
    pub table: Arc<SharedTable>,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub log: Logger,
    pub build: Build,
}

/// One domain as the admin side shows it.
pub struct DomainView<'a> {
    pub name: &'a str,
    pub domain: &'a Domain,
}

/// A backend's state for people: in rotation, or ejected until a time.
pub struct BackendState {
    pub ejected: bool,
    /// Wall-clock end of the ejection; `None` in rotation.
    pub until: Option<SystemTime>,
    /// The ejection has run out: the next request to come is its probe.
    pub probe_due: bool,
    pub failures_in_a_row: u32,
}

impl BackendState {
    pub fn of(health: &crate::health::BackendHealth) -> BackendState {
        let until_ms = health.ejected_until_ms();
        let left = until_ms.map(|u| Duration::from_millis(u.saturating_sub(now_ms())));
        BackendState {
            ejected: until_ms.is_some(),
            until: left.map(|l| SystemTime::now() + l),
            probe_due: left.is_some_and(|l| l.is_zero()),
            failures_in_a_row: health.failures_in_a_row(),
        }
    }

    pub fn name(&self) -> &'static str {
        match (self.ejected, self.probe_due) {
            (false, _) => "in_rotation",
            (true, false) => "ejected",
            (true, true) => "probe_due",
        }
    }
}

/// The domains of `table`, sorted by name.
pub fn sorted(table: &RouteTable) -> Vec<DomainView<'_>> {
    let mut out: Vec<DomainView<'_>> = table
        .domains()
        .map(|(name, domain)| DomainView { name, domain })
        .collect();
    out.sort_unstable_by(|a, b| a.name.cmp(b.name));
    out
}

/// Seconds since `t`, if it is in the past.
pub fn age_secs(t: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub struct Admin {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` and starts the accept thread and the rate sampler.
    pub fn start(addr: SocketAddr, sources: Sources) -> Result<Admin, String> {
        let listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on --admin {addr}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on --admin {addr}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (table, flag) = (Arc::clone(&sources.table), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("admin-sampler".into())
            .spawn(move || sample(&table, &flag))
            .map_err(|e| format!("cannot start the admin sampler: {e}"))?;
        sources.log.emit(Event::AdminStart {
            listen: local.to_string(),
        });
        let flag = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(listener, &sources, &flag))
            .map_err(|e| format!("cannot start the admin thread: {e}"))?;
        Ok(Admin {
            local,
            stop,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Samples every domain's totals for the rates of the status page.
fn sample(table: &SharedTable, stop: &AtomicBool) {
    let every = RATE_WINDOW / (RATE_SAMPLES as u32 - 1);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            for (_, domain) in table.load().domains() {
                domain.stats().sample(now);
            }
            next = now + every;
        }
        std::thread::sleep(Duration::from_millis(250).min(next - now.min(next)));
    }
}

fn accept_loop(listener: TcpListener, sources: &Sources, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else {
            // Out of descriptors, say: not a reason to spin.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if active.load(Ordering::SeqCst) >= ADMIN_MAX_CONNECTIONS {
            // A fresh socket's send buffer takes this without blocking.
            let _ = conn.set_nonblocking(true);
            let _ = conn.write_all(&answer(
                503,
                "text/plain; charset=utf-8",
                b"503 too many admin connections\n".to_vec(),
                false,
            ));
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (sources, held) = (sources.clone(), Arc::clone(&active));
        let spawned = std::thread::Builder::new()
            .name("admin-conn".into())
            .spawn(move || {
                serve(conn, &sources);
                held.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why an admin request gets no page.
#[derive(Debug, PartialEq)]
enum AdminError {
    BadRequest,
    MethodNotAllowed,
    NotFound,
}

impl AdminError {
    fn answer(&self) -> (u16, &'static str) {
        match self {
            AdminError::BadRequest => (400, "400 bad request\n"),
            AdminError::MethodNotAllowed => (405, "405 only GET and HEAD\n"),
            AdminError::NotFound => (404, "404 not found: try /, /healthz, /routes or /metrics\n"),
        }
    }
}

fn serve(mut conn: TcpStream, sources: &Sources) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(ADMIN_READ_SECS)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(ADMIN_WRITE_SECS)));
    let deadline = Instant::now() + Duration::from_secs(ADMIN_READ_SECS);
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    let parsed = loop {
        match parse_head(&head) {
            Ok(Some(request)) => break Ok(request),
            Ok(None) if head.len() < ADMIN_HEAD_MAX_BYTES && Instant::now() < deadline => {}
            Ok(None) | Err(_) => break Err(AdminError::BadRequest),
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let (head_only, reply) = match parsed {
        Ok((method, path)) => (method == "HEAD", route(&method, &path, sources)),
        Err(e) => (false, Err(e)),
    };
    let bytes = match reply {
        Ok((status, kind, body)) => answer(status, kind, body, head_only),
        Err(e) => {
            let (status, text) = e.answer();
            let mut out = answer(status, "text/plain; charset=utf-8", text.into(), head_only);
            if e == AdminError::MethodNotAllowed {
                // `Allow` goes in the head, before the blank line.
                let at = out.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
                out.splice(at..at, b"Allow: GET, HEAD\r\n".iter().copied());
            }
            out
        }
    };
    let _ = conn.write_all(&bytes);
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

/// The method and path (without the query) of a complete head; `None`
/// while incomplete.
fn parse_head(head: &[u8]) -> Result<Option<(String, String)>, AdminError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(AdminError::BadRequest),
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(AdminError::BadRequest);
    };
    let path = target.split(['?', '#']).next().unwrap_or("");
    Ok(Some((method.to_string(), path.to_string())))
}

type Page = (u16, &'static str, Vec<u8>);

fn route(method: &str, path: &str, sources: &Sources) -> Result<Page, AdminError> {
    if method != "GET" && method != "HEAD" {
        return Err(AdminError::MethodNotAllowed);
    }
    let view = sources.status.view();
    match path {
        "/healthz" => {
            let (status, text) = health(&view);
            Ok((status, "text/plain; charset=utf-8", text.into_bytes()))
        }
        "/routes" => {
            let table = sources.table.load();
            let body = routes_json(&table, &view);
            Ok((200, "application/json", body.into_bytes()))
        }
        "/metrics" => Ok((
            200,
            prometheus::CONTENT_TYPE,
            prometheus::render(sources, &view).into_bytes(),
        )),
        "/" => Ok((
            200,
            "text/html; charset=utf-8",
            status_page::render(sources, &view).into_bytes(),
        )),
        _ => Err(AdminError::NotFound),
    }
}

/// `/healthz`: ready once a table was loaded, from etcd or the state file.
pub fn health(view: &StatusView) -> (u16, String) {
    let revision = view
        .revision
        .map_or(String::new(), |r| format!(" at revision {r}"));
    match view.source {
        Some("etcd") => (
            200,
            format!(
                "ok: {} domains, {} routes from etcd{revision}\n",
                view.domains, view.routes
            ),
        ),
        Some(_) => (
            200,
            format!(
                "ok: {} domains, {} routes from the state file (etcd not reached yet)\n",
                view.domains, view.routes
            ),
        ),
        None => {
            let why = view
                .last_error
                .as_ref()
                .map_or("not answered yet".to_string(), |(e, _)| e.clone());
            (
                503,
                format!("not ready: no route table loaded yet ({why})\n"),
            )
        }
    }
}

/// Discovery's state as JSON members, for `/routes`.
fn discovery_json(view: &StatusView) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("loaded".into(), view.source.is_some().into());
    m.insert("source".into(), json!(view.source));
    m.insert(
        "api".into(),
        json!((!view.api.is_empty()).then_some(view.api)),
    );
    m.insert("endpoint".into(), json!(view.endpoint));
    m.insert("state".into(), json!(view.state));
    m.insert("revision".into(), json!(view.revision));
    m.insert(
        "last_event_age_secs".into(),
        json!(view.last_event_at.map(age_secs)),
    );
    m.insert(
        "last_error".into(),
        json!(
            view.last_error
                .as_ref()
                .map(|(e, at)| json!({"error": e, "at": rfc3339(*at)}))
        ),
    );
    m.insert(
        "synced".into(),
        json!(view.synced.as_ref().map(|(revision, digest, at)| json!({
            "revision": revision, "digest": digest, "at": rfc3339(*at),
        }))),
    );
    m
}

/// `/routes`: every domain's backends and their state, with where the
/// table stands in etcd. The digest is the last whole snapshot's (or the
/// state file's), under `synced`: recomputing it per change would cost
/// discovery a pass over every route.
pub fn routes_json(table: &RouteTable, view: &StatusView) -> String {
    let mut domains = Map::new();
    for d in sorted(table) {
        let backends: Vec<Value> = d
            .domain
            .members()
            .map(|(b, h)| {
                let s = BackendState::of(h);
                json!({
                    "key": b.key,
                    "url": b.url,
                    "state": s.name(),
                    "ejected_until": s.until.map(rfc3339),
                    "failures_in_a_row": s.failures_in_a_row,
                })
            })
            .collect();
        domains.insert(d.name.to_string(), json!({ "backends": backends }));
    }
    let mut out = discovery_json(view);
    out.insert("domains_count".into(), table.len().into());
    out.insert("domains".into(), Value::Object(domains));
    out.insert("generated_at".into(), json!(rfc3339(SystemTime::now())));
    Value::Object(out).to_string()
}

/// A whole answer; the connection closes after it.
fn answer(status: u16, kind: &str, body: Vec<u8>, head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(&body);
    }
    out
}

/// The one write helper the page and the text formats share: `out` grows,
/// nothing fails.
pub fn push_fmt(out: &mut String, args: std::fmt::Arguments<'_>) {
    let _ = std::fmt::Write::write_fmt(out, args);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_or_refused() {
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Some(("GET".into(), "/metrics".into())))
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Ok(None));
        assert_eq!(
            parse_head(b"\x00\x01 / HTTP/1.1\r\n\r\n"),
            Err(AdminError::BadRequest)
        );
    }

    #[test]
    fn health_says_why_it_is_not_ready() {
        let mut v = StatusView {
            endpoint: "http://127.0.0.1:2379".into(),
            last_error: Some(("connection refused".into(), SystemTime::now())),
            ..StatusView::default()
        };
        let (status, text) = health(&v);
        assert_eq!(status, 503);
        assert!(text.contains("connection refused"), "{text}");
        v.source = Some("etcd");
        v.revision = Some(7);
        v.domains = 2;
        assert_eq!(health(&v).0, 200);
        assert!(health(&v).1.contains("revision 7"));
    }

    #[test]
    fn answers_have_their_length_and_no_body_for_head() {
        let a = answer(200, "text/plain", b"hello".to_vec(), false);
        let text = String::from_utf8(a).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 5\r\n") && text.ends_with("\r\n\r\nhello"));
        let h = answer(200, "text/plain", b"hello".to_vec(), true);
        assert!(String::from_utf8(h).unwrap().ends_with("\r\n\r\n"));
    }
}
