//! Hostile requests, row by row: what a client can make the router read
//! differently from the hops before and after it (request smuggling), and
//! what it must refuse.
//!
//! Each row is sent raw over a socket to a server front started in-process
//! (the library's `Server`, `Proxy` and backend edge, no binary, no etcd),
//! followed on the same connection by a benign request, as an attacker's
//! smuggled request would be. For each row the test checks the statuses
//! the client got, that the connection closed where it must, and the exact
//! bytes a recording backend received: nothing, or one well-framed request
//! (and then the benign one), or, when the router refuses a body it was
//! already streaming, bytes that never make a complete request.
//!
//! The rows name their source: the defects found with a hostile-request
//! corpus (issue 7), llhttp's request test vectors (`test/request/*.md` of
//! nodejs/llhttp, transcribed as data; llhttp's strict mode is the
//! reference there), RFC 9112 / RFC 9110, and this project's own cases.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use httprouter::backend::BackendClient;
use httprouter::health::EjectPolicy;
use httprouter::log::Logger;
use httprouter::proxy::{Proxy, ProxySettings};
use httprouter::routes::{Backend, RouteTable, SharedTable};
use httprouter::server::{Server, ServerSettings};
use httprouter::tunnel::HandshakeTimeouts;

const HOST: &str = "t.example";
/// Sent right after every row on the same connection.
const FOLLOW_UP: &[u8] = b"GET /next HTTP/1.1\r\nHost: t.example\r\n\r\n";
/// How long any one exchange may take before the test calls it hung.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A backend that records every byte of every connection, and answers
/// each complete request `200 ok` with `Connection: close` (so that the
/// router's edge never pools a connection, and one connection is one
/// request).
struct RecordingBackend {
    addr: SocketAddr,
    conns: Arc<(Mutex<Vec<Recorded>>, Condvar)>,
    /// Connections already handed out by [`RecordingBackend::settle`].
    taken: usize,
}

struct Recorded {
    peer: SocketAddr,
    bytes: Vec<u8>,
    done: bool,
}

impl RecordingBackend {
    fn start() -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let addr = listener.local_addr().expect("backend address");
        let conns: Arc<(Mutex<Vec<Recorded>>, Condvar)> = Arc::default();
        let c = Arc::clone(&conns);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(peer) = stream.peer_addr() else {
                    continue;
                };
                let index = {
                    let mut list = c.0.lock().unwrap();
                    list.push(Recorded {
                        peer,
                        bytes: Vec::new(),
                        done: false,
                    });
                    list.len() - 1
                };
                c.1.notify_all();
                let c = Arc::clone(&c);
                std::thread::spawn(move || record(stream, index, &c));
            }
        });
        RecordingBackend {
            addr,
            conns,
            taken: 0,
        }
    }

    /// The bytes of every connection the router made since the last call,
    /// each once the router closed it. Exact, without sleeping: a fence
    /// connection is made now, and the listener hands out connections in
    /// the order they were made, so every earlier one is accepted before
    /// the fence is.
    fn settle(&mut self) -> Vec<Vec<u8>> {
        let fence = TcpStream::connect(self.addr).expect("fence connection");
        let fence_addr = fence.local_addr().expect("fence address");
        drop(fence);
        let deadline = Instant::now() + EXCHANGE_TIMEOUT;
        let (lock, cond) = &*self.conns;
        let mut list = lock.lock().unwrap();
        loop {
            if let Some(at) = list[self.taken..].iter().position(|r| r.peer == fence_addr) {
                let at = self.taken + at;
                if list[self.taken..at].iter().all(|r| r.done) {
                    let out = list[self.taken..at]
                        .iter()
                        .map(|r| r.bytes.clone())
                        .collect();
                    self.taken = at + 1;
                    return out;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the router never closed a backend connection"
            );
            list = cond.wait_timeout(list, left).unwrap().0;
        }
    }
}

fn record(mut stream: TcpStream, index: usize, conns: &(Mutex<Vec<Recorded>>, Condvar)) {
    let _ = stream.set_read_timeout(Some(EXCHANGE_TIMEOUT));
    let mut seen = Vec::new();
    let mut answered = false;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        conns.0.lock().unwrap()[index].bytes = seen.clone();
        if !answered && request_len(&seen).is_some() {
            answered = true;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    }
    let mut list = conns.0.lock().unwrap();
    list[index].bytes = seen;
    list[index].done = true;
    conns.1.notify_all();
}

