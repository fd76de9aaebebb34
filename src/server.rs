//! The server front: serves client connections with a pool of workers
//! and stops gracefully.
//!
//! A connection lives with the [`poller`](crate::poller) while it waits
//! for a request (idle, or its head still arriving) and with a
//! [`worker`](crate::workers) while a request is served: a worker gets a
//! connection whose head it can read without waiting, serves that request
//! (and any pipelined after it) with blocking I/O and timeouts, and hands
//! the connection back. Owns the request lifecycle on a connection; the
//! wire format is `http1`, the request logic `proxy`, upgraded
//! connections `tunnel`. A panic while serving a request costs that
//! connection, never the process.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{ClientBuffers, ClientReader, ClientSocket, ClientWriter};
use crate::http1::{
    self, BodyFraming, HeadError, HeadScan, HttpVersion, Request, ResponseHead, Verdict,
};
use crate::log::{Logger, RequestRecord};
use crate::metrics::{DomainStats, Metrics};
use crate::poller::{Back, Dispatch, Handback, Job, Parked, Poller, PollerLimits};
use crate::proxy::{Outcome, Proxy, ProxyResponse};
use crate::tunnel;
use crate::workers::Pool;

/// Closing a socket with unread input makes the kernel send a reset, which
/// can destroy the answer before the client reads it; so after answering a
/// request whose body was not read, input is read and dropped for a while
/// before closing (what nginx calls a lingering close).
const LINGER_MAX_MILLIS: u64 = 1000;
const LINGER_MAX_BYTES: u64 = 256 * 1024;

/// Limits and timeouts of the client side.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Open connections at most; idle ones cost no thread.
    pub max_connections: usize,
    /// Workers serving ordinary requests at once (see [`crate::workers`]:
    /// workers held by slow requests are replaced, up to one per
    /// connection).
    pub workers: usize,
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

/// Shared by the workers.
struct Shared {
    proxy: Arc<Proxy>,
    log: Logger,
    metrics: Arc<Metrics>,
    settings: ServerSettings,
    stop: Arc<AtomicBool>,
    /// Connections a worker holds or is about to (dispatched, not yet
    /// handed back): what shutdown waits for.
    busy: Arc<AtomicUsize>,
    handback: Handback,
    /// To take an upgraded connection off the poller's epoll set.
    registry: mio::Registry,
}

/// A worker thread's own buffers, reused from connection to connection.
#[derive(Default)]
struct WorkerBuffers {
    client: ClientBuffers,
    copy: Vec<u8>,
    head: Vec<u8>,
}

/// The poller's way to the workers.
struct ToWorkers {
    pool: Pool<Job, WorkerBuffers>,
    busy: Arc<AtomicUsize>,
}

impl Dispatch for ToWorkers {
    fn dispatch(&self, job: Job) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.pool.submit(job);
    }

    fn check(&self) {
        self.pool.check();
    }

    fn queued(&self) -> usize {
        self.pool.queued()
    }
}

pub struct Server {
    shared: Arc<Shared>,
    local: SocketAddr,
    poller: JoinHandle<()>,
}

impl Server {
    pub fn start(
        listen: SocketAddr,
        settings: ServerSettings,
        proxy: Arc<Proxy>,
        log: Logger,
        metrics: Arc<Metrics>,
    ) -> Result<Server, String> {
        let listener =
            TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let limits = PollerLimits {
            max_connections: settings.max_connections,
            header_timeout: settings.header_timeout,
            keepalive_timeout: settings.keepalive_timeout,
        };
        let (poller, handback, registry) = Poller::new(
            listener,
            limits,
            log.clone(),
            Arc::clone(&stop),
            Arc::clone(&metrics),
        )
        .map_err(|e| format!("cannot start the poller: {e}"))?;
        let busy = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            proxy,
            log,
            metrics,
            settings,
            stop,
            busy: Arc::clone(&busy),
            handback,
            registry,
        });
        let s = Arc::clone(&shared);
        let pool = Pool::new(
            settings.workers,
            settings.max_connections,
            move |job, bufs| serve_job(&s, job, bufs),
        );
        let dispatch = ToWorkers { pool, busy };
        let poller = std::thread::Builder::new()
            .name("poller".into())
            .spawn(move || poller.run(dispatch))
            .map_err(|e| format!("cannot start the poller thread: {e}"))?;
        Ok(Server {
            shared,
            local,
            poller,
        })
    }

    /// The address the listener is bound to (the port chosen, for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting (the listening socket is closed at once), closes
    /// idle connections and tunnels, and lets the requests in flight finish
    /// within `grace` (their answers say `Connection: close`). Returns how
    /// many connections were still being served when the grace period
    /// ended.
    pub fn shutdown(self, grace: Duration) -> usize {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.handback.wake();
        let _ = self.poller.join();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.shared.busy.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.shared.busy.load(Ordering::SeqCst)
    }
}

