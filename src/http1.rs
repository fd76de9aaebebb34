//! HTTP/1.1 as bytes on a socket, the wire format below both edges: field
//! values and names, request heads (read with `httparse`), body framing,
//! request bodies, and responses to clients.
//!
//! Owns framing and nothing else, and imports nothing from the modules
//! above it (`server`, `proxy`, `backend`, `tunnel` all use it). Every read
//! is bounded in size and time by the caller's socket timeouts and the
//! limits here; nothing allocates in proportion to what a client *claims*
//! (a `Content-Length` of a terabyte costs nothing until bytes arrive). A
//! body that ends early is an error, never a short success, and a response
//! body that cannot be completed is left visibly unfinished (no final
//! chunk) so the client can tell.

use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// Header fields as they came: each name and value the bytes sent, in
/// order, all in one buffer, so a head of any number of fields costs two
/// allocations. Values are bytes because RFC 9110 §5.5 allows bytes above
/// 0x7F (obs-text) that need not be UTF-8, and a proxy passes them on
/// unchanged; names are tokens (ASCII), as `httparse` checks and the
/// router's own are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    bytes: Vec<u8>,
    spans: Vec<FieldSpan>,
}

/// Where one field's name and value are in [`Fields::bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldSpan {
    name: (usize, usize),
    value: (usize, usize),
}

impl Fields {
    pub const fn new() -> Fields {
        Fields {
            bytes: Vec::new(),
            spans: Vec::new(),
        }
    }

    pub fn with_capacity(fields: usize, bytes: usize) -> Fields {
        Fields {
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(fields),
        }
    }

    /// Fields from name-value pairs (the router's own answers, tests).
    pub fn from_pairs<N: AsRef<str>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Fields {
        let mut fields = Fields::with_capacity(pairs.len(), 64);
        for (name, value) in pairs {
            fields.push(name.as_ref(), value.as_ref());
        }
        fields
    }

    pub fn push(&mut self, name: &str, value: &[u8]) {
        let name_at = self.bytes.len();
        self.bytes.extend_from_slice(name.as_bytes());
        let value_at = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.spans.push(FieldSpan {
            name: (name_at, value_at),
            value: (value_at, self.bytes.len()),
        });
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    fn name_of(&self, span: &FieldSpan) -> &[u8] {
        &self.bytes[span.name.0..span.name.1]
    }

    fn value_of(&self, span: &FieldSpan) -> &[u8] {
        &self.bytes[span.value.0..span.value.1]
    }

    /// Every field, in order, names as sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.spans.iter().map(|s| {
            // Names go in as `&str` (see `push`), so this never fails.
            let name = std::str::from_utf8(self.name_of(s)).unwrap_or_default();
            (name, self.value_of(s))
        })
    }

    /// Every value of field `name` (names compare case-insensitively).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.spans
            .iter()
            .filter(move |s| self.name_of(s).eq_ignore_ascii_case(name.as_bytes()))
            .map(|s| self.value_of(s))
    }

    /// The first value of field `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.spans
            .iter()
            .find(|s| self.name_of(s).eq_ignore_ascii_case(name.as_bytes()))
            .map(|s| self.value_of(s))
    }

    /// The first value of field `name`, if it is text (UTF-8): for fields
    /// whose values are ASCII by their grammar (`Host`, `Upgrade`).
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Keeps the fields `keep` says yes to (their bytes stay in the buffer).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &[u8]) -> bool) {
        let bytes = &self.bytes;
        self.spans.retain(|s| {
            let name = std::str::from_utf8(&bytes[s.name.0..s.name.1]).unwrap_or_default();
            keep(name, &bytes[s.value.0..s.value.1])
        });
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

/// The tokens listed in `Connection` fields.
pub fn connection_tokens(fields: &Fields) -> impl Iterator<Item = &[u8]> {
    list_elements(fields.values("connection"))
}

/// The elements of comma-separated list values (RFC 9110 §5.6.1), SP and
/// HTAB around them stripped, empty ones skipped.
fn list_elements<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Strips the only whitespace HTTP has, SP and HTAB (RFC 9110 §5.6.3),
/// and nothing else: a router that reads `Content-Length: 5\xa0` as `5`
/// (as `str::trim` would, taking 0xA0 for U+00A0) disagrees with every
/// hop that reads it as invalid (CL.0 smuggling).
pub fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|&b| b != b' ' && b != b'\t');
    let Some(start) = start else {
        return &[];
    };
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &value[start..end]
}

/// [`trim_ows`] for text.
pub fn trim_ows_str(value: &str) -> &str {
    value.trim_matches([' ', '\t'])
}

