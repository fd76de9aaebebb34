//! Upgraded connections (`Connection: Upgrade`: WebSocket, or any other
//! protocol): the handshake with the backend, and after its `101` a
//! byte-for-byte copy both ways until either side ends or both fall silent.
//!
//! The handshake goes on a connection of its own, made and read by the
//! backend edge's `connect` and `read_response_head`, and never pooled: an
//! upgrade connection is used once. It knows nothing of routing or header
//! rules (`proxy` decides what is sent).

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::backend::{self, AnswerError, BackendError, Buffered};
use crate::health::now_ms;
use crate::http1::{
    BodyFraming, BodyReader, Fields, is_timeout, last_coding_is_chunked, parse_content_length,
};

const BUFFER_BYTES: usize = 16 * 1024;
const RELAY_STACK_BYTES: usize = 128 * 1024;

/// How long the handshake may take.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeTimeouts {
    pub connect: Duration,
    /// From the request sent to the whole response head.
    pub response: Duration,
    /// Longest silence on the connection: a write of the request, or a
    /// read of a refused upgrade's body.
    pub body: Duration,
}

/// The backend's answer to an upgrade request.
pub struct Handshake {
    pub status: u16,
    /// As received; `proxy` filters them.
    pub headers: Fields,
    /// The connection, positioned just after the response head.
    conn: Buffered,
    body_timeout: Duration,
}

/// Sends an upgrade request (which has no body) to `authority` and reads the
/// answer's head. Interim answers other than `101` (`100`, `103`) are
/// skipped. A [`BackendError::Connect`] means nothing was sent.
pub fn handshake(
    authority: &str,
    head: &[u8],
    timeouts: HandshakeTimeouts,
) -> Result<Handshake, BackendError> {
    let stream = backend::connect(authority, timeouts.connect)?;
    let failed = |what: &str, e: io::Error| {
        if is_timeout(&e) {
            BackendError::Timeout {
                detail: format!("{what}: {e}"),
            }
        } else {
            BackendError::Failed {
                detail: format!("{what}: {e}"),
            }
        }
    };
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(timeouts.body))
        .and_then(|_| (&stream).write_all(head))
        .map_err(|e| failed("sending the upgrade request", e))?;
    let deadline = Instant::now() + timeouts.response;
    let mut conn = Buffered::new(stream);
    let mut read_timeout = None;
    loop {
        let answer =
            backend::read_response_head(&mut conn, deadline, &mut read_timeout, timeouts.body)
                .map_err(|e| match e {
                    AnswerError::Nothing(e) | AnswerError::Partial(e) => {
                        failed("reading the answer", e)
                    }
                })?;
        if answer.status == 101 || !(100..200).contains(&answer.status) {
            return Ok(Handshake {
                status: answer.status,
                headers: answer.headers,
                conn,
                body_timeout: timeouts.body,
            });
        }
    }
}

impl Handshake {
    /// The body of an answer that is not `101`, for passing on; the
    /// connection is not reused afterwards. `None` when the length is
    /// unknown and the body ends when the backend closes.
    pub fn into_body(self, head_request: bool) -> (Option<u64>, Box<dyn Read + Send>) {
        let no_body = head_request || matches!(self.status, 100..=199 | 204 | 304);
        let has_te = self.headers.get("transfer-encoding").is_some();
        let chunked = has_te && last_coding_is_chunked(&self.headers);
        // RFC 9112 §6.3: with a Transfer-Encoding, a Content-Length says
        // nothing; without chunked last, the body ends with the connection.
        let length = if has_te {
            None
        } else {
            self.headers
                .get("content-length")
                .and_then(parse_content_length)
        };
        let conn = self.conn;
        let _ = conn.get_ref().set_read_timeout(Some(self.body_timeout));
        if no_body {
            return (length, Box::new(io::empty()));
        }
        if chunked {
            let body = BodyReader::<_, io::Sink>::new(conn, BodyFraming::Chunked, None);
            return (None, Box::new(body));
        }
        match length {
            Some(n) => (
                Some(n),
                Box::new(BodyReader::<_, io::Sink>::new(
                    conn,
                    BodyFraming::Sized(n),
                    None,
                )),
            ),
            None => (None, Box::new(conn)),
        }
    }
}

/// Asked about once a second by each direction: true ends the tunnel (the
/// server is shutting down).
pub type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

