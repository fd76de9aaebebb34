//! One request in, one response out: host → route → backend, with the
//! header rules of a forwarding proxy.
//!
//! Works on the project's own types ([`IncomingRequest`],
//! [`ProxyResponse`]); the server front and the backend client are edges
//! that convert. Header rules live here and nowhere else. Never waits on
//! etcd: the route table is a snapshot taken at the start of the request.

use std::io::{Cursor, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::backend::{BackendClient, BackendError, BackendRequest};
use crate::routes::{SharedTable, normalise_host};

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus the legacy `Keep-Alive` and
/// `Proxy-Connection`: they describe one connection and must not be
/// forwarded. Headers named in `Connection` are removed as well.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Header values travel through the router as Latin-1 strings: each byte
/// of the value is one `char` (U+0000–U+00FF). RFC 9110 §5.5 allows bytes
/// above 0x7F (obs-text) that need not be UTF-8, and a proxy must pass them
/// unchanged; decoding them as UTF-8 would rewrite them.
pub fn field_from_bytes(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.is_ascii() => s.to_string(),
        _ => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// The bytes a value made by [`field_from_bytes`] stands for. (A value with
/// characters past U+00FF can only be the router's own, and goes as UTF-8.)
pub fn field_to_bytes(value: &str) -> std::borrow::Cow<'_, [u8]> {
    if value.is_ascii() || value.chars().any(|c| u32::from(c) > 0xFF) {
        std::borrow::Cow::Borrowed(value.as_bytes())
    } else {
        std::borrow::Cow::Owned(value.chars().map(|c| c as u8).collect())
    }
}

/// How a request body is framed, on either side of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Sized(u64),
    /// Length unknown (the client sent it chunked): sent chunked.
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http10,
    Http11,
}

/// A client request as the server front parsed it.
#[derive(Debug, Clone)]
pub struct IncomingRequest {
    pub method: String,
    /// The request-target as received: origin-form (`/path?q`) or
    /// absolute-form (`http://host/path?q`).
    pub target: String,
    pub version: HttpVersion,
    pub headers: Vec<(String, String)>,
    pub peer: Option<SocketAddr>,
    /// Decided by the server front, which reads the body.
    pub framing: BodyFraming,
}

/// Every value of header `name` (names compare case-insensitively).
pub fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The first value of header `name`.
pub fn header<'a>(headers: &'a [(String, String)], name: &'a str) -> Option<&'a str> {
    header_values(headers, name).next()
}

/// The tokens listed in `Connection` headers.
pub fn connection_tokens(headers: &[(String, String)]) -> impl Iterator<Item = &str> {
    header_values(headers, "connection")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The answer to send to the client.
pub struct ProxyResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub length: Option<u64>,
    pub body: Box<dyn Read + Send + 'static>,
}

/// A response plus what the request log needs to know about it.
pub struct Outcome {
    pub response: ProxyResponse,
    /// The normalised host, or the raw `Host` value when it was unusable.
    pub host: String,
    pub upstream: Option<String>,
    pub error: Option<String>,
}

pub struct Proxy {
    table: Arc<SharedTable>,
    client: BackendClient,
}

impl Proxy {
    pub fn new(table: Arc<SharedTable>, client: BackendClient) -> Proxy {
        Proxy { table, client }
    }