/// A `Content-Length` value: digits only, SP/HTAB around them at most
/// (`+5`, `5\xa0`, `0x5`, `5, 5` are not lengths, whatever `str::parse`
/// would say of some of them).
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    let v = trim_ows(value);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The last transfer coding of a message is `chunked` (RFC 9112 §6.3:
/// how a response's body is framed when it has `Transfer-Encoding`).
pub fn last_coding_is_chunked(fields: &Fields) -> bool {
    list_elements(fields.values("transfer-encoding"))
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// `tchar` (RFC 9110 §5.6.2): what a token, and so a method or a field
/// name, is made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A header-name byte as CGI, PHP, WSGI and several frameworks read it:
/// case folded and `_` as `-`. For them `Content_Length` *is*
/// `Content-Length`.
pub fn fold_name_byte(b: u8) -> u8 {
    if b == b'_' {
        b'-'
    } else {
        b.to_ascii_lowercase()
    }
}

/// The two header names are the same name once folded (see
/// [`fold_name_byte`]). Allocates nothing.
pub fn name_folds_to(name: &[u8], other: &[u8]) -> bool {
    name.len() == other.len()
        && name
            .iter()
            .map(|&b| fold_name_byte(b))
            .eq(other.iter().map(|&b| fold_name_byte(b)))
}

/// Header names whose underscore spelling a request may not carry at all:
/// they frame the request, so a backend that reads `_` as `-` would see a
/// second framing the router never read (CL.TE desync). (`Host` and
/// `Connection`, the other names that frame or route a request, have no
/// dash and so no other spelling.)
const FRAMING_NAMES: &[&str] = &["content-length", "transfer-encoding"];

/// Request line plus headers.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Request line alone; past this the answer is 414.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
pub const MAX_HEADERS: usize = 100;
/// A chunk-size line, extensions included.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
/// Chunked trailers, all lines together (they are read and dropped).
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Response body copy buffer (one per connection, reused).
pub const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// A request as the server front read it: the one request type from the
/// parser to the backend edge. It carries the front's verdict, decided
/// once when the head is parsed, so that no later step re-derives the
/// framing or the kind of request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request-target as received: origin-form (`/path?q`) or
    /// absolute-form (`http://host/path?q`).
    pub target: String,
    pub version: HttpVersion,
    pub headers: Fields,
    /// How the body is read; [`BodyFraming::None`] when the verdict
    /// refuses the request, whose body is then never read.
    pub framing: BodyFraming,
    /// The client's address: the parser cannot know it, the front fills
    /// it in.
    pub peer: Option<SocketAddr>,
    /// HTTP/1.0, or `Connection: close`: the connection ends after the
    /// answer.
    pub wants_close: bool,
    /// `Expect: 100-continue` in HTTP/1.1: `100 Continue` goes out before
    /// the body is read.
    pub expects_continue: bool,
    pub verdict: Verdict,
}

/// What the front does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it to a backend.
    Forward,
    /// A protocol upgrade (see [`Request::new`]): a tunnel after a `101`.
    Upgrade,
    /// The router answers it itself.
    Refuse(Refusal),
}

/// A request the router answers itself, with the status and the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub why: &'static str,
    /// The request's end cannot be found (its framing was refused), so
    /// nothing after it on the connection can be trusted: the connection
    /// closes after the answer.
    pub unreadable: bool,
}

impl Request {
    /// Decides what the request is from its head: framing (refused when
    /// ambiguous), expectations, upgrade or not.
    pub fn new(method: String, target: String, version: HttpVersion, headers: Fields) -> Request {
        let http11 = version == HttpVersion::Http11;
        // HTTP/1.0 connections are not kept alive.
        let wants_close =
            !http11 || connection_tokens(&headers).any(|t| t.eq_ignore_ascii_case(b"close"));
        // RFC 9110 §10.1.1: `100-continue` is the only expectation;
        // HTTP/1.0 requests' expectations are ignored.
        let (expects_continue, unmet_expectation) = {
            let mut expect = headers.values("expect").map(trim_ows);
            let (first, more) = (expect.next(), expect.next().is_some());
            let only_continue =
                !more && first.is_some_and(|e| e.eq_ignore_ascii_case(b"100-continue"));
            (
                http11 && only_continue,
                http11 && first.is_some() && !only_continue,
            )
        };
        let (framing, verdict) = match request_framing(version, &headers) {
            Err(refusal) => (BodyFraming::None, Verdict::Refuse(refusal)),
            Ok(framing) if unmet_expectation => (
                framing,
                Verdict::Refuse(Refusal {
                    status: 417,
                    why: "unsupported Expect",
                    unreadable: false,
                }),
            ),
            Ok(framing) if is_upgrade(version, framing, &headers) => (framing, Verdict::Upgrade),
            Ok(framing) => (framing, Verdict::Forward),
        };
        Request {
            method,
            target,
            version,
            headers,
            framing,
            peer: None,
            wants_close,
            expects_continue,
            verdict,
        }
    }

    /// `HEAD`: methods are case-sensitive (RFC 9110 §9.1), `head` is not.
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// `Connection: Upgrade` with an `Upgrade` header, in HTTP/1.1 (RFC 9110
/// §7.8), and no body: an upgrade request with a body is served as a plain
/// request instead, which the RFC allows (the upgrade is optional), rather
/// than interleaving the body with a new protocol.
fn is_upgrade(version: HttpVersion, framing: BodyFraming, headers: &Fields) -> bool {
    version == HttpVersion::Http11
        && framing == BodyFraming::None
        && headers
            .get("upgrade")
            .is_some_and(|v| !trim_ows(v).is_empty())
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

#[derive(Debug)]
pub enum HeadError {
    /// The client closed the connection before the first byte: the normal
    /// end of a keep-alive connection.
    Closed,
    /// No byte arrived before the read timeout (or `before_each_read` gave
    /// up waiting): the connection is idle.
    Idle,
    /// 414: the request line alone is longer than [`MAX_REQUEST_LINE_BYTES`].
    LineTooLong,
    /// 431: head over [`MAX_HEAD_BYTES`] or over [`MAX_HEADERS`] fields.
    TooLarge,
    /// 408: the head did not arrive in time.
    Timeout,
    /// 400.
    Malformed(String),
    /// The connection broke mid-head.
    Broken,
}

impl HeadError {
    /// The status to answer with and why, if any answer is due.
    pub fn answer(&self) -> Option<(u16, &str)> {
        match self {
            HeadError::Closed | HeadError::Idle | HeadError::Broken => None,
            HeadError::LineTooLong => Some((414, "request line too long")),
            HeadError::TooLarge => Some((431, "request head too large")),
            HeadError::Timeout => Some((408, "request head not received in time")),
            HeadError::Malformed(why) => Some((400, why)),
        }
    }
}

/// A read or write timeout, whichever kind the platform reports.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Sets a socket's read timeout when it differs from `current`, the one in
/// force: most requests on a kept connection then cost no `setsockopt`.
pub fn set_read_timeout(
    stream: &std::net::TcpStream,
    current: &mut Option<Duration>,
    want: Duration,
) -> io::Result<()> {
    if *current != Some(want) {
        stream.set_read_timeout(Some(want))?;
        *current = Some(want);
    }
    Ok(())
}

/// Reads one request head. `before_each_read` is called before every socket
/// read that is still needed, with whether any byte has arrived yet; the
/// caller uses it to set the idle and header-deadline timeouts, and returns
/// a `TimedOut` error to stop waiting.
///
/// `head` is scratch space, kept by the caller so that a keep-alive
/// connection allocates it once.
pub fn read_head<R: BufRead>(
    reader: &mut R,
    head: &mut Vec<u8>,
    mut before_each_read: impl FnMut(bool) -> io::Result<()>,
) -> Result<Request, HeadError> {
    head.clear();
    // Empty lines skipped before the request line: they start the head's
    // deadline (so sending one now and then cannot keep a connection open
    // past the keep-alive timeout), but a head of nothing else is idle.
    let mut skipped = 0usize;
    // The last byte skipped was a CR, whose LF may come in the next read.
    let mut after_cr = false;
    loop {
        let waited = before_each_read(!head.is_empty() || skipped > 0);
        let available = match waited.and_then(|_| reader.fill_buf()) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) && head.is_empty() => return Err(HeadError::Idle),
            Err(e) if is_timeout(&e) => return Err(HeadError::Timeout),
            Err(_) => return Err(HeadError::Broken),
        };
        if available.is_empty() {
            return Err(if head.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Malformed("connection closed in the middle of the request head".into())
            });
        }
        // RFC 9112 §2.2: empty lines (CRLF) before the request line are
        // ignored; a bare CR or LF there is as malformed as anywhere else.
        let mut skip = 0;
        if head.is_empty() {
            for &b in available {
                match (after_cr, b) {
                    (false, b'\r') => after_cr = true,
                    (true, b'\n') => after_cr = false,
                    (false, b'\n') | (true, _) => return Err(bare_line_end()),
                    (false, _) => break,
                }
                skip += 1;
            }
        }
        skipped += skip;
        if skipped > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let before = head.len();
        let room = MAX_HEAD_BYTES + 1 - before;
        let data = &available[skip..];
        head.extend_from_slice(&data[..data.len().min(room)]);
        let end = find_head_end(head, before)?;
        if let Some(end) = end {
            head.truncate(end);
        }
        let used = skip + (head.len() - before);
        let complete = end.is_some();
        reader.consume(used);
        let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
        if line_end > MAX_REQUEST_LINE_BYTES {
            return Err(HeadError::LineTooLong);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        if complete {
            return parse_head(head);
        }
    }
}

