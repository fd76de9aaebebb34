//! The backend edge: one request to one backend, HTTP/1.1 over pooled
//! `TcpStream`s.
//!
//! Owns backend sockets, their timeouts and the pool of idle keep-alive
//! connections; `proxy` sees only [`BackendRequest`], [`BackendResponse`]
//! and [`BackendError`]. The request goes out as the client sent it: the
//! target and header names byte for byte, the body in the client's framing.
//! The response head is read with `httparse` and its body framed by the
//! same code as the server side's (`http1::BodyReader`). Redirects are never
//! followed and bodies never decoded. Every wait is bounded by a timeout.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http1::{
    BodyFraming, BodyReader, Fields, connection_tokens, is_timeout, last_coding_is_chunked,
    parse_content_length, set_read_timeout,
};

/// Idle pooled connections older than this are not reused: many servers
/// close idle keep-alive connections after 5 s, and reusing one just as it
/// closes costs a retry.
const POOL_IDLE_MAX_SECS: u64 = 4;
/// Idle keep-alive connections kept per backend, and in all.
const POOL_IDLE_MAX_PER_BACKEND: usize = 256;
const POOL_IDLE_MAX_TOTAL: usize = 1024;
/// Every this many connections put back, the whole pool is swept of
/// expired ones (see `PoolState::sweep`).
const POOL_SWEEP_EVERY_PUTS: usize = 1024;
/// A backend's response head is bounded like a client's request head.
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 100;
/// The read buffer of a backend connection while it carries an answer.
const RESPONSE_BUFFER_BYTES: usize = 16 * 1024;
/// A request body up to this size is read whole before the request is
/// sent, so the request can go again on a fresh connection when a pooled
/// one turns out closed; a larger one is streamed.
const REPLAYABLE_BODY_BYTES: u64 = 16 * 1024;
/// Request body copy buffer, and the room kept in front of it for a chunk
/// size line (up to 8 hex digits and CRLF).
const COPY_BUFFER_BYTES: usize = 32 * 1024;
const CHUNK_HEAD_ROOM: usize = 10;
/// How long to look for an answer the backend may have sent before it
/// stopped taking the request body.
const EARLY_ANSWER_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct BackendRequest<'a> {
    pub method: &'a str,
    /// `host:port`.
    pub authority: &'a str,
    /// Path and query, starting with `/`, as the client sent them.
    pub path_and_query: &'a str,
    /// End-to-end headers only, `Host` included; framing headers are set
    /// from `framing`.
    pub headers: &'a [(&'a str, Cow<'a, [u8]>)],
    pub framing: BodyFraming,
}

pub struct BackendResponse {
    pub status: u16,
    /// As received (names as the backend spelt them), framing and
    /// hop-by-hop headers included; `proxy` filters.
    pub headers: Fields,
    /// The body's length when the backend framed it by `Content-Length`.
    pub length: Option<u64>,
    pub body: Box<dyn Read + Send + 'static>,
}

#[derive(Debug)]
pub enum BackendError {
    /// No connection was made, so no byte of the request left: safe to try
    /// another backend.
    Connect { timed_out: bool, detail: String },
    /// The backend took longer than the response timeout.
    Timeout { detail: String },
    /// Anything else after the connection was made (reset, bad response).
    Failed { detail: String },
    /// Reading the client's body failed while it was being sent.
    ClientBody { detail: String },
    /// The router itself ran out of file descriptors: says nothing about
    /// the backend.
    Local { detail: String },
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Connect {
                timed_out: true,
                detail,
            } => write!(f, "connect timed out: {detail}"),
            BackendError::Connect { detail, .. } => write!(f, "connect failed: {detail}"),
            BackendError::Timeout { detail } => write!(f, "timed out: {detail}"),
            BackendError::Failed { detail } => write!(f, "failed: {detail}"),
            BackendError::ClientBody { detail } => {
                write!(f, "client body failed while forwarding: {detail}")
            }
            BackendError::Local { detail } => write!(f, "router out of resources: {detail}"),
        }
    }
}