    pub fn handle(&self, req: &IncomingRequest, body: &mut dyn Read) -> Outcome {
        let target = match RequestTarget::parse(&req.target) {
            Some(t) => t,
            None => {
                return refuse(
                    400,
                    "bad request target",
                    header(&req.headers, "host").unwrap_or(""),
                );
            }
        };
        let host_values: Vec<&str> = header_values(&req.headers, "host").collect();
        // RFC 9112 §3.2: more than one Host, or none in HTTP/1.1, is a 400.
        if host_values.len() > 1 {
            return refuse(400, "more than one Host header", host_values[0]);
        }
        let raw_host = match (target.authority, host_values.first()) {
            // RFC 9112 §3.2.2: the absolute-form authority wins over Host.
            (Some(authority), _) => authority,
            (None, Some(h)) => *h,
            (None, None) => return refuse(400, "missing Host header", ""),
        };
        let Some(host) = normalise_host(raw_host) else {
            return refuse(400, "no usable host", raw_host);
        };

        let table = self.table.load();
        let Some(domain) = table.lookup(&host) else {
            return refuse(503, "no route for this host", &host);
        };

        let headers = forward_headers(req, raw_host);
        let mut last_error = None;
        for backend in domain.rotation() {
            let path = format!("{}{}", backend.base_path, target.path_and_query);
            let out = BackendRequest {
                method: &req.method,
                authority: &backend.authority,
                path_and_query: &path,
                headers: &headers,
                framing: req.framing,
            };
            match self.client.send(&out, body) {
                Ok(resp) => {
                    // For HEAD the client's body is empty whatever the
                    // length says; the server front sends none.
                    let response = ProxyResponse {
                        status: resp.status,
                        headers: response_headers(resp.headers),
                        length: resp.length,
                        body: resp.body,
                    };
                    return Outcome {
                        response,
                        host,
                        upstream: Some(backend.url.clone()),
                        error: None,
                    };
                }
                // Nothing was sent: the next backend may take it.
                Err(e @ BackendError::Connect { .. }) => {
                    last_error = Some((backend.url.clone(), e));
                }
                Err(e) => return backend_failure(host, backend.url.clone(), e),
            }
        }
        match last_error {
            Some((url, e)) => backend_failure(host, url, e),
            None => refuse(503, "no route for this host", &host),
        }
    }
}

/// The request-target split into what routing and forwarding need.
#[derive(Debug, PartialEq)]
struct RequestTarget<'a> {
    authority: Option<&'a str>,
    path_and_query: &'a str,
}

impl<'a> RequestTarget<'a> {
    fn parse(target: &'a str) -> Option<RequestTarget<'a>> {
        if target.starts_with('/') {
            return Some(RequestTarget {
                authority: None,
                path_and_query: target,
            });
        }
        let scheme_len = target
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case("http://"))
            .map(|s| s.len())?;
        let rest = &target[scheme_len..];
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let path_and_query = match path {
            "" => "/",
            p if p.starts_with('/') => p,
            // `http://host?q`: rare enough to refuse rather than rewrite.
            _ => return None,
        };
        Some(RequestTarget {
            authority: Some(authority),
            path_and_query,
        })
    }
}

/// True for headers that must not cross the proxy in either direction.
fn is_hop_by_hop(name: &str, connection_tokens: &[&str]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

/// The headers sent to the backend: the client's end-to-end headers, its
/// `Host` (as the original tool did), and the forwarding headers.
fn forward_headers(req: &IncomingRequest, raw_host: &str) -> Vec<(String, String)> {
    let tokens: Vec<&str> = connection_tokens(&req.headers).collect();
    let mut out = Vec::with_capacity(req.headers.len() + 3);
    let mut forwarded_for: Vec<&str> = Vec::new();
    for (name, value) in &req.headers {
        if is_hop_by_hop(name, &tokens)
            || name.eq_ignore_ascii_case("host")
            || name.eq_ignore_ascii_case("content-length")
            // The server front answers `Expect: 100-continue` itself; the
            // backend must not send an interim response of its own.
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("x-forwarded-host")
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(value.trim());
            continue;
        }
        out.push((name.clone(), value.clone()));
    }
    out.push(("Host".into(), raw_host.to_string()));
    let client_ip = req.peer.map(|p| p.ip().to_string());
    let mut xff = forwarded_for
        .into_iter()
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(ip) = client_ip {
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        xff.push_str(&ip);
    }
    if !xff.is_empty() {
        out.push(("X-Forwarded-For".into(), xff));
    }
    out.push(("X-Forwarded-Proto".into(), "http".into()));
    out.push(("X-Forwarded-Host".into(), raw_host.to_string()));
    out
}

/// The backend's headers minus hop-by-hop and framing headers (the server
/// front frames the body itself).
fn response_headers(mut headers: Vec<(String, String)>) -> Vec<(String, String)> {
    // Owned, as `retain` borrows the list mutably; allocates nothing when
    // there is no `Connection` header.
    let owned: Vec<String> = connection_tokens(&headers).map(String::from).collect();
    let tokens: Vec<&str> = owned.iter().map(String::as_str).collect();
    headers
        .retain(|(n, _)| !is_hop_by_hop(n, &tokens) && !n.eq_ignore_ascii_case("content-length"));
    headers
}

fn backend_failure(host: String, upstream: String, e: BackendError) -> Outcome {
    let (status, text) = match &e {
        BackendError::Connect {
            timed_out: true, ..
        }
        | BackendError::Timeout { .. } => (504, "backend did not answer in time"),
        BackendError::BadRequest { .. } => (400, "request cannot be forwarded"),
        _ => (502, "backend unavailable"),
    };
    let mut outcome = refuse(status, text, &host);
    outcome.host = host;
    outcome.upstream = Some(upstream);
    outcome.error = Some(e.to_string());
    outcome
}

