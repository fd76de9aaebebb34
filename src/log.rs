//! Log events, the bounded channel they travel on, and the one thread that
//! writes them to a sink (stdout, a file, or an HTTP collector).
//!
//! A request thread never blocks here: [`Logger`] uses `try_send`, and when
//! the queue is full the event is dropped and counted; the count is itself
//! logged (`log.dropped`) as soon as there is room. The audit trail of what
//! the router serves (route and etcd events, [`Logger::audit`]) has a queue
//! of its own that drops nothing and that discovery alone sends to; large
//! snapshots are logged compactly and paced (`route_set`,
//! [`Logger::audit_raw`]). Only the log thread
//! touches the sink, so a slow disk or a dead collector slows nothing else.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use serde_json::{Map, Value};

use crate::cidr::IpText;
use crate::event::{Event, KINDS, Kind, Trail};

/// Events queued beyond this are dropped (and counted). The queue's slots
/// are allocated whole at start (see [`Payload::Request`]); the log thread
/// empties it every [`LOG_TICK_MILLIS`], when at 40,000 requests a second
/// it holds 2,000.
pub const LOG_QUEUE_CAPACITY: usize = 8_192;
/// Past this many queued audit events, a long one ([`Logger::audit_raw`],
/// a `route.bulk` line) waits up to [`AUDIT_PACE_MAX_MILLIS`] for the log
/// thread, which writes them as they come: a large snapshot's lines are
/// then not all held in memory at once, and a stuck sink delays discovery
/// by a bounded time, never forever.
pub const AUDIT_PACE_QUEUED: usize = 4;
const AUDIT_PACE_MAX_MILLIS: u64 = 100;
/// A line this long is written without waiting for others.
const LONG_LINE_BYTES: usize = 16 * 1024;
/// Lines written or POSTed together.
pub const LOG_BATCH_MAX_LINES: usize = 500;
/// A `--logurl` batch is sent at the latest this long after its first line.
pub const LOG_URL_FLUSH_SECS: u64 = 2;
/// Lines kept for `--logurl` while the collector is failing; older lines are
/// dropped (and counted) past this.
pub const LOG_URL_BUFFER_MAX_BYTES: usize = 8 * 1024 * 1024;
const LOG_URL_RETRY_MAX_SECS: u64 = 30;
const LOG_URL_TIMEOUT_SECS: u64 = 10;
/// How long shutdown waits for the log thread to write what it holds.
pub const LOG_SHUTDOWN_GRACE_SECS: u64 = 5;
/// The log thread wakes this often and takes everything queued. Waking per
/// event instead would cost every proxied request a context switch.
const LOG_TICK_MILLIS: u64 = 50;

/// One proxied request, sent from the request path; serialised on the log
/// thread so workers do no JSON work.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    pub host: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub upstream: Option<String>,
    pub duration_ms: f64,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// Bytes the client sent through an upgraded connection (tunnels only).
    pub bytes_to_backend: Option<u64>,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// Why the router answered itself (no route, backend down, …).
    pub error: Option<String>,
}

#[derive(Debug)]
enum Payload {
    /// Boxed: a queue slot is the size of the largest payload, and the
    /// queue's slots are allocated whole at start (8,192 of 224 bytes
    /// inline, 1.8 MiB; boxed, 40 bytes), for one small allocation per
    /// request.
    Request(Box<RequestRecord>),
    Event(Kind, Map<String, Value>),
    /// Fields already written as JSON object members (`"a":1,"b":[…]`).
    Raw(Kind, String),
    Shutdown,
}

#[derive(Debug)]
struct Message {
    at: SystemTime,
    payload: Payload,
}

/// The sending side, cheap to clone into every thread.
#[derive(Debug, Clone)]
pub struct Logger {
    tx: Sender<Message>,
    /// Unbounded: see the module documentation.
    audit_tx: Sender<Message>,
    dropped: Arc<AtomicU64>,
    unrouted: Arc<UnroutedLimit>,
    counts: Arc<Counts>,
}