/// How long each step may take.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    /// From the request sent to the whole response head.
    response: Duration,
    /// Longest silence on the connection, either way.
    body: Duration,
}

pub struct BackendClient {
    timeouts: Timeouts,
    pool: Arc<Pool>,
}

impl BackendClient {
    /// Up to `pool_size` idle keep-alive connections are kept per backend
    /// (one per client connection the router serves at once, capped).
    /// `response_timeout` bounds the wait for the response head as a whole;
    /// `body_timeout` every single read and write (the longest silence),
    /// the head's reads included.
    pub fn new(
        connect_timeout: Duration,
        response_timeout: Duration,
        body_timeout: Duration,
        pool_size: usize,
    ) -> Self {
        BackendClient {
            timeouts: Timeouts {
                connect: connect_timeout,
                response: response_timeout,
                body: body_timeout,
            },
            pool: Arc::new(Pool {
                idle: Mutex::new(PoolState::default()),
                per_backend: pool_size.clamp(1, POOL_IDLE_MAX_PER_BACKEND),
            }),
        }
    }

    /// Sends the request, its body read from `body` per `framing`. On
    /// [`BackendError::Connect`] nothing has been read from `body`.
    ///
    /// A pooled connection is used only if a non-blocking peek, just before
    /// the request goes, finds nothing on it: not the backend's close, nor
    /// bytes it sent unasked (the late end of an earlier answer, which would
    /// be taken for the start of this one). If it closes after all before
    /// the first byte of an answer (the backend timed it out as the request
    /// left), an idempotent request goes once more on a fresh connection;
    /// any other answers `502`, as the backend may have acted on it.
    pub fn send(
        &self,
        req: &BackendRequest<'_>,
        body: &mut dyn Read,
    ) -> Result<BackendResponse, BackendError> {
        let streamed = match req.framing {
            BodyFraming::None => false,
            BodyFraming::Sized(n) => n > REPLAYABLE_BODY_BYTES,
            BodyFraming::Chunked => true,
        };
        // A connection first, so that a refused connect (the next backend's
        // turn) comes before any of the body is read.
        let mut pooled = self.pool.take(req.authority);
        let mut fresh = match pooled {
            Some(_) => None,
            None => Some(Conn::connect(req.authority, self.timeouts)?),
        };
        let mut request = request_head(req);
        let head_len = request.len();
        if let BodyFraming::Sized(n) = req.framing
            && !streamed
        {
            let start = request.len();
            body.take(n)
                .read_to_end(&mut request)
                .map_err(|e| client_body_failed(&e))?;
            if ((request.len() - start) as u64) < n {
                return Err(BackendError::ClientBody {
                    detail: "client closed the connection before the end of the request body"
                        .into(),
                });
            }
        }
        while pooled.as_ref().is_some_and(|c| !c.looks_open()) {
            pooled = self.pool.take(req.authority);
        }
        let conn = match (pooled, fresh.take()) {
            (Some(conn), _) | (None, Some(conn)) => conn,
            // Every pooled connection was dead: a connection now, after the
            // body was read, so a failure is no longer a `Connect` (the next
            // backend could not be given the body).
            (None, None) => Conn::connect(req.authority, self.timeouts).map_err(|e| match e {
                BackendError::Connect { detail, .. } if request.len() > head_len => {
                    BackendError::Failed { detail }
                }
                other => other,
            })?,
        };
        let replayable = !streamed && is_idempotent(req);
        match self.exchange(conn, &request, req, body, streamed) {
            Err(Failure::Stale(e)) if replayable => {
                // Not `Connect`: the first try may have reached the backend.
                let fresh = Conn::connect(req.authority, self.timeouts).map_err(|c| {
                    BackendError::Failed {
                        detail: format!("{c} (after a pooled connection failed: {e})"),
                    }
                })?;
                self.exchange(fresh, &request, req, body, streamed)
                    .map_err(|f| f.into_error(Some(&e)))
            }
            other => other.map_err(|f| f.into_error(None)),
        }
    }

