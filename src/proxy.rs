//! One request in, one response out: host → route → backend, with the
//! header rules of a forwarding proxy.
//!
//! Works on the project's own types ([`Request`], as the server front
//! parsed it, and [`ProxyResponse`]); the server front and the backend
//! client are edges that convert. Header rules and the choice of backends
//! (ejection, retry budget) live here and nowhere else. Never waits on
//! etcd: the route table is a snapshot taken at the start of the request.
//!
//! Retries never amplify an outage: another backend is tried only when the
//! failed attempt sent nothing (no connection was made), never the same
//! backend twice, and only while the domain's retry budget allows.

use std::borrow::Cow;
use std::io::{Cursor, Read};
use std::sync::Arc;

use crate::backend::{BackendClient, BackendError, BackendRequest};
use crate::cidr::{Cidr, IpText};
use crate::event::Event;
use crate::health::{AfterFailure, EjectPolicy, now_ms};
use crate::http1::{
    BodyFraming, Fields, Refusal, Request, connection_tokens, fold_name_byte, name_folds_to,
    trim_ows,
};
use crate::log::{Logger, NO_ROUTE};
use crate::metrics::DomainStats;
use crate::routes::{Backend, Domain, SharedTable, normalise_host};
use crate::tunnel::{self, Handshake, HandshakeTimeouts};

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

/// The answer to send to the client.
pub struct ProxyResponse {
    pub status: u16,
    pub headers: Fields,
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
    /// The connection must end after this answer: the request was one the
    /// router could not read as a whole (see [`refuse`]).
    pub close: bool,
    /// The counters of the domain it was routed to, if any.
    pub stats: Option<Arc<DomainStats>>,
}

/// How the proxy treats backends and clients, from the command line.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub eject: EjectPolicy,
    /// Peers whose forwarding headers are kept (see [`forward_headers`]).
    pub trusted_proxies: Vec<Cidr>,
    /// For upgrade handshakes, which do not go through the pooled client.
    pub handshake: HandshakeTimeouts,
}

pub struct Proxy {
    table: Arc<SharedTable>,
    client: BackendClient,
    settings: ProxySettings,
    log: Logger,
}

/// A request that passed the checks every request must pass: a usable
/// target and host.
struct Routed<'r> {
    /// Normalised, for lookup and logs.
    host: String,
    /// As the client sent it, for `Host` and `X-Forwarded-Host`.
    raw_host: &'r str,
    path_and_query: Cow<'r, str>,
}

/// An upgrade request the backend answered.
pub struct Upgraded {
    pub handshake: Handshake,
    pub host: String,
    pub upstream: String,
    pub stats: Arc<DomainStats>,
}

impl Upgraded {
    /// An answer other than `101`, to pass on like any response.
    pub fn into_outcome(self, head_request: bool) -> Outcome {
        let status = self.handshake.status;
        let headers = response_headers(self.handshake.headers.clone());
        let (length, body) = self.handshake.into_body(head_request);
        Outcome {
            response: ProxyResponse {
                status,
                headers,
                length,
                body,
            },
            host: self.host,
            upstream: Some(self.upstream),
            error: None,
            // The server front closes after any answer to an upgrade.
            close: true,
            stats: Some(self.stats),
        }
    }
}

impl Proxy {
    pub fn new(
        table: Arc<SharedTable>,
        client: BackendClient,
        settings: ProxySettings,
        log: Logger,
    ) -> Proxy {
        Proxy {
            table,
            client,
            settings,
            log,
        }
    }

