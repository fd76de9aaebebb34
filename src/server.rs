//! The server front: accepts connections, serves each on its own thread
//! (up to a cap), keeps them alive between requests, and stops gracefully.
//!
//! Owns sockets, timeouts and the connection lifecycle; the wire format is
//! `http1`, the request logic `proxy`, upgraded connections `tunnel`. At
//! the connection cap a new connection takes the place of an idle
//! keep-alive one (closed, as its keep-alive timeout would have); when none
//! is idle the acceptor stops accepting, so new connections wait in the
//! kernel's listen backlog instead of costing a thread each. A panic while
//! serving a request costs that connection, never the process.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::health::now_ms;
use crate::http1::{
    self, BodyFraming, HeadError, HttpVersion, ResponseHead, connection_tokens, header,
    header_values,
};
use crate::log::{Logger, RequestRecord};
use crate::proxy::{IncomingRequest, Outcome, Proxy, ProxyResponse};
use crate::tunnel;

/// Connection threads do little on the stack; the buffers live on the heap.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;
const READ_BUFFER_BYTES: usize = 16 * 1024;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// How long the acceptor waits for a free slot before looking at the stop
/// flag again (and closing another idle connection, if one appeared).
const SLOT_POLL_MILLIS: u64 = 250;
/// `server.saturated` is logged at most this often.
const SATURATION_LOG_EVERY_MILLIS: u64 = 10_000;
/// Closing a socket with unread input makes the kernel send a reset, which
/// can destroy the answer before the client reads it; so after answering a
/// request whose body was not read, input is read and dropped for a while
/// before closing (what nginx calls a lingering close).
const LINGER_MAX_MILLIS: u64 = 1000;
const LINGER_MAX_BYTES: u64 = 256 * 1024;

/// Limits and timeouts of the client side.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Open connections at most (one thread each).
    pub max_connections: usize,
    /// A request head must be complete within this of its first byte, and
    /// the first request of a connection within this of the accept: a
    /// silent or dripping connection cannot sit on a slot.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub keepalive_timeout: Duration,
    /// Longest pause while reading a request body or writing a response.
    pub client_timeout: Duration,
    /// An upgraded connection with no byte either way for this is closed.
    pub tunnel_timeout: Duration,
}

/// Where a connection is in its life, for shutdown and for making room at
/// the connection cap. A connection that is not `ACTIVE` may be closed by
/// another thread, which first moves it to `CLOSING`; the connection's own
/// thread moves to `ACTIVE` with a compare-and-swap, so a request it has
/// read is never lost to a close it did not see.
const WAITING_FIRST: u8 = 0;
/// Between requests with no byte of the next one.
const KEEPALIVE_IDLE: u8 = 1;
/// Reading a request or serving it.
const ACTIVE: u8 = 2;
/// Carrying an upgraded connection: closed at shutdown (it has no natural
/// end to wait for).
const TUNNEL: u8 = 3;
/// Being closed by another thread.
const CLOSING: u8 = 4;

/// Shared by the acceptor and every connection thread.
struct Shared {
    proxy: Arc<Proxy>,
    log: Logger,
    settings: ServerSettings,
    /// When `server.saturated` was last logged ([`now_ms`]; 0: never).
    saturation_logged_ms: AtomicU64,
    stop: AtomicBool,
    /// Requests being served (head read, answer not yet written).
    busy: AtomicUsize,
    /// Open connections, with a condvar to wait for a free slot.
    open: Mutex<usize>,
    slot_freed: Condvar,
    /// Every open connection, so that shutdown can close the idle ones at
    /// once instead of each polling for it.
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    conns: HashMap<u64, (Arc<TcpStream>, Arc<AtomicU8>)>,
}

