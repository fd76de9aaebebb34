//! The client edge: one request to one backend through a pooled ureq agent.
//!
//! Owns every ureq type; `proxy` sees only [`BackendRequest`],
//! [`BackendResponse`] and [`BackendError`], so the client can be replaced
//! without touching routing or header rules. Redirects are never followed
//! and bodies are never decoded: the backend's bytes reach the client as
//! sent.

use std::fmt;
use std::io::{self, Read};
use std::time::Duration;

use crate::http1::{BodyFraming, field_from_bytes, field_to_bytes, parse_content_length};

#[derive(Debug)]
pub struct BackendRequest<'a> {
    pub method: &'a str,
    /// `host:port`.
    pub authority: &'a str,
    /// Path and query, starting with `/`.
    pub path_and_query: &'a str,
    /// End-to-end headers only, `Host` included; framing headers are set
    /// from `framing`.
    pub headers: &'a [(String, String)],
    pub framing: BodyFraming,
}

pub struct BackendResponse {
    pub status: u16,
    /// As received, framing and hop-by-hop headers included; `proxy` filters.
    pub headers: Vec<(String, String)>,
    /// `Content-Length` when the backend sent a valid one.
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
    /// The request could not be expressed to the backend (e.g. a target the
    /// URL parser refuses).
    BadRequest { detail: String },
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
            BackendError::BadRequest { detail } => write!(f, "bad request: {detail}"),
            BackendError::ClientBody { detail } => {
                write!(f, "client body failed while forwarding: {detail}")
            }
            BackendError::Local { detail } => write!(f, "router out of resources: {detail}"),
        }
    }
}

pub struct BackendClient {
    agent: ureq::Agent,
}

/// Idle pooled connections older than this are not reused: many servers
/// close idle keep-alive connections after 5 s, and reusing one just as it
/// closes fails the request.
const POOL_IDLE_MAX_SECS: u64 = 4;
/// Idle keep-alive connections kept per backend, and in all.
const POOL_IDLE_MAX_PER_BACKEND: usize = 256;
const POOL_IDLE_MAX_TOTAL: usize = 1024;

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
        let agent = ureq::Agent::config_builder()
            // A proxy from the environment (http_proxy) must not capture
            // backend traffic.
            .proxy(None)
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent("")
            .accept("")
            .accept_encoding("")
            .allow_non_standard_methods(true)
            .timeout_connect(Some(connect_timeout))
            .timeout_recv_response(Some(response_timeout))
            .timeout_per_read(Some(body_timeout))
            .timeout_per_write(Some(body_timeout))
            .max_idle_connections(POOL_IDLE_MAX_TOTAL)
            .max_idle_connections_per_host(pool_size.clamp(1, POOL_IDLE_MAX_PER_BACKEND))
            // ureq's 128 KiB default buffers, times every pooled connection,
            // would dominate the router's memory; 64 KiB still holds the
            // largest response head ureq accepts.
            .input_buffer_size(64 * 1024)
            .output_buffer_size(16 * 1024)
            .max_idle_age(Duration::from_secs(POOL_IDLE_MAX_SECS))
            .build()
            .new_agent();
        BackendClient { agent }
    }

    /// Sends the request, streaming `body` per `framing`. On
    /// [`BackendError::Connect`] nothing has been read from `body`.
    pub fn send(
        &self,
        req: &BackendRequest<'_>,
        body: &mut dyn Read,
    ) -> Result<BackendResponse, BackendError> {
        let uri = format!("http://{}{}", req.authority, uri_safe(req.path_and_query));
        let mut builder = ureq::http::Request::builder().method(req.method).uri(uri);
        for (name, value) in req.headers {
            builder = builder.header(name.as_str(), &*field_to_bytes(value));
        }
        // The framing the client used, never another: a request without a
        // body stays without one (ureq alone would send an empty POST
        // chunked, which servers without chunked uploads answer with 411,
        // and which an HTTP/1.0 client never sent).
        let result = match req.framing {
            BodyFraming::None => {
                // As Go's transport does: `Content-Length: 0` for the
                // methods that expect a body (RFC 9110 §8.6 lets a client
                // send it), none for the others.
                let builder = if matches!(req.method, "POST" | "PUT" | "PATCH") {
                    builder.header("Content-Length", 0)
                } else {
                    builder
                };
                builder
                    .body(ureq::SendBody::none())
                    .map(|r| self.agent.run(r))
            }
            BodyFraming::Sized(n) => {
                let mut limited = body.take(n);
                builder
                    .header("Content-Length", n)
                    .body(ureq::SendBody::from_reader(&mut limited))
                    .map(|r| self.agent.run(r))
            }
            BodyFraming::Chunked => builder
                .body(ureq::SendBody::from_reader(body))
                .map(|r| self.agent.run(r)),
        };
        let resp = match result {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(classify(e)),
            Err(e) => {
                return Err(BackendError::BadRequest {
                    detail: e.to_string(),
                });
            }
        };
        let (parts, body) = resp.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), field_from_bytes(v.as_bytes())))
            .collect();
        let mut lengths = parts.headers.get_all("content-length").iter();
        let length = match (lengths.next(), lengths.next()) {
            (Some(one), None) => one.to_str().ok().and_then(parse_content_length),
            _ => None,
        };
        Ok(BackendResponse {
            status: parts.status.as_u16(),
            headers,
            length,
            body: Box::new(body.into_reader()),
        })
    }
}