    /// Checks the target and the host (RFC 9112 §3.2).
    fn route<'r>(&self, req: &'r Request) -> Result<Routed<'r>, Box<Outcome>> {
        let Some(target) = RequestTarget::parse(&req.target) else {
            return Err(Box::new(refuse_unreadable(
                400,
                "bad request target",
                req.headers.get_str("host").unwrap_or(""),
            )));
        };
        let host_values: Vec<&[u8]> = req.headers.values("host").collect();
        // RFC 9112 §3.2: more than one Host, or none in HTTP/1.1, is a 400.
        if host_values.len() > 1 {
            return Err(Box::new(refuse_unreadable(
                400,
                "more than one Host header",
                std::str::from_utf8(host_values[0]).unwrap_or(""),
            )));
        }
        let raw_host = match (target.authority, host_values.first()) {
            // RFC 9112 §3.2.2: the absolute-form authority wins over Host.
            (Some(authority), _) => authority,
            // A host name is ASCII (RFC 3986 §3.2.2): other bytes are no
            // host at all.
            (None, Some(h)) => std::str::from_utf8(h).unwrap_or(""),
            (None, None) => {
                return Err(Box::new(refuse_unreadable(400, "missing Host header", "")));
            }
        };
        let Some(host) = normalise_host(raw_host) else {
            return Err(Box::new(refuse_unreadable(400, "no usable host", raw_host)));
        };
        Ok(Routed {
            host,
            raw_host,
            path_and_query: target.path_and_query,
        })
    }

    pub fn handle(&self, req: &Request, body: &mut dyn Read) -> Outcome {
        let routed = match self.route(req) {
            Ok(r) => r,
            Err(refused) => return *refused,
        };
        // A body on HEAD has no meaning (RFC 9110 §9.3.2), and a backend
        // that reads none would take it for the next request: nothing can
        // forward it faithfully.
        if req.method == "HEAD" && req.framing != BodyFraming::None {
            return refuse_unreadable(400, "HEAD request with a body", &routed.host);
        }
        let headers = forward_headers(req, routed.raw_host, &self.settings.trusted_proxies);
        let mut body = ClientBody {
            inner: body,
            failed: false,
            read: 0,
        };
        let result = self.attempt(&routed.host, |backend| {
            let path = backend_target(&backend.base_path, &routed.path_and_query);
            let out = BackendRequest {
                method: &req.method,
                authority: &backend.authority,
                path_and_query: &path,
                headers: &headers,
                framing: req.framing,
            };
            let sent = self.client.send(&out, &mut body);
            match sent {
                // The client's body broke, not the backend.
                Err(e) if body.failed => Err(BackendError::ClientBody {
                    detail: e.to_string(),
                }),
                // Part of the body is gone: whatever the error says, this
                // request cannot go anywhere else.
                Err(BackendError::Connect { detail, .. }) if body.read > 0 => {
                    Err(BackendError::Failed { detail })
                }
                other => other,
            }
        });
        match result {
            // For HEAD the client's body is empty whatever the length says;
            // the server front sends none.
            Ok((resp, upstream, stats)) => Outcome {
                response: ProxyResponse {
                    status: resp.status,
                    headers: response_headers(resp.headers),
                    length: resp.length,
                    body: resp.body,
                },
                host: routed.host,
                upstream: Some(upstream),
                error: None,
                close: false,
                stats: Some(stats),
            },
            Err(outcome) => *outcome,
        }
    }

    /// Sends an upgrade request (of
    /// [`Verdict::Upgrade`](crate::http1::Verdict::Upgrade)) to a backend
    /// and returns its answer, `101` or not, for the server front to pass on.
    pub fn upgrade(&self, req: &Request) -> Result<Upgraded, Box<Outcome>> {
        let routed = self.route(req)?;
        let mut headers = forward_headers(req, routed.raw_host, &self.settings.trusted_proxies);
        headers.push(("Connection", Cow::Borrowed(b"Upgrade")));
        for value in req.headers.values("upgrade") {
            headers.push(("Upgrade", Cow::Borrowed(value)));
        }
        let asked: Vec<Vec<u8>> = req
            .headers
            .values("upgrade")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|p| protocol_name(p).to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect();
        let (handshake, upstream, stats) = self.attempt(&routed.host, |backend| {
            let path = backend_target(&backend.base_path, &routed.path_and_query);
            let head = tunnel::request_head(&req.method, &path, &headers);
            let answer = tunnel::handshake(&backend.authority, &head, self.settings.handshake)?;
            // RFC 9110 §15.2.2: a 101 names the protocol switched to, one
            // the client asked for. Anything else would hand the client a
            // raw connection to a backend that never agreed to one.
            if answer.status == 101 {
                let switched = answer.headers.get("upgrade").map(protocol_name);
                if !switched.is_some_and(|p| asked.contains(&p.to_ascii_lowercase())) {
                    return Err(BackendError::Failed {
                        detail: format!(
                            "101 answer switches to {:?}, not a protocol the client asked for",
                            String::from_utf8_lossy(switched.unwrap_or(b"nothing"))
                        ),
                    });
                }
            }
            Ok(answer)
        })?;
        Ok(Upgraded {
            handshake,
            host: routed.host,
            upstream,
            stats,
        })
    }

    /// Runs `send` against the domain's backends: the round-robin pick,
    /// then (only after a failure that sent nothing, and only within the
    /// retry budget) the next ones. Records each result in the backend's
    /// health and the domain's counters. Returns the answer, the backend's
    /// URL and the domain's counters, or the refusal.
    fn attempt<T>(
        &self,
        host: &str,
        mut send: impl FnMut(&Backend) -> Result<T, BackendError>,
    ) -> Result<(T, String, Arc<DomainStats>), Box<Outcome>> {
        let table = self.table.load();
        let Some(domain) = table.lookup(host) else {
            return Err(Box::new(refuse(503, NO_ROUTE, host)));
        };
        let stats = domain.stats();
        let policy = &self.settings.eject;
        domain.budget().record_request(now_ms());
        let mut tries = 0u32;
        let mut budget_spent = false;
        let mut last_error: Option<(String, BackendError)> = None;
        let mut candidates = domain.candidates(policy, now_ms);
        loop {
            // The budget is asked before the next backend is taken: taking
            // an ejected backend claims its probe, which must not be
            // wasted. And only if there is a next backend, so that a retry
            // never spent is never counted.
            if tries > 0 && !candidates.may_have_more() {
                break;
            }
            if tries > 0 && !domain.budget().try_retry(now_ms()) {
                budget_spent = true;
                break;
            }
            let Some(candidate) = candidates.next() else {
                break;
            };
            if tries > 0 {
                stats.retried();
            }
            tries += 1;
            let backend = candidate.backend;
            match send(backend) {
                Ok(answer) => {
                    if candidate.health.succeeded() {
                        self.log.emit(Event::BackendRestore {
                            domain: host.to_string(),
                            backend: backend.url.clone(),
                            key: backend.key.clone(),
                        });
                    }
                    return Ok((answer, backend.url.clone(), Arc::clone(stats)));
                }
                Err(e) => {
                    if counts_against_health(&e) {
                        stats.backend_failed();
                        self.record_failure(host, domain, &candidate, &e);
                    }
                    match e {
                        // Nothing was sent: the next backend may take it.
                        BackendError::Connect { .. } => {
                            last_error = Some((backend.url.clone(), e));
                        }
                        e => {
                            let mut outcome = backend_failure(host, backend.url.clone(), e);
                            outcome.stats = Some(Arc::clone(stats));
                            return Err(Box::new(outcome));
                        }
                    }
                }
            }
        }
        let mut outcome = match last_error {
            Some((url, e)) => backend_failure(host, url, e),
            None => refuse(503, NO_ROUTE, host),
        };
        if budget_spent && let Some(error) = &mut outcome.error {
            error.push_str(&format!(" (retry budget spent after {tries} tries)"));
        }
        outcome.stats = Some(Arc::clone(stats));
        Err(Box::new(outcome))
    }

    fn record_failure(
        &self,
        host: &str,
        domain: &Domain,
        candidate: &crate::routes::Candidate<'_>,
        e: &BackendError,
    ) {
        let policy = &self.settings.eject;
        if candidate.health.failed(now_ms(), policy) == AfterFailure::Ejected {
            domain.stats().ejected();
            self.log.emit(Event::BackendEject {
                domain: host.to_string(),
                backend: candidate.backend.url.clone(),
                key: candidate.backend.key.clone(),
                failures: policy.after,
                for_secs: policy.duration_ms as f64 / 1000.0,
                error: e.to_string(),
                all_ejected: domain.all_ejected(),
            });
        }
    }
}