    /// One try on one connection: the request (and its streamed body), then
    /// the response head.
    fn exchange(
        &self,
        mut conn: Conn,
        request: &[u8],
        req: &BackendRequest<'_>,
        body: &mut dyn Read,
        streamed: bool,
    ) -> Result<BackendResponse, Failure> {
        let reused = conn.reused;
        if let Err(e) = (&conn.stream).write_all(request) {
            return Err(if reused && is_closed(&e) {
                Failure::Stale(e)
            } else {
                Failure::Io("sending the request", e)
            });
        }
        // Set when the backend stopped taking the body: it may have
        // answered already (413, 401...), and that answer is worth more
        // than a 502. The connection is not reused after it.
        let mut body_refused = None;
        if streamed {
            let copied = match req.framing {
                BodyFraming::Chunked => copy_chunked(body, &conn.stream),
                BodyFraming::Sized(n) => copy_sized(body, &conn.stream, n),
                BodyFraming::None => Ok(()),
            };
            match copied {
                Ok(()) => {}
                Err(Copy::Client(e)) => return Err(Failure::Client(e)),
                Err(Copy::Backend(e)) => body_refused = Some(e),
            }
        }
        let deadline = match body_refused {
            Some(_) => Instant::now() + self.timeouts.response.min(EARLY_ANSWER_WAIT),
            None => Instant::now() + self.timeouts.response,
        };
        let mut reader = Buffered::new(conn.stream);
        let mut interim_seen = false;
        let head = loop {
            let head = read_response_head(
                &mut reader,
                deadline,
                &mut conn.read_timeout,
                self.timeouts.body,
            );
            let head = match (head, body_refused.take()) {
                (Ok(head), refused) => {
                    body_refused = refused;
                    head
                }
                (Err(_), Some(e)) => return Err(Failure::Io("sending the request body", e)),
                // Nothing at all of an answer on a reused connection: it
                // was closed as the request left.
                (Err(AnswerError::Nothing(e)), None)
                    if reused && !interim_seen && is_closed(&e) =>
                {
                    return Err(Failure::Stale(e));
                }
                (Err(AnswerError::Nothing(e) | AnswerError::Partial(e)), None) => {
                    return Err(Failure::Io("reading the response head", e));
                }
            };
            match head.status {
                101 => return Err(Failure::Protocol("101 to a request that asked no upgrade")),
                // Interim answers (100, 103): the final one follows.
                100..=199 => interim_seen = true,
                200..=599 => break head,
                _ => return Err(Failure::Protocol("status code outside 100-599")),
            }
        };
        let reuse = body_refused.is_none();
        response(
            req,
            head,
            reader,
            conn.read_timeout,
            &self.pool,
            self.timeouts.body,
            reuse,
        )
    }
}

/// RFC 9110 §9.2.2: a request that may be sent twice without a different
/// effect: an idempotent method, or one the client marked with an
/// idempotency key.
fn is_idempotent(req: &BackendRequest<'_>) -> bool {
    matches!(
        req.method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    ) || req
        .headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("idempotency-key"))
}