/// An answer from the router itself: a short text body.
pub fn refuse(status: u16, why: &str, host: &str) -> Outcome {
    let text = format!("{status} {why}\n");
    Outcome {
        response: ProxyResponse {
            status,
            headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
            length: Some(text.len() as u64),
            body: Box::new(Cursor::new(text.into_bytes())),
        },
        host: host.to_string(),
        upstream: None,
        error: Some(why.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> IncomingRequest {
        IncomingRequest {
            method: "GET".into(),
            target: "/".into(),
            version: HttpVersion::Http11,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            peer: Some("192.0.2.7:5555".parse().unwrap()),
            framing: BodyFraming::None,
        }
    }

    fn names(headers: &[(String, String)]) -> Vec<String> {
        headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_removed_both_ways() {
        let r = req(&[
            ("Host", "a.com"),
            ("Connection", "keep-alive, X-Secret"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("X-Secret", "1"),
            ("Expect", "100-continue"),
            ("Content-Length", "5"),
            ("Accept", "*/*"),
        ]);
        let out = forward_headers(&r, "a.com");
        assert_eq!(
            names(&out),
            [
                "accept",
                "host",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host"
            ]
        );
        let back = response_headers(vec![
            ("Connection".into(), "close, X-Internal".into()),
            ("X-Internal".into(), "1".into()),
            ("Transfer-Encoding".into(), "chunked".into()),
            ("Content-Length".into(), "3".into()),
            ("Set-Cookie".into(), "a=1".into()),
            ("Set-Cookie".into(), "b=2".into()),
        ]);
        assert_eq!(names(&back), ["set-cookie", "set-cookie"]);
    }

    #[test]
    fn forwarding_headers() {
        let r = req(&[
            ("Host", "A.com:8080"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil"),
            ("User-Agent", "test/1"),
        ]);
        let out = forward_headers(&r, "A.com:8080");
        let get = |n: &str| {
            out.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("x-forwarded-for"), ["10.0.0.1, 10.0.0.2, 192.0.2.7"]);
        assert_eq!(get("x-forwarded-proto"), ["http"]);
        assert_eq!(get("x-forwarded-host"), ["A.com:8080"]);
        assert_eq!(get("host"), ["A.com:8080"]);
        assert_eq!(get("user-agent"), ["test/1"]);
    }

    #[test]
    fn header_bytes_survive_the_round_trip() {
        for bytes in [&b"plain"[..], b"caf\xe9", b"\xc3\xa9t\xc3\xa9", b"\x80\xff"] {
            let field = field_from_bytes(bytes);
            assert_eq!(&*field_to_bytes(&field), bytes);
        }
        assert_eq!(&*field_to_bytes("ascii"), b"ascii");
    }

    #[test]
    fn request_targets() {
        assert_eq!(
            RequestTarget::parse("/a?b"),
            Some(RequestTarget {
                authority: None,
                path_and_query: "/a?b"
            })
        );
        assert_eq!(
            RequestTarget::parse("HTTP://Example.com:81/x?y"),
            Some(RequestTarget {
                authority: Some("Example.com:81"),
                path_and_query: "/x?y"
            })
        );
        assert_eq!(
            RequestTarget::parse("http://example.com").map(|t| t.path_and_query),
            Some("/")
        );
        for bad in [
            "*",
            "",
            "example.com/x",
            "https://a/",
            "http:///x",
            "http://u@a/",
        ] {
            assert_eq!(RequestTarget::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn hosts_are_required_and_validated() {
        let proxy = Proxy::new(
            Arc::new(SharedTable::default()),
            BackendClient::new(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(1),
                1,
            ),
        );
        let status = |r: IncomingRequest| proxy.handle(&r, &mut std::io::empty()).response.status;
        assert_eq!(status(req(&[])), 400);
        assert_eq!(status(req(&[("Host", "a.com"), ("Host", "b.com")])), 400);
        assert_eq!(status(req(&[("Host", "bad host")])), 400);
        assert_eq!(status(req(&[("Host", "unknown.example")])), 503);
        let mut r10 = req(&[]);
        r10.version = HttpVersion::Http10;
        assert_eq!(status(r10), 400);
    }
}