/// The index just past the blank line that ends a head (`\r\n\r\n`),
/// looking at the bytes from `from` on (those before were looked at
/// already). A bare LF or CR is refused as soon as it is seen.
///
/// RFC 9112 §2.2 lets a recipient accept a bare LF as a line end, and
/// nginx and HAProxy do; this router does not: behind a proxy that ends
/// lines only at CRLF, `X: a\nContent-Length: 5` is one field there and two
/// here, which is a smuggling gadget.
fn find_head_end(buf: &[u8], from: usize) -> Result<Option<usize>, HeadError> {
    // The byte before `from` may be a CR whose successor just arrived.
    for i in from.saturating_sub(1)..buf.len() {
        match buf[i] {
            b'\r' if buf.get(i + 1).is_some_and(|&b| b != b'\n') => return Err(bare_line_end()),
            b'\n' if i >= from => {
                if i == 0 || buf[i - 1] != b'\r' {
                    return Err(bare_line_end());
                }
                if i >= 3 && buf[i - 3..i - 1] == *b"\r\n" {
                    return Ok(Some(i + 1));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Watches a request head arrive in pieces without reading it: says when
/// [`read_head`] over the bytes so far would finish without waiting for
/// more (a whole head, or one already refused). The poller uses it to hand
/// a connection to a worker only when the worker will not block on the
/// client. Incremental: each byte is looked at once, so a head dripping in
/// a byte at a time costs no more than one that comes whole.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadScan {
    /// Bytes of empty lines (CRLF) before the request line.
    skipped: usize,
    /// The last byte skipped was a CR.
    after_cr: bool,
    /// Bytes of the head proper looked at so far.
    scanned: usize,
    /// Where the request line ends, once seen.
    line_end: Option<usize>,
}

impl HeadScan {
    /// True when `buf` (everything received since the scan started) holds
    /// a whole head, a malformed one, or more than the limits allow.
    pub fn ready(&mut self, buf: &[u8]) -> bool {
        if self.scanned == 0 {
            for &b in &buf[self.skipped..] {
                match (self.after_cr, b) {
                    (false, b'\r') => self.after_cr = true,
                    (true, b'\n') => self.after_cr = false,
                    (false, b'\n') | (true, _) => return true,
                    (false, _) => break,
                }
                self.skipped += 1;
            }
            if self.skipped > MAX_HEAD_BYTES {
                return true;
            }
        }
        let head = &buf[self.skipped..];
        if head.is_empty() {
            return false;
        }
        let from = self.scanned;
        self.scanned = head.len();
        if self.line_end.is_none() {
            self.line_end = head[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + from);
        }
        if self.line_end.unwrap_or(head.len()) > MAX_REQUEST_LINE_BYTES
            || head.len() > MAX_HEAD_BYTES
        {
            return true;
        }
        !matches!(find_head_end(head, from), Ok(None))
    }
}

fn bare_line_end() -> HeadError {
    HeadError::Malformed("bare CR or LF in the request head: lines must end in CRLF".into())
}

fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HeadError::Malformed("incomplete request head".into()));
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(format!("bad request head: {e}"))),
    }
    let version = match req.version {
        Some(0) => HttpVersion::Http10,
        Some(1) => HttpVersion::Http11,
        _ => return Err(HeadError::Malformed("unsupported HTTP version".into())),
    };
    if let Some(h) = req.headers.iter().find(|h| {
        h.name.contains('_')
            && FRAMING_NAMES
                .iter()
                .any(|n| name_folds_to(h.name.as_bytes(), n.as_bytes()))
    }) {
        return Err(HeadError::Malformed(format!(
            "{}: an underscore spelling of a framing header",
            h.name
        )));
    }
    let mut headers = Fields::with_capacity(req.headers.len(), head.len());
    for h in req.headers.iter() {
        headers.push(h.name, h.value);
    }
    Ok(Request::new(
        req.method.unwrap_or_default().to_string(),
        req.path.unwrap_or_default().to_string(),
        version,
        headers,
    ))
}