/// Builds the framing of the answer and the reader of its body, which puts
/// the connection back in the pool once the body has been read to its end.
fn response(
    req: &BackendRequest<'_>,
    head: ResponseHead,
    reader: Buffered,
    read_timeout: Option<Duration>,
    pool: &Arc<Pool>,
    body_timeout: Duration,
    reuse: bool,
) -> Result<BackendResponse, Failure> {
    let ResponseHead {
        status,
        http11,
        headers,
    } = head;
    let has_te = headers.get("transfer-encoding").is_some();
    let mut length: Option<u64> = None;
    for value in headers.values("content-length") {
        let n = parse_content_length(value).ok_or(Failure::Protocol("invalid Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(Failure::Protocol("conflicting Content-Length values"));
        }
        length = Some(n);
    }
    // RFC 9112 §6.3, in its order.
    let no_body = req.method == "HEAD" || matches!(status, 204 | 304);
    let framing = if no_body {
        Some(BodyFraming::None)
    } else if has_te {
        // Chunked last: chunked; anything else ends with the connection.
        last_coding_is_chunked(&headers).then_some(BodyFraming::Chunked)
    } else {
        length.map(BodyFraming::Sized)
    };
    // A connection that said it closes, an HTTP/1.0 one, or one whose
    // framing was doubtful (both headers) is not reused.
    let reusable = reuse
        && http11
        && framing.is_some()
        && !(has_te && length.is_some())
        && !connection_tokens(&headers).any(|t| t.eq_ignore_ascii_case(b"close"));
    let (body_reader, length) = match framing {
        Some(f) => (
            PooledBody::Framed(BodyReader::new(reader, f, None)),
            if has_te && !no_body { None } else { length },
        ),
        None => (PooledBody::UntilClose(reader), None),
    };
    let body = AnswerBody {
        body: Some(body_reader),
        back_to: reusable.then(|| (Arc::clone(pool), req.authority.to_string())),
        read_timeout: Some(body_timeout),
        timeout_was: read_timeout,
    };
    Ok(BackendResponse {
        status,
        headers,
        length,
        body: Box::new(body),
    })
}

/// Why one try failed.
enum Failure {
    /// A pooled connection closed before any byte of an answer arrived:
    /// worth another try when the request is idempotent and held whole.
    Stale(io::Error),
    Io(&'static str, io::Error),
    /// Reading the client's body failed.
    Client(io::Error),
    /// The backend broke HTTP.
    Protocol(&'static str),
}

impl Failure {
    /// `first` is the stale pooled connection this try replaced.
    fn into_error(self, first: Option<&io::Error>) -> BackendError {
        let retried = |detail: String| match first {
            Some(e) => format!("{detail} (after a pooled connection failed: {e})"),
            None => detail,
        };
        match self {
            Failure::Stale(e) => BackendError::Failed {
                detail: retried(format!("connection closed before an answer: {e}")),
            },
            Failure::Io(what, e) if is_timeout(&e) => BackendError::Timeout {
                detail: retried(format!("{what}: {e}")),
            },
            Failure::Io(what, e) => BackendError::Failed {
                detail: retried(format!("{what}: {e}")),
            },
            Failure::Client(e) => client_body_failed(&e),
            Failure::Protocol(what) => BackendError::Failed {
                detail: retried(format!("bad response: {what}")),
            },
        }
    }
}

fn client_body_failed(e: &io::Error) -> BackendError {
    BackendError::ClientBody {
        detail: e.to_string(),
    }
}

/// An error that says the peer closed the connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// The request line, the headers as given, and the framing header.
fn request_head(req: &BackendRequest<'_>) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(req.method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(req.path_and_query.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    crate::http1::push_fields(&mut head, req.headers);
    match req.framing {
        // As Go's transport does: `Content-Length: 0` for the methods that
        // expect a body (RFC 9110 §8.6 lets a client send it), none for the
        // others; never chunked, which servers without chunked uploads
        // answer with 411, and which an HTTP/1.0 client never sent.
        BodyFraming::None if matches!(req.method, "POST" | "PUT" | "PATCH") => {
            head.extend_from_slice(b"Content-Length: 0\r\n");
        }
        BodyFraming::None => {}
        BodyFraming::Sized(n) => {
            head.extend_from_slice(b"Content-Length: ");
            head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => head.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Which side of a body copy failed.
enum Copy {
    Client(io::Error),
    Backend(io::Error),
}

fn read_client(body: &mut dyn Read, buf: &mut [u8]) -> Result<usize, Copy> {
    loop {
        match body.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map_err(Copy::Client),
        }
    }
}

fn copy_sized(body: &mut dyn Read, mut out: &TcpStream, mut left: u64) -> Result<(), Copy> {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = read_client(body, &mut buf[..want])?;
        if n == 0 {
            return Err(Copy::Client(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection before the end of the request body",
            )));
        }
        out.write_all(&buf[..n]).map_err(Copy::Backend)?;
        left -= n as u64;
    }
    Ok(())
}

/// Each read of the client's body goes out as one chunk, in one write.
fn copy_chunked(body: &mut dyn Read, mut out: &TcpStream) -> Result<(), Copy> {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let data_end = buf.len() - 2;
    loop {
        let n = read_client(body, &mut buf[CHUNK_HEAD_ROOM..data_end])?;
        if n == 0 {
            return out.write_all(b"0\r\n\r\n").map_err(Copy::Backend);
        }
        let mut size = [0u8; CHUNK_HEAD_ROOM];
        let len = {
            let mut w = &mut size[..];
            // n < 2^32 fits in 8 hex digits and CRLF.
            let _ = write!(w, "{n:x}\r\n");
            CHUNK_HEAD_ROOM - w.len()
        };
        let start = CHUNK_HEAD_ROOM - len;
        buf[start..CHUNK_HEAD_ROOM].copy_from_slice(&size[..len]);
        let end = CHUNK_HEAD_ROOM + n;
        buf[end..end + 2].copy_from_slice(b"\r\n");
        out.write_all(&buf[start..end + 2]).map_err(Copy::Backend)?;
    }
}

thread_local! {
    /// A read buffer left by this thread's last backend answer: most
    /// requests then allocate none (malloc per request is what makes the
    /// static musl build slow).
    static SPARE_BUFFER: Cell<Option<Box<[u8]>>> = const { Cell::new(None) };
}

/// A backend connection with its read buffer, as `BufReader` would hold
/// it, but with a buffer taken from this thread's spare and given back by
/// [`Buffered::into_inner`].
pub struct Buffered {
    stream: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl Buffered {
    pub fn new(stream: TcpStream) -> Buffered {
        let buf = SPARE_BUFFER
            .take()
            .unwrap_or_else(|| vec![0u8; RESPONSE_BUFFER_BYTES].into_boxed_slice());
        Buffered {
            stream,
            buf,
            pos: 0,
            filled: 0,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// Read from the socket and not consumed yet.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// The connection; the buffer (and whatever it still holds) goes back
    /// to this thread's spare.
    pub fn into_inner(self) -> TcpStream {
        SPARE_BUFFER.set(Some(self.buf));
        self.stream
    }
}

impl Read for Buffered {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // A large read with nothing buffered goes straight to the caller.
        if self.pos == self.filled && out.len() >= self.buf.len() {
            return (&self.stream).read(out);
        }
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(out.len());
            out[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Buffered {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            self.filled = (&self.stream).read(&mut self.buf)?;
            self.pos = 0;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.filled);
    }
}

/// A backend connection and the read timeout set on it (set only when it
/// changes: most requests on a pooled connection cost no `setsockopt`).
struct Conn {
    stream: TcpStream,
    read_timeout: Option<Duration>,
    /// Taken from the pool, not freshly connected.
    reused: bool,
}

impl Conn {
    fn connect(authority: &str, timeouts: Timeouts) -> Result<Conn, BackendError> {
        let stream = connect(authority, timeouts.connect)?;
        let _ = stream.set_nodelay(true);
        // Never changes for this connection: set once.
        let _ = stream.set_write_timeout(Some(timeouts.body));
        Ok(Conn {
            stream,
            read_timeout: None,
            reused: false,
        })
    }

    /// The backend has not closed this idle connection, nor sent anything
    /// unasked: a non-blocking peek finds nothing to read yet.
    fn looks_open(&self) -> bool {
        let mut byte = [0u8; 1];
        // SAFETY: recv writes at most one byte into `byte`, which lives
        // across the call; the descriptor is owned by `self.stream`.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}

/// Resolves and connects, trying each address in turn.
pub fn connect(authority: &str, timeout: Duration) -> Result<TcpStream, BackendError> {
    let addrs: Vec<SocketAddr> = authority
        .to_socket_addrs()
        .map_err(|e| BackendError::Connect {
            timed_out: false,
            detail: format!("resolving {authority}: {e}"),
        })?
        .collect();
    let mut last = BackendError::Connect {
        timed_out: false,
        detail: format!("{authority} resolves to no address"),
    };
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) if is_local_shortage(&e) => {
                return Err(BackendError::Local {
                    detail: format!("connecting to {addr}: {e}"),
                });
            }
            Err(e) => {
                last = BackendError::Connect {
                    timed_out: is_timeout(&e),
                    detail: format!("connecting to {addr}: {e}"),
                };
            }
        }
    }
    Err(last)
}

/// A response head as received.
pub struct ResponseHead {
    pub status: u16,
    /// `HTTP/1.1` (else `HTTP/1.0`).
    pub http11: bool,
    /// Names as the backend spelt them, values as its bytes.
    pub headers: Fields,
}

/// Why no response head could be read.
pub enum AnswerError {
    /// Not one byte of an answer arrived.
    Nothing(io::Error),
    /// Part of a head arrived, or a malformed one.
    Partial(io::Error),
}

/// Reads one response head by `deadline`, each read waiting at most
/// `body_timeout`. `read_timeout` is the timeout set on the socket, kept
/// up to date (rounded up to whole seconds, so that it mostly stays put).
pub fn read_response_head(
    conn: &mut Buffered,
    deadline: Instant,
    read_timeout: &mut Option<Duration>,
    body_timeout: Duration,
) -> Result<ResponseHead, AnswerError> {
    let mut head: Vec<u8> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let fail = |e: io::Error, head: &[u8]| {
            if head.is_empty() {
                AnswerError::Nothing(e)
            } else {
                AnswerError::Partial(e)
            }
        };
        if left.is_zero() {
            return Err(fail(io::ErrorKind::TimedOut.into(), &head));
        }
        let wait = body_timeout.min(Duration::from_secs(left.as_secs() + 1));
        set_read_timeout(conn.get_ref(), read_timeout, wait).map_err(|e| fail(e, &head))?;
        let available = match conn.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(e, &head)),
        };
        if available.is_empty() {
            return Err(fail(
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "backend closed the connection before a complete response head",
                ),
                &head,
            ));
        }
        let before = head.len();
        head.extend_from_slice(available);
        let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        let malformed =
            |why: String| AnswerError::Partial(io::Error::new(io::ErrorKind::InvalidData, why));
        match resp.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                conn.consume(len - before);
                let mut headers = Fields::with_capacity(resp.headers.len(), len);
                for h in resp.headers.iter() {
                    headers.push(h.name, h.value);
                }
                return Ok(ResponseHead {
                    status: resp.code.unwrap_or(0),
                    http11: resp.version == Some(1),
                    headers,
                });
            }
            Ok(httparse::Status::Partial) if head.len() <= MAX_RESPONSE_HEAD_BYTES => {
                let n = head.len() - before;
                conn.consume(n);
            }
            Ok(httparse::Status::Partial) => {
                return Err(malformed("response head too large".into()));
            }
            Err(e) => return Err(malformed(format!("bad response head: {e}"))),
        }
    }
}

