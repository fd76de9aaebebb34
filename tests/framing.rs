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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::inproc::InProcessRouter;

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
    stop: Arc<AtomicBool>,
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
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
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
            stop,
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

impl Drop for RecordingBackend {
    /// Stops the accept loop (woken by one last connection) and so closes
    /// the listener.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
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

/// Sends `raw` and the follow-up, ends the sending side unless the router
/// is to close by itself, and reads until the router closes: the statuses
/// of the answers, in order.
fn exchange(addr: SocketAddr, raw: &[u8], half_close: bool) -> Result<Vec<u16>, String> {
    let mut conn = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut sent = raw.to_vec();
    sent.extend_from_slice(FOLLOW_UP);
    conn.write_all(&sent).map_err(|e| e.to_string())?;
    if half_close {
        let _ = conn.shutdown(Shutdown::Write);
    }
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
/// client's end-to-end headers as the client spelt them, `Host` and the
/// forwarding headers, the framing header, then the body in the framing
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
        for h in self.headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        let host = self.host;
        out.push_str(&format!(
            "Host: {host}\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: {host}\r\n"
        ));
        let mut out = out.into_bytes();
        match &self.body {
            Body::None => out.extend_from_slice(b"\r\n"),
            Body::Empty => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
            Body::Length(b) => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Body::Chunks(chunks) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for c in *chunks {
                    out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        out
    }
}

/// What one backend connection received.
enum Sent {
    /// Exactly this request.
    Whole(Fwd),
    /// The start of this request at most, never its end: the router was
    /// streaming the body when it found the body malformed or cut short.
    /// (Zero connections also pass: the edge may not have connected yet.)
    Cut(Fwd),
    /// Exactly these bytes: an upgrade handshake, which the tunnel writes
    /// itself (names as sent, `Connection: Upgrade` last).
    Exact(&'static [u8]),
}

struct Row {
    source: &'static str,
    name: &'static str,
    raw: &'static [u8],
    expect: Expect,
}

struct Expect {
    /// Statuses of the answers the client gets before the router closes.
    answers: Vec<u16>,
    backend: Vec<Sent>,
    /// The router closes the connection by itself after the last answer.
    /// Otherwise the client ends its side after the follow-up, and the
    /// router closes when it reads that end.
    closes: bool,
}

/// Refused before anything was forwarded, and closed: the follow-up is
/// never served.
fn refused(status: u16) -> Expect {
    answered(vec![status], Vec::new())
}

/// Forwarded exactly so, then the follow-up on the same connection.
fn forwarded(f: Fwd) -> Expect {
    answered(
        vec![200, 200],
        vec![Sent::Whole(f), Sent::Whole(fwd("GET /next HTTP/1.1"))],
    )
}

/// Forwarded exactly so, then the connection closes (HTTP/1.0,
/// `Connection: close`).
fn forwarded_then_closed(f: Fwd) -> Expect {
    answered_then_closed(vec![200], vec![Sent::Whole(f)])
}

/// Refused while the body was being streamed: the backend never gets a
/// whole request.
fn cut(status: u16, f: Fwd) -> Expect {
    answered(vec![status], vec![Sent::Cut(f)])
}

/// The client ends its side in the middle of the body: `400`, and the
/// backend never gets a whole request.
fn cut_short(f: Fwd) -> Expect {
    Expect {
        answers: vec![400],
        backend: vec![Sent::Cut(f)],
        closes: false,
    }
}

/// These answers and backend connections; the router closes by itself when
/// the last answer is one of its refusals of an unreadable request.
fn answered(answers: Vec<u16>, backend: Vec<Sent>) -> Expect {
    let closes = answers
        .last()
        .is_some_and(|s| [400, 408, 413, 414, 431, 501].contains(s));
    Expect {
        answers,
        backend,
        closes,
    }
}

/// These answers and backend connections, and the router closes after the
/// last answer.
fn answered_then_closed(answers: Vec<u16>, backend: Vec<Sent>) -> Expect {
    Expect {
        answers,
        backend,
        closes: true,
    }
}

const ISSUE: &str = "issue 7 (hostile-request corpus)";
const RFC9112: &str = "RFC 9112";
const RFC9110: &str = "RFC 9110";
const OWN: &str = "httprouter";

// llhttp request test vectors (nodejs/llhttp test/request/*.md), one
// constant per file.
const LLHTTP_TE: &str = "llhttp test/request/transfer-encoding.md";
const LLHTTP_CL: &str = "llhttp test/request/content-length.md";
const LLHTTP_INVALID: &str = "llhttp test/request/invalid.md";
const LLHTTP_CONNECTION: &str = "llhttp test/request/connection.md";
const LLHTTP_PIPELINING: &str = "llhttp test/request/pipelining.md";
const LLHTTP_SAMPLE: &str = "llhttp test/request/sample.md";
const LLHTTP_URI: &str = "llhttp test/request/uri.md";
const LLHTTP_METHOD: &str = "llhttp test/request/method.md";
const LLHTTP_LENIENT_HEADERS: &str = "llhttp test/request/lenient-headers.md";
const LLHTTP_LENIENT_HEADER_VALUE_RELAXED: &str =
    "llhttp test/request/lenient-header-value-relaxed.md";
const LLHTTP_LENIENT_VERSION: &str = "llhttp test/request/lenient-version.md";

macro_rules! row {
    ($source:expr, $name:expr, $raw:expr, $expect:expr) => {
        Row {
            source: $source,
            name: $name,
            raw: $raw,
            expect: $expect,
        }
    };
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
            forwarded(fwd("GET / HTTP/1.1").headers(&["X_Custom: 1"]))),
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
        row!(RFC9112, "asterisk-form (`*`) names no resource to route",
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
            answered(vec![200, 400], vec![Sent::Whole(post.clone().body(Length(b"abcGET /ne")))])),
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
            answered(vec![200, 200], vec![Sent::Whole(fwd("HEAD / HTTP/1.1")), Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        // Connections.
        row!(RFC9112, "Connection: close ends the connection",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nConnection: close\r\n\r\n",
            forwarded_then_closed(fwd("GET / HTTP/1.1"))),
        row!(RFC9112, "HTTP/1.0 is not kept alive, keep-alive asked or not",
            b"GET / HTTP/1.0\r\nHost: t.example\r\nConnection: keep-alive\r\n\r\n",
            forwarded_then_closed(fwd("GET / HTTP/1.1"))),
        row!(RFC9112, "pipelined requests are answered in order",
            b"GET /1 HTTP/1.1\r\nHost: t.example\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t.example\r\nContent-Length: 2\r\n\r\nhi",
            answered(vec![200, 200, 200], vec![
                Sent::Whole(fwd("GET /1 HTTP/1.1")),
                Sent::Whole(fwd("POST /2 HTTP/1.1").body(Length(b"hi"))),
                Sent::Whole(fwd("GET /next HTTP/1.1")),
            ])),
        row!(RFC9112, "a pipelined request after a refused one is never read",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nContent-Length: x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t.example\r\n\r\n",
            refused(400)),
        row!(RFC9110, "an unknown expectation",
            b"GET / HTTP/1.1\r\nHost: t.example\r\nExpect: 100-continue-please\r\n\r\n",
            answered(vec![417, 200], vec![Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        // llhttp's request test vectors, adapted: a `Host: t.example` first
        // header where the vector has none, and `t.example` for any other
        // Host value (rows marked " (Host: t.example)"); the rest byte for
        // byte. The expectations follow the router's rules, not llhttp's.
        // llhttp test/request/transfer-encoding.md
        row!(LLHTTP_TE, "Parsing and setting flag (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n",
            cut(400, fwd("PUT /url HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Parse chunks with lowercase size (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            a\r\n\
            0123456789\r\n\
            0\r\n\
            \r\n",
            forwarded(fwd("PUT /url HTTP/1.1").body(Chunks(&[b"0123456789"])))),
        row!(LLHTTP_TE, "Parse chunks with uppercase size (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            A\r\n\
            0123456789\r\n\
            0\r\n\
            \r\n",
            forwarded(fwd("PUT /url HTTP/1.1").body(Chunks(&[b"0123456789"])))),
        row!(LLHTTP_TE, "POST with `Transfer-Encoding: chunked` (Host: t.example)",
            b"POST /post_chunked_all_your_base HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            1e\r\n\
            all your base are belong to us\r\n\
            0\r\n\
            \r\n",
            forwarded(fwd("POST /post_chunked_all_your_base HTTP/1.1").body(Chunks(&[b"all your base are belong to us"])))),
        row!(LLHTTP_TE, "Two chunks and triple zero prefixed end chunk (Host: t.example)",
            b"POST /two_chunks_mult_zero_end HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            5\r\n\
            hello\r\n\
            6\r\n\
            \x20world\r\n\
            000\r\n\
            \r\n",
            forwarded(fwd("POST /two_chunks_mult_zero_end HTTP/1.1").body(Chunks(&[b"hello", b" world"])))),
        row!(LLHTTP_TE, "Trailing headers (Host: t.example)",
            b"POST /chunked_w_trailing_headers HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            5\r\n\
            hello\r\n\
            6\r\n\
            \x20world\r\n\
            0\r\n\
            Vary: *\r\n\
            Content-Type: text/plain\r\n\
            \r\n",
            forwarded(fwd("POST /chunked_w_trailing_headers HTTP/1.1").body(Chunks(&[b"hello", b" world"])))),
        row!(LLHTTP_TE, "Chunk extensions (Host: t.example)",
            b"POST /chunked_w_unicorns_after_length HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            5;ilovew3;somuchlove=aretheseparametersfor;another=withvalue\r\n\
            hello\r\n\
            6;blahblah;blah\r\n\
            \x20world\r\n\
            0\r\n",
            cut(400, fwd("POST /chunked_w_unicorns_after_length HTTP/1.1").body(Chunks(&[b"hello", b" world"])))),
        row!(LLHTTP_TE, "No semicolon before chunk extensions (Host: t.example)",
            b"POST /chunked_w_unicorns_after_length HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-encoding: chunked\r\n\
            \r\n\
            2 erfrferferf\r\n\
            aa\r\n\
            0 rrrr\r\n\
            \r\n",
            cut(400, fwd("POST /chunked_w_unicorns_after_length HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "No extension after semicolon (Host: t.example)",
            b"POST /chunked_w_unicorns_after_length HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-encoding: chunked\r\n\
            \r\n\
            2;\r\n\
            aa\r\n\
            0\r\n\
            \r\n",
            cut(400, fwd("POST /chunked_w_unicorns_after_length HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Chunk extensions quoting (Host: t.example)",
            b"POST /chunked_w_unicorns_after_length HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            5;ilovew3=\"I \\\"love\\\"; \\\\extensions\\\\\";somuchlove=\"aretheseparametersfor\";blah;foo=bar\r\n\
            hello\r\n\
            6;blahblah;blah\r\n\
            \x20world\r\n\
            0\r\n",
            cut(400, fwd("POST /chunked_w_unicorns_after_length HTTP/1.1").body(Chunks(&[b"hello", b" world"])))),
        row!(LLHTTP_TE, "Unbalanced chunk extensions quoting (Host: t.example)",
            b"POST /chunked_w_unicorns_after_length HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            5;ilovew3=\"abc\";somuchlove=\"def; ghi\r\n\
            hello\r\n\
            6;blahblah;blah\r\n\
            \x20world\r\n\
            0\r\n",
            cut(400, fwd("POST /chunked_w_unicorns_after_length HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Ignoring `pigeons` (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: pigeons\r\n\
            \r\n",
            refused(501)),
        row!(LLHTTP_TE, "POST with `Transfer-Encoding` and `Content-Length` (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: identity\r\n\
            Content-Length: 5\r\n\
            \r\n\
            World",
            refused(400)),
        row!(LLHTTP_TE, "POST with `Transfer-Encoding` and `Content-Length` (lenient) (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: identity\r\n\
            Content-Length: 1\r\n\
            \r\n\
            World",
            refused(400)),
        row!(LLHTTP_TE, "POST with empty `Transfer-Encoding` and `Content-Length` (lenient) (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 10\r\n\
            Transfer-Encoding:\r\n\
            Transfer-Encoding:\r\n\
            Transfer-Encoding:\r\n\
            \r\n\
            2\r\n\
            AA\r\n\
            0",
            refused(400)),
        row!(LLHTTP_TE, "POST with `chunked` before other transfer coding names (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: chunked, deflate\r\n\
            \r\n\
            World",
            refused(501)),
        row!(LLHTTP_TE, "POST with `chunked` and duplicate transfer-encoding (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: chunked\r\n\
            Transfer-Encoding: deflate\r\n\
            \r\n\
            World",
            refused(501)),
        row!(LLHTTP_TE, "POST with `chunked` before other transfer-coding (lenient) (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: chunked, deflate\r\n\
            \r\n\
            World",
            refused(501)),
        row!(LLHTTP_TE, "POST with `chunked` and duplicate transfer-encoding (lenient) (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: chunked\r\n\
            Transfer-Encoding: deflate\r\n\
            \r\n\
            World",
            refused(501)),
        row!(LLHTTP_TE, "POST with `chunked` as last transfer-encoding (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: deflate, chunked\r\n\
            \r\n\
            5\r\n\
            World\r\n\
            0\r\n\
            \r\n",
            refused(501)),
        row!(LLHTTP_TE, "POST with `chunked` as last transfer-encoding (multiple headers) (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: deflate\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            5\r\n\
            World\r\n\
            0\r\n\
            \r\n",
            refused(501)),
        row!(LLHTTP_TE, "POST with `chunkedchunked` as transfer-encoding (Host: t.example)",
            b"POST /post_identity_body_world?q=search#hey HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            Transfer-Encoding: chunkedchunked\r\n\
            \r\n\
            5\r\n\
            World\r\n\
            0\r\n\
            \r\n",
            refused(501)),
        row!(LLHTTP_TE, "Missing last-chunk (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            3\r\n\
            foo\r\n\
            \r\n",
            cut(400, fwd("PUT /url HTTP/1.1").body(Chunks(&[b"foo"])))),
        row!(LLHTTP_TE, "Validate chunk parameters (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            3 \n\
            \x20 \r\n\
            foo\r\n\
            \r\n",
            cut(400, fwd("PUT /url HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Invalid OBS fold after chunked value (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \x20 abc\r\n\
            \r\n\
            5\r\n\
            World\r\n\
            0\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_TE, "Chunk header not terminated by CRLF (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close \r\n\
            Transfer-Encoding: chunked \r\n\
            \r\n\
            5\r\r;ABCD\r\n\
            34\r\n\
            E\r\n\
            0\r\n\
            \r\n\
            GET / HTTP/1.1 \r\n\
            Host: t.example\r\n\
            Content-Length: 5\r\n\
            \r\n\
            0\r\n",
            cut(400, fwd("GET / HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Chunk header not terminated by CRLF (lenient) (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close \r\n\
            Transfer-Encoding: chunked \r\n\
            \r\n\
            6\r\r;ABCD\r\n\
            33\r\n\
            E\r\n\
            0\r\n\
            \r\n\
            GET / HTTP/1.1 \r\n\
            Host: t.example\r\n\
            Content-Length: 5\r\n\
            0\r\n\
            \r\n",
            cut(400, fwd("GET / HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Chunk data not terminated by CRLF (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close \r\n\
            Transfer-Encoding: chunked \r\n\
            \r\n\
            5\r\n\
            ABCDE0\r\n",
            cut(400, fwd("GET / HTTP/1.1").body(Chunks(&[b"ABCDE"])))),
        row!(LLHTTP_TE, "Chunk data not terminated by CRLF (lenient) (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close \r\n\
            Transfer-Encoding: chunked \r\n\
            \r\n\
            5\r\n\
            ABCDE0\r\n",
            cut(400, fwd("GET / HTTP/1.1").body(Chunks(&[b"ABCDE"])))),
        row!(LLHTTP_TE, "Space after chunk header (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            a \r\n\
            0123456789\r\n\
            0\r\n\
            \r\n",
            cut(400, fwd("PUT /url HTTP/1.1").body(Chunks(&[])))),
        row!(LLHTTP_TE, "Space after chunk header (lenient) (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            a \r\n\
            0123456789\r\n\
            0\r\n\
            \r\n",
            cut(400, fwd("PUT /url HTTP/1.1").body(Chunks(&[])))),
        // llhttp test/request/content-length.md
        row!(LLHTTP_CL, "`Content-Length` with zeroes (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 003\r\n\
            \r\n\
            abc",
            forwarded(fwd("PUT /url HTTP/1.1").body(Length(b"abc")))),
        row!(LLHTTP_CL, "`Content-Length` with follow-up headers (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 003\r\n\
            Ohai: world\r\n\
            \r\n\
            abc",
            forwarded(fwd("PUT /url HTTP/1.1").headers(&["Ohai: world"]).body(Length(b"abc")))),
        // The vector stops where llhttp fails; the blank line that ends
        // the head is added, or the follow-up would be read as a field and
        // the row refused for that.
        row!(LLHTTP_CL, "Error on `Content-Length` overflow (Host: t.example, head ended)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 1000000000000000000000\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "Error on duplicate `Content-Length` (Host: t.example, head ended)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 1\r\n\
            Content-Length: 2\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "Error on simultaneous `Content-Length` and `Transfer-Encoding: identity` (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 1\r\n\
            Transfer-Encoding: identity\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "Invalid whitespace token with `Content-Length` header field (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: upgrade\r\n\
            Content-Length : 4\r\n\
            Upgrade: ws\r\n\
            \r\n\
            abcdefgh",
            refused(400)),
        row!(LLHTTP_CL, "Invalid whitespace token with `Content-Length` header field (lenient) (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: upgrade\r\n\
            Content-Length : 4\r\n\
            Upgrade: ws\r\n\
            \r\n\
            abcdefgh",
            refused(400)),
        row!(LLHTTP_CL, "No error on simultaneous `Content-Length` and `Transfer-Encoding: identity` (lenient) (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 1\r\n\
            Transfer-Encoding: identity\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "Funky `Content-Length` with body (Host: t.example)",
            b"GET /get_funky_content_length_body_hello HTTP/1.0\r\n\
            Host: t.example\r\n\
            conTENT-Length: 5\r\n\
            \r\n\
            HELLO",
            forwarded_then_closed(fwd("GET /get_funky_content_length_body_hello HTTP/1.1").body(Length(b"HELLO")))),
        row!(LLHTTP_CL, "Spaces in `Content-Length` (surrounding) (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length:  42 \r\n\
            \r\n",
            // The follow-up's 39 bytes are body; the client then stops.
            cut_short(post.clone().body(Length(b"GET /next HTTP/1.1\r\nHost: t.example\r\n\r\n???")))),
        row!(LLHTTP_CL, "Tabs in `Content-Length` (surrounding) (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length:\t42\t  \r\n\
            \r\n",
            cut_short(post.clone().body(Length(b"GET /next HTTP/1.1\r\nHost: t.example\r\n\r\n???")))),
        row!(LLHTTP_CL, "Spaces in `Content-Length` #2 (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 4 2\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "Spaces in `Content-Length` #3 (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 13 37\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "Empty `Content-Length` (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length:\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CL, "`Content-Length` with CR instead of dash (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content\rLength: 003\r\n\
            \r\n\
            abc",
            refused(400)),
        row!(LLHTTP_CL, "Missing CRLF-CRLF before body (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 3\r\n\
            \rabc",
            refused(400)),
        row!(LLHTTP_CL, "Missing CRLF-CRLF before body (lenient) (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 3\r\n\
            \rabc",
            refused(400)),
        // llhttp test/request/invalid.md
        row!(LLHTTP_INVALID, "ICE protocol and GET method (Host: t.example)",
            b"GET /music/sweet/music ICE/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "ICE protocol, but not really (Host: t.example)",
            b"GET /music/sweet/music IHTTP/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "RTSP protocol and PUT method (Host: t.example)",
            b"PUT /music/sweet/music RTSP/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "HTTP protocol and ANNOUNCE method (Host: t.example)",
            b"ANNOUNCE /music/sweet/music HTTP/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded_then_closed(fwd("ANNOUNCE /music/sweet/music HTTP/1.1"))),
        row!(LLHTTP_INVALID, "Headers separated by CR (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Foo: 1\rBar: 2\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Headers separated by LF (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            x:x\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            1\r\n\
            A\r\n\
            0\r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Headers separated by dummy characters (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Connection: close\r\n\
            Host: t.example\r\n\
            \rZGET /evil: HTTP/1.1\r\n\
            Host: t.example\r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Headers separated by dummy characters (lenient) (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Connection: close\r\n\
            Host: t.example\r\n\
            \rZGET /evil: HTTP/1.1\r\n\
            Host: t.example\r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Empty headers separated by CR (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Connection: Close\r\n\
            Host: t.example\r\n\
            x:\rTransfer-Encoding: chunked\r\n\
            \r\n\
            1\r\n\
            A\r\n\
            0\r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Empty headers separated by LF (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            x:\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            1\r\n\
            A\r\n\
            0\r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Invalid header token #1 (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Fo@: Failure\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Invalid header token #2 (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Foo\x01\test: Bar\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Invalid header token #3 (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            : Bar\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Invalid method (Host: t.example)",
            b"MKCOLA / HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("MKCOLA / HTTP/1.1"))),
        row!(LLHTTP_INVALID, "Illegal header field name line folding (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            name\r\n\
            \x20: value\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Corrupted Connection header (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection\r\x1b5\xc3\x95eep-Alive\r\n\
            Accept-Encoding: gzip\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Corrupted header name (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            X-Some-Header\r\x1b5\xc3\x95eep-Alive\r\n\
            Accept-Encoding: gzip\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Missing CR between headers (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Dummy: x\n\
            Content-Length: 23\r\n\
            \r\n\
            GET / HTTP/1.1\r\n\
            Dummy: GET /admin HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Invalid HTTP version",
            b"GET / HTTP/5.6",
            refused(400)),
        row!(LLHTTP_INVALID, "Invalid space after start line (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            \x20Host: t.example",
            refused(400)),
        row!(LLHTTP_INVALID, "Only LFs present",
            b"POST / HTTP/1.1\n\
            Transfer-Encoding: chunked\n\
            Trailer: Baz\r\n\
            Foo: abc\n\
            Bar: def\n\
            \n\
            1\n\
            A\n\
            1;abc\n\
            B\n\
            1;def=ghi\n\
            C\n\
            1;jkl=\"mno\"\n\
            D\n\
            0\n\
            \n\
            Baz: ghi\n\
            \n\
            \\",
            refused(400)),
        row!(LLHTTP_INVALID, "Only LFs present (lenient)",
            b"POST / HTTP/1.1\n\
            Transfer-Encoding: chunked\n\
            Trailer: Baz\r\n\
            Foo: abc\n\
            Bar: def\n\
            \n\
            1\n\
            A\n\
            1;abc\n\
            B\n\
            1;def=ghi\n\
            C\n\
            1;jkl=\"mno\"\n\
            D\n\
            0\n\
            \n\
            Baz: ghi\n\
            \n",
            refused(400)),
        row!(LLHTTP_INVALID, "Spaces before headers (Host: t.example)",
            b"POST /hello HTTP/1.1\r\n\
            Host: t.example\r\n\
            Foo: bar\r\n\
            \x20Content-Length: 38\r\n\
            \r\n\
            GET /bye HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_INVALID, "Spaces before headers (lenient) (Host: t.example)",
            b"POST /hello HTTP/1.1\r\n\
            Host: t.example\r\n\
            Foo: bar\r\n\
            \x20Content-Length: 38\r\n\
            \r\n\
            GET /bye HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        // llhttp test/request/connection.md
        row!(LLHTTP_CONNECTION, "Setting flag (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: keep-alive\r\n\
            \r\n",
            forwarded(fwd("PUT /url HTTP/1.1").body(Empty))),
        row!(LLHTTP_CONNECTION, "Restarting when keep-alive is explicitly (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: keep-alive\r\n\
            \r\n\
            PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: keep-alive\r\n\
            \r\n",
            answered(vec![200, 200, 200], vec![Sent::Whole(fwd("PUT /url HTTP/1.1").body(Empty)), Sent::Whole(fwd("PUT /url HTTP/1.1").body(Empty)), Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        row!(LLHTTP_CONNECTION, "No restart when keep-alive is off (1.0) (Host: t.example)",
            b"PUT /url HTTP/1.0\r\n\
            Host: t.example\r\n\
            \r\n\
            PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded_then_closed(fwd("PUT /url HTTP/1.1").body(Empty))),
        row!(LLHTTP_CONNECTION, "Resetting flags when keep-alive is off (1.0, lenient) (Host: t.example)",
            b"PUT /url HTTP/1.0\r\n\
            Host: t.example\r\n\
            Content-Length: 0\r\n\
            \r\n\
            PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Transfer-Encoding: chunked\r\n\
            \r\n",
            forwarded_then_closed(fwd("PUT /url HTTP/1.1").body(Empty))),
        row!(LLHTTP_CONNECTION, "CRLF between requests, implicit `keep-alive` (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Type: application/x-www-form-urlencoded\r\n\
            Content-Length: 4\r\n\
            \r\n\
            q=42\r\n\
            \r\n\
            GET / HTTP/1.1",
            answered(vec![200, 400], vec![Sent::Whole(fwd("POST / HTTP/1.1").headers(&["Content-Type: application/x-www-form-urlencoded"]).body(Length(b"q=42")))])),
        row!(LLHTTP_CONNECTION, "Not treating `\\r` as `-` (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: keep\ralive\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_CONNECTION, "Setting flag on `close` (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close\r\n\
            \r\n",
            forwarded_then_closed(fwd("PUT /url HTTP/1.1").body(Empty))),
        row!(LLHTTP_CONNECTION, "Setting flag on `close` followed by tab (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close\t\r\n\
            \r\n",
            forwarded_then_closed(fwd("PUT /url HTTP/1.1").body(Empty))),
        row!(LLHTTP_CONNECTION, "CRLF between requests, explicit `close` (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Type: application/x-www-form-urlencoded\r\n\
            Content-Length: 4\r\n\
            Connection: close\r\n\
            \r\n\
            q=42\r\n\
            \r\n\
            GET / HTTP/1.1",
            forwarded_then_closed(fwd("POST / HTTP/1.1").headers(&["Content-Type: application/x-www-form-urlencoded"]).body(Length(b"q=42")))),
        row!(LLHTTP_CONNECTION, "CRLF between requests, explicit `close` followed by tab (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Type: application/x-www-form-urlencoded\r\n\
            Content-Length: 4\r\n\
            Connection: close\t\r\n\
            \r\n\
            q=42\r\n\
            \r\n\
            GET / HTTP/1.1",
            forwarded_then_closed(fwd("POST / HTTP/1.1").headers(&["Content-Type: application/x-www-form-urlencoded"]).body(Length(b"q=42")))),
        row!(LLHTTP_CONNECTION, "CRLF between requests, explicit `close` (lenient) (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Type: application/x-www-form-urlencoded\r\n\
            Content-Length: 4\r\n\
            Connection: close\r\n\
            \r\n\
            q=42\r\n\
            \r\n\
            GET / HTTP/1.1",
            forwarded_then_closed(fwd("POST / HTTP/1.1").headers(&["Content-Type: application/x-www-form-urlencoded"]).body(Length(b"q=42")))),
        row!(LLHTTP_CONNECTION, "Sample (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: close, token, upgrade, token, keep-alive\r\n\
            \r\n",
            forwarded_then_closed(fwd("PUT /url HTTP/1.1").body(Empty))),
        row!(LLHTTP_CONNECTION, "Multiple tokens with folding and LWS (Host: t.example)",
            b"GET /demo HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: keep-alive, upgrade\r\n\
            Upgrade: WebSocket\r\n\
            \r\n\
            Hot diggity dogg",
            // An upgrade the backend answers with a plain 200: passed on,
            // then closed; the bytes after the head are never forwarded.
            answered_then_closed(vec![200], vec![Sent::Exact(b"GET /demo HTTP/1.1\r\nHost: t.example\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: t.example\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n")])),
        row!(LLHTTP_CONNECTION, "Setting a flag and pausing (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: upgrade\r\n\
            Upgrade: ws\r\n\
            \r\n",
            answered_then_closed(vec![200], vec![Sent::Exact(b"PUT /url HTTP/1.1\r\nHost: t.example\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: t.example\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n")])),
        row!(LLHTTP_CONNECTION, "Upgrade GET request (Host: t.example)",
            b"GET /demo HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: Upgrade\r\n\
            Sec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\n\
            Sec-WebSocket-Protocol: sample\r\n\
            Upgrade: WebSocket\r\n\
            Sec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\n\
            Origin: http://example.com\r\n\
            \r\n\
            Hot diggity dogg",
            answered_then_closed(vec![200], vec![Sent::Exact(b"GET /demo HTTP/1.1\r\nSec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\nSec-WebSocket-Protocol: sample\r\nSec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\nOrigin: http://example.com\r\nHost: t.example\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: t.example\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n")])),
        row!(LLHTTP_CONNECTION, "Multiple tokens with folding (Host: t.example)",
            b"GET /demo HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: Something,\r\n\
            \x20Upgrade, ,Keep-Alive\r\n\
            Sec-WebSocket-Key2: 12998 5 Y3 1  .P00\r\n\
            Sec-WebSocket-Protocol: sample\r\n\
            Upgrade: WebSocket\r\n\
            Sec-WebSocket-Key1: 4 @1  46546xW%0l 1 5\r\n\
            Origin: http://example.com\r\n\
            \r\n\
            Hot diggity dogg",
            refused(400)),
        row!(LLHTTP_CONNECTION, "Multiple tokens with folding, LWS, and CRLF (Host: t.example)",
            b"GET /demo HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: keep-alive, \r\n\
            \x20upgrade\r\n\
            Upgrade: WebSocket\r\n\
            \r\n\
            Hot diggity dogg",
            refused(400)),
        row!(LLHTTP_CONNECTION, "Invalid whitespace token with `Connection` header field (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection : upgrade\r\n\
            Content-Length: 4\r\n\
            Upgrade: ws\r\n\
            \r\n\
            abcdefgh",
            refused(400)),
        row!(LLHTTP_CONNECTION, "Invalid whitespace token with `Connection` header field (lenient) (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection : upgrade\r\n\
            Content-Length: 4\r\n\
            Upgrade: ws\r\n\
            \r\n\
            abcdefgh",
            refused(400)),
        row!(LLHTTP_CONNECTION, "Emitting part of body and pausing (Host: t.example)",
            b"PUT /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: upgrade\r\n\
            Content-Length: 4\r\n\
            Upgrade: ws\r\n\
            \r\n\
            abcdefgh",
            answered(vec![200, 200], vec![Sent::Whole(fwd("PUT /url HTTP/1.1").body(Length(b"abcd"))), Sent::Whole(fwd("efghGET /next HTTP/1.1"))])),
        row!(LLHTTP_CONNECTION, "Upgrade POST request (Host: t.example)",
            b"POST /demo HTTP/1.1\r\n\
            Host: t.example\r\n\
            Connection: Upgrade\r\n\
            Upgrade: HTTP/2.0\r\n\
            Content-Length: 15\r\n\
            \r\n\
            sweet post bodyHot diggity dogg",
            answered(vec![200, 400], vec![Sent::Whole(fwd("POST /demo HTTP/1.1").body(Length(b"sweet post body")))])),
        // llhttp test/request/pipelining.md
        row!(LLHTTP_PIPELINING, "Should parse multiple events (Host: t.example)",
            b"POST /aaa HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 3\r\n\
            \r\n\
            AAA\r\n\
            PUT /bbb HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 4\r\n\
            \r\n\
            BBBB\r\n\
            PATCH /ccc HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Length: 5\r\n\
            \r\n\
            CCCC",
            answered(vec![200, 200, 200, 200], vec![Sent::Whole(fwd("POST /aaa HTTP/1.1").body(Length(b"AAA"))), Sent::Whole(fwd("PUT /bbb HTTP/1.1").body(Length(b"BBBB"))), Sent::Whole(fwd("PATCH /ccc HTTP/1.1").body(Length(b"CCCCG"))), Sent::Whole(fwd("ET /next HTTP/1.1"))])),
        // llhttp test/request/sample.md
        row!(LLHTTP_SAMPLE, "Request with method starting with `H` (Host: t.example)",
            b"HEAD /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("HEAD /url HTTP/1.1"))),
        row!(LLHTTP_SAMPLE, "Simple request (Host: t.example)",
            b"OPTIONS /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: Value1\r\n\
            Header2:\t Value2\r\n\
            \r\n",
            forwarded(fwd("OPTIONS /url HTTP/1.1").headers(&["Header1: Value1", "Header2: Value2"]))),
        row!(LLHTTP_SAMPLE, "curl GET (Host: t.example)",
            b"GET /test HTTP/1.1\r\n\
            User-Agent: curl/7.18.0 (i486-pc-linux-gnu) libcurl/7.18.0 OpenSSL/0.9.8g zlib/1.2.3.3 libidn/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            \r\n",
            forwarded(fwd("GET /test HTTP/1.1").headers(&["User-Agent: curl/7.18.0 (i486-pc-linux-gnu) libcurl/7.18.0 OpenSSL/0.9.8g zlib/1.2.3.3 libidn/1.1", "Accept: */*"]))),
        row!(LLHTTP_SAMPLE, "Firefox GET (Host: t.example)",
            b"GET /favicon.ico HTTP/1.1\r\n\
            Host: t.example\r\n\
            User-Agent: Mozilla/5.0 (X11; U; Linux i686; en-US; rv:1.9) Gecko/2008061015 Firefox/3.0\r\n\
            Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
            Accept-Language: en-us,en;q=0.5\r\n\
            Accept-Encoding: gzip,deflate\r\n\
            Accept-Charset: ISO-8859-1,utf-8;q=0.7,*;q=0.7\r\n\
            Keep-Alive: 300\r\n\
            Connection: keep-alive\r\n\
            \r\n",
            forwarded(fwd("GET /favicon.ico HTTP/1.1").headers(&["User-Agent: Mozilla/5.0 (X11; U; Linux i686; en-US; rv:1.9) Gecko/2008061015 Firefox/3.0", "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "Accept-Language: en-us,en;q=0.5", "Accept-Encoding: gzip,deflate", "Accept-Charset: ISO-8859-1,utf-8;q=0.7,*;q=0.7"]))),
        row!(LLHTTP_SAMPLE, "DUMBPACK (Host: t.example)",
            b"GET /dumbpack HTTP/1.1\r\n\
            Host: t.example\r\n\
            aaaaaaaaaaaaa:++++++++++\r\n\
            \r\n",
            forwarded(fwd("GET /dumbpack HTTP/1.1").headers(&["aaaaaaaaaaaaa: ++++++++++"]))),
        row!(LLHTTP_SAMPLE, "No headers and no body (Host: t.example)",
            b"GET /get_no_headers_no_body/world HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /get_no_headers_no_body/world HTTP/1.1"))),
        row!(LLHTTP_SAMPLE, "One header and no body (Host: t.example)",
            b"GET /get_one_header_no_body HTTP/1.1\r\n\
            Host: t.example\r\n\
            Accept: */*\r\n\
            \r\n",
            forwarded(fwd("GET /get_one_header_no_body HTTP/1.1").headers(&["Accept: */*"]))),
        row!(LLHTTP_SAMPLE, "Apache bench GET (Host: t.example)",
            b"GET /test HTTP/1.0\r\n\
            Host: t.example\r\n\
            User-Agent: ApacheBench/2.3\r\n\
            Accept: */*\r\n\
            \r\n",
            forwarded_then_closed(fwd("GET /test HTTP/1.1").headers(&["User-Agent: ApacheBench/2.3", "Accept: */*"]))),
        row!(LLHTTP_SAMPLE, "Prefix newline (Host: t.example)",
            b"\r\n\
            GET /test HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /test HTTP/1.1"))),
        row!(LLHTTP_SAMPLE, "No HTTP version",
            b"GET /\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_SAMPLE, "Line folding in header value with CRLF (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Line1:   abc\r\n\
            \tdef\r\n\
            \x20ghi\r\n\
            \t\tjkl\r\n\
            \x20 mno \r\n\
            \t \tqrs\r\n\
            Line2: \t line2\t\r\n\
            Line3:\r\n\
            \x20line3\r\n\
            Line4: \r\n\
            \x20\r\n\
            Connection:\r\n\
            \x20close\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_SAMPLE, "Line folding in header value with LF (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Line1:   abc\n\
            \tdef\n\
            \x20ghi\n\
            \t\tjkl\n\
            \x20 mno \n\
            \t \tqrs\n\
            Line2: \t line2\t\n\
            Line3:\n\
            \x20line3\n\
            Line4: \n\
            \x20\n\
            Connection:\n\
            \x20close\n\
            \n",
            refused(400)),
        row!(LLHTTP_SAMPLE, "No LF after CR",
            b"GET / HTTP/1.1\rLine: 1\r\n",
            refused(400)),
        row!(LLHTTP_SAMPLE, "No LF after CR (lenient)",
            b"GET / HTTP/1.1\rLine: 1\r\n",
            refused(400)),
        row!(LLHTTP_SAMPLE, "Request starting with CRLF (Host: t.example)",
            b"\r\n\
            GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: Value1\r\n\
            \r\n",
            forwarded(fwd("GET /url HTTP/1.1").headers(&["Header1: Value1"]))),
        row!(LLHTTP_SAMPLE, "Extended Characters (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            Test: D\xc3\xbcsseldorf\r\n\
            \r\n",
            forwarded(fwd("GET / HTTP/1.1").headers(&["Test: D\u{fc}sseldorf"]))),
        row!(LLHTTP_SAMPLE, "255 ASCII in header value (Host: t.example)",
            b"OPTIONS /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: Value1\r\n\
            Header2: \xc3\xbfValue2\r\n\
            \r\n",
            forwarded(fwd("OPTIONS /url HTTP/1.1").headers(&["Header1: Value1", "Header2: \u{ff}Value2"]))),
        row!(LLHTTP_SAMPLE, "X-SSL-Nonsense (Host: t.example)",
            b"GET / HTTP/1.1\r\n\
            Host: t.example\r\n\
            X-SSL-Nonsense:   -----BEGIN CERTIFICATE-----\r\n\
            \tMIIFbTCCBFWgAwIBAgICH4cwDQYJKoZIhvcNAQEFBQAwcDELMAkGA1UEBhMCVUsx\r\n\
            \tETAPBgNVBAoTCGVTY2llbmNlMRIwEAYDVQQLEwlBdXRob3JpdHkxCzAJBgNVBAMT\r\n\
            \tAkNBMS0wKwYJKoZIhvcNAQkBFh5jYS1vcGVyYXRvckBncmlkLXN1cHBvcnQuYWMu\r\n\
            \tdWswHhcNMDYwNzI3MTQxMzI4WhcNMDcwNzI3MTQxMzI4WjBbMQswCQYDVQQGEwJV\r\n\
            \tSzERMA8GA1UEChMIZVNjaWVuY2UxEzARBgNVBAsTCk1hbmNoZXN0ZXIxCzAJBgNV\r\n\
            \tBAcTmrsogriqMWLAk1DMRcwFQYDVQQDEw5taWNoYWVsIHBhcmQYJKoZIhvcNAQEB\r\n\
            \tBQADggEPADCCAQoCggEBANPEQBgl1IaKdSS1TbhF3hEXSl72G9J+WC/1R64fAcEF\r\n\
            \tW51rEyFYiIeZGx/BVzwXbeBoNUK41OK65sxGuflMo5gLflbwJtHBRIEKAfVVp3YR\r\n\
            \tgW7cMA/s/XKgL1GEC7rQw8lIZT8RApukCGqOVHSi/F1SiFlPDxuDfmdiNzL31+sL\r\n\
            \t0iwHDdNkGjy5pyBSB8Y79dsSJtCW/iaLB0/n8Sj7HgvvZJ7x0fr+RQjYOUUfrePP\r\n\
            \tu2MSpFyf+9BbC/aXgaZuiCvSR+8Snv3xApQY+fULK/xY8h8Ua51iXoQ5jrgu2SqR\r\n\
            \twgA7BUi3G8LFzMBl8FRCDYGUDy7M6QaHXx1ZWIPWNKsCAwEAAaOCAiQwggIgMAwG\r\n\
            \tA1UdEwEB/wQCMAAwEQYJYIZIAYb4QgHTTPAQDAgWgMA4GA1UdDwEB/wQEAwID6DAs\r\n\
            \tBglghkgBhvhCAQ0EHxYdVUsgZS1TY2llbmNlIFVzZXIgQ2VydGlmaWNhdGUwHQYD\r\n\
            \tVR0OBBYEFDTt/sf9PeMaZDHkUIldrDYMNTBZMIGaBgNVHSMEgZIwgY+AFAI4qxGj\r\n\
            \tloCLDdMVKwiljjDastqooXSkcjBwMQswCQYDVQQGEwJVSzERMA8GA1UEChMIZVNj\r\n\
            \taWVuY2UxEjAQBgNVBAsTCUF1dGhvcml0eTELMAkGA1UEAxMCQ0ExLTArBgkqhkiG\r\n\
            \t9w0BCQEWHmNhLW9wZXJhdG9yQGdyaWQtc3VwcG9ydC5hYy51a4IBADApBgNVHRIE\r\n\
            \tIjAggR5jYS1vcGVyYXRvckBncmlkLXN1cHBvcnQuYWMudWswGQYDVR0gBBIwEDAO\r\n\
            \tBgwrBgEEAdkvAQEBAQYwPQYJYIZIAYb4QgEEBDAWLmh0dHA6Ly9jYS5ncmlkLXN1\r\n\
            \tcHBvcnQuYWMudmT4sopwqlBWsvcHViL2NybC9jYWNybC5jcmwwPQYJYIZIAYb4QgEDBDAWLmh0\r\n\
            \tdHA6Ly9jYS5ncmlkLXN1cHBvcnQuYWMudWsvcHViL2NybC9jYWNybC5jcmwwPwYD\r\n\
            \tVR0fBDgwNjA0oDKgMIYuaHR0cDovL2NhLmdyaWQt5hYy51ay9wdWIv\r\n\
            \tY3JsL2NhY3JsLmNybDANBgkqhkiG9w0BAQUFAAOCAQEAS/U4iiooBENGW/Hwmmd3\r\n\
            \tXCy6Zrt08YjKCzGNjorT98g8uGsqYjSxv/hmi0qlnlHs+k/3Iobc3LjS5AMYr5L8\r\n\
            \tUO7OSkgFFlLHQyC9JzPfmLCAugvzEbyv4Olnsr8hbxF1MbKZoQxUZtMVu29wjfXk\r\n\
            \thTeApBv7eaKCWpSp7MCbvgzm74izKhu3vlDk9w6qVrxePfGgpKPqfHiOoGhFnbTK\r\n\
            \twTC6o2xq5y0qZ03JonF7OJspEd3I5zKY3E+ov7/ZhW6DqT8UFvsAdjvQbXyhV8Eu\r\n\
            \tYhixw1aKEPzNjNowuIseVogKOLXxWI5vAi5HgXdS0/ES5gDGsABo4fqovUKlgop3\r\n\
            \tRA==\r\n\
            \t-----END CERTIFICATE-----\r\n\
            \r\n",
            refused(400)),
        // llhttp test/request/uri.md
        row!(LLHTTP_URI, "Quotes in URI (Host: t.example)",
            b"GET /with_\"lovely\"_quotes?foo=\\\"bar\\\" HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /with_\"lovely\"_quotes?foo=\\\"bar\\\" HTTP/1.1"))),
        row!(LLHTTP_URI, "Query URL with question mark (Host: t.example)",
            b"GET /test.cgi?foo=bar?baz HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /test.cgi?foo=bar?baz HTTP/1.1"))),
        row!(LLHTTP_URI, "Host terminated by a query string (Host: t.example)",
            b"GET http://hypnotoad.org?hail=all HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n\
            \r\n",
            answered(vec![503, 200], vec![Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        row!(LLHTTP_URI, "`host:port` terminated by a query string (Host: t.example)",
            b"GET http://hypnotoad.org:1234?hail=all HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            answered(vec![503, 200], vec![Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        row!(LLHTTP_URI, "Query URL with vertical bar character (Host: t.example)",
            b"GET /test.cgi?query=| HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /test.cgi?query=| HTTP/1.1"))),
        row!(LLHTTP_URI, "`host:port` terminated by a space (Host: t.example)",
            b"GET http://hypnotoad.org:1234 HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            answered(vec![503, 200], vec![Sent::Whole(fwd("GET /next HTTP/1.1"))])),
        row!(LLHTTP_URI, "Disallow UTF-8 in URI path in strict mode (Host: t.example)",
            b"GET /\xce\xb4\xc2\xb6/\xce\xb4t/pope?q=1#narf HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /δ¶/δt/pope?q=1#narf HTTP/1.1"))),
        row!(LLHTTP_URI, "Fragment in URI (Host: t.example)",
            b"GET /forums/1/topics/2375?page=1#posts-17408 HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("GET /forums/1/topics/2375?page=1#posts-17408 HTTP/1.1"))),
        row!(LLHTTP_URI, "Underscore in hostname (Host: t.example)",
            b"CONNECT home_0.netscape.com:443 HTTP/1.0\r\n\
            Host: t.example\r\n\
            User-agent: Mozilla/1.1N\r\n\
            Proxy-authorization: basic aGVsbG86d29ybGQ=\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_URI, "`host:port` and basic auth (Host: t.example)",
            b"GET http://a%12:b!&*$@hypnotoad.org:1234/toto HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_URI, "Space in URI",
            b"GET /foo bar/ HTTP/1.1\r\n\
            \r\n",
            refused(400)),
        // llhttp test/request/method.md
        row!(LLHTTP_METHOD, "REPORT request (Host: t.example)",
            b"REPORT /test HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("REPORT /test HTTP/1.1"))),
        row!(LLHTTP_METHOD, "CONNECT request (Host: t.example)",
            b"CONNECT 0-home0.netscape.com:443 HTTP/1.0\r\n\
            Host: t.example\r\n\
            User-agent: Mozilla/1.1N\r\n\
            Proxy-authorization: basic aGVsbG86d29ybGQ=\r\n\
            \r\n\
            some data\r\n\
            and yet even more data",
            refused(400)),
        row!(LLHTTP_METHOD, "CONNECT request with CAPS (Host: t.example)",
            b"CONNECT HOME0.NETSCAPE.COM:443 HTTP/1.0\r\n\
            Host: t.example\r\n\
            User-agent: Mozilla/1.1N\r\n\
            Proxy-authorization: basic aGVsbG86d29ybGQ=\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_METHOD, "CONNECT with body (Host: t.example)",
            b"CONNECT foo.bar.com:443 HTTP/1.0\r\n\
            Host: t.example\r\n\
            User-agent: Mozilla/1.1N\r\n\
            Proxy-authorization: basic aGVsbG86d29ybGQ=\r\n\
            Content-Length: 10\r\n\
            \r\n\
            blarfcicle\"",
            refused(400)),
        row!(LLHTTP_METHOD, "M-SEARCH request (Host: t.example)",
            b"M-SEARCH * HTTP/1.1\r\n\
            HOST: t.example\r\n\
            MAN: \"ssdp:discover\"\r\n\
            ST: \"ssdp:all\"\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_METHOD, "PATCH request (Host: t.example)",
            b"PATCH /file.txt HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Type: application/example\r\n\
            If-Match: \"e0023aa4e\"\r\n\
            Content-Length: 10\r\n\
            \r\n\
            cccccccccc",
            forwarded(fwd("PATCH /file.txt HTTP/1.1").headers(&["Content-Type: application/example", "If-Match: \"e0023aa4e\""]).body(Length(b"cccccccccc")))),
        row!(LLHTTP_METHOD, "PURGE request (Host: t.example)",
            b"PURGE /file.txt HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("PURGE /file.txt HTTP/1.1"))),
        row!(LLHTTP_METHOD, "SEARCH request (Host: t.example)",
            b"SEARCH / HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("SEARCH / HTTP/1.1"))),
        row!(LLHTTP_METHOD, "LINK request (Host: t.example)",
            b"LINK /images/my_dog.jpg HTTP/1.1\r\n\
            Host: t.example\r\n\
            Link: <http://example.com/profiles/joe>; rel=\"tag\"\r\n\
            Link: <http://example.com/profiles/sally>; rel=\"tag\"\r\n\
            \r\n",
            forwarded(fwd("LINK /images/my_dog.jpg HTTP/1.1").headers(&["Link: <http://example.com/profiles/joe>; rel=\"tag\"", "Link: <http://example.com/profiles/sally>; rel=\"tag\""]))),
        row!(LLHTTP_METHOD, "LINK request (Host: t.example)",
            b"UNLINK /images/my_dog.jpg HTTP/1.1\r\n\
            Host: t.example\r\n\
            Link: <http://example.com/profiles/sally>; rel=\"tag\"\r\n\
            \r\n",
            forwarded(fwd("UNLINK /images/my_dog.jpg HTTP/1.1").headers(&["Link: <http://example.com/profiles/sally>; rel=\"tag\""]))),
        row!(LLHTTP_METHOD, "SOURCE request (Host: t.example)",
            b"SOURCE /music/sweet/music HTTP/1.1\r\n\
            Host: t.example\r\n\
            \r\n",
            forwarded(fwd("SOURCE /music/sweet/music HTTP/1.1"))),
        row!(LLHTTP_METHOD, "SOURCE request with ICE (Host: t.example)",
            b"SOURCE /music/sweet/music ICE/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_METHOD, "OPTIONS request with RTSP (Host: t.example)",
            b"OPTIONS /music/sweet/music RTSP/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_METHOD, "ANNOUNCE request with RTSP (Host: t.example)",
            b"ANNOUNCE /music/sweet/music RTSP/1.0\r\n\
            Host: t.example\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_METHOD, "PRI request HTTP2",
            b"PRI * HTTP/1.1\r\n\
            \r\n\
            SM\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_METHOD, "QUERY request (Host: t.example)",
            b"QUERY /contacts HTTP/1.1\r\n\
            Host: t.example\r\n\
            Content-Type: example/query\r\n\
            Accept: text/csv\r\n\
            Content-Length: 41\r\n\
            \r\n\
            select surname, givenname, email limit 10",
            forwarded(fwd("QUERY /contacts HTTP/1.1").headers(&["Content-Type: example/query", "Accept: text/csv"]).body(Length(b"select surname, givenname, email limit 10")))),
        // llhttp test/request/lenient-headers.md
        row!(LLHTTP_LENIENT_HEADERS, "Header value (lenient) (Host: t.example)",
            b"GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: \x0c\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_LENIENT_HEADERS, "Second request header value (lenient) (Host: t.example)",
            b"GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: Okay\r\n\
            \r\n\
            \r\n\
            GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: \x0c\r\n\
            \r\n",
            answered(vec![200, 400], vec![Sent::Whole(fwd("GET /url HTTP/1.1").headers(&["Header1: Okay"]))])),
        row!(LLHTTP_LENIENT_HEADERS, "Header value (Host: t.example)",
            b"GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: \x0c\r\n\
            \r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_LENIENT_HEADERS, "Empty headers separated by CR (lenient) (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Connection: Close\r\n\
            Host: t.example\r\n\
            x:\rTransfer-Encoding: chunked\r\n\
            \r\n\
            1\r\n\
            A\r\n\
            0\r\n",
            refused(400)),
        // llhttp test/request/lenient-header-value-relaxed.md
        row!(LLHTTP_LENIENT_HEADER_VALUE_RELAXED, "Control char in header value (relaxed) (Host: t.example)",
            b"GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: hello\x0cworld\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_LENIENT_HEADER_VALUE_RELAXED, "Control char in header value (strict) (Host: t.example)",
            b"GET /url HTTP/1.1\r\n\
            Host: t.example\r\n\
            Header1: hello\x0cworld\r\n\
            \r\n",
            refused(400)),
        row!(LLHTTP_LENIENT_HEADER_VALUE_RELAXED, "LF in header value should be rejected even with relaxed flag (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            x:\n\
            Transfer-Encoding: chunked\r\n\
            \r\n\
            1\r\n\
            A\r\n\
            0\r\n",
            refused(400)),
        row!(LLHTTP_LENIENT_HEADER_VALUE_RELAXED, "CR without LF in header value should be rejected even with relaxed flag (Host: t.example)",
            b"POST / HTTP/1.1\r\n\
            Host: t.example\r\n\
            x:\rTransfer-Encoding: chunked\r\n\
            \r\n\
            1\r\n\
            A\r\n\
            0\r\n",
            refused(400)),
        row!(LLHTTP_LENIENT_HEADER_VALUE_RELAXED, "Space after start line must still fail",
            b"GET /url HTTP/1.1\r\n\
            \x20Header1: value\r\n",
            refused(400)),
        // llhttp test/request/lenient-version.md
        row!(LLHTTP_LENIENT_VERSION, "Invalid HTTP version (lenient)",
            b"GET / HTTP/5.6\r\n\
            \r\n",
            refused(400)),
    ]
}

#[test]
fn hostile_requests_get_the_answer_the_table_says() {
    let mut backend = RecordingBackend::start();
    let router = InProcessRouter::start(&[(HOST, &format!("http://{}", backend.addr))]);
    let mut failures = Vec::new();
    let table = rows();
    for row in &table {
        let want = &row.expect;
        let answers = exchange(router.addr, row.raw, !want.closes);
        let sent = backend.settle();
        let mut wrong = Vec::new();
        match &answers {
            Ok(a) if *a == want.answers => {}
            other => wrong.push(format!("answers {other:?}, expected {:?}", want.answers)),
        }
        let all_cut = want.backend.iter().all(|s| matches!(s, Sent::Cut(_)));
        if sent.len() != want.backend.len() && !(all_cut && sent.is_empty()) {
            wrong.push(format!(
                "{} backend connections, expected {}",
                sent.len(),
                want.backend.len()
            ));
        }
        for (got, expected) in sent.iter().zip(&want.backend) {
            if let Some(why) = expected.mismatch(got) {
                wrong.push(why);
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

impl Sent {
    /// What is wrong with `got` for this expectation, if anything.
    fn mismatch(&self, got: &[u8]) -> Option<String> {
        let (ok, what, expected) = match self {
            Sent::Whole(f) => {
                let whole = f.render();
                (*got == whole, "", whole)
            }
            Sent::Cut(f) => {
                // A start of the request that stops before its end (for a
                // chunked body, before its last chunk): the backend cannot
                // have taken it for a complete request.
                let whole = f.render();
                let end = match f.body {
                    Body::Chunks(_) => b"0\r\n\r\n".len(),
                    _ => 1,
                };
                (
                    whole[..whole.len() - end].starts_with(got),
                    "a start of ",
                    whole,
                )
            }
            Sent::Exact(bytes) => (got == *bytes, "", bytes.to_vec()),
        };
        (!ok).then(|| {
            format!(
                "backend got {:?}, expected {what}{:?}",
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(&expected)
            )
        })
    }
}

/// A refused request followed by far more than one read holds: the router
/// drains what it did not read before closing, so the client gets its
/// answer and a clean end, never a reset that could destroy the answer.
#[test]
fn a_refused_request_is_closed_cleanly_however_much_follows() {
    let backend = RecordingBackend::start();
    let router = InProcessRouter::start(&[(HOST, &format!("http://{}", backend.addr))]);
    for (head, status) in [
        (&b"GET / HTTP/1.1\r\nHost: t.example\r\nHost: t.example\r\n\r\n"[..], 400),
        (b"GET t.example/ HTTP/1.1\r\nHost: t.example\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t.example\r\nContent-Length: 5\xa0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t.example\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: t.example\nX: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t.example\r\nConnection: upgrade\r\nUpgrade: x\r\nHost: t.example\r\n\r\n", 400),
    ] {
        let mut conn = TcpStream::connect(router.addr).expect("connect to the router");
        conn.set_read_timeout(Some(EXCHANGE_TIMEOUT)).expect("timeout");
        let mut sent = head.to_vec();
        sent.resize(head.len() + 200 * 1024, b'x');
        let mut writer = conn.try_clone().expect("clone the socket");
        let sending = std::thread::spawn(move || writer.write_all(&sent));
        let mut got = Vec::new();
        let read = conn.read_to_end(&mut got);
        let _ = sending.join();
        let shown = String::from_utf8_lossy(head);
        assert!(read.is_ok(), "{shown:?}: {read:?} after {:?}", String::from_utf8_lossy(&got));
        assert_eq!(parse_responses(&got, false), Ok(vec![status]), "{shown:?}");
    }
}