const fn bad_framing(status: u16, why: &'static str) -> Refusal {
    Refusal {
        status,
        why,
        unreadable: true,
    }
}

/// Decides how the request body is framed (RFC 9112 §6). Anything
/// ambiguous is refused, and the connection is closed after the answer: a
/// proxy that reads a body differently from the hop before or after it is
/// a request-smuggling vector.
fn request_framing(version: HttpVersion, headers: &Fields) -> Result<BodyFraming, Refusal> {
    let te: Vec<&[u8]> = headers.values("transfer-encoding").collect();
    let has_length = headers.get("content-length").is_some();
    if !te.is_empty() {
        if version == HttpVersion::Http10 {
            return Err(bad_framing(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        if has_length {
            return Err(bad_framing(
                400,
                "both Transfer-Encoding and Content-Length",
            ));
        }
        let codings: Vec<&[u8]> = te
            .iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(trim_ows)
            .collect();
        // Each element a bare token: `chunked\xa0`, `\x85chunked`, an empty
        // element or a parameter is malformed, where another hop may well
        // read plain `chunked` (TE.0 smuggling).
        if codings
            .iter()
            .any(|c| c.is_empty() || !c.iter().all(|&b| is_tchar(b)))
        {
            return Err(bad_framing(400, "invalid Transfer-Encoding"));
        }
        // Only plain chunked: other codings would reach the backend
        // decoded of their chunking but still encoded, with nothing saying so.
        return match codings[..] {
            [c] if c.eq_ignore_ascii_case(b"chunked") => Ok(BodyFraming::Chunked),
            _ => Err(bad_framing(
                501,
                "only Transfer-Encoding: chunked is supported",
            )),
        };
    }
    let mut length: Option<u64> = None;
    for value in headers.values("content-length") {
        let n = parse_content_length(value)
            .ok_or_else(|| bad_framing(400, "invalid Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(bad_framing(400, "conflicting Content-Length values"));
        }
        length = Some(n);
    }
    Ok(match length {
        Some(0) | None => BodyFraming::None,
        Some(n) => BodyFraming::Sized(n),
    })
}

/// Reads a request body as framed, from the connection's buffered reader.
/// Sends `100 Continue` before the first read when the client asked for it.
/// Ends with `UnexpectedEof` if the client stops before the body is whole.
///
/// Owns its reader and writer; pass `&mut` ones to borrow a connection.
pub struct BodyReader<R: BufRead, W: Write> {
    conn: R,
    state: BodyState,
    /// Where to send `100 Continue`, until it has been sent.
    continue_to: Option<W>,
    /// The read error that ended the body early, if any.
    pub error: Option<io::ErrorKind>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyState {
    Length(u64),
    /// Bytes left in the current chunk (0: a size line comes next).
    Chunk {
        left: u64,
        first: bool,
    },
    Done,
}

impl<R: BufRead, W: Write> BodyReader<R, W> {
    pub fn new(conn: R, framing: BodyFraming, continue_to: Option<W>) -> Self {
        let state = match framing {
            BodyFraming::None => BodyState::Done,
            BodyFraming::Sized(n) => BodyState::Length(n),
            BodyFraming::Chunked => BodyState::Chunk {
                left: 0,
                first: true,
            },
        };
        BodyReader {
            conn,
            state,
            continue_to: if state == BodyState::Done {
                None
            } else {
                continue_to
            },
            error: None,
        }
    }

    /// True once the whole body has been read.
    pub fn is_complete(&self) -> bool {
        self.state == BodyState::Done
    }

    /// The connection it reads from.
    pub fn get_ref(&self) -> &R {
        &self.conn
    }

    /// The connection, positioned just after the body if it is complete.
    pub fn into_inner(self) -> R {
        self.conn
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(mut w) = self.continue_to.take() {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            w.flush()?;
        }
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length(left) => {
                    let n = self.read_some(buf, left)?;
                    self.state = if left == n as u64 {
                        BodyState::Done
                    } else {
                        BodyState::Length(left - n as u64)
                    };
                    return Ok(n);
                }
                BodyState::Chunk { left: 0, first } => {
                    if !first {
                        self.expect_crlf()?;
                    }
                    let size = self.chunk_size()?;
                    if size == 0 {
                        self.skip_trailers()?;
                        self.state = BodyState::Done;
                        return Ok(0);
                    }
                    self.state = BodyState::Chunk {
                        left: size,
                        first: false,
                    };
                }
                BodyState::Chunk { left, first } => {
                    let n = self.read_some(buf, left)?;
                    self.state = BodyState::Chunk {
                        left: left - n as u64,
                        first,
                    };
                    return Ok(n);
                }
            }
        }
    }

    /// Reads up to `left` bytes (at least one); EOF is an error here.
    fn read_some(&mut self, buf: &mut [u8], left: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.conn.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection before the end of the request body",
            ));
        }
        Ok(n)
    }

    fn read_line(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let available = self.conn.fill_buf()?;
            if available.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection inside a chunked body",
                ));
            }
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..take]);
            self.conn.consume(take);
            if line.len() > max {
                return Err(bad_chunk("chunk line too long"));
            }
            if done {
                // RFC 9112 §7.1: lines end in CRLF; a bare LF or a stray CR
                // is how two parsers are made to disagree on a body's end.
                if !line.ends_with(b"\r\n") {
                    return Err(bad_chunk("chunk line does not end in CRLF"));
                }
                line.truncate(line.len() - 2);
                if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                    return Err(bad_chunk("control character in a chunk line"));
                }
                return Ok(line);
            }
        }
    }

    /// `chunk-size [ BWS chunk-ext ]`: hex digits only (no sign, no
    /// surrounding space but the BWS before an extension), at most 15 of
    /// them; the extensions are dropped, but only once they parse.
    fn chunk_size(&mut self) -> io::Result<u64> {
        let line = self.read_line(MAX_CHUNK_LINE_BYTES)?;
        let digits = match line.iter().position(|&b| b == b';') {
            Some(i) => {
                if !is_chunk_ext(&line[i..]) {
                    return Err(bad_chunk("bad chunk extension"));
                }
                trim_ows_end(&line[..i])
            }
            None => &line[..],
        };
        if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(bad_chunk("bad chunk size"));
        }
        let digits = std::str::from_utf8(digits).map_err(|_| bad_chunk("bad chunk size"))?;
        u64::from_str_radix(digits, 16).map_err(|_| bad_chunk("bad chunk size"))
    }

    fn expect_crlf(&mut self) -> io::Result<()> {
        let line = self.read_line(2)?;
        if line.is_empty() {
            Ok(())
        } else {
            Err(bad_chunk("chunk data longer than its size"))
        }
    }

    /// Trailers are dropped, but each must be a field line: a parser that
    /// swallowed any line here (a request line, say) would end the body
    /// somewhere another hop does not.
    fn skip_trailers(&mut self) -> io::Result<()> {
        let mut total = 0;
        loop {
            let line = self.read_line(MAX_TRAILER_BYTES)?;
            total += line.len() + 2;
            if line.is_empty() {
                return Ok(());
            }
            if total > MAX_TRAILER_BYTES {
                return Err(bad_chunk("trailers too large"));
            }
            if !is_field_line(&line) {
                return Err(bad_chunk("trailer is not a header field"));
            }
        }
    }
}