/// Moves `state` from `from` to `CLOSING` and shuts the socket, unless the
/// connection's thread got there first.
fn close_if(stream: &TcpStream, state: &AtomicU8, from: u8) -> bool {
    let won = state
        .compare_exchange(from, CLOSING, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if won {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    won
}

/// A connection's entry in the registry, removed on drop.
///
/// The socket is shared by the reader, the writer, the registry and a
/// tunnel: one descriptor per connection, not one per handle. (Reading
/// through `&TcpStream` also keeps std's uninitialised-buffer reads: a
/// wrapper type would make `BufReader` zero its whole buffer, 16 KiB of
/// memory touched for every idle connection.)
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
    state: Arc<AtomicU8>,
    stream: Arc<TcpStream>,
}

impl<'a> Registered<'a> {
    fn new(shared: &'a Shared, stream: &Arc<TcpStream>) -> Registered<'a> {
        let state = Arc::new(AtomicU8::new(WAITING_FIRST));
        let mut reg = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        let id = reg.next_id;
        reg.next_id += 1;
        reg.conns
            .insert(id, (Arc::clone(stream), Arc::clone(&state)));
        Registered {
            shared,
            id,
            state,
            stream: Arc::clone(stream),
        }
    }

    /// Moves to `to`; false if another thread is closing the connection.
    fn set(&self, to: u8) -> bool {
        let mut now = self.state.load(Ordering::SeqCst);
        loop {
            if now == to {
                return true;
            }
            if now == CLOSING {
                return false;
            }
            match self
                .state
                .compare_exchange(now, to, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(seen) => now = seen,
            }
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut reg = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reg.conns.remove(&self.id);
    }
}

pub struct Server {
    shared: Arc<Shared>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl Server {
    pub fn start(
        listen: SocketAddr,
        settings: ServerSettings,
        proxy: Arc<Proxy>,
        log: Logger,
    ) -> Result<Server, String> {
        let listener =
            TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let shared = Arc::new(Shared {
            proxy,
            log,
            settings,
            saturation_logged_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            open: Mutex::new(0),
            slot_freed: Condvar::new(),
            registry: Mutex::new(Registry::default()),
        });
        let s = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| format!("cannot start the accept thread: {e}"))?;
        Ok(Server {
            shared,
            local,
            acceptor,
        })
    }

    /// The address the listener is bound to (the port chosen, for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting (the listening socket is closed at once), lets the
    /// requests in flight finish within `grace`, and closes idle
    /// connections. Returns how many requests were still running when the
    /// grace period ended.
    pub fn shutdown(self, grace: Duration) -> usize {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.slot_freed.notify_all();
        // Wake the acceptor out of accept(); it then drops the listener.
        let wake = match self.local {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            other => other,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = self.acceptor.join();
        // Connections waiting for a request, and tunnels, are closed now;
        // the others close after their current answer (which says so).
        {
            let reg = self
                .shared
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (stream, state) in reg.conns.values() {
                for from in [WAITING_FIRST, KEEPALIVE_IDLE, TUNNEL] {
                    close_if(stream, state, from);
                }
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.shared.busy.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.shared.busy.load(Ordering::SeqCst)
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
        };
        // Holding one accepted connection while waiting for a slot costs a
        // file descriptor; the rest wait in the backlog.
        if shared.stop.load(Ordering::SeqCst) || !take_slot(&shared) {
            break;
        }
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    serve_connection(stream, peer, &s)
                }));
                release_slot(&s);
            });
        if spawned.is_err() {
            // The stream was moved into the failed closure and is closed.
            release_slot(&shared);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The listener drops here: new connections are refused from now on.
}

/// Waits for a free connection slot and takes it. At the cap, closes one
/// idle keep-alive connection to make room (again after each second of
/// waiting, in case it was not enough). False if the server is stopping.
fn take_slot(shared: &Shared) -> bool {
    let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
    let mut next_eviction = Instant::now();
    while *open >= shared.settings.max_connections {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        if Instant::now() >= next_eviction {
            let closed_idle = close_one_idle(shared);
            next_eviction = Instant::now() + Duration::from_secs(1);
            let now = now_ms();
            let last = shared.saturation_logged_ms.load(Ordering::Relaxed);
            if last == 0 || now.saturating_sub(last) >= SATURATION_LOG_EVERY_MILLIS {
                shared
                    .saturation_logged_ms
                    .store(now.max(1), Ordering::Relaxed);
                shared.log.event(
                    "server.saturated",
                    json!({
                        "max_connections": shared.settings.max_connections,
                        "closed_idle": closed_idle,
                    }),
                );
            }
        }
        open = shared
            .slot_freed
            .wait_timeout(open, Duration::from_millis(SLOT_POLL_MILLIS))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    *open += 1;
    true
}

/// True if there was an idle connection to close.
fn close_one_idle(shared: &Shared) -> bool {
    let reg = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
    reg.conns
        .values()
        .any(|(stream, state)| close_if(stream, state, KEEPALIVE_IDLE))
}

fn release_slot(shared: &Shared) {
    let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
    *open = open.saturating_sub(1);
    shared.slot_freed.notify_one();
}

/// Decrements the busy count even if serving the request panics.
struct BusyGuard<'a>(&'a AtomicUsize);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The socket's read timeout, set only when it changes (see
/// [`http1::set_read_timeout`]).
struct ReadTimeout<'a> {
    sock: &'a TcpStream,
    current: Option<Duration>,
}

impl ReadTimeout<'_> {
    fn set(&mut self, t: Duration) -> io::Result<()> {
        http1::set_read_timeout(self.sock, &mut self.current, t)
    }
}

fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let accepted = Instant::now();
    let _ = stream.set_nodelay(true);
    let settings = shared.settings;
    let _ = stream.set_write_timeout(Some(settings.client_timeout));
    let stream = Arc::new(stream);
    let registered = Registered::new(shared, &stream);
    let mut timeout = ReadTimeout {
        sock: &stream,
        current: None,
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, &*stream);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, &*stream);
    let mut copy_buf = Vec::new();
    let mut head_buf = Vec::with_capacity(1024);
    let mut first = true;

    loop {
        // Pipelined bytes already buffered are a request under way, not
        // an idle connection to close at the cap.
        if !first && reader.buffer().is_empty() && !registered.set(KEEPALIVE_IDLE) {
            return;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut head_deadline: Option<Instant> = None;
        let head = http1::read_head(&mut reader, &mut head_buf, |started| {
            if started && !registered.set(ACTIVE) {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            if started || first {
                // All of the head by its deadline (the first request's from
                // the accept).
                let deadline = *head_deadline.get_or_insert_with(|| {
                    let from = if first { accepted } else { Instant::now() };
                    from + settings.header_timeout
                });
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                // Rounded up to whole 100 ms, so the cached value mostly
                // stays put and no setsockopt is made per read.
                let tenths = left.as_millis().div_ceil(100).max(1);
                timeout.set(Duration::from_millis(
                    u64::try_from(tenths * 100).unwrap_or(u64::MAX),
                ))
            } else {
                timeout.set(settings.keepalive_timeout)
            }
        });
        let head = match head {
            Ok(head) => head,
            Err(HeadError::Closed | HeadError::Idle | HeadError::Broken) => return,
            Err(e) => {
                answer_bad_head(&mut writer, peer, shared, &e);
                linger_close(&mut reader);
                return;
            }
        };
        // Closed at the cap or at shutdown while the head came in: the
        // request was never started, and the client sees a closed
        // keep-alive connection, which it may retry.
        if !registered.set(ACTIVE) {
            return;
        }
        first = false;
        shared.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = BusyGuard(&shared.busy);
        let after = serve_request(
            head,
            &mut reader,
            &mut writer,
            &mut timeout,
            &mut copy_buf,
            peer,
            shared,
        );
        match after {
            After::KeepAlive => {}
            After::Close => return,
            After::Upgrade(request) => {
                let (incoming, started) = *request;
                let context = (peer, started);
                serve_upgrade(
                    incoming,
                    &mut reader,
                    &mut writer,
                    context,
                    shared,
                    &registered,
                );
                return;
            }
            After::LingerAndClose => {
                linger_close(&mut reader);
                return;
            }
        }
    }
}

fn answer_bad_head(
    writer: &mut BufWriter<&TcpStream>,
    peer: SocketAddr,
    shared: &Shared,
    e: &HeadError,
) {
    let Some(status) = e.status() else {
        return;
    };
    let why = match e {
        HeadError::LineTooLong => "request line too long".to_string(),
        HeadError::TooLarge => "request head too large".to_string(),
        HeadError::Timeout => "request head not received in time".to_string(),
        HeadError::Malformed(m) => m.clone(),
        HeadError::Closed | HeadError::Idle | HeadError::Broken => return,
    };
    let started = Instant::now();
    // The same answer as every refusal of the router's own; no request to
    // log beyond it.
    let ProxyResponse {
        status,
        headers,
        length,
        mut body,
    } = crate::proxy::refuse_unreadable(status, &why, "").response;
    let written = http1::write_response(
        writer,
        &ResponseHead {
            status,
            headers: &headers,
            length,
            head_only: false,
            version: HttpVersion::Http11,
            keep_alive: false,
        },
        &mut *body,
        &mut Vec::new(),
    );
    shared.log.request(RequestRecord {
        status,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes: written.body_bytes,
        client_ip: Some(peer.ip().to_string()),
        error: Some(why),
        ..RequestRecord::default()
    });
}

/// What to do with the connection after a request.
enum After {
    KeepAlive,
    Close,
    /// The request body was not read: see [`LINGER_MAX_MILLIS`].
    LingerAndClose,
    /// An upgrade request, to be served by [`serve_upgrade`].
    Upgrade(Box<(IncomingRequest, Instant)>),
}

fn linger_close(reader: &mut BufReader<&TcpStream>) {
    let sock = *reader.get_ref();
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(LINGER_MAX_MILLIS);
    let mut dropped = 0u64;
    let mut buf = [0u8; 8192];
    while dropped < LINGER_MAX_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match std::io::Read::read(reader, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n as u64,
        }
    }
}