/// Headers that carry what a proxy says about the client: `Forwarded`,
/// every `X-Forwarded-*` (`-For`, `-Proto`, `-Host`, `-Port`, `-Prefix`,
/// ...), `X-Real-IP` and the other client-address headers, also spelt with
/// underscores, which CGI, PHP and WSGI servers map to the same variable
/// as the dashes.
fn is_forwarding_header(name: &str) -> bool {
    // Compared byte by byte, `_` as `-`: this runs for every header of
    // every request, so it allocates nothing.
    let starts = |want: &str| {
        name.len() >= want.len()
            && name
                .bytes()
                .take(want.len())
                .map(fold_name_byte)
                .eq(want.bytes())
    };
    let is = |want: &str| name.len() == want.len() && starts(want);
    starts("x-forwarded-")
        || [
            "forwarded",
            "x-real-ip",
            "client-ip",
            "x-client-ip",
            "true-client-ip",
            "x-cluster-client-ip",
        ]
        .into_iter()
        .any(is)
}

/// Failures that say something about the backend: it refused, did not
/// answer in time, or broke the exchange. (A client whose upload broke
/// off, or the router's own shortage, does not.)
fn counts_against_health(e: &BackendError) -> bool {
    !matches!(
        e,
        BackendError::ClientBody { .. } | BackendError::Local { .. }
    )
}