/// The request target as the `http` crate's URI parser will take it.
/// Clients send bytes RFC 3986 does not allow raw (`{`, `|`, `"`, a
/// backtick, non-ASCII...) and servers accept them; the `http` crate does
/// not, so those bytes are percent-encoded, which servers decode to the
/// same thing. Everything else, existing escapes included, is kept as sent.
fn uri_safe(target: &str) -> std::borrow::Cow<'_, str> {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
    if target.bytes().all(keep) {
        return std::borrow::Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len() + 16);
    for b in target.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Out of file descriptors (EMFILE, ENFILE): the router's shortage, which
/// must not be held against a backend. (Not `AddrNotAvailable`: that is
/// also what an address family the host lacks gives, and another address
/// or backend may well work.)
pub fn is_local_shortage(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

fn classify(e: ureq::Error) -> BackendError {
    use ureq::{Error, Timeout};
    let detail = e.to_string();
    match e {
        // Failures before a connection existed: nothing was sent.
        Error::ConnectionFailed | Error::HostNotFound => BackendError::Connect {
            timed_out: false,
            detail,
        },
        Error::Timeout(Timeout::Connect | Timeout::Resolve) => BackendError::Connect {
            timed_out: true,
            detail,
        },
        Error::Io(ref io) if is_local_shortage(io) => BackendError::Local { detail },
        // ureq's connector reports these from connect(), before any byte
        // of the request was written.
        Error::Io(ref io)
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::AddrNotAvailable
            ) =>
        {
            BackendError::Connect {
                timed_out: false,
                detail,
            }
        }
        Error::Timeout(_) => BackendError::Timeout { detail },
        Error::Io(ref io)
            if matches!(
                io.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            BackendError::Timeout { detail }
        }
        Error::BadUri(_) | Error::Http(_) => BackendError::BadRequest { detail },
        _ => BackendError::Failed { detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_httparse_accepts_becomes_a_valid_uri() {
        let mut target = String::from("/a");
        for b in 0x21u8..0x7f {
            target.push(char::from(b));
        }
        target.push('é');
        let uri = format!("http://h:1{}", uri_safe(&target));
        assert!(uri.parse::<ureq::http::Uri>().is_ok(), "{uri}");
        assert_eq!(uri_safe("/plain/path?q=1&x=%20"), "/plain/path?q=1&x=%20");
        assert_eq!(uri_safe("/a|b?x={1}"), "/a%7Cb?x=%7B1%7D");
    }
}