/// The body of an answer, as framed.
enum PooledBody {
    Framed(BodyReader<Buffered, io::Sink>),
    /// Neither a length nor chunked: the body ends with the connection.
    UntilClose(Buffered),
}

/// A backend's answer body. As soon as it has been read to its end, the
/// connection goes back to the pool (if the answer allows reuse), before
/// the last bytes reach the client: the client's next request, on this
/// connection or another, then finds it there. Dropped earlier, the
/// connection is closed.
struct AnswerBody {
    body: Option<PooledBody>,
    /// Where the connection goes when the body is done.
    back_to: Option<(Arc<Pool>, String)>,
    /// The body's reads wait at most this long.
    read_timeout: Option<Duration>,
    /// The timeout set on the socket while the head was read.
    timeout_was: Option<Duration>,
}

impl AnswerBody {
    /// Puts the connection back in the pool if its answer was read to the
    /// very end, with nothing after it (bytes past the answer would be
    /// read as the next answer's start); closes it otherwise.
    fn release(&mut self) {
        let (Some((pool, authority)), Some(PooledBody::Framed(reader))) =
            (self.back_to.take(), self.body.take())
        else {
            return;
        };
        if !reader.is_complete() || !reader.get_ref().buffer().is_empty() {
            return;
        }
        let stream = reader.into_inner().into_inner();
        // (`into_inner` gave the read buffer back to this thread's spare.)
        pool.put(
            &authority,
            Conn {
                stream,
                read_timeout: self.timeout_was,
                reused: true,
            },
        );
    }
}

