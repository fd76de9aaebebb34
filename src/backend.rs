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

/// How the request body is framed towards the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Sized(u64),
    /// Length unknown (the client sent it chunked): sent chunked.
    Chunked,
}

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
    pub body: Box<dyn Read + Send + Sync + 'static>,
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
        }
    }
}

pub struct BackendClient {
    agent: ureq::Agent,
}

impl BackendClient {
    /// `pool_size` idle keep-alive connections are kept per backend; one per
    /// worker means a busy domain never has to reconnect.
    pub fn new(connect_timeout: Duration, response_timeout: Duration, pool_size: usize) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout)
            // Per socket read: bounds the wait for the response head and
            // every pause inside the body.
            .timeout_read(response_timeout)
            .timeout_write(response_timeout)
            .redirects(0)
            .max_idle_connections(pool_size.saturating_mul(4).max(16))
            .max_idle_connections_per_host(pool_size.max(1))
            .user_agent("")
            .build();
        BackendClient { agent }
    }

    /// Sends the request, streaming `body` per `framing`. On
    /// [`BackendError::Connect`] nothing has been read from `body`.
    pub fn send(
        &self,
        req: &BackendRequest<'_>,
        body: &mut dyn Read,
    ) -> Result<BackendResponse, BackendError> {
        let url = format!("http://{}{}", req.authority, req.path_and_query);
        let mut out = self.agent.request(req.method, &url);
        for (name, value) in req.headers {
            out = add_header(out, name, value);
        }
        let result = match req.framing {
            BodyFraming::None => out.call(),
            BodyFraming::Sized(n) => out.set("Content-Length", &n.to_string()).send(body.take(n)),
            BodyFraming::Chunked => out.send(body),
        };
        let resp = match result {
            Ok(resp) => resp,
            // Status codes pass through unchanged: 4xx/5xx are answers too.
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(ureq::Error::Transport(t)) => return Err(classify(t)),
        };
        let mut headers = Vec::new();
        for name in resp.headers_names() {
            for value in resp.all(&name) {
                headers.push((name.clone(), value.to_string()));
            }
        }
        let length = match resp.all("content-length").as_slice() {
            [one] => one.trim().parse().ok(),
            _ => None,
        };
        Ok(BackendResponse {
            status: resp.status(),
            headers,
            length,
            body: resp.into_reader(),
        })
    }
}

/// ureq's `set` replaces a header of the same name (except `X-…`); repeated
/// request headers are joined into one list value (RFC 9110 §5.3), which is
/// what a recipient may do anyway. `Cookie` is joined with `; `
/// (RFC 6265 §5.4).
fn add_header(req: ureq::Request, name: &str, value: &str) -> ureq::Request {
    match req.header(name) {
        Some(existing) if !name.to_ascii_lowercase().starts_with("x-") => {
            let sep = if name.eq_ignore_ascii_case("cookie") {
                "; "
            } else {
                ", "
            };
            let joined = format!("{existing}{sep}{value}");
            req.set(name, &joined)
        }
        _ => req.set(name, value),
    }
}

fn classify(t: ureq::Transport) -> BackendError {
    let detail = t.to_string();
    let io_kind = std::error::Error::source(&t)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    let timed_out = matches!(
        io_kind,
        Some(io::ErrorKind::TimedOut) | Some(io::ErrorKind::WouldBlock)
    );
    match t.kind() {
        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => {
            BackendError::Connect { timed_out, detail }
        }
        ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
            BackendError::BadRequest { detail }
        }
        _ if timed_out => BackendError::Timeout { detail },
        _ => BackendError::Failed { detail },
    }
}