/// Decrements the busy count even if serving panics.
struct BusyGuard<'a>(&'a AtomicUsize);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A worker's job: serve the connection until it is idle (or closed), then
/// tell the poller.
fn serve_job(shared: &Shared, job: Job, bufs: &mut WorkerBuffers) {
    let token = job.token;
    let back = {
        let _busy = BusyGuard(&shared.busy);
        std::panic::catch_unwind(AssertUnwindSafe(|| serve_connection(job, bufs, shared)))
            .unwrap_or(Back::Closed { token })
    };
    // A stopped poller drops the message, and the connection with it.
    shared.handback.send(back);
}

/// How one turn on a connection ended.
enum Turn {
    /// The next request's head is already buffered whole (pipelining).
    Next(Vec<u8>),
    /// Idle, or part of the next head buffered: back to the poller.
    Park(Vec<u8>),
    Close,
}

fn serve_connection(job: Job, bufs: &mut WorkerBuffers, shared: &Shared) -> Back {
    let Job { token, conn } = job;
    let Parked {
        sock,
        peer,
        pending,
        eof,
        away,
        ..
    } = conn;
    let sock = ClientSocket::new(sock, shared.settings.client_timeout);
    let mut pending = pending;
    loop {
        let turn = {
            let (mut reader, mut writer) = bufs.client.attach(&sock, &pending);
            let conn = Conn { token, peer, eof };
            serve_turn(
                &conn,
                &mut reader,
                &mut writer,
                (&mut bufs.copy, &mut bufs.head),
                shared,
            )
        };
        match turn {
            Turn::Next(next) => pending = next,
            Turn::Park(pending) => {
                return Back::Park {
                    token,
                    sock: sock.into_stream(),
                    peer,
                    pending,
                    away,
                };
            }
            Turn::Close => {
                drop(sock);
                return Back::Closed { token };
            }
        }
    }
}

/// The connection a turn serves.
struct Conn {
    token: usize,
    peer: SocketAddr,
    /// The client ended its side: nothing will tell the poller when to
    /// read again, so the worker reads on until the end.
    eof: bool,
}

/// Reads one request head (whole in the buffer, or the poller would not
/// have handed the connection over) and serves the request.
fn serve_turn(
    conn: &Conn,
    reader: &mut ClientReader<'_>,
    writer: &mut ClientWriter<'_>,
    (copy_buf, head_buf): (&mut Vec<u8>, &mut Vec<u8>),
    shared: &Shared,
) -> Turn {
    if shared.stop.load(Ordering::SeqCst) {
        return Turn::Close;
    }
    // A worker never waits for a head: a read that would block means the
    // head is late (the poller hands over heads past their deadline too),
    // and is answered as such (408, or nothing if nothing came).
    reader.socket().set_read_timeout(None);
    let head = http1::read_head(reader, head_buf, |_| Ok(()));
    let head = match head {
        Ok(head) => head,
        Err(HeadError::Closed | HeadError::Idle | HeadError::Broken) => return Turn::Close,
        Err(e) => {
            answer_bad_head(writer, conn.peer, shared, &e);
            linger_close(reader);
            return Turn::Close;
        }
    };
    let after = serve_request(head, reader, writer, copy_buf, conn.peer, shared);
    match after {
        After::KeepAlive => {
            let pending = reader.take_pending();
            if conn.eof || (!pending.is_empty() && HeadScan::default().ready(&pending)) {
                Turn::Next(pending)
            } else {
                Turn::Park(pending)
            }
        }
        After::Close => Turn::Close,
        After::Upgrade(request) => {
            let (incoming, started) = *request;
            serve_upgrade(incoming, reader, writer, (conn, started), shared);
            Turn::Close
        }
        After::LingerAndClose => {
            linger_close(reader);
            Turn::Close
        }
    }
}