/// Events logged, by kind, and lines the sink lost; read by `/metrics`.
#[derive(Debug)]
pub struct Counts {
    events: [AtomicU64; KINDS.len()],
    /// Lines `--logurl` dropped from its full buffer.
    sink_dropped: AtomicU64,
}

impl Default for Counts {
    fn default() -> Counts {
        Counts {
            events: std::array::from_fn(|_| AtomicU64::new(0)),
            sink_dropped: AtomicU64::new(0),
        }
    }
}

impl Counts {
    fn count(&self, kind: Kind) {
        self.events[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn of(&self, kind: Kind) -> u64 {
        self.events[kind.index()].load(Ordering::Relaxed)
    }
}

/// The router's answer to a request for a host it has no route for; the
/// log limits these (see [`UnroutedLimit`]).
pub const NO_ROUTE: &str = "no route for this host";
/// `503 no route` request lines logged per second at most; the rest are
/// counted and the count logged (`log.suppressed`).
pub const UNROUTED_LINES_PER_SEC: u64 = 20;

/// A scanner trying hosts cannot flood the sink: `503 no route` lines pass
/// [`UNROUTED_LINES_PER_SEC`] a second. Lock-free: one word holds the
/// second and its count.
#[derive(Debug, Default)]
struct UnroutedLimit {
    /// `second << 32 | lines logged in it`.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl UnroutedLimit {
    fn admit(&self, second: u64) -> bool {
        let second = second & 0xffff_ffff;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (at, lines) = (current >> 32, current & 0xffff_ffff);
            let next = if at != second {
                second << 32 | 1
            } else if lines < UNROUTED_LINES_PER_SEC {
                current + 1
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

impl Logger {
    /// Logs an event on the queue its kind names (see [`Trail`]): the
    /// audit trail never drops and never waits; the rest never waits and
    /// drops when the queue is full.
    pub fn emit(&self, event: Event) {
        let kind = event.kind();
        self.counts.count(kind);
        let payload = Payload::Event(kind, event.into_fields());
        match kind.trail() {
            Trail::Audit => {
                let msg = Message {
                    at: SystemTime::now(),
                    payload,
                };
                // Fails only once the log thread is gone, at the very end.
                let _ = self.audit_tx.send(msg);
            }
            Trail::Lossy | Trail::Log => self.send(payload),
        }
    }

    /// Logs a request; `503 no route` lines are limited (see
    /// [`UnroutedLimit`]).
    pub fn request(&self, record: RequestRecord) {
        if record.status == 503 && record.error.as_deref() == Some(NO_ROUTE) {
            let second = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            if !self.unrouted.admit(second) {
                return;
            }
        }
        self.counts.count(Kind::RouterRequest);
        self.send(Payload::Request(Box::new(record)));
    }

    /// [`Logger::audit`] with the fields already written as JSON object
    /// members (`"a":1,"b":[…]`, see [`push_json_str`]): for events that
    /// list thousands of items, which as JSON values would cost ten times
    /// their text.
    ///
    /// Paced (see [`AUDIT_PACE_QUEUED`]): never call it on the request path.
    pub fn audit_raw(&self, kind: Kind, members: String) {
        self.counts.count(kind);
        let until = Instant::now() + Duration::from_millis(AUDIT_PACE_MAX_MILLIS);
        while self.audit_tx.len() >= AUDIT_PACE_QUEUED && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let msg = Message {
            at: SystemTime::now(),
            payload: Payload::Raw(kind, members),
        };
        let _ = self.audit_tx.send(msg);
    }

    fn send(&self, payload: Payload) {
        let msg = Message {
            at: SystemTime::now(),
            payload,
        };
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A logger that throws everything away (for tests and tools).
    pub fn discard() -> Logger {
        let (tx, _) = crossbeam_channel::bounded(0);
        let (audit_tx, _) = crossbeam_channel::bounded(0);
        Logger {
            tx,
            audit_tx,
            dropped: Arc::new(AtomicU64::new(0)),
            unrouted: Arc::default(),
            counts: Arc::default(),
        }
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines lost: dropped from the full queue, or by `--logurl` while
    /// its collector was down.
    pub fn lost(&self) -> u64 {
        self.dropped() + self.counts.sink_dropped.load(Ordering::Relaxed)
    }

    /// `503 no route` lines left out (see [`UnroutedLimit`]).
    pub fn suppressed(&self) -> u64 {
        self.unrouted.suppressed.load(Ordering::Relaxed)
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }
}

/// Where log lines go.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    Stdout,
    File(std::path::PathBuf),
    Url(String),
}

/// The running log thread.
pub struct LogThread {
    handle: JoinHandle<()>,
    tx: Sender<Message>,
}

impl LogThread {
    /// Sends every queued event to the sink and stops the thread, waiting at
    /// most [`LOG_SHUTDOWN_GRACE_SECS`].
    pub fn shutdown(self) {
        let grace = Duration::from_secs(LOG_SHUTDOWN_GRACE_SECS);
        let msg = Message {
            at: SystemTime::now(),
            payload: Payload::Shutdown,
        };
        if self.tx.send_timeout(msg, grace).is_err() {
            return;
        }
        let deadline = Instant::now() + grace;
        while !self.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.handle.is_finished() {
            let _ = self.handle.join();
        }
    }
}

/// Opens the destination (so a bad `--logfile` fails before anything
/// starts) and starts the log thread.
///
/// `reopen` is the SIGHUP flag: set, the log file is reopened at the next
/// tick (ignored for the other destinations).
pub fn start(dest: Destination, reopen: Arc<AtomicBool>) -> io::Result<(Logger, LogThread)> {
    let sink = match dest {
        Destination::Stdout => Sink::Stdout,
        Destination::File(path) => Sink::File(LogFile::open(&path, reopen)?),
        Destination::Url(url) => Sink::Url(UrlSink::new(url)),
    };
    let (tx, rx) = crossbeam_channel::bounded(LOG_QUEUE_CAPACITY);
    let (audit_tx, audit_rx) = crossbeam_channel::unbounded();
    let dropped = Arc::new(AtomicU64::new(0));
    let unrouted: Arc<UnroutedLimit> = Arc::default();
    let counts: Arc<Counts> = Arc::default();
    let logger = Logger {
        tx,
        audit_tx: audit_tx.clone(),
        dropped: Arc::clone(&dropped),
        unrouted: Arc::clone(&unrouted),
        counts: Arc::clone(&counts),
    };
    let handle = std::thread::Builder::new()
        .name("log".into())
        .spawn(move || run([audit_rx, rx], sink, dropped, unrouted, counts))?;
    Ok((
        logger,
        LogThread {
            handle,
            tx: audit_tx,
        },
    ))
}

fn open_log_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// `queues`: the audit queue first, then the request queue (the shutdown
/// marker comes on the audit queue).
fn run(
    queues: [Receiver<Message>; 2],
    mut sink: Sink,
    dropped: Arc<AtomicU64>,
    unrouted: Arc<UnroutedLimit>,
    counts: Arc<Counts>,
) {
    let mut reported_dropped = 0u64;
    let (mut reported_suppressed, mut suppressed_at) = (0u64, Instant::now());
    let mut batch: Vec<String> = Vec::with_capacity(LOG_BATCH_MAX_LINES);
    let mut stopping = false;
    let tick = Duration::from_millis(LOG_TICK_MILLIS);
    let mut next_tick = Instant::now() + tick;
    while !stopping {
        // Audit events are written as they come (they are rare, and their
        // long ones are paced); request lines once a tick.
        let now = Instant::now();
        if now < next_tick {
            match queues[0].recv_timeout(next_tick - now) {
                Ok(msg) => {
                    stopping |= push_line(&mut batch, msg);
                    while let Ok(msg) = queues[0].try_recv() {
                        stopping |= push_line(&mut batch, msg);
                        if batch.len() >= LOG_BATCH_MAX_LINES {
                            sink.write(&mut batch);
                        }
                    }
                    sink.write(&mut batch);
                    // At shutdown, one last round below: requests queued,
                    // the dropped count.
                    if !stopping {
                        continue;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
        }
        next_tick = Instant::now() + tick;
        for rx in &queues {
            loop {
                match rx.try_recv() {
                    Ok(msg) => stopping |= push_line(&mut batch, msg),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                }
                // A long line (a `route.bulk` of hundreds of routes) goes
                // out at once: a large snapshot's lines are not all held
                // here together.
                if batch.len() >= LOG_BATCH_MAX_LINES
                    || batch.last().is_some_and(|l| l.len() > LONG_LINE_BYTES)
                {
                    sink.write(&mut batch);
                }
            }
        }
        counts
            .sink_dropped
            .store(sink.dropped_lines(), Ordering::Relaxed);
        let now_dropped = dropped.load(Ordering::Relaxed) + sink.dropped_lines();
        if now_dropped > reported_dropped {
            batch.push(own_line(
                &counts,
                Event::LogDropped {
                    dropped: now_dropped - reported_dropped,
                    dropped_total: now_dropped,
                },
            ));
            reported_dropped = now_dropped;
        }
        // Once a second at most, or at the end.
        let suppressed = unrouted.suppressed.load(Ordering::Relaxed);
        if suppressed > reported_suppressed
            && (stopping || suppressed_at.elapsed() >= Duration::from_secs(1))
        {
            batch.push(own_line(
                &counts,
                Event::LogSuppressed {
                    suppressed: suppressed - reported_suppressed,
                    suppressed_total: suppressed,
                    what: "router.request lines of 503 no route",
                    limit_per_sec: UNROUTED_LINES_PER_SEC,
                },
            ));
            reported_suppressed = suppressed;
            suppressed_at = Instant::now();
        }
        sink.write(&mut batch);
        if let Some(reason) = sink.tick(Instant::now()) {
            batch.push(own_line(&counts, Event::LogReopen { reason }));
            sink.write(&mut batch);
        }
    }
    // Whatever is still queued (events sent just before shutdown).
    for rx in &queues {
        while let Ok(msg) = rx.try_recv() {
            push_line(&mut batch, msg);
        }
    }
    sink.write(&mut batch);
    sink.finish(Instant::now() + Duration::from_secs(LOG_SHUTDOWN_GRACE_SECS));
}

/// A line of the log thread's own, counted like any event.
fn own_line(counts: &Counts, event: Event) -> String {
    let kind = event.kind();
    counts.count(kind);
    render_event(SystemTime::now(), kind, &event.into_fields())
}

/// Renders `msg` onto `batch`; true when it is the shutdown marker.
fn push_line(batch: &mut Vec<String>, msg: Message) -> bool {
    match msg.payload {
        Payload::Shutdown => return true,
        Payload::Event(kind, fields) => batch.push(render_event(msg.at, kind, &fields)),
        Payload::Raw(kind, members) => {
            let mut line = render_event(msg.at, kind, &Map::new());
            line.pop();
            line.push(',');
            line.push_str(&members);
            line.push('}');
            batch.push(line);
        }
        Payload::Request(r) => batch.push(render_request(msg.at, &r)),
    }
    false
}

fn render_event(at: SystemTime, kind: Kind, fields: &Map<String, Value>) -> String {
    let mut line = String::with_capacity(128);
    line.push_str("{\"timestamp\":\"");
    push_rfc3339(&mut line, at);
    line.push_str("\",\"event\":");
    push_json_str(&mut line, kind.name());
    line.push_str(",\"service\":\"httprouter\"");
    for (k, v) in fields {
        if matches!(k.as_str(), "timestamp" | "event" | "service") {
            continue;
        }
        line.push(',');
        line.push_str(&Value::from(k.as_str()).to_string());
        line.push(':');
        line.push_str(&v.to_string());
    }
    line.push('}');
    line
}

/// Written straight into the line, without building a JSON value first
/// and without `fmt` (numbers by `itoa`): this runs once per request.
fn render_request(at: SystemTime, r: &RequestRecord) -> String {
    let mut line = String::with_capacity(320);
    line.push_str("{\"timestamp\":\"");
    push_rfc3339(&mut line, at);
    line.push_str("\",\"event\":\"router.request\",\"service\":\"httprouter\",\"host\":");
    push_json_str(&mut line, &r.host);
    line.push_str(",\"method\":");
    push_json_str(&mut line, &r.method);
    line.push_str(",\"path\":");
    push_json_str(&mut line, &r.path);
    line.push_str(",\"status\":");
    line.push_str(itoa::Buffer::new().format(r.status));
    line.push_str(",\"upstream\":");
    push_json_opt(&mut line, r.upstream.as_deref());
    if r.duration_ms.is_finite() && r.duration_ms >= 0.0 {
        line.push_str(",\"duration_ms\":");
        push_millis(&mut line, r.duration_ms);
    }
    line.push_str(",\"bytes\":");
    line.push_str(itoa::Buffer::new().format(r.bytes));
    if let Some(n) = r.bytes_to_backend {
        line.push_str(",\"bytes_to_backend\":");
        line.push_str(itoa::Buffer::new().format(n));
    }
    line.push_str(",\"client_ip\":");
    match r.client_ip {
        Some(ip) => push_json_str(&mut line, IpText::new(ip).as_str()),
        None => line.push_str("null"),
    }
    line.push_str(",\"user_agent\":");
    push_json_opt(&mut line, r.user_agent.as_deref());
    if let Some(e) = &r.error {
        line.push_str(",\"error\":");
        push_json_str(&mut line, e);
    }
    line.push('}');
    line
}

/// Milliseconds to the microsecond, as a JSON number: `2`, `0.5`, `1.235`.
fn push_millis(line: &mut String, ms: f64) {
    // Finite and not negative (checked by the caller); saturates past
    // 584,000 years.
    let micros = (ms * 1000.0).round() as u64;
    line.push_str(itoa::Buffer::new().format(micros / 1000));
    let mut frac = micros % 1000;
    if frac > 0 {
        line.push('.');
        let mut digits = 3;
        while frac.is_multiple_of(10) {
            frac /= 10;
            digits -= 1;
        }
        push_padded(line, frac, digits);
    }
}

/// `n` in decimal, zero-padded to `width` digits.
fn push_padded(line: &mut String, n: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n);
    for _ in digits.len()..width {
        line.push('0');
    }
    line.push_str(digits);
}

fn push_json_opt(line: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(line, s),
        None => line.push_str("null"),
    }
}

/// A JSON string (RFC 8259 §7): quotes, backslashes and control
/// characters escaped, everything else as it is.
pub fn push_json_str(line: &mut String, s: &str) {
    use std::fmt::Write as _;
    line.push('"');
    let mut rest = s;
    while let Some(at) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') {
        line.push_str(&rest[..at]);
        let c = rest[at..].chars().next().unwrap_or(' ');
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c => {
                let _ = write!(line, "\\u{:04x}", u32::from(c));
            }
        }
        rest = &rest[at + c.len_utf8()..];
    }
    line.push_str(rest);
    line.push('"');
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-26T22:56:00.762817Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let mut out = String::with_capacity(27);
    push_rfc3339(&mut out, at);
    out
}

/// [`rfc3339`], written into `line` (no allocation of its own).
fn push_rfc3339(line: &mut String, at: SystemTime) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    push_padded(line, y.max(0) as u64, 4);
    for (sep, n, width) in [
        ('-', u64::from(m), 2),
        ('-', u64::from(d), 2),
        ('T', rem / 3600, 2),
        (':', rem % 3600 / 60, 2),
        (':', rem % 60, 2),
        ('.', u64::from(since.subsec_micros()), 6),
    ] {
        line.push(sep);
        push_padded(line, n, width);
    }
    line.push('Z');
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

enum Sink {
    Stdout,
    File(LogFile),
    Url(UrlSink),
}

/// How often the log file's path is checked for a move or a delete.
const LOG_FILE_CHECK_MILLIS: u64 = 1000;

/// `--logfile`, reopened on SIGHUP (logrotate's `postrotate`) and when the
/// path no longer names the open file (moved or deleted without a signal).
/// Only the log thread writes, whole lines at a time and between checks, so
/// no line is torn or lost across a reopen: lines before it are in the old
/// file, lines after it in the new one.
struct LogFile {
    path: PathBuf,
    file: File,
    /// Set by the SIGHUP handler.
    reopen: Arc<AtomicBool>,
    checked_at: Instant,
}

impl LogFile {
    fn open(path: &Path, reopen: Arc<AtomicBool>) -> io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_path_buf(),
            file: open_log_file(path)?,
            reopen,
            checked_at: Instant::now(),
        })
    }

    /// Reopens the file when asked to or when its path changed; returns
    /// why, for a `log.reopen` line in the new file.
    fn check(&mut self, now: Instant) -> Option<&'static str> {
        use std::os::unix::fs::MetadataExt;
        let reason = if self.reopen.swap(false, Ordering::Relaxed) {
            "sighup"
        } else if now.duration_since(self.checked_at) < Duration::from_millis(LOG_FILE_CHECK_MILLIS)
        {
            return None;
        } else {
            self.checked_at = now;
            let open = self.file.metadata().ok().map(|m| (m.dev(), m.ino()));
            match std::fs::metadata(&self.path) {
                Err(_) => "deleted_or_moved",
                Ok(m) if Some((m.dev(), m.ino())) != open => "replaced",
                Ok(_) => return None,
            }
        };
        match open_log_file(&self.path) {
            Ok(file) => {
                self.file = file;
                Some(reason)
            }
            Err(e) => {
                // The old file keeps the lines until the path works again.
                eprintln!(
                    "httprouter: reopening the log file {} failed: {e}",
                    self.path.display()
                );
                None
            }
        }
    }
}

impl Sink {
    /// Takes the lines out of `batch`.
    fn write(&mut self, batch: &mut Vec<String>) {
        if batch.is_empty() {
            return;
        }
        match self {
            Sink::Stdout => {
                let out = io::stdout();
                let mut out = out.lock();
                // A closed stdout must not stop the router: lines are lost,
                // nothing else.
                let _ = write_lines(&mut out, batch).and_then(|_| out.flush());
            }
            Sink::File(log) => {
                if let Err(e) = write_lines(&mut log.file, batch) {
                    eprintln!("httprouter: writing the log file failed: {e}");
                }
            }
            Sink::Url(u) => u.push(batch),
        }
        batch.clear();
    }