/// The client's request body, noting whether reading it failed: a
/// forwarding error is then the client's doing, not the backend's.
struct ClientBody<'a> {
    inner: &'a mut dyn Read,
    failed: bool,
    /// Bytes handed to the backend client so far.
    read: u64,
}

impl Read for ClientBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let result = self.inner.read(buf);
        match &result {
            Ok(n) => self.read += *n as u64,
            Err(_) => self.failed = true,
        }
        result
    }
}

/// `websocket` of `WebSocket/13`: the name of a protocol in an `Upgrade`
/// list, version dropped.
fn protocol_name(token: &[u8]) -> &[u8] {
    let token = trim_ows(token);
    trim_ows(token.split(|&b| b == b'/').next().unwrap_or(token))
}

/// The headers of a backend's `101`: its end-to-end headers and `Upgrade`,
/// with `Connection: Upgrade` (RFC 9110 §7.8).
pub fn switching_headers(headers: &Fields) -> Fields {
    let tokens: Vec<&[u8]> = connection_tokens(headers).collect();
    let mut out = Fields::with_capacity(headers.len() + 1, 256);
    for (name, value) in headers.iter() {
        let keep = name.eq_ignore_ascii_case("upgrade") || !is_hop_by_hop(name, &tokens);
        if keep && !name.eq_ignore_ascii_case("content-length") {
            out.push(name, value);
        }
    }
    out.push("Connection", b"Upgrade");
    out
}

/// The target sent to a backend: its URL's path as a prefix (most backends
/// have none, and then nothing is allocated).
fn backend_target<'a>(base_path: &str, path_and_query: &'a str) -> Cow<'a, str> {
    if base_path.is_empty() {
        Cow::Borrowed(path_and_query)
    } else {
        Cow::Owned(format!("{base_path}{path_and_query}"))
    }
}

/// The request-target split into what routing and forwarding need.
#[derive(Debug, PartialEq)]
struct RequestTarget<'a> {
    authority: Option<&'a str>,
    /// Starts with `/`; borrowed unless a `/` had to be put in front.
    path_and_query: Cow<'a, str>,
}

