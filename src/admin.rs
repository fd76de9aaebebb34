//! The admin side (`--admin ADDR`): `/healthz`, `/routes`, `/metrics` and
//! a status page at `/`.
//!
//! It has its own listener and threads, apart from the poller and the
//! workers, so it answers while the proxy side is saturated. It only reads
//! (see [`admin_view`](crate::admin_view)); no request changes anything.
//! Each connection gets one answer and is closed. At most
//! [`ADMIN_MAX_CONNECTIONS`] are served at once; the next ones wait in the
//! listen backlog (not refused, up to the backlog's length). A connection
//! has [`ADMIN_READ_SECS`] from its accept to send its head, and
//! [`ADMIN_WRITE_SECS`] to take its whole answer, so a slow or hostile
//! client holds a thread for seconds at most.
//!
//! The pages that walk the whole table (`/routes`, `/metrics`, `/`) take
//! turns: rendered and sent one at a time into one reused buffer, so
//! concurrent requests for them cannot multiply the memory a large
//! table's answer takes (megabytes at 10,000 domains). At most
//! [`ADMIN_TABLE_WIDE_MAX`] wait or hold the turn, none waits past its
//! head deadline, and the rest are answered `503` with `Retry-After` at
//! once: readers that never read can delay those pages, never take every
//! slot, so `/healthz` is answered within the head deadlines of the
//! connections ahead of it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::admin_view::{BackendState, Sources, age_secs, health, sorted};
use crate::discovery::StatusView;
use crate::event::Event;
use crate::log::{push_json_str, rfc3339};
use crate::metrics::{RATE_SAMPLES, RATE_WINDOW};
use crate::routes::{RouteTable, SharedTable};
use crate::{prometheus, status_page};

/// Admin connections served at once; the next wait in the listen backlog.
pub const ADMIN_MAX_CONNECTIONS: usize = 8;
/// A request head must arrive within this of the accept.
pub const ADMIN_READ_SECS: u64 = 5;
/// The whole answer must be taken within this.
pub const ADMIN_WRITE_SECS: u64 = 10;
const ADMIN_HEAD_MAX_BYTES: usize = 16 * 1024;
/// Table-wide pages waiting for their turn or holding it, at most; more
/// are answered `503` with `Retry-After` at once. Two slots stay for
/// `/healthz` and the small answers.
pub const ADMIN_TABLE_WIDE_MAX: usize = ADMIN_MAX_CONNECTIONS - 2;
/// After the answer, what the client sent beyond its head is read and
/// dropped for this long (at most [`ADMIN_DRAIN_BYTES`]): closing with
/// unread input would send a reset that can destroy the answer.
const ADMIN_DRAIN_MILLIS: u64 = 500;
const ADMIN_DRAIN_BYTES: usize = 64 * 1024;

/// Why `--admin` could not start.
#[derive(Debug)]
pub struct AdminStartError {
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl std::fmt::Display for AdminStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot serve --admin {}: {}", self.addr, self.error)
    }
}