    /// Timed work; returns why the log file was reopened, if it was.
    fn tick(&mut self, now: Instant) -> Option<&'static str> {
        match self {
            Sink::Url(u) => {
                u.tick(now, false);
                None
            }
            Sink::File(log) => log.check(now),
            Sink::Stdout => None,
        }
    }

    fn finish(&mut self, deadline: Instant) {
        if let Sink::Url(u) = self {
            while !u.pending.is_empty() && Instant::now() < deadline {
                if !u.tick(Instant::now(), true) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn dropped_lines(&self) -> u64 {
        match self {
            Sink::Url(u) => u.dropped,
            _ => 0,
        }
    }
}

fn write_lines(w: &mut impl Write, lines: &[String]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        buf.extend_from_slice(l.as_bytes());
        buf.push(b'\n');
    }
    w.write_all(&buf)
}

/// Batches lines and POSTs them, newline-joined, to a collector. A failed
/// POST is retried with exponential backoff; meanwhile lines are kept up to
/// [`LOG_URL_BUFFER_MAX_BYTES`], the oldest dropped beyond that.
struct UrlSink {
    url: String,
    agent: ureq::Agent,
    pending: std::collections::VecDeque<String>,
    pending_bytes: usize,
    oldest_at: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    dropped: u64,
}

impl UrlSink {
    fn new(url: String) -> UrlSink {
        UrlSink {
            url,
            agent: ureq::Agent::config_builder()
                .proxy(None)
                .max_redirects(0)
                .timeout_global(Some(Duration::from_secs(LOG_URL_TIMEOUT_SECS)))
                .build()
                .new_agent(),
            pending: Default::default(),
            pending_bytes: 0,
            oldest_at: None,
            retry_at: None,
            backoff: Duration::from_secs(1),
            dropped: 0,
        }
    }

    fn push(&mut self, batch: &mut Vec<String>) {
        if self.pending.is_empty() {
            self.oldest_at = Some(Instant::now());
        }
        for line in batch.drain(..) {
            self.pending_bytes += line.len() + 1;
            self.pending.push_back(line);
        }
        while self.pending_bytes > LOG_URL_BUFFER_MAX_BYTES {
            match self.pending.pop_front() {
                Some(l) => {
                    self.pending_bytes -= l.len() + 1;
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// POSTs one batch when one is due; true when a POST succeeded.
    fn tick(&mut self, now: Instant, force: bool) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        let due = force
            || self.pending.len() >= LOG_BATCH_MAX_LINES
            || self
                .oldest_at
                .is_some_and(|t| now.duration_since(t) >= Duration::from_secs(LOG_URL_FLUSH_SECS));
        if !due {
            return false;
        }
        let n = self.pending.len().min(LOG_BATCH_MAX_LINES);
        let mut body = String::new();
        for line in self.pending.iter().take(n) {
            body.push_str(line);
            body.push('\n');
        }
        let result = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/x-ndjson")
            .send(body.as_bytes());
        match result {
            Ok(_) => {
                for _ in 0..n {
                    if let Some(l) = self.pending.pop_front() {
                        self.pending_bytes -= l.len() + 1;
                    }
                }
                self.oldest_at = (!self.pending.is_empty()).then(Instant::now);
                self.retry_at = None;
                self.backoff = Duration::from_secs(1);
                true
            }
            Err(e) => {
                eprintln!(
                    "httprouter: POST of {n} log lines to {} failed ({e}); retrying in {}s",
                    self.url,
                    self.backoff.as_secs()
                );
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(LOG_URL_RETRY_MAX_SECS));
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_733_760_762_817);
        assert_eq!(rfc3339(t), "2026-11-26T22:56:00.762817Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn request_lines_are_json_whatever_the_client_sent() {
        let odd = "a\"b\\c\n\r\t\u{1}\u{7f}é\u{ff}😀";
        let r = RequestRecord {
            host: odd.into(),
            method: "GET".into(),
            path: "/p?q=\"x\"".into(),
            status: 502,
            upstream: None,
            duration_ms: 1.23456,
            bytes: 7,
            bytes_to_backend: Some(3),
            client_ip: Some([127, 0, 0, 1].into()),
            user_agent: Some(odd.into()),
            error: Some("backend \"down\"".into()),
        };
        let line = render_request(UNIX_EPOCH, &r);
        let v: Value = serde_json::from_str(&line).expect(&line);
        assert_eq!(v["event"], "router.request");
        assert_eq!(v["service"], "httprouter");
        assert_eq!(v["host"], odd);
        assert_eq!(v["user_agent"], odd);
        assert_eq!(v["path"], "/p?q=\"x\"");
        assert_eq!(v["status"], 502);
        assert_eq!(v["upstream"], Value::Null);
        assert_eq!(v["duration_ms"], 1.235);
        for (ms, text) in [
            (2.0, "2"),
            (0.5, "0.5"),
            (0.0004, "0"),
            (1.0005, "1.001"),
            (10.02, "10.02"),
        ] {
            let mut line = String::new();
            push_millis(&mut line, ms);
            assert_eq!(line, text);
        }
        assert_eq!(v["bytes"], 7);
        assert_eq!(v["bytes_to_backend"], 3);
        assert_eq!(v["error"], "backend \"down\"");
        // Every field the definition names, and no other.
        let mut keys: Vec<&str> = v
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| !matches!(*k, "timestamp" | "event" | "service"))
            .collect();
        let mut defined = Kind::RouterRequest.fields().to_vec();
        keys.sort();
        defined.sort();
        assert_eq!(keys, defined);
        let plain = RequestRecord::default();
        let v: Value = serde_json::from_str(&render_request(UNIX_EPOCH, &plain)).unwrap();
        assert!(v.get("error").is_none() && v.get("bytes_to_backend").is_none());
        assert_eq!(v["client_ip"], Value::Null);
    }

    #[test]
    fn lines_are_json_with_the_common_fields() {
        let mut fields = Map::new();
        fields.insert("key".into(), "/domains/a\"b".into());
        fields.insert("event".into(), "spoofed".into());
        let line = render_event(UNIX_EPOCH, Kind::RouteAdd, &fields);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "route.add");
        assert_eq!(v["service"], "httprouter");
        assert_eq!(v["key"], "/domains/a\"b");
        assert!(line.starts_with("{\"timestamp\":\"1970-01-01T00:00:00.000000Z\""));
    }

    #[test]
    fn unknown_host_lines_are_limited_per_second() {
        let limit = UnroutedLimit::default();
        let admitted = (0..100).filter(|_| limit.admit(5)).count() as u64;
        assert_eq!(admitted, UNROUTED_LINES_PER_SEC);
        assert_eq!(
            limit.suppressed.load(Ordering::Relaxed),
            100 - UNROUTED_LINES_PER_SEC
        );
        assert!(limit.admit(6), "a new second, a new allowance");
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let (tx, _rx) = crossbeam_channel::bounded(2);
        let (audit_tx, audit_rx) = crossbeam_channel::unbounded();
        let logger = Logger {
            tx,
            audit_tx,
            dropped: Arc::new(AtomicU64::new(0)),
            unrouted: Arc::default(),
            counts: Arc::default(),
        };
        for _ in 0..5 {
            logger.emit(Event::AdminStart {
                listen: "test".into(),
            });
        }
        assert_eq!(logger.dropped(), 3);
        // The audit queue drops nothing and never waits; long lines wait a
        // little when many are queued, then go anyway.
        for _ in 0..50_000 {
            logger.emit(Event::StateError {
                path: "p".into(),
                error: "e".into(),
            });
        }
        let started = Instant::now();
        logger.audit_raw(Kind::RouteBulk, "\"items\":[]".into());
        assert!(started.elapsed() >= Duration::from_millis(AUDIT_PACE_MAX_MILLIS));
        assert_eq!(logger.dropped(), 3);
        assert_eq!(audit_rx.len(), 50_001);
    }

    #[test]
    fn dropped_events_are_reported_and_the_queue_is_flushed_at_shutdown() {
        let path = std::env::temp_dir().join(format!("httprouter-log-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = LogFile::open(&path, Arc::default()).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(4);
        let (audit_tx, audit_rx) = crossbeam_channel::unbounded();
        let dropped = Arc::new(AtomicU64::new(0));
        let logger = Logger {
            tx,
            audit_tx: audit_tx.clone(),
            dropped: Arc::clone(&dropped),
            unrouted: Arc::default(),
            counts: Arc::default(),
        };
        // Nobody is reading yet: 4 fit, 3 are dropped.
        for i in 0..7 {
            logger.emit(Event::BackendRestore {
                domain: i.to_string(),
                backend: "b".into(),
                key: "k".into(),
            });
        }
        assert_eq!(logger.dropped(), 3);
        let handle = std::thread::spawn(move || {
            run(
                [audit_rx, rx],
                Sink::File(file),
                dropped,
                Arc::default(),
                Arc::default(),
            )
        });
        LogThread {
            handle,
            tx: audit_tx,
        }
        .shutdown();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            events
                .iter()
                .filter(|e| e["event"] == "backend.restore")
                .count(),
            4
        );
        let report = events
            .iter()
            .find(|e| e["event"] == "log.dropped")
            .expect("a log.dropped event");
        assert_eq!(report["dropped"], 3);
        assert_eq!(report["dropped_total"], 3);
    }

    #[test]
    fn url_sink_bounds_its_buffer() {
        let mut sink = UrlSink::new("http://127.0.0.1:9/".into());
        let line = "x".repeat(1024);
        let mut batch: Vec<String> = (0..10_000).map(|_| line.clone()).collect();
        sink.push(&mut batch);
        assert!(sink.pending_bytes <= LOG_URL_BUFFER_MAX_BYTES);
        assert_eq!(sink.dropped as usize + sink.pending.len(), 10_000);
    }
}