impl<'a> RequestTarget<'a> {
    fn parse(target: &'a str) -> Option<RequestTarget<'a>> {
        if target.starts_with('/') {
            return Some(RequestTarget {
                authority: None,
                path_and_query: Cow::Borrowed(target),
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
        // RFC 3986 §3.3: after an authority the path may be empty, and
        // RFC 9112 §3.2.1 forwards an empty path as `/`, so
        // `http://host?q` is `/?q` at `host`.
        let path_and_query = match path {
            "" => Cow::Borrowed("/"),
            p if p.starts_with('/') => Cow::Borrowed(p),
            q => Cow::Owned(format!("/{q}")),
        };
        Some(RequestTarget {
            authority: Some(authority),
            path_and_query,
        })
    }
}

/// True for headers that must not cross the proxy in either direction.
///
/// Compared with `_` read as `-` (see [`name_folds_to`]): the server front
/// refuses underscore spellings of the framing headers outright, and the
/// other ones (`Keep_Alive`, `Proxy_Connection`, and those of the names
/// `Connection` lists) are dropped here, so a backend that reads `_` as `-`
/// never sees a hop-by-hop header the router did not act on.
fn is_hop_by_hop(name: &str, connection_tokens: &[&[u8]]) -> bool {
    let name = name.as_bytes();
    HOP_BY_HOP.iter().any(|h| name_folds_to(name, h.as_bytes()))
        || connection_tokens.iter().any(|t| name_folds_to(name, t))
}

/// The headers sent to the backend: the client's end-to-end headers, its
/// `Host` (as the original tool did), and the forwarding headers.
///
/// Forwarding headers (see [`is_forwarding_header`]) from a client are
/// claims anyone can make, so they are believed only from a peer in
/// `trusted` (another proxy in front of this one): from such a peer
/// `X-Forwarded-For` is kept and the peer appended, and the others are
/// kept. From any other peer they are all dropped and replaced by the
/// router's own `X-Forwarded-For`/`-Proto`/`-Host`, so a backend never
/// mistakes a client's say-so for an address.
///
/// Borrowed from the request: only `X-Forwarded-For` is a new string.
pub fn forward_headers<'r>(
    req: &'r Request,
    raw_host: &'r str,
    trusted: &[Cidr],
) -> Vec<(&'r str, Cow<'r, [u8]>)> {
    let peer_trusted = req
        .peer
        .is_some_and(|p| trusted.iter().any(|c| c.contains(p.ip())));
    let tokens: Vec<&[u8]> = connection_tokens(&req.headers).collect();
    let mut out = Vec::with_capacity(req.headers.len() + 3);
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let (mut has_proto, mut has_host) = (false, false);
    for (name, value) in req.headers.iter() {
        if is_hop_by_hop(name, &tokens)
            || name.eq_ignore_ascii_case("host")
            || name.eq_ignore_ascii_case("content-length")
            // The server front answers `Expect: 100-continue` itself; the
            // backend must not send an interim response of its own.
            || name.eq_ignore_ascii_case("expect")
        {
            continue;
        }
        if is_forwarding_header(name) {
            // Underscore spellings are dropped even from a trusted proxy:
            // most pass client headers through untouched, so one of these
            // would be the client's, read by CGI-style servers as the
            // real thing.
            if !peer_trusted || name.contains('_') {
                continue;
            }
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                forwarded_for.push(trim_ows(value));
                continue;
            }
            has_proto |= name.eq_ignore_ascii_case("x-forwarded-proto");
            has_host |= name.eq_ignore_ascii_case("x-forwarded-host");
        }
        out.push((name, Cow::Borrowed(value)));
    }
    out.push(("Host", Cow::Borrowed(raw_host.as_bytes())));
    let mut xff: Vec<u8> = Vec::new();
    for hop in forwarded_for.into_iter().filter(|v| !v.is_empty()) {
        if !xff.is_empty() {
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(hop);
    }
    if let Some(peer) = req.peer {
        if !xff.is_empty() {
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(IpText::new(peer.ip().to_canonical()).as_str().as_bytes());
    }
    if !xff.is_empty() {
        out.push(("X-Forwarded-For", Cow::Owned(xff)));
    }
    if !has_proto {
        out.push(("X-Forwarded-Proto", Cow::Borrowed(b"http")));
    }
    if !has_host {
        out.push(("X-Forwarded-Host", Cow::Borrowed(raw_host.as_bytes())));
    }
    out
}

/// The backend's headers minus hop-by-hop and framing headers (the server
/// front frames the body itself).
pub fn response_headers(mut headers: Fields) -> Fields {
    // Owned, as `retain` borrows the fields mutably; allocates nothing when
    // there is no `Connection` header.
    let owned: Vec<Vec<u8>> = connection_tokens(&headers).map(<[u8]>::to_vec).collect();
    let tokens: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
    headers.retain(|n, _| !is_hop_by_hop(n, &tokens) && !n.eq_ignore_ascii_case("content-length"));
    headers
}

fn backend_failure(host: &str, upstream: String, e: BackendError) -> Outcome {
    let (status, text) = match &e {
        BackendError::Connect {
            timed_out: true, ..
        }
        | BackendError::Timeout { .. } => (504, "backend did not answer in time"),
        // The server front replaces this answer with its own 400/408.
        BackendError::ClientBody { .. } => (400, "request body incomplete"),
        BackendError::Local { .. } => (503, "router out of resources"),
        _ => (502, "backend unavailable"),
    };
    // A request whose body broke off was not read as a whole.
    let mut outcome = if matches!(e, BackendError::ClientBody { .. }) {
        refuse_unreadable(status, text, host)
    } else {
        refuse(status, text, host)
    };
    outcome.upstream = Some(upstream);
    outcome.error = Some(e.to_string());
    outcome
}

/// The router's answer to a request the front refused.
pub fn refusal(r: Refusal, host: &str) -> Outcome {
    if r.unreadable {
        refuse_unreadable(r.status, r.why, host)
    } else {
        refuse(r.status, r.why, host)
    }
}

/// An answer from the router itself, to a request it read as a whole: a
/// short text body, and the connection may carry the next request.
pub fn refuse(status: u16, why: &str, host: &str) -> Outcome {
    let text = format!("{status} {why}\n");
    Outcome {
        response: ProxyResponse {
            status,
            headers: Fields::from_pairs(&[("Content-Type", "text/plain; charset=utf-8")]),
            length: Some(text.len() as u64),
            body: Box::new(Cursor::new(text.into_bytes())),
        },
        host: host.to_string(),
        upstream: None,
        error: Some(why.to_string()),
        close: false,
        stats: None,
    }
}

/// The router's answer to a request it could not read as a whole (a bad
/// target, a duplicate or unusable Host, bad framing, a body cut short, a
/// request no backend can be sent): nothing after it on the connection can
/// be trusted, so the connection closes after the answer, as nginx closes
/// after its own 400, 408, 413, 414 and 501.
pub fn refuse_unreadable(status: u16, why: &str, host: &str) -> Outcome {
    Outcome {
        close: true,
        ..refuse(status, why, host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{HttpVersion, Verdict};

    fn req(headers: &[(&str, &str)]) -> Request {
        let mut r = Request::new(
            "GET".into(),
            "/".into(),
            HttpVersion::Http11,
            Fields::from_pairs(headers),
        );
        r.peer = Some("192.0.2.7:5555".parse().unwrap());
        r
    }

    fn names<N: AsRef<str>, V>(headers: &[(N, V)]) -> Vec<String> {
        headers
            .iter()
            .map(|(n, _)| n.as_ref().to_ascii_lowercase())
            .collect()
    }

    fn field_names(fields: &Fields) -> Vec<String> {
        fields.iter().map(|(n, _)| n.to_ascii_lowercase()).collect()
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
        let out = forward_headers(&r, "a.com", &[]);
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
        let back = response_headers(Fields::from_pairs(&[
            ("Connection", "close, X-Internal"),
            ("X-Internal", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "3"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]));
        assert_eq!(field_names(&back), ["set-cookie", "set-cookie"]);
    }

    fn get(out: &[(&str, Cow<'_, [u8]>)], n: &str) -> Vec<String> {
        out.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    #[test]
    fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
        let r = req(&[
            ("Host", "A.com:8080"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil"),
            ("Forwarded", "for=10.0.0.1"),
            ("X-Forwarded-Port", "443"),
            ("X_Forwarded_For", "10.9.9.9"),
            ("X-Real-IP", "10.9.9.9"),
            ("User-Agent", "test/1"),
        ]);
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let out = forward_headers(&r, "A.com:8080", &trusted);
        for gone in ["x-forwarded-port", "x_forwarded_for", "x-real-ip"] {
            assert!(get(&out, gone).is_empty(), "{gone}");
        }
        assert_eq!(get(&out, "x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(get(&out, "x-forwarded-proto"), ["http"]);
        assert_eq!(get(&out, "x-forwarded-host"), ["A.com:8080"]);
        assert!(get(&out, "forwarded").is_empty());
        assert_eq!(get(&out, "host"), ["A.com:8080"]);
        assert_eq!(get(&out, "user-agent"), ["test/1"]);
    }

    #[test]
    fn forwarding_headers_from_a_trusted_proxy_are_kept_and_appended_to() {
        let r = req(&[
            ("Host", "a.com"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-For", "10.0.0.2"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=10.0.0.1"),
            ("X_Forwarded_For", "10.6.6.6"),
        ]);
        let trusted = [Cidr::parse("192.0.2.0/24").unwrap()];
        let out = forward_headers(&r, "a.com", &trusted);
        // Underscore spellings never pass: a proxy in front passes client
        // headers through.
        assert!(get(&out, "x_forwarded_for").is_empty());
        assert_eq!(
            get(&out, "x-forwarded-for"),
            ["10.0.0.1, 10.0.0.2, 192.0.2.7"]
        );
        assert_eq!(get(&out, "x-forwarded-proto"), ["https"]);
        // Not sent by the trusted proxy: the router's own value.
        assert_eq!(get(&out, "x-forwarded-host"), ["a.com"]);
        assert_eq!(get(&out, "forwarded"), ["for=10.0.0.1"]);
    }

    #[test]
    fn upgrades_are_recognised_and_their_answer_headers_kept() {
        let mut r = req(&[
            ("Host", "a.com"),
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
        ]);
        assert_eq!(r.verdict, Verdict::Upgrade);
        r = req(&[
            ("Host", "a.com"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Content-Length", "3"),
        ]);
        assert_eq!(
            r.verdict,
            Verdict::Forward,
            "a body: served as a plain request"
        );
        let plain = req(&[("Host", "a.com"), ("Upgrade", "websocket")]);
        assert_eq!(
            plain.verdict,
            Verdict::Forward,
            "Upgrade without Connection: upgrade"
        );
        let back = switching_headers(&Fields::from_pairs(&[
            ("Upgrade", "websocket"),
            ("Connection", "upgrade"),
            ("Sec-WebSocket-Accept", "x"),
            ("Keep-Alive", "1"),
        ]));
        assert_eq!(
            field_names(&back),
            ["upgrade", "sec-websocket-accept", "connection"]
        );
    }

    #[test]
    fn request_targets() {
        let parsed =
            |t| RequestTarget::parse(t).map(|t| (t.authority, t.path_and_query.into_owned()));
        let origin = |p: &str| Some((None, p.to_string()));
        let absolute = |a, p: &str| Some((Some(a), p.to_string()));
        assert_eq!(parsed("/a?b"), origin("/a?b"));
        assert_eq!(
            parsed("HTTP://Example.com:81/x?y"),
            absolute("Example.com:81", "/x?y")
        );
        assert_eq!(parsed("http://example.com"), absolute("example.com", "/"));
        // RFC 3986: an authority, then a query, and an empty path.
        assert_eq!(
            parsed("http://example.org?x=1"),
            absolute("example.org", "/?x=1")
        );
        assert_eq!(parsed("http://example.org?"), absolute("example.org", "/?"));
        for bad in [
            "*",
            "",
            "example.com/x",
            "example.com:443",
            "https://a/",
            "http:///x",
            "http://?x",
            "http://u@a/",
        ] {
            assert_eq!(RequestTarget::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn underscore_spellings_of_hop_by_hop_headers_are_dropped() {
        let r = req(&[
            ("Host", "a.com"),
            ("Connection", "X-Secret"),
            ("Keep_Alive", "timeout=5"),
            ("Proxy_Connection", "keep-alive"),
            ("Upgrade_", "websocket"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("X_Secret", "1"),
            ("EXPECT", "100-continue"),
            ("X_Custom", "kept"),
        ]);
        let out = forward_headers(&r, "a.com", &[]);
        assert_eq!(
            names(&out),
            [
                "upgrade_",
                "x_custom",
                "host",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host"
            ]
        );
    }

    #[test]
    fn hosts_are_required_and_validated() {
        let second = std::time::Duration::from_secs(1);
        let proxy = Proxy::new(
            Arc::new(SharedTable::default()),
            BackendClient::new(second, second, second, 1),
            ProxySettings {
                eject: EjectPolicy {
                    after: 3,
                    duration_ms: 1000,
                },
                trusted_proxies: Vec::new(),
                handshake: HandshakeTimeouts {
                    connect: second,
                    response: second,
                    body: second,
                },
            },
            Logger::discard(),
        );
        let status = |r: Request| proxy.handle(&r, &mut std::io::empty()).response.status;
        assert_eq!(status(req(&[])), 400);
        assert_eq!(status(req(&[("Host", "a.com"), ("Host", "b.com")])), 400);
        assert_eq!(status(req(&[("Host", "bad host")])), 400);
        assert_eq!(status(req(&[("Host", "unknown.example")])), 503);
        let mut r10 = req(&[]);
        r10.version = HttpVersion::Http10;
        assert_eq!(status(r10), 400);
    }
}