/// How a tunnel ended.
#[derive(Debug, Default)]
pub struct Relayed {
    pub to_backend: u64,
    pub to_client: u64,
    /// Why it ended, if not by both sides closing.
    pub error: Option<String>,
}

/// Copies bytes both ways between the client and the backend until both
/// directions have ended, or until nothing has moved either way for
/// `idle`. `client_pending` holds bytes the client sent after its request
/// head (already read off its socket). Uses one extra thread for the
/// client-to-backend direction.
pub fn relay(
    client: &Arc<TcpStream>,
    client_pending: Vec<u8>,
    handshake: Handshake,
    idle: Duration,
    cancelled: Cancelled,
) -> Relayed {
    let backend_pending = handshake.conn.buffer().to_vec();
    let backend = Arc::new(handshake.conn.into_inner());
    let (client_in, client_out) = (Arc::clone(client), Arc::clone(client));
    let (backend_in, backend_out) = (Arc::clone(&backend), Arc::clone(&backend));
    // Reads wake up this often to see whether the whole tunnel is idle.
    let poll = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    for s in [&client_in, &backend_in] {
        let _ = s.set_read_timeout(Some(poll));
        let _ = s.set_write_timeout(Some(idle));
    }
    let activity = Arc::new(AtomicU64::new(now_ms()));
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let up = {
        let activity = Arc::clone(&activity);
        let cancelled = Arc::clone(&cancelled);
        std::thread::Builder::new()
            .name("tunnel".into())
            .stack_size(RELAY_STACK_BYTES)
            .spawn(move || {
                pump(
                    client_in,
                    backend_out,
                    client_pending,
                    &activity,
                    idle_ms,
                    &*cancelled,
                )
            })
    };
    let Ok(up) = up else {
        let _ = backend.shutdown(Shutdown::Both);
        return Relayed {
            error: Some("cannot start the tunnel thread".into()),
            ..Relayed::default()
        };
    };
    let down = pump(
        backend_in,
        client_out,
        backend_pending,
        &activity,
        idle_ms,
        &*cancelled,
    );
    let up = up.join().unwrap_or(Pumped {
        bytes: 0,
        error: Some("tunnel thread panicked".into()),
    });
    let _ = backend.shutdown(Shutdown::Both);
    Relayed {
        to_backend: up.bytes,
        to_client: down.bytes,
        error: down.error.or(up.error),
    }
}

struct Pumped {
    bytes: u64,
    error: Option<String>,
}

/// One direction. On the reader's end the writer's side is half-closed, so
/// the other direction can finish; on an error or idleness both sockets are
/// shut, which ends the other direction too.
fn pump(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    pending: Vec<u8>,
    activity: &AtomicU64,
    idle_ms: u64,
    cancelled: &(dyn Fn() -> bool + Send + Sync),
) -> Pumped {
    let mut bytes = 0u64;
    let end = |from: &TcpStream, to: &TcpStream, bytes, why: String| {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
        Pumped {
            bytes,
            error: Some(why),
        }
    };
    if !pending.is_empty() {
        if let Err(e) = (&*to).write_all(&pending) {
            return end(&from, &to, bytes, format!("tunnel write failed: {e}"));
        }
        bytes += pending.len() as u64;
    }
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        match (&*from).read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return Pumped { bytes, error: None };
            }
            Ok(n) => {
                if let Err(e) = (&*to).write_all(&buf[..n]) {
                    return end(&from, &to, bytes, format!("tunnel write failed: {e}"));
                }
                bytes += n as u64;
                activity.store(now_ms(), Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                let quiet = now_ms().saturating_sub(activity.load(Ordering::Relaxed));
                if quiet >= idle_ms {
                    return end(&from, &to, bytes, "tunnel idle timeout".into());
                }
                if cancelled() {
                    return end(&from, &to, bytes, "closed at shutdown".into());
                }
            }
            Err(e) => return end(&from, &to, bytes, format!("tunnel read failed: {e}")),
        }
    }
}

/// The request head to send for an upgrade, from already filtered headers.
pub fn request_head(method: &str, target: &str, headers: &[(&str, Cow<'_, [u8]>)]) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    crate::http1::push_fields(&mut head, headers);
    head.extend_from_slice(b"\r\n");
    head
}