/// Serves one request whose head has been read.
fn serve_request(
    head: http1::RequestHead,
    reader: &mut BufReader<&TcpStream>,
    writer: &mut BufWriter<&TcpStream>,
    timeout: &mut ReadTimeout<'_>,
    copy_buf: &mut Vec<u8>,
    peer: SocketAddr,
    shared: &Shared,
) -> After {
    let started = Instant::now();
    let wants_close = match head.version {
        HttpVersion::Http11 => {
            connection_tokens(&head.headers).any(|t| t.eq_ignore_ascii_case("close"))
        }
        // HTTP/1.0 connections are not kept alive.
        HttpVersion::Http10 => true,
    };
    let framing = http1::request_framing(head.version, &head.headers);
    let expect: Vec<&str> = header_values(&head.headers, "expect")
        .map(http1::trim_ows)
        .collect();
    // RFC 9110 §10.1.1: `100-continue` is the only expectation; HTTP/1.0
    // requests' expectations are ignored.
    let expects_continue = head.version == HttpVersion::Http11
        && expect.len() == 1
        && expect[0].eq_ignore_ascii_case("100-continue");
    let unmet_expectation =
        head.version == HttpVersion::Http11 && !expect.is_empty() && !expects_continue;

    let incoming = IncomingRequest {
        method: head.method,
        target: head.target,
        version: head.version,
        headers: head.headers,
        peer: Some(peer),
        framing: framing.unwrap_or(BodyFraming::None),
    };
    if incoming.framing != BodyFraming::None {
        let _ = timeout.set(shared.settings.client_timeout);
    }
    if framing.is_ok() && !unmet_expectation && crate::proxy::is_upgrade(&incoming) {
        return After::Upgrade(Box::new((incoming, started)));
    }

    // `100 Continue` goes straight to the socket (nothing is buffered in
    // the writer between requests).
    let mut continue_sock = expects_continue.then(|| *writer.get_ref());
    let (mut outcome, body_complete, body_error) = {
        let mut body = http1::BodyReader::new(reader, incoming.framing, continue_sock.as_mut());
        let outcome = match framing {
            Err(bad) => crate::proxy::refuse_unreadable(bad.status, bad.why, ""),
            Ok(_) if unmet_expectation => crate::proxy::refuse(417, "unsupported Expect", ""),
            Ok(_) => shared.proxy.handle(&incoming, &mut body),
        };
        (outcome, body.is_complete(), body.error)
    };

    // The client's body failed while we forwarded it: the backend's view
    // of the request is incomplete, whatever it answered.
    if let Some(kind) = body_error {
        let status = if matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            408
        } else {
            400
        };
        let upstream = outcome.upstream.take();
        outcome = crate::proxy::refuse_unreadable(status, "request body incomplete", &outcome.host);
        outcome.upstream = upstream;
    }
    // Keep the connection only when its framing is beyond doubt: a refused
    // framing leaves the body's bytes unread, and reading them as the next
    // request is exactly request smuggling.
    let unreadable = outcome.close || framing.is_err();
    let keep_alive = !wants_close
        && !unreadable
        && body_complete
        && body_error.is_none()
        && !shared.stop.load(Ordering::SeqCst);
    let written = write_and_log(
        incoming,
        outcome,
        keep_alive,
        writer,
        copy_buf,
        (peer, started),
        shared,
    );
    // Input the router did not read (a body, or whatever followed a
    // request it could not read) is drained before the close, so that the
    // close is not a reset that destroys the answer.
    if written.reusable {
        After::KeepAlive
    } else if body_error.is_none() && (!body_complete || unreadable) {
        After::LingerAndClose
    } else {
        After::Close
    }
}