fn answer_bad_head(writer: &mut impl Write, peer: SocketAddr, shared: &Shared, e: &HeadError) {
    let Some((status, why)) = e.answer() else {
        return;
    };
    let started = Instant::now();
    // The same answer as every refusal of the router's own; no request to
    // log beyond it.
    let ProxyResponse {
        status,
        headers,
        length,
        mut body,
    } = crate::proxy::refuse_unreadable(status, why, "").response;
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
    let took = started.elapsed();
    // Not in the duration histogram: there was no request, and this one's
    // clock started after the head failed (a 408 would look instant).
    shared.metrics.record(None, status, None);
    shared.log.request(RequestRecord {
        status,
        duration_ms: took.as_secs_f64() * 1000.0,
        bytes: written.body_bytes,
        client_ip: Some(peer.ip()),
        error: Some(why.to_string()),
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
    Upgrade(Box<(Request, Instant)>),
}

fn linger_close(reader: &mut ClientReader<'_>) {
    let sock = reader.socket();
    let _ = sock.stream().shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(LINGER_MAX_MILLIS);
    let mut dropped = 0u64;
    let mut buf = [0u8; 8192];
    while dropped < LINGER_MAX_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        sock.set_read_timeout(Some(left));
        match std::io::Read::read(reader, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => dropped += n as u64,
        }
    }
}

/// Serves one request whose head has been read.
fn serve_request(
    mut req: Request,
    reader: &mut ClientReader<'_>,
    writer: &mut ClientWriter<'_>,
    copy_buf: &mut Vec<u8>,
    peer: SocketAddr,
    shared: &Shared,
) -> After {
    let started = Instant::now();
    req.peer = Some(peer);
    let refused = match req.verdict {
        Verdict::Upgrade => return After::Upgrade(Box::new((req, started))),
        Verdict::Refuse(refusal) => Some(refusal),
        Verdict::Forward => None,
    };
    if req.framing != BodyFraming::None {
        reader
            .socket()
            .set_read_timeout(Some(shared.settings.client_timeout));
    }
    // `100 Continue` goes straight to the socket (nothing is buffered in
    // the writer between requests).
    let mut continue_sock = req.expects_continue.then(|| writer.socket());
    let (mut outcome, body_complete, body_error) = {
        let mut body = http1::BodyReader::new(reader, req.framing, continue_sock.as_mut());
        let outcome = match refused {
            Some(refusal) => crate::proxy::refusal(refusal, ""),
            None => shared.proxy.handle(&req, &mut body),
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
        let (upstream, stats) = (outcome.upstream.take(), outcome.stats.take());
        outcome = crate::proxy::refuse_unreadable(status, "request body incomplete", &outcome.host);
        (outcome.upstream, outcome.stats) = (upstream, stats);
    }
    // Keep the connection only when its framing is beyond doubt: a refused
    // framing leaves the body's bytes unread, and reading them as the next
    // request is exactly request smuggling.
    let unreadable = outcome.close;
    let keep_alive = !req.wants_close
        && !unreadable
        && body_complete
        && body_error.is_none()
        && !shared.stop.load(Ordering::SeqCst);
    let written = write_and_log(
        req,
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

/// Serves a request asking for a protocol upgrade
/// ([`Verdict::Upgrade`]). After a `101` the connection is a tunnel
/// until either side ends it; any other answer is passed on as usual. The
/// connection is closed afterwards either way.
fn serve_upgrade(
    incoming: Request,
    reader: &mut ClientReader<'_>,
    writer: &mut ClientWriter<'_>,
    (conn, started): (&Conn, Instant),
    shared: &Shared,
) {
    let context = (conn.peer, started);
    // A rare path: its own scratch buffer.
    let copy_buf = &mut Vec::new();
    let upgraded = match shared.proxy.upgrade(&incoming) {
        Ok(up) if up.handshake.status == 101 => up,
        // Refused (or ignored): an ordinary answer, passed on; or the
        // router's own. Either way the connection closes, and what the
        // client sent after its head (often already the new protocol) is
        // drained first.
        Ok(refused) => {
            let outcome = refused.into_outcome(incoming.is_head());
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
        stats: Some(upgraded.stats),
        tunnel: true,
        ..Logged::default()
    };
    // Counted as the 101 goes out, not when the tunnel ends (minutes or
    // hours later, perhaps after the domain left the table).
    shared.metrics.record(logged.stats.as_deref(), 101, None);
    let tunnel_stream = match http1::write_switching_head(writer, &headers) {
        Err(e) => Err(format!("writing the 101 head: {e}")),
        Ok(()) => tunnel_socket(reader.socket(), shared)
            .map_err(|e| format!("cannot hand the connection to the tunnel: {e}")),
    };
    match tunnel_stream {
        Err(why) => logged.error = Some(why),
        // Checked after the poller was told: either its shutdown sweep
        // finds the tunnel, or this sees the stop flag (both SeqCst).
        Ok(stream)
            if !shared.handback.send(Back::Tunnel {
                token: conn.token,
                stream: Arc::clone(&stream),
            }) || shared.stop.load(Ordering::SeqCst) =>
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            logged.error = Some("closed at shutdown".into());
        }
        Ok(stream) => {
            // Bytes the client sent after its head belong to the new
            // protocol.
            let pending = reader.take_pending();
            let stop = Arc::clone(&shared.stop);
            let relayed = tunnel::relay(
                &stream,
                pending,
                upgraded.handshake,
                shared.settings.tunnel_timeout,
                Arc::new(move || stop.load(Ordering::SeqCst)),
            );
            logged.bytes = relayed.to_client;
            logged.bytes_to_backend = Some(relayed.to_backend);
            logged.error = relayed.error;
        }
    }
    log_request(shared, incoming, context, logged);
}

/// The client's socket as a blocking one for [`tunnel::relay`], which
/// carries it on two threads of its own: taken off the poller's epoll set
/// (a tunnel's traffic would wake it for nothing) and switched to
/// blocking, once per tunnel.
fn tunnel_socket(sock: &ClientSocket, shared: &Shared) -> io::Result<Arc<std::net::TcpStream>> {
    let fd = sock.stream().as_raw_fd();
    shared.registry.deregister(&mut mio::unix::SourceFd(&fd))?;
    let stream = std::net::TcpStream::from(sock.stream().as_fd().try_clone_to_owned()?);
    stream.set_nonblocking(false)?;
    Ok(Arc::new(stream))
}

/// Writes an answer (the router's own or a backend's, already converted)
/// and logs the request.
fn write_and_log(
    incoming: Request,
    outcome: Outcome,
    keep_alive: bool,
    writer: &mut impl Write,
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
            head_only: incoming.is_head(),
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
        stats: outcome.stats,
        tunnel: false,
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
    stats: Option<Arc<DomainStats>>,
    /// An upgraded connection, counted when its 101 went out; its time is
    /// the session's, not a request's.
    tunnel: bool,
}

fn log_request(
    shared: &Shared,
    incoming: Request,
    (peer, started): (SocketAddr, Instant),
    logged: Logged,
) {
    let took = started.elapsed();
    // A tunnel was counted when its 101 went out.
    if !logged.tunnel {
        shared
            .metrics
            .record(logged.stats.as_deref(), logged.status, Some(took));
    }
    shared.log.request(RequestRecord {
        host: logged.host,
        method: incoming.method,
        path: incoming.target,
        status: logged.status,
        upstream: logged.upstream,
        duration_ms: took.as_secs_f64() * 1000.0,
        bytes: logged.bytes,
        bytes_to_backend: logged.bytes_to_backend,
        client_ip: Some(peer.ip()),
        user_agent: incoming
            .headers
            .get("user-agent")
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        error: logged.error,
    });
}