impl Read for AnswerBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(want) = self.read_timeout.take() {
            let stream = match &self.body {
                Some(PooledBody::Framed(r)) => r.get_ref().get_ref(),
                Some(PooledBody::UntilClose(r)) => r.get_ref(),
                None => return Ok(0),
            };
            set_read_timeout(stream, &mut self.timeout_was, want)?;
        }
        match &mut self.body {
            Some(PooledBody::Framed(r)) => {
                let n = r.read(buf)?;
                if r.is_complete() {
                    self.release();
                }
                Ok(n)
            }
            Some(PooledBody::UntilClose(r)) => r.read(buf),
            None => Ok(0),
        }
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        self.release();
    }
}

/// Idle keep-alive connections by backend authority. Newest last: the
/// warmest is taken first, and the ones idle too long age out at the
/// front. A backend with no idle connection has no entry, so backends that
/// come and go leave nothing behind.
struct Pool {
    idle: Mutex<PoolState>,
    per_backend: usize,
}

#[derive(Default)]
struct PoolState {
    by_backend: HashMap<String, Vec<Idle>>,
    total: usize,
    /// Connections put back since the last sweep.
    puts: usize,
}

impl PoolState {
    /// Takes out every expired connection of every backend, and the entries
    /// left empty: a backend that is no longer asked for (removed from
    /// etcd, say) would otherwise keep its sockets and its share of the
    /// total cap for good.
    fn sweep(&mut self, now: Instant) -> Vec<Idle> {
        let mut expired = Vec::new();
        self.by_backend.retain(|_, list| {
            let n = list.iter().take_while(|i| is_expired(i, now)).count();
            expired.extend(list.drain(..n));
            !list.is_empty()
        });
        self.total -= expired.len();
        self.puts = 0;
        expired
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

fn is_expired(idle: &Idle, now: Instant) -> bool {
    now.duration_since(idle.since) > Duration::from_secs(POOL_IDLE_MAX_SECS)
}

impl Pool {
    /// The newest idle connection to `authority`, if it is fresh enough
    /// (when it is not, none is: the others are older).
    fn take(&self, authority: &str) -> Option<Conn> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let taken = {
            let mut state = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let PoolState {
                by_backend, total, ..
            } = &mut *state;
            let list = by_backend.get_mut(authority)?;
            let newest = list.pop();
            let taken = match newest {
                Some(idle) if !is_expired(&idle, now) => Some(idle.conn),
                Some(idle) => {
                    expired.push(idle);
                    expired.append(list);
                    None
                }
                None => None,
            };
            *total -= expired.len() + usize::from(taken.is_some());
            if list.is_empty() {
                by_backend.remove(authority);
            }
            taken
        };
        // Closed outside the lock.
        drop(expired);
        taken
    }

    fn put(&self, authority: &str, conn: Conn) {
        let now = Instant::now();
        let mut state = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        state.puts += 1;
        // Now and then, and whenever the cap is reached: each connection is
        // swept once, so this is O(1) a put on average.
        let dropped = if state.total >= POOL_IDLE_MAX_TOTAL || state.puts >= POOL_SWEEP_EVERY_PUTS {
            state.sweep(now)
        } else {
            Vec::new()
        };
        let PoolState {
            by_backend, total, ..
        } = &mut *state;
        let list = match by_backend.get_mut(authority) {
            Some(list) => list,
            None => by_backend.entry(authority.to_string()).or_default(),
        };
        if list.len() < self.per_backend && *total < POOL_IDLE_MAX_TOTAL {
            list.push(Idle { conn, since: now });
            *total += 1;
        } else if list.is_empty() {
            by_backend.remove(authority);
        }
        // Closed outside the lock.
        drop(state);
        drop(dropped);
    }
}

/// Out of file descriptors (EMFILE, ENFILE): the router's shortage, which
/// must not be held against a backend. (Not `AddrNotAvailable`: that is
/// also what an address family the host lacks gives, and another address
/// or backend may well work.)
pub fn is_local_shortage(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}