/// The length of the first request in `bytes` if it is complete. Only for
/// what the router sends, which the rows check byte for byte anyway.
fn request_len(bytes: &[u8]) -> Option<usize> {
    let head_end = find(bytes, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    if field("transfer-encoding:").is_some() {
        let mut at = head_end;
        loop {
            let line_end = at + find(&bytes[at..], b"\r\n")?;
            let line = std::str::from_utf8(&bytes[at..line_end]).ok()?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let end = at + find(&bytes[at..], b"\r\n")?;
                    let empty = end == at;
                    at = end + 2;
                    if empty {
                        return Some(at);
                    }
                }
            }
            at += size + 2;
            if at > bytes.len() {
                return None;
            }
        }
    }
    let length: usize = field("content-length:").map_or(Some(0), |v| v.parse().ok())?;
    (bytes.len() >= head_end + length).then_some(head_end + length)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

struct Router {
    server: Option<Server>,
    addr: SocketAddr,
}

impl Router {
    fn start(backend: SocketAddr) -> Router {
        let table = Arc::new(SharedTable::default());
        let route = Backend::parse(&format!("/domains/{HOST}/a"), &format!("http://{backend}"))
            .expect("a valid backend URL");
        table.store(RouteTable::build(
            [(HOST, Arc::new(route))],
            &RouteTable::default(),
        ));
        let second = Duration::from_secs(1);
        let five = Duration::from_secs(5);
        let proxy = Proxy::new(
            table,
            BackendClient::new(second, five, five, 4),
            ProxySettings {
                eject: EjectPolicy {
                    after: 1000,
                    duration_ms: 1,
                },
                trusted_proxies: Vec::new(),
                handshake: HandshakeTimeouts {
                    connect: second,
                    response: five,
                    body: five,
                },
            },
            Logger::discard(),
        );
        let server = Server::start(
            "127.0.0.1:0".parse().expect("an address"),
            ServerSettings {
                max_connections: 64,
                header_timeout: five,
                keepalive_timeout: five,
                client_timeout: five,
                tunnel_timeout: five,
            },
            Arc::new(proxy),
            Logger::discard(),
        )
        .expect("start the server front");
        let addr = server.local_addr();
        Router {
            server: Some(server),
            addr,
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown(Duration::from_secs(1));
        }
    }
}

/// Sends `raw` and the follow-up, ends the sending side, and reads until
/// the router closes: the statuses of the answers, in order.
fn exchange(addr: SocketAddr, raw: &[u8]) -> Result<Vec<u16>, String> {
    let mut conn = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut sent = raw.to_vec();
    sent.extend_from_slice(FOLLOW_UP);
    conn.write_all(&sent).map_err(|e| e.to_string())?;
    let _ = conn.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    match conn.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
            return Err(format!(
                "connection left open: {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&got))),
    }
    parse_responses(&got, raw.starts_with(b"HEAD "))
}

/// The statuses of the answers in `bytes`; the first one is bodiless if
/// it answers a HEAD request.
fn parse_responses(mut bytes: &[u8], head_first: bool) -> Result<Vec<u16>, String> {
    let mut statuses = Vec::new();
    while !bytes.is_empty() {
        let show = || String::from_utf8_lossy(bytes).into_owned();
        let head_end =
            find(bytes, b"\r\n\r\n").ok_or_else(|| format!("cut answer {:?}", show()))? + 4;
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let status: u16 = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an answer: {:?}", show()))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| format!("answer without a length: {head:?}"))?;
        let length = if head_first && statuses.is_empty() {
            0
        } else {
            length
        };
        if bytes.len() < head_end + length {
            return Err(format!("cut answer body: {:?}", show()));
        }
        statuses.push(status);
        bytes = &bytes[head_end + length..];
    }
    Ok(statuses)
}

/// A request as the router's backend edge sends it: the request line, the
/// client's end-to-end headers (names lowercased, as the edge writes them
/// today), `Host` and the forwarding headers, then the body in the framing
/// the client used.
#[derive(Clone)]
struct Fwd {
    line: &'static str,
    host: &'static str,
    headers: &'static [&'static str],
    body: Body,
}

#[derive(Clone)]
enum Body {
    /// No body and no framing header.
    None,
    /// No body, `Content-Length: 0` (methods that expect a body).
    Empty,
    Length(&'static [u8]),
    /// Chunked, in these chunks (the edge re-chunks what it reads; each
    /// row's chunks come whole from the client's buffer).
    Chunks(&'static [&'static [u8]]),
}