pub struct Admin {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Admin {
    /// Binds `addr` and starts the accept thread and the rate sampler.
    pub fn start(addr: SocketAddr, sources: Sources) -> Result<Admin, AdminStartError> {
        let failed = |error| AdminStartError { addr, error };
        let listener = TcpListener::bind(addr).map_err(failed)?;
        let local = listener.local_addr().map_err(failed)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (table, flag) = (Arc::clone(&sources.table), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("admin-sampler".into())
            .spawn(move || sample(&table, &flag))
            .map_err(failed)?;
        sources.log.emit(Event::AdminStart {
            listen: local.to_string(),
        });
        let flag = Arc::clone(&stop);
        let accept = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_loop(listener, &sources, &flag))
            .map_err(failed)?;
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
        std::thread::sleep(Duration::from_millis(250).min(next.saturating_duration_since(now)));
    }
}

/// The pages that walk the whole table (`/routes`, `/metrics`, `/`): they
/// take turns, rendered and sent one at a time into one reused buffer, and
/// at most [`ADMIN_TABLE_WIDE_MAX`] wait or hold the turn, so the other
/// slots stay free for `/healthz`.
#[derive(Default)]
struct TableWide {
    buffer: Mutex<String>,
    /// Requests waiting for the turn or holding it.
    queued: AtomicUsize,
}

/// Gives a count back when dropped, panic or not.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, sources: &Sources, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    let pages = Arc::new(TableWide::default());
    loop {
        // At the cap, the next connection waits in the backlog: a refusal
        // would look like an unhealthy router to a health check.
        while active.load(Ordering::SeqCst) >= ADMIN_MAX_CONNECTIONS {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let conn = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((conn, _)) = conn else {
            // Out of descriptors, say: not a reason to spin.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        active.fetch_add(1, Ordering::SeqCst);
        let (sources, active_here, pages) =
            (sources.clone(), Arc::clone(&active), Arc::clone(&pages));
        let spawned = std::thread::Builder::new()
            .name("admin-conn".into())
            .spawn(move || {
                let _slot = Held(&active_here);
                serve(conn, &sources, &pages);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why an admin request gets no page; [`AdminError::answer`] is the one
/// place each becomes an answer.
#[derive(Debug, PartialEq)]
enum AdminError {
    BadRequest,
    Timeout,
    MethodNotAllowed,
    NotFound,
    /// Too many table-wide pages waiting, or no turn in time.
    Busy,
}

impl AdminError {
    fn answer(&self) -> (u16, &'static str) {
        match self {
            AdminError::BadRequest => (400, "400 bad request\n"),
            AdminError::Timeout => (408, "408 the request head did not arrive in time\n"),
            AdminError::MethodNotAllowed => (405, "405 only GET and HEAD\n"),
            AdminError::NotFound => (404, "404 not found: try /, /healthz, /routes or /metrics\n"),
            AdminError::Busy => (
                503,
                "503 busy sending other table-wide pages; retry in a second\n",
            ),
        }
    }
}

fn serve(mut conn: TcpStream, sources: &Sources, pages: &TableWide) {
    let deadline = Instant::now() + Duration::from_secs(ADMIN_READ_SECS);
    let parsed = read_head(&mut conn, deadline);
    let parsed = match parsed {
        Ok(Some(request)) => Ok(request),
        Ok(None) => return,
        Err(e) => Err(e),
    };
    // A table-wide page waits for its turn (no longer than the head could
    // have taken) and keeps it until the answer is sent.
    let table_wide = matches!(&parsed, Ok((method, path))
        if (method == "GET" || method == "HEAD") && TABLE_WIDE.contains(&path.as_str()));
    let ahead = table_wide.then(|| pages.queued.fetch_add(1, Ordering::SeqCst));
    let queued = ahead.map(|_| Held(&pages.queued));
    let mut turn = None;
    let parsed = match parsed {
        Ok(_) if ahead.is_some_and(|n| n >= ADMIN_TABLE_WIDE_MAX) => Err(AdminError::Busy),
        Ok(request) if table_wide => match wait_turn(&pages.buffer, deadline) {
            Some(guard) => {
                turn = Some(guard);
                Ok(request)
            }
            None => Err(AdminError::Busy),
        },
        other => other,
    };
    let buf = turn.as_deref_mut().map(std::mem::take).unwrap_or_default();
    let (head_only, reply) = match parsed {
        Ok((method, path)) => (method == "HEAD", route(&method, &path, sources, buf)),
        Err(e) => (false, Err(e)),
    };
    let (head, body) = match reply {
        Ok((status, kind, body)) => (answer_head(status, kind, &[], body.len()), body),
        Err(e) => {
            let (status, text) = e.answer();
            let extra: &[(&str, &str)] = match e {
                AdminError::MethodNotAllowed => &[("Allow", "GET, HEAD")],
                AdminError::Busy => &[("Retry-After", "1")],
                _ => &[],
            };
            let kind = "text/plain; charset=utf-8";
            (answer_head(status, kind, extra, text.len()), text.into())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(ADMIN_WRITE_SECS);
    let sent: &[u8] = if head_only { &[] } else { body.as_bytes() };
    let written = write_within(&mut conn, head.as_bytes(), deadline)
        .and_then(|()| write_within(&mut conn, sent, deadline));
    if let Some(buf) = turn.as_deref_mut() {
        let mut body = body;
        // Kept for the next page, unless the table has shrunk a lot.
        if body.capacity() > 4 * body.len().max(64 * 1024) {
            body.shrink_to(body.len());
        }
        *buf = body;
    }
    drop(turn);
    drop(queued);
    if written.is_ok() {
        let _ = conn.shutdown(std::net::Shutdown::Write);
        drain(&mut conn);
    }
}

/// The turn of the table-wide pages, waited for until `deadline` (a
/// poisoned lock holds a buffer like any).
fn wait_turn(buffer: &Mutex<String>, deadline: Instant) -> Option<MutexGuard<'_, String>> {
    loop {
        match buffer.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
            Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Reads a request head until `deadline`: its method and path, `None` if
/// the client went away, or why there is none. The head is parsed only
/// once its blank line has arrived, so a client dripping bytes costs a
/// scan of each byte once, not a parse per read.
fn read_head(
    conn: &mut TcpStream,
    deadline: Instant,
) -> Result<Option<(String, String)>, AdminError> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AdminError::Timeout);
        }
        let _ = conn.set_read_timeout(Some(left));
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AdminError::Timeout);
            }
            Err(_) => return Ok(None),
        };
        // The blank line may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        let tail = &head[from..];
        let ended =
            tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
        if ended {
            return match parse_head(&head) {
                Ok(Some(request)) => Ok(Some(request)),
                Ok(None) | Err(_) => Err(AdminError::BadRequest),
            };
        }
        if head.len() >= ADMIN_HEAD_MAX_BYTES {
            return Err(AdminError::BadRequest);
        }
    }
}

/// The pages that walk the whole table.
const TABLE_WIDE: [&str; 3] = ["/routes", "/metrics", "/"];

/// Writes all of `bytes` unless `deadline` passes first.
fn write_within(conn: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        conn.set_write_timeout(Some(left))?;
        match conn.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and drops what the client still sends, for a bounded time, so
/// that the close is not a reset (see [`ADMIN_DRAIN_MILLIS`]).
fn drain(conn: &mut TcpStream) {
    let deadline = Instant::now() + Duration::from_millis(ADMIN_DRAIN_MILLIS);
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < ADMIN_DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
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

type Page = (u16, &'static str, String);

/// The answer to a request; a table-wide page is written into `buf`.
fn route(method: &str, path: &str, sources: &Sources, buf: String) -> Result<Page, AdminError> {
    if method != "GET" && method != "HEAD" {
        return Err(AdminError::MethodNotAllowed);
    }
    let view = sources.status.view();
    if path == "/healthz" {
        let (status, text) = health(&view);
        return Ok((status, "text/plain; charset=utf-8", text));
    }
    let render: fn(&Sources, &StatusView, String) -> String = match path {
        "/routes" => |s, v, buf| routes_json(&s.table.load(), v, buf),
        "/metrics" => prometheus::render,
        "/" => status_page::render,
        _ => return Err(AdminError::NotFound),
    };
    let kind = match path {
        "/routes" => "application/json",
        "/metrics" => prometheus::CONTENT_TYPE,
        _ => "text/html; charset=utf-8",
    };
    Ok((200, kind, render(sources, &view, buf)))
}

/// `"name":` then the value written by `value`, after a comma unless first.
fn member(out: &mut String, first: &mut bool, name: &str, value: impl FnOnce(&mut String)) {
    if !std::mem::take(first) {
        out.push(',');
    }
    push_json_str(out, name);
    out.push(':');
    value(out);
}

fn json_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

fn json_opt_u64(out: &mut String, n: Option<u64>) {
    match n {
        Some(n) => out.push_str(itoa::Buffer::new().format(n)),
        None => out.push_str("null"),
    }
}

/// `/routes`: every domain's backends and their state, with where the
/// table stands in etcd. The digest is the last whole snapshot's (or the
/// state file's), under `synced`: recomputing it per change would cost
/// discovery a pass over every route. Written straight into one string
/// (a `serde_json::Value` tree of a large table would weigh ten times the
/// text).
pub fn routes_json(table: &RouteTable, view: &StatusView, mut out: String) -> String {
    let domains = sorted(table);
    out.clear();
    out.reserve(1024 + domains.len() * 200);
    let first = &mut true;
    out.push('{');
    member(&mut out, first, "loaded", |o| {
        o.push_str(if view.source.is_some() {
            "true"
        } else {
            "false"
        })
    });
    member(&mut out, first, "source", |o| {
        json_opt_str(o, view.source.map(|s| s.name()))
    });
    member(&mut out, first, "api", |o| {
        json_opt_str(o, (!view.api.is_empty()).then_some(view.api))
    });
    member(&mut out, first, "endpoint", |o| {
        push_json_str(o, &view.endpoint)
    });
    member(&mut out, first, "state", |o| {
        push_json_str(o, view.state.name())
    });
    member(&mut out, first, "revision", |o| {
        json_opt_u64(o, view.revision)
    });
    member(&mut out, first, "last_event_age_secs", |o| {
        match view.last_event_at.map(age_secs) {
            Some(age) => o.push_str(&format!("{age:.3}")),
            None => o.push_str("null"),
        }
    });
    member(&mut out, first, "last_error", |o| match &view.last_error {
        Some((error, at)) => {
            o.push_str("{\"error\":");
            push_json_str(o, error);
            o.push_str(",\"at\":");
            push_json_str(o, &rfc3339(*at));
            o.push('}');
        }
        None => o.push_str("null"),
    });
    member(&mut out, first, "synced", |o| match &view.synced {
        Some((revision, digest, at)) => {
            o.push_str("{\"revision\":");
            o.push_str(itoa::Buffer::new().format(*revision));
            o.push_str(",\"digest\":");
            push_json_str(o, digest);
            o.push_str(",\"at\":");
            push_json_str(o, &rfc3339(*at));
            o.push('}');
        }
        None => o.push_str("null"),
    });
    member(&mut out, first, "domains_count", |o| {
        o.push_str(itoa::Buffer::new().format(table.len()))
    });
    member(&mut out, first, "generated_at", |o| {
        push_json_str(o, &rfc3339(SystemTime::now()))
    });
    member(&mut out, first, "domains", |o| {
        o.push('{');
        for (i, d) in domains.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            push_json_str(o, d.name);
            o.push_str(":{\"backends\":[");
            for (j, (b, h)) in d.domain.members().enumerate() {
                let s = BackendState::of(h);
                if j > 0 {
                    o.push(',');
                }
                o.push_str("{\"key\":");
                push_json_str(o, &b.key);
                o.push_str(",\"url\":");
                push_json_str(o, &b.url);
                o.push_str(",\"state\":");
                push_json_str(o, s.name());
                o.push_str(",\"ejected_until\":");
                json_opt_str(o, s.until.map(rfc3339).as_deref());
                o.push_str(",\"failures_in_a_row\":");
                o.push_str(itoa::Buffer::new().format(s.failures_in_a_row));
                o.push('}');
            }
            o.push_str("]}");
        }
        o.push('}');
    });
    out.push('}');
    out
}

/// An answer's head; the connection closes after the answer.
fn answer_head(status: u16, kind: &str, extra: &[(&str, &str)], length: usize) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Service Unavailable",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         Connection: close\r\n",
        length
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::TableSource;

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
    fn answer_heads_have_the_length_and_the_extra_fields_last() {
        let text = answer_head(405, "text/plain", &[("Allow", "GET, HEAD")], 5);
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Content-Length: 5\r\n"));
        assert!(text.ends_with("\r\nAllow: GET, HEAD\r\n\r\n"));
    }

    #[test]
    fn routes_json_is_json() {
        let view = StatusView {
            source: Some(TableSource::Etcd),
            api: "v3",
            endpoint: "http://e\"x".into(),
            revision: Some(9),
            last_event_at: Some(SystemTime::now()),
            last_error: Some(("bad \"thing\"".into(), SystemTime::now())),
            synced: Some((9, "00ff".into(), SystemTime::now())),
            ..StatusView::default()
        };
        let b = crate::routes::Backend::parse("/d/a.com/r\"1", "http://127.0.0.1:1").unwrap();
        let table = RouteTable::build([("a.com", Arc::new(b))], &RouteTable::default());
        let v: serde_json::Value =
            serde_json::from_str(&routes_json(&table, &view, String::new())).unwrap();
        assert_eq!(v["source"], "etcd");
        assert_eq!(v["state"], "starting");
        assert_eq!(v["revision"], 9);
        assert_eq!(v["last_error"]["error"], "bad \"thing\"");
        assert_eq!(v["synced"]["digest"], "00ff");
        assert_eq!(v["domains"]["a.com"]["backends"][0]["key"], "/d/a.com/r\"1");
        assert_eq!(v["domains"]["a.com"]["backends"][0]["state"], "in_rotation");
        assert!(v["domains"]["a.com"]["backends"][0]["ejected_until"].is_null());
    }
}