fn bad_chunk(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn trim_ows_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    &b[n..]
}

fn trim_ows_end(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .rev()
        .take_while(|&&c| c == b' ' || c == b'\t')
        .count();
    &b[..b.len() - n]
}

/// `field-name ":" OWS field-value OWS` (RFC 9110 §5.1, §5.5), as a line
/// whose CRLF is gone and whose value bytes [`BodyReader::read_line`]
/// already checked (no control characters but HTAB): a token, then a
/// colon. So no space before the colon and no obs-fold (a line starting
/// with whitespace), as in the head.
fn is_field_line(line: &[u8]) -> bool {
    line.iter()
        .position(|&b| b == b':')
        .is_some_and(|colon| colon > 0 && line[..colon].iter().all(|&b| is_tchar(b)))
}

/// `chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )`, with
/// `ext-val = token / quoted-string` (RFC 9112 §7.1.1); `ext` starts at the
/// first `;`.
fn is_chunk_ext(mut ext: &[u8]) -> bool {
    loop {
        ext = trim_ows_start(ext);
        let Some(rest) = ext.strip_prefix(b";") else {
            return ext.is_empty();
        };
        ext = trim_ows_start(rest);
        let name = ext.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return false;
        }
        ext = trim_ows_start(&ext[name..]);
        let Some(rest) = ext.strip_prefix(b"=") else {
            continue;
        };
        ext = trim_ows_start(rest);
        if let Some(quoted) = ext.strip_prefix(b"\"") {
            match quoted_string_len(quoted) {
                Some(n) => ext = &quoted[n..],
                None => return false,
            }
        } else {
            let value = ext.iter().take_while(|&&b| is_tchar(b)).count();
            if value == 0 {
                return false;
            }
            ext = &ext[value..];
        }
    }
}

/// The length of a quoted string's rest after its opening quote, closing
/// quote included (RFC 9110 §5.6.4); `None` if it does not close or holds
/// a byte it may not.
fn quoted_string_len(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let escaped = *s.get(i + 1)?;
                if escaped != b'\t' && (escaped < b' ' || escaped == 0x7f) {
                    return None;
                }
                i += 2;
            }
            b if b == b'\t' || (b >= b' ' && b != 0x7f) => i += 1,
            _ => return None,
        }
    }
    None
}

impl<R: BufRead, W: Write> Read for BodyReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.read_inner(buf);
        if let Err(e) = &result {
            self.error.get_or_insert(e.kind());
        }
        result
    }
}

/// How a response is written.
pub struct ResponseHead<'a> {
    pub status: u16,
    pub headers: &'a Fields,
    /// Body length, when known.
    pub length: Option<u64>,
    /// HEAD request: headers only (with the length the body would have).
    pub head_only: bool,
    pub version: HttpVersion,
    pub keep_alive: bool,
}

/// What writing a response achieved.
pub struct Written {
    pub body_bytes: u64,
    /// The response is complete and correctly framed: the connection can
    /// carry another request.
    pub reusable: bool,
    pub error: Option<String>,
}

/// Appends `name: value` lines, values as the bytes they stand for.
pub fn push_fields<N: AsRef<str>, V: AsRef<[u8]>>(head: &mut Vec<u8>, headers: &[(N, V)]) {
    for (name, value) in headers {
        push_field(head, name.as_ref(), value.as_ref());
    }
}

/// [`push_fields`] for a [`Fields`].
pub fn push_field_set(head: &mut Vec<u8>, fields: &Fields) {
    for (name, value) in fields.iter() {
        push_field(head, name, value);
    }
}