/// Serves a request asking for a protocol upgrade (see
/// [`crate::proxy::is_upgrade`]). After a `101` the connection is a tunnel
/// until either side ends it; any other answer is passed on as usual. The
/// connection is closed afterwards either way.
fn serve_upgrade(
    incoming: IncomingRequest,
    reader: &mut BufReader<&TcpStream>,
    writer: &mut BufWriter<&TcpStream>,
    context: (SocketAddr, Instant),
    shared: &Shared,
    registered: &Registered<'_>,
) {
    // A rare path: its own scratch buffer.
    let copy_buf = &mut Vec::new();
    let upgraded = match shared.proxy.upgrade(&incoming) {
        Ok(up) if up.handshake.status == 101 => up,
        // Refused (or ignored): an ordinary answer, passed on; or the
        // router's own. Either way the connection closes, and what the
        // client sent after its head (often already the new protocol) is
        // drained first.
        Ok(refused) => {
            let outcome = refused.into_outcome(incoming.method == "HEAD");
            write_and_log(incoming, outcome, false, writer, copy_buf, context, shared);
            linger_close(reader);
            return;
        }
        Err(outcome) => {
            write_and_log(incoming, *outcome, false, writer, copy_buf, context, shared);
            linger_close(reader);
            return;
        }
    };
    let headers = crate::proxy::switching_headers(&upgraded.handshake.headers);
    let mut logged = Logged {
        host: upgraded.host,
        status: 101,
        upstream: Some(upgraded.upstream),
        ..Logged::default()
    };
    if let Err(e) = http1::write_switching_head(writer, &headers) {
        logged.error = Some(format!("writing the 101 head: {e}"));
    } else if !registered.set(TUNNEL) || shared.stop.load(Ordering::SeqCst) {
        // Checked after the state is set: either the shutdown sweep sees
        // TUNNEL, or this sees the stop flag (both SeqCst).
        logged.error = Some("closed at shutdown".into());
    } else {
        // Bytes the client sent after its head belong to the new protocol.
        let pending = reader.buffer().to_vec();
        reader.consume(pending.len());
        let state = Arc::clone(&registered.state);
        let relayed = tunnel::relay(
            &registered.stream,
            pending,
            upgraded.handshake,
            shared.settings.tunnel_timeout,
            Arc::new(move || state.load(Ordering::SeqCst) == CLOSING),
        );
        logged.bytes = relayed.to_client;
        logged.bytes_to_backend = Some(relayed.to_backend);
        logged.error = relayed.error;
    }
    log_request(shared, incoming, context, logged);
}

/// Writes an answer (the router's own or a backend's, already converted)
/// and logs the request.
fn write_and_log(
    incoming: IncomingRequest,
    outcome: Outcome,
    keep_alive: bool,
    writer: &mut BufWriter<&TcpStream>,
    copy_buf: &mut Vec<u8>,
    context: (SocketAddr, Instant),
    shared: &Shared,
) -> http1::Written {
    let ProxyResponse {
        status,
        headers,
        length,
        mut body,
    } = outcome.response;
    let mut written = http1::write_response(
        writer,
        &ResponseHead {
            status,
            headers: &headers,
            length,
            // Methods are case-sensitive (RFC 9110 §9.1): `head` is not HEAD.
            head_only: incoming.method == "HEAD",
            version: incoming.version,
            keep_alive,
        },
        &mut *body,
        copy_buf,
    );
    let logged = Logged {
        host: outcome.host,
        status,
        upstream: outcome.upstream,
        bytes: written.body_bytes,
        bytes_to_backend: None,
        error: outcome.error.or(written.error.take()),
    };
    log_request(shared, incoming, context, logged);
    written
}

/// What a request's log line says beyond the request itself.
#[derive(Default)]
struct Logged {
    host: String,
    status: u16,
    upstream: Option<String>,
    bytes: u64,
    bytes_to_backend: Option<u64>,
    error: Option<String>,
}

fn log_request(
    shared: &Shared,
    incoming: IncomingRequest,
    (peer, started): (SocketAddr, Instant),
    logged: Logged,
) {
    shared.log.request(RequestRecord {
        host: logged.host,
        method: incoming.method,
        path: incoming.target,
        status: logged.status,
        upstream: logged.upstream,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        bytes: logged.bytes,
        bytes_to_backend: logged.bytes_to_backend,
        client_ip: Some(peer.ip().to_string()),
        user_agent: header(&incoming.headers, "user-agent").map(str::to_string),
        error: logged.error,
    });
}