fn fwd(line: &'static str) -> Fwd {
    Fwd {
        line,
        host: HOST,
        headers: &[],
        body: Body::None,
    }
}

impl Fwd {
    fn host(mut self, host: &'static str) -> Fwd {
        self.host = host;
        self
    }
    fn headers(mut self, headers: &'static [&'static str]) -> Fwd {
        self.headers = headers;
        self
    }
    fn body(mut self, body: Body) -> Fwd {
        self.body = body;
        self
    }

    fn render(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        if matches!(self.body, Body::Chunks(_)) {
            out.push_str("transfer-encoding: chunked\r\n");
        }
        for h in self.headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        let host = self.host;
        out.push_str(&format!(
            "host: {host}\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: {host}\r\n"
        ));
        let mut out = out.into_bytes();
        match &self.body {
            Body::None | Body::Chunks(_) => out.extend_from_slice(b"\r\n"),
            Body::Empty => out.extend_from_slice(b"content-length: 0\r\n\r\n"),
            Body::Length(b) => {
                out.extend_from_slice(format!("content-length: {}\r\n\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
        }
        if let Body::Chunks(chunks) = &self.body {
            for c in *chunks {
                out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        out
    }
}

/// What one backend connection received.
enum Sent {
    /// Exactly this request.
    Whole(Fwd),
    /// The start of this request at most, never its end: the router was
    /// streaming the body when it found the body malformed. (Zero
    /// connections also pass: the edge may not have connected yet.)
    Cut(Fwd),
}

struct Row {
    source: &'static str,
    name: &'static str,
    raw: &'static [u8],
    /// Statuses of the answers the client gets before the router closes
    /// (the client sends the row, the follow-up, and then ends its side).
    answers: Vec<u16>,
    backend: Vec<Sent>,
}

/// Refused before anything was forwarded, and closed: the follow-up is
/// never served.
fn refused(status: u16) -> (Vec<u16>, Vec<Sent>) {
    (vec![status], Vec::new())
}

/// Forwarded exactly so, then the follow-up on the same connection.
fn forwarded(f: Fwd) -> (Vec<u16>, Vec<Sent>) {
    (
        vec![200, 200],
        vec![Sent::Whole(f), Sent::Whole(fwd("GET /next HTTP/1.1"))],
    )
}

/// Forwarded exactly so, then the connection closes (HTTP/1.0,
/// `Connection: close`).
fn forwarded_then_closed(f: Fwd) -> (Vec<u16>, Vec<Sent>) {
    (vec![200], vec![Sent::Whole(f)])
}

/// Refused while the body was being streamed: the backend never gets a
/// whole request.
fn cut(status: u16, f: Fwd) -> (Vec<u16>, Vec<Sent>) {
    (vec![status], vec![Sent::Cut(f)])
}

const ISSUE: &str = "issue 7 (hostile-request corpus)";
const RFC9112: &str = "RFC 9112";
const RFC9110: &str = "RFC 9110";
const OWN: &str = "httprouter";

macro_rules! row {
    ($source:expr, $name:expr, $raw:expr, $expect:expr) => {{
        let (answers, backend) = $expect;
        Row {
            source: $source,
            name: $name,
            raw: $raw,
            answers,
            backend,
        }
    }};
}

fn rows() -> Vec<Row> {
    use Body::*;
    let post = fwd("POST / HTTP/1.1");
    vec![
        // 1. Underscore spellings of framing headers.
        row!(ISSUE, "Transfer_Encoding beside Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer_Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX",
            refused(400)),
        row!(ISSUE, "Content_Length with a body",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent_Length: 5\r\n\r\nhello",
            refused(400)),
        row!(ISSUE, "content_length, lowercase",
            b"GET / HTTP/1.1\r\nHost: t.example\r\ncontent_length: 0\r\n\r\n",
            refused(400)),
        row!(ISSUE, "Keep_Alive, Proxy_Connection and TE are dropped, X_Custom kept",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nKeep_Alive: 300\r\nProxy_Connection: keep-alive\r\nX_Custom: 1\r\nTE: trailers\r\n\r\n",
            forwarded(fwd("GET / HTTP/1.1").headers(&["x_custom: 1"]))),
        row!(ISSUE, "X_Forwarded_For from a client is dropped",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n",
            forwarded(fwd("GET / HTTP/1.1"))),
        // 2. Latin-1 "whitespace" in framing values.
        row!(ISSUE, "Content-Length: 5\\xa0",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\xa0\r\n\r\nhello",
            refused(400)),
        row!(ISSUE, "Content-Length: \\x855",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: \x855\r\n\r\nhello",
            refused(400)),
        row!(ISSUE, "Transfer-Encoding: chunked\\xa0",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\xa0\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(ISSUE, "Transfer-Encoding: \\x85chunked",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: \x85chunked\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9110, "Host: t.example\\xa0 (only SP and HTAB are whitespace)",
            b"GET / HTTP/1.1\r\nHost: t.example\xa0\r\n\r\n",
            refused(400)),
        row!(RFC9110, "HTAB and SP around a framing value are whitespace",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length:\t 5 \t\r\n\r\nhello",
            forwarded(post.clone().body(Length(b"hello")))),
        // 3. A refused head closes.
        row!(ISSUE, "two Host headers",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(ISSUE, "a target that is no path",
            b"GET t.example/ HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "asterisk-form outside OPTIONS",
            b"GET * HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "authority-form (CONNECT): not a forward proxy",
            b"CONNECT t.example:443 HTTP/1.1\r\nHost: t.example:443\r\n\r\n",
            refused(400)),
        row!(RFC9112, "https absolute-form",
            b"GET https://t.example/ HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "userinfo in the absolute-form",
            b"GET http://u@t.example/ HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "no Host in HTTP/1.1",
            b"GET / HTTP/1.1\r\n\r\n",
            refused(400)),
        row!(OWN, "a Host that is no host",
            b"GET / HTTP/1.1\r\nHost: t.example/evil\r\n\r\n",
            refused(400)),
        row!(OWN, "a Host with userinfo",
            b"GET / HTTP/1.1\r\nHost: u@t.example\r\n\r\n",
            refused(400)),
        // 4. The absolute-form.
        row!(ISSUE, "authority, then a query, empty path",
            b"GET http://t.example?x=1 HTTP/1.1\r\nHost: t.example\r\n\r\n",
            forwarded(fwd("GET /?x=1 HTTP/1.1"))),
        row!(RFC9112, "absolute-form with an empty path",
            b"GET http://t.example HTTP/1.1\r\nHost: t.example\r\n\r\n",
            forwarded(fwd("GET / HTTP/1.1"))),
        row!(RFC9112, "the absolute-form's authority wins over Host",
            b"GET http://T.Example/a?b HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
            forwarded(fwd("GET /a?b HTTP/1.1").host("T.Example"))),
        // 5. The client's framing, forwarded.
        row!(ISSUE, "POST without a body",
            b"POST / HTTP/1.1\r\nHost: t.example\r\n\r\n",
            forwarded(post.clone().body(Empty))),
        row!(ISSUE, "PUT without a body, HTTP/1.0",
            b"PUT /x HTTP/1.0\r\nHost: t.example\r\n\r\n",
            forwarded_then_closed(fwd("PUT /x HTTP/1.1").body(Empty))),
        row!(ISSUE, "PATCH with Content-Length: 0",
            b"PATCH /x HTTP/1.1\r\nHost: t.example\r\nContent-Length: 0\r\n\r\n",
            forwarded(fwd("PATCH /x HTTP/1.1").body(Empty))),
        row!(ISSUE, "POST with a body, HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: t.example\r\nContent-Length: 5\r\n\r\nhello",
            forwarded_then_closed(post.clone().body(Length(b"hello")))),
        row!(ISSUE, "DELETE without a body: no framing header",
            b"DELETE /x HTTP/1.1\r\nHost: t.example\r\n\r\n",
            forwarded(fwd("DELETE /x HTTP/1.1"))),
        row!(ISSUE, "GET with Content-Length: 0: no framing header",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 0\r\n\r\n",
            forwarded(fwd("GET / HTTP/1.1"))),
        row!(ISSUE, "chunked stays chunked",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            forwarded(post.clone().body(Chunks(&[b"hello"])))),
        row!(ISSUE, "GET with a body keeps it",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 3\r\n\r\nabc",
            forwarded(fwd("GET / HTTP/1.1").body(Length(b"abc")))),
        // 6. Bare LF and bare CR.
        row!(ISSUE, "bare LF between two fields",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nDummy: x\nContent-Length: 23\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            refused(400)),
        row!(ISSUE, "bare LF after the request line",
            b"GET / HTTP/1.1\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(ISSUE, "bare LFs throughout",
            b"GET / HTTP/1.1\nHost: t.example\n\n",
            refused(400)),
        row!(ISSUE, "a head ended by CRLF LF",
            b"GET / HTTP/1.1\r\nHost: t.example\r\n\n",
            refused(400)),
        row!(RFC9112, "bare CR inside a field",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nX: a\rContent-Length: 5\r\n\r\nhello",
            refused(400)),
        row!(RFC9112, "an empty line before the request line is skipped",
            b"\r\nGET / HTTP/1.1\r\nHost: t.example\r\n\r\n",
            forwarded(fwd("GET / HTTP/1.1"))),
        row!(RFC9112, "a bare LF before the request line",
            b"\nGET / HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        // 7. Trailers.
        row!(ISSUE, "a request line as a trailer",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[b"hello"])))),
        row!(ISSUE, "no empty line after the last chunk: the follow-up is no trailer",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
            cut(400, post.clone().body(Chunks(&[b"hello"])))),
        row!(ISSUE, "a trailer with space before the colon",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX : y\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(ISSUE, "a folded trailer",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n z\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "well-formed trailers are read and dropped",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\nContent-Length: 99\r\n\r\n",
            forwarded(post.clone().body(Chunks(&[b"hello"])))),
        // Framing in general.
        row!(RFC9112, "Transfer-Encoding and Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9112, "Content-Length and Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9112, "two different Content-Lengths",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            refused(400)),
        row!(RFC9112, "two equal Content-Lengths: one goes on",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            forwarded(post.clone().body(Length(b"hello")))),
        row!(RFC9112, "a Content-Length list",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5, 5\r\n\r\nhello",
            refused(400)),
        row!(RFC9112, "a signed Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: +5\r\n\r\nhello",
            refused(400)),
        row!(RFC9112, "a negative Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: -1\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a hex Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 0x5\r\n\r\nhello",
            refused(400)),
        row!(RFC9112, "a space inside Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 1 2\r\n\r\nhello world!",
            refused(400)),
        row!(RFC9112, "an empty Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length:\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a Content-Length past 64 bits",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 18446744073709551616\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a Content-Length with leading zeros is that number",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 005\r\n\r\nhello",
            forwarded(post.clone().body(Length(b"hello")))),
        row!(RFC9112, "a Content-Length that swallows the follow-up's start",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 10\r\n\r\nabc",
            (vec![200, 400], vec![Sent::Whole(post.clone().body(Length(b"abcGET /ne")))])),
        row!(RFC9112, "Transfer-Encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a transfer coding other than chunked",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: gzip\r\n\r\n",
            refused(501)),
        row!(RFC9112, "chunked not last",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            refused(501)),
        row!(RFC9112, "chunked after another coding",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            refused(501)),
        row!(RFC9112, "chunked twice, in two fields",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            refused(501)),
        row!(RFC9112, "identity is no transfer coding",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
            refused(400)),
        row!(RFC9112, "an empty Transfer-Encoding list element",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a quoted transfer coding",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9112, "Transfer-Encoding is case-insensitive",
            b"POST / HTTP/1.1\r\nHost: t.example\r\ntransfer-encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            forwarded(post.clone().body(Chunks(&[b"abc"])))),
        row!(RFC9112, "chunk extensions are parsed and dropped",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5 ; a=1;b=\"x;y\"\r\nhello\r\n0;last\r\n\r\n",
            forwarded(post.clone().body(Chunks(&[b"hello"])))),
        row!(RFC9112, "an unterminated quoted chunk extension",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"x\r\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "a chunk extension without a name",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5;=x\r\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "a chunk size with a sign",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "a chunk size with 0x",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "a chunk size past 64 bits",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "a chunk size line ended by a bare LF",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[])))),
        row!(RFC9112, "chunk data longer than its size",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[b"hel"])))),
        row!(RFC9112, "chunk data ended by a bare LF",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
            cut(400, post.clone().body(Chunks(&[b"hello"])))),
        // Head syntax.
        row!(RFC9112, "space between a field name and the colon",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length : 5\r\n\r\nhello",
            refused(400)),
        row!(RFC9112, "obs-fold",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nX: a\r\n b\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a folded Transfer-Encoding",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9112, "whitespace before the first field",
            b"POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: t.example\r\n\r\n0\r\n\r\n",
            refused(400)),
        row!(RFC9110, "NUL in a field value",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nX: a\x00b\r\n\r\n",
            refused(400)),
        row!(RFC9110, "a vertical tab around Content-Length",
            b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\x0b\r\n\r\nhello",
            refused(400)),
        row!(RFC9110, "a space in a field name",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nX Y: 1\r\n\r\n",
            refused(400)),
        row!(RFC9110, "an empty field name",
            b"GET / HTTP/1.1\r\nHost: t.example\r\n: 1\r\n\r\n",
            refused(400)),
        row!(RFC9110, "a non-ASCII field name",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nX\xe9: 1\r\n\r\n",
            refused(400)),
        row!(RFC9112, "two spaces in the request line",
            b"GET  / HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a tab for a space in the request line",
            b"GET\t/ HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "HTTP/0.9 (no version)",
            b"GET /\r\n\r\n",
            refused(400)),
        row!(RFC9112, "an unknown HTTP version",
            b"GET / HTTP/1.2\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a lowercase protocol name",
            b"GET / http/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9112, "a method with a non-token byte",
            b"G(T / HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9110, "HEAD with a body",
            b"HEAD / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\r\n\r\nhello",
            refused(400)),
        row!(RFC9110, "HEAD with Content-Length: 0",
            b"HEAD / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 0\r\n\r\n",
            (vec![200, 200], vec![Sent::Whole(fwd("HEAD / HTTP/1.1")), Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        // Connections.
        row!(RFC9112, "Connection: close ends the connection",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nConnection: close\r\n\r\n",
            forwarded_then_closed(fwd("GET / HTTP/1.1"))),
        row!(RFC9112, "HTTP/1.0 is not kept alive, keep-alive asked or not",
            b"GET / HTTP/1.0\r\nHost: t.example\r\nConnection: keep-alive\r\n\r\n",
            forwarded_then_closed(fwd("GET / HTTP/1.1"))),
        row!(RFC9112, "pipelined requests are answered in order",
            b"GET /1 HTTP/1.1\r\nHost: t.example\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t.example\r\nContent-Length: 2\r\n\r\nhi",
            (vec![200, 200, 200], vec![
                Sent::Whole(fwd("GET /1 HTTP/1.1")),
                Sent::Whole(fwd("POST /2 HTTP/1.1").body(Length(b"hi"))),
                Sent::Whole(fwd("GET /next HTTP/1.1")),
            ])),
        row!(RFC9112, "a pipelined request after a refused one is never read",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nContent-Length: x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9110, "an unknown expectation",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue-please\r\n\r\n",
            (vec![417, 200], vec![Sent::Whole(fwd("GET /next HTTP/1.1"))])),
    ]
}

#[test]
fn hostile_requests_get_the_answer_the_table_says() {
    let mut backend = RecordingBackend::start();
    let router = Router::start(backend.addr);
    let mut failures = Vec::new();
    let table = rows();
    for row in &table {
        let answers = exchange(router.addr, row.raw);
        let sent = backend.settle();
        let mut wrong = Vec::new();
        match &answers {
            Ok(a) if *a == row.answers => {}
            other => wrong.push(format!("answers {other:?}, expected {:?}", row.answers)),
        }
        let all_cut = row.backend.iter().all(|s| matches!(s, Sent::Cut(_)));
        if sent.len() != row.backend.len() && !(all_cut && sent.is_empty()) {
            wrong.push(format!(
                "{} backend connections, expected {}",
                sent.len(),
                row.backend.len()
            ));
        }
        for (got, want) in sent.iter().zip(&row.backend) {
            match want {
                Sent::Whole(f) if *got == f.render() => {}
                Sent::Cut(f) if is_cut_of(got, &f.render()) => {}
                Sent::Whole(f) | Sent::Cut(f) => wrong.push(format!(
                    "backend got {:?}, expected {}{:?}",
                    String::from_utf8_lossy(got),
                    if matches!(want, Sent::Cut(_)) {
                        "a start of "
                    } else {
                        ""
                    },
                    String::from_utf8_lossy(&f.render())
                )),
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{} / {}:\n    {}",
                row.source,
                row.name,
                wrong.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
}

/// `got` is a start of the request `whole` that stops before its last
/// chunk: the backend cannot have taken it for a complete request.
fn is_cut_of(got: &[u8], whole: &[u8]) -> bool {
    let unfinished = &whole[..whole.len() - b"0\r\n\r\n".len()];
    unfinished.starts_with(got)
}