fn push_field(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Writes a `101 Switching Protocols` head as is: after it the connection
/// belongs to the new protocol, so there is no framing and no
/// `Connection: close` to add.
pub fn write_switching_head<W: Write>(out: &mut W, headers: &Fields) -> io::Result<()> {
    let mut head: Vec<u8> = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    push_field_set(&mut head, headers);
    head.extend_from_slice(b"\r\n");
    out.write_all(&head)?;
    out.flush()
}

/// Writes a response. With a known length the body is sent as is; without
/// one it is chunked (HTTP/1.1) or delimited by closing (HTTP/1.0). If the
/// body fails midway nothing more is written — no final chunk — and the
/// result says the connection must be closed, so a truncated body never
/// looks complete.
///
/// `buf` is scratch space for copying the body, kept by the caller so that
/// a keep-alive connection allocates it once.
pub fn write_response<W: Write>(
    out: &mut W,
    resp: &ResponseHead<'_>,
    body: &mut dyn Read,
    buf: &mut Vec<u8>,
) -> Written {
    let no_body = resp.head_only || matches!(resp.status, 100..=199 | 204 | 304);
    let chunked = !no_body && resp.length.is_none() && resp.version == HttpVersion::Http11;
    let close_delimited = !no_body && resp.length.is_none() && !chunked;
    let keep_alive = resp.keep_alive && !close_delimited;

    let mut head: Vec<u8> = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(itoa::Buffer::new().format(resp.status).as_bytes());
    head.push(b' ');
    head.extend_from_slice(reason(resp.status).as_bytes());
    head.extend_from_slice(b"\r\n");
    push_field_set(&mut head, resp.headers);
    if let Some(n) = resp.length {
        // RFC 9110 §8.6: never on 1xx/204; a 304 or HEAD may carry the
        // length of the body it stands for.
        if !matches!(resp.status, 100..=199 | 204) {
            head.extend_from_slice(b"Content-Length: ");
            head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !keep_alive {
        head.extend_from_slice(b"Connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");

    let fail = |bytes, e: String| Written {
        body_bytes: bytes,
        reusable: false,
        error: Some(e),
    };
    if let Err(e) = out.write_all(&head) {
        return fail(0, format!("writing the response head: {e}"));
    }
    let mut sent = 0u64;
    if buf.len() < COPY_BUFFER_BYTES {
        buf.resize(COPY_BUFFER_BYTES, 0);
    }
    if no_body {
        // Nothing to send, but let an HTTP client's reader reach its (empty)
        // end so the backend connection goes back to the pool.
        let _ = body.read(&mut buf[..1]);
    } else {
        let limit = resp.length.unwrap_or(u64::MAX);
        while sent < limit {
            let want = buf
                .len()
                .min(usize::try_from(limit - sent).unwrap_or(usize::MAX));
            let n = match body.read(&mut buf[..want]) {
                Ok(0) if resp.length.is_some() => {
                    let _ = out.flush();
                    return fail(
                        sent,
                        format!("backend body ended after {sent} of {limit} bytes"),
                    );
                }
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = out.flush();
                    return fail(sent, format!("backend body failed after {sent} bytes: {e}"));
                }
            };
            let written = if chunked {
                write!(out, "{n:x}\r\n")
                    .and_then(|_| out.write_all(&buf[..n]))
                    .and_then(|_| out.write_all(b"\r\n"))
            } else {
                out.write_all(&buf[..n])
            };
            // Flushed as it comes: a streamed answer (server-sent events, a
            // long poll, a slow download) must not wait for a buffer to fill.
            if let Err(e) = written.and_then(|_| out.flush()) {
                return fail(sent, format!("client stopped reading: {e}"));
            }
            sent += n as u64;
        }
        if chunked && let Err(e) = out.write_all(b"0\r\n\r\n") {
            return fail(sent, format!("client stopped reading: {e}"));
        }
        if resp.length.is_some() {
            // Let the body reader see its end: an HTTP client returns the
            // backend connection to its pool only then. (Extra bytes past
            // the declared length are not ours to send.)
            let _ = body.read(&mut buf[..1]);
        }
    }
    if let Err(e) = out.flush() {
        return fail(sent, format!("client stopped reading: {e}"));
    }
    Written {
        body_bytes: sent,
        reusable: keep_alive,
        error: None,
    }
}

/// Reason phrases (RFC 9110 §15); clients ignore them, but people read them.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn head(raw: &[u8]) -> Result<Request, HeadError> {
        read_head(
            &mut BufReader::new(Cursor::new(raw.to_vec())),
            &mut Vec::new(),
            |_| Ok(()),
        )
    }

    fn h(pairs: &[(&str, &str)]) -> Fields {
        Fields::from_pairs(pairs)
    }

    fn body(raw: &[u8], framing: BodyFraming) -> (io::Result<Vec<u8>>, bool) {
        let mut conn = BufReader::new(Cursor::new(raw.to_vec()));
        let mut reader = BodyReader::<_, &mut Vec<u8>>::new(&mut conn, framing, None);
        let mut out = Vec::new();
        let r = reader.read_to_end(&mut out).map(|_| out);
        (r, reader.is_complete())
    }

    #[test]
    fn header_bytes_and_names_survive_the_round_trip() {
        for bytes in [&b"plain"[..], b"caf\xe9", b"\xc3\xa9t\xc3\xa9", b"\x80\xff"] {
            let mut raw = b"GET / HTTP/1.1\r\nSOAPAction: ".to_vec();
            raw.extend_from_slice(bytes);
            raw.extend_from_slice(b"\r\nx-lower: a\r\n\r\n");
            let r = head(&raw).unwrap();
            assert_eq!(r.headers.get("soapaction"), Some(bytes));
            let names: Vec<&str> = r.headers.iter().map(|(n, _)| n).collect();
            assert_eq!(names, ["SOAPAction", "x-lower"]);
            let mut out = Vec::new();
            push_field_set(&mut out, &r.headers);
            let mut want = b"SOAPAction: ".to_vec();
            want.extend_from_slice(bytes);
            want.extend_from_slice(b"\r\nx-lower: a\r\n");
            assert_eq!(out, want);
        }
    }

    #[test]
    fn parses_heads() {
        let r = head(b"\r\nGET /a?b HTTP/1.1\r\nHost: x\r\nX-Y:  z \r\n\r\nrest").unwrap();
        assert_eq!((r.method.as_str(), r.target.as_str()), ("GET", "/a?b"));
        assert_eq!(r.version, HttpVersion::Http11);
        assert_eq!(r.headers, h(&[("Host", "x"), ("X-Y", "z")]));
        assert_eq!(
            head(b"\r\n\r\nGET / HTTP/1.0\r\n\r\n").unwrap().version,
            HttpVersion::Http10
        );
    }

    fn malformed(raw: &[u8]) -> String {
        match head(raw) {
            Err(HeadError::Malformed(why)) => why,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn lines_end_in_crlf_and_nothing_else() {
        for raw in [
            &b"GET / HTTP/1.0\n\n"[..],
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nDummy: x\nContent-Length: 23\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            b"GET / HTTP/1.1\rHost: a\r\n\r\n",
            b"\nGET / HTTP/1.1\r\n\r\n",
            b"\r\rGET / HTTP/1.1\r\n\r\n",
            b"\r\n\rGET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(malformed(raw).contains("CRLF"), "{raw:?}");
        }
        // A bare LF is refused as soon as it arrives, not when the head
        // limit or the deadline is reached.
        let mut reads = 0;
        let r = read_head(
            &mut BufReader::new(Cursor::new(b"GET / HTTP/1.1\nX".to_vec())),
            &mut Vec::new(),
            |_| {
                reads += 1;
                Ok(())
            },
        );
        assert!(matches!(r, Err(HeadError::Malformed(_))));
        assert_eq!(reads, 1);
        // Split across reads: a CR at the end of one read, its LF (or not)
        // at the start of the next.
        let split = |a: &[u8], b: &[u8]| {
            let chain = Cursor::new(a.to_vec()).chain(Cursor::new(b.to_vec()));
            read_head(
                &mut BufReader::with_capacity(4, chain),
                &mut Vec::new(),
                |_| Ok(()),
            )
        };
        assert!(split(b"GET / HTTP/1.1\r", b"\nHost: a\r\n\r\n").is_ok());
        assert!(split(b"\r", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
        assert!(split(b"GET / HTTP/1.1\r", b"Host: a\r\n\r\n").is_err());
    }

    #[test]
    fn underscore_spellings_of_framing_headers_are_refused() {
        let with = |name: &str| format!("GET / HTTP/1.1\r\nHost: a\r\n{name}: 5\r\n\r\n");
        for refused in [
            "Content_Length",
            "content_length",
            "Transfer_Encoding",
            "TRANSFER_ENCODING",
        ] {
            let why = malformed(with(refused).as_bytes());
            assert_eq!(
                why,
                format!("{refused}: an underscore spelling of a framing header")
            );
        }
        for kept in ["X_Custom", "Content_Type", "Content_Length_", "Host_"] {
            let ok = head(with(kept).as_bytes()).unwrap();
            assert_eq!(ok.headers.iter().nth(1).map(|(n, _)| n), Some(kept));
        }
    }

    #[test]
    fn obs_fold_and_space_before_colon_are_refused() {
        for raw in [
            &b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\n\tX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 \r\n\r\n",
            b"GET / HTTP/1.10\r\n\r\n",
        ] {
            malformed(raw);
        }
    }

    #[test]
    fn refuses_bad_or_oversized_heads() {
        assert!(matches!(head(b""), Err(HeadError::Closed)));
        assert!(matches!(
            head(b"GET / HTTP/1.1\r\nHost"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head(b"\x00\x01\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let long_line = format!(
            "GET /{} HTTP/1.1\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE_BYTES)
        );
        assert!(matches!(
            head(long_line.as_bytes()),
            Err(HeadError::LineTooLong)
        ));
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(matches!(head(big.as_bytes()), Err(HeadError::TooLarge)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(head(many.as_bytes()), Err(HeadError::TooLarge)));
    }

    #[test]
    fn framing() {
        let f = |p: &[(&str, &str)]| request_framing(HttpVersion::Http11, &h(p));
        assert_eq!(f(&[]), Ok(BodyFraming::None));
        assert_eq!(f(&[("Content-Length", "0")]), Ok(BodyFraming::None));
        assert_eq!(f(&[("Content-Length", "12")]), Ok(BodyFraming::Sized(12)));
        assert_eq!(
            f(&[("Content-Length", "12"), ("content-length", "12")]),
            Ok(BodyFraming::Sized(12))
        );
        assert_eq!(
            f(&[("Transfer-Encoding", "Chunked")]),
            Ok(BodyFraming::Chunked)
        );
        for bad in [
            &[("Content-Length", "12"), ("Content-Length", "13")][..],
            &[("Content-Length", "12, 12")][..],
            &[("Content-Length", "-1")][..],
            &[("Content-Length", "+1")][..],
            &[("Content-Length", "1e3")][..],
            &[("Content-Length", "")][..],
            &[("Content-Length", "99999999999999999999999")][..],
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")][..],
        ] {
            assert_eq!(f(bad).map_err(|e| e.status), Err(400), "{bad:?}");
        }
        for unsupported in [
            &[("Transfer-Encoding", "gzip")][..],
            &[("Transfer-Encoding", "gzip, chunked")][..],
            &[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked"),
            ][..],
            &[("Transfer-Encoding", "chunked, gzip")][..],
        ] {
            assert_eq!(
                f(unsupported).map_err(|e| e.status),
                Err(501),
                "{unsupported:?}"
            );
        }
        let old = request_framing(HttpVersion::Http10, &h(&[("Transfer-Encoding", "chunked")]));
        assert_eq!(old.map_err(|e| e.status), Err(400));
    }

    #[test]
    fn only_sp_and_htab_are_whitespace_in_framing_values() {
        let f = |name: &str, value: &[u8]| {
            let headers = Fields::from_pairs(&[(name, value)]);
            request_framing(HttpVersion::Http11, &headers).map_err(|e| e.status)
        };
        assert_eq!(f("Content-Length", b"5"), Ok(BodyFraming::Sized(5)));
        assert_eq!(f("Content-Length", b" 5\t"), Ok(BodyFraming::Sized(5)));
        assert_eq!(
            f("Transfer-Encoding", b"\tchunked "),
            Ok(BodyFraming::Chunked)
        );
        for (name, value) in [
            ("Content-Length", &b"5\xa0"[..]),
            ("Content-Length", b"\x855"),
            ("Content-Length", b"\xa05"),
            ("Content-Length", b"5\x0b"),
            ("Transfer-Encoding", b"chunked\xa0"),
            ("Transfer-Encoding", b"\x85chunked"),
            ("Transfer-Encoding", b"chunked\x0c"),
            ("Transfer-Encoding", b"ch\xa0unked"),
            ("Transfer-Encoding", b"chunked,"),
            ("Transfer-Encoding", b",chunked"),
            ("Transfer-Encoding", b"\"chunked\""),
            ("Transfer-Encoding", b"chunked;q=1"),
        ] {
            assert_eq!(f(name, value), Err(400), "{name}: {value:?}");
        }
    }

    #[test]
    fn reads_sized_and_chunked_bodies() {
        let (r, done) = body(b"hello world", BodyFraming::Sized(5));
        assert_eq!(r.unwrap(), b"hello");
        assert!(done);
        let (r, done) = body(
            b"5 ;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT",
            BodyFraming::Chunked,
        );
        assert_eq!(r.unwrap(), b"hello world");
        assert!(done);
        for ext in [
            &b";a"[..],
            b" ; a = b ;c;d=\"q \\\" \xe9\"",
            b";a=\"\"",
            b"\t;a\t=\tb",
        ] {
            let mut raw = b"5".to_vec();
            raw.extend_from_slice(ext);
            raw.extend_from_slice(b"\r\nhello\r\n0\r\nX-T: \xe9 v\r\nY:\r\n\r\n");
            let (r, done) = body(&raw, BodyFraming::Chunked);
            assert_eq!(r.unwrap(), b"hello", "{ext:?}");
            assert!(done);
        }
    }

    #[test]
    fn short_or_broken_bodies_are_errors() {
        let (r, done) = body(b"abc", BodyFraming::Sized(5));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(!done);
        for raw in [
            &b"5\r\nhel"[..],
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n",
            b"ffffffffffffffffff\r\n",
            // The "funky chunks" family: lenient parsers disagree on these.
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX: \x01\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            // Trailers are fields or nothing.
            b"5\r\nhello\r\n0\r\nGET / HTTP/1.1\r\n\r\n",
            b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",
            b"5\r\nhello\r\n0\r\n: no name\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX : space before colon\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX: a\r\n folded\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX: \x7f\r\n\r\n",
            // Chunk extensions parse or the body is refused.
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;=x\r\nhello\r\n0\r\n\r\n",
            b"5;a=\r\nhello\r\n0\r\n\r\n",
            b"5;a b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\"y\r\nhello\r\n0\r\n\r\n",
            b"5;a=b,c\r\nhello\r\n0\r\n\r\n",
            b"5;a=\xff\r\nhello\r\n0\r\n\r\n",
        ] {
            let (r, done) = body(raw, BodyFraming::Chunked);
            assert!(r.is_err(), "{raw:?}");
            assert!(!done);
        }
    }

    #[test]
    fn huge_claimed_lengths_cost_nothing_up_front() {
        // A client claiming a terabyte and sending 3 bytes: an error after
        // 3 bytes, no allocation in proportion to the claim.
        let (r, _) = body(b"abc", BodyFraming::Sized(1 << 40));
        assert!(r.is_err());
    }

    #[test]
    fn continue_is_sent_before_the_first_read_only() {
        let mut conn = BufReader::new(Cursor::new(b"hello".to_vec()));
        let mut sink: Vec<u8> = Vec::new();
        let mut reader = BodyReader::new(&mut conn, BodyFraming::Sized(5), Some(&mut sink));
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
        assert_eq!(sink, b"HTTP/1.1 100 Continue\r\n\r\n");
        // Never read: never invited.
        let mut conn = BufReader::new(Cursor::new(b"hello".to_vec()));
        let mut sink: Vec<u8> = Vec::new();
        {
            let reader = BodyReader::new(&mut conn, BodyFraming::Sized(5), Some(&mut sink));
            assert!(!reader.is_complete());
        }
        assert!(sink.is_empty());
    }

    fn respond(resp: ResponseHead<'_>, body: &[u8]) -> (String, Written) {
        let mut out = Vec::new();
        let w = write_response(
            &mut out,
            &resp,
            &mut Cursor::new(body.to_vec()),
            &mut Vec::new(),
        );
        (String::from_utf8_lossy(&out).into_owned(), w)
    }

    static NO_FIELDS: Fields = Fields::new();

    fn resp(status: u16, length: Option<u64>, version: HttpVersion) -> ResponseHead<'static> {
        ResponseHead {
            status,
            headers: &NO_FIELDS,
            length,
            head_only: false,
            version,
            keep_alive: true,
        }
    }

    #[test]
    fn response_framing() {
        let (out, w) = respond(resp(200, Some(2), HttpVersion::Http11), b"ok");
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert!(w.reusable);
        let (out, w) = respond(resp(200, None, HttpVersion::Http11), b"hello");
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        assert!(w.reusable);
        let (out, w) = respond(resp(200, None, HttpVersion::Http10), b"hello");
        assert_eq!(out, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello");
        assert!(!w.reusable);
        let (out, _) = respond(resp(204, Some(0), HttpVersion::Http11), b"");
        assert_eq!(out, "HTTP/1.1 204 No Content\r\n\r\n");
        let (out, _) = respond(resp(304, None, HttpVersion::Http11), b"");
        assert_eq!(out, "HTTP/1.1 304 Not Modified\r\n\r\n");
        let mut head = resp(200, Some(1000), HttpVersion::Http11);
        head.head_only = true;
        let (out, w) = respond(head, b"");
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
        assert!(w.reusable);
    }

    #[test]
    fn truncated_bodies_never_look_complete() {
        // Known length, body short: no more bytes, connection not reusable.
        let (out, w) = respond(resp(200, Some(10), HttpVersion::Http11), b"short");
        assert!(out.ends_with("short"));
        assert!(!w.reusable && w.error.is_some());
        // Chunked, body fails: no terminating chunk.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("backend died"));
                }
                self.0 = 0;
                buf[..3].copy_from_slice(b"abc");
                Ok(3)
            }
        }
        let mut out = Vec::new();
        let w = write_response(
            &mut out,
            &resp(200, None, HttpVersion::Http11),
            &mut Failing(1),
            &mut Vec::new(),
        );
        let out = String::from_utf8(out).unwrap();
        assert!(out.ends_with("3\r\nabc\r\n"), "{out:?}");
        assert!(!w.reusable);
        assert_eq!(w.body_bytes, 3);
    }
}
