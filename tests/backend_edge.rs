//! The backend edge, in-process against scripted backends on loopback:
//! header names as sent both ways, the idle pool (reuse, and a pooled
//! connection the backend closed meanwhile), and the framing of answers.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::inproc::InProcessRouter;

const HOST: &str = "edge.example";

/// One request as a scripted backend read it.
#[derive(Debug, Clone)]
struct Received {
    /// Which connection (0, 1, ...) it came on.
    conn: usize,
    /// Which request of that connection it is (0: the first).
    nth: usize,
    head: String,
    body: Vec<u8>,
}

/// What a scripted backend does with a request.
struct Reply {
    answer: Vec<u8>,
    /// Bytes sent a moment after the answer, unasked.
    later: Option<Vec<u8>>,
    /// Close the connection after the answer.
    close: bool,
}

fn reply(answer: &[u8], close: bool) -> Reply {
    Reply {
        answer: answer.to_vec(),
        later: None,
        close,
    }
}

type Script = dyn Fn(&Received) -> Reply + Send + Sync;

/// A backend that answers each request with what `script` says (the
/// answer's bytes, and whether to close the connection after them), and
/// records every request.
struct ScriptedBackend {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl ScriptedBackend {
    fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let addr = listener.local_addr().expect("backend address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let r = Arc::clone(&received);
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                let (r, script) = (Arc::clone(&r), Arc::clone(&script));
                std::thread::spawn(move || serve(stream, conn, &r, &*script));
            }
        });
        ScriptedBackend { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, conn: usize, received: &Mutex<Vec<Received>>, script: &Script) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut out = stream.try_clone().expect("clone the backend socket");
    let mut reader = BufReader::new(stream);
    for nth in 0.. {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let field = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let mut body = Vec::new();
        if field("transfer-encoding").is_some() {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = field("content-length").and_then(|v| v.parse().ok()) {
            body.resize(n, 0);
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        let request = Received {
            conn,
            nth,
            head,
            body,
        };
        received.lock().unwrap().push(request.clone());
        let Reply {
            answer,
            later,
            close,
        } = script(&request);
        if out.write_all(&answer).is_err() || close {
            return;
        }
        if let Some(later) = later {
            std::thread::sleep(Duration::from_millis(30));
            if out.write_all(&later).is_err() {
                return;
            }
        }
    }
}

/// Sends `raw` on one connection and reads `answers` answers (each with a
/// Content-Length) back.
fn exchange(router: &InProcessRouter, raw: &[u8], answers: usize) -> Vec<String> {
    let conn = TcpStream::connect(router.addr).expect("connect to the router");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    (&conn).write_all(raw).expect("send");
    let mut reader = BufReader::new(conn);
    (0..answers)
        .map(|_| {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("an answer");
                assert!(!line.is_empty(), "closed after {head:?}");
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).expect("the body");
            head + &String::from_utf8_lossy(&body)
        })
        .collect()
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn ok(_: &Received) -> Reply {
    reply(OK, false)
}

fn path(r: &Received) -> &str {
    r.head.split(' ').nth(1).unwrap_or("")
}

#[test]
fn header_names_keep_their_spelling_both_ways() {
    let backend = ScriptedBackend::start(|_| {
        reply(
            b"HTTP/1.1 200 OK\r\nSOAPAction: urn:x\r\nx-all-lower: 1\r\nX-MiXeD-CaSe: 2\r\nContent-Length: 2\r\n\r\nok",
            false,
        )
    });
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let answers = exchange(
        &router,
        b"GET / HTTP/1.1\r\nHost: edge.example\r\nSOAPAction: \"urn:y\"\r\nx-all-lower: a\r\nX-MiXeD-CaSe: b\r\n\r\n",
        1,
    );
    let seen = &backend.received()[0].head;
    for line in ["SOAPAction: \"urn:y\"", "x-all-lower: a", "X-MiXeD-CaSe: b"] {
        assert!(seen.contains(&format!("\r\n{line}\r\n")), "{seen:?}");
    }
    for line in ["SOAPAction: urn:x", "x-all-lower: 1", "X-MiXeD-CaSe: 2"] {
        assert!(
            answers[0].contains(&format!("\r\n{line}\r\n")),
            "{answers:?}"
        );
    }
}

#[test]
fn idle_backend_connections_are_reused() {
    let backend = ScriptedBackend::start(ok);
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let one = b"GET /1 HTTP/1.1\r\nHost: edge.example\r\n\r\n";
    for _ in 0..3 {
        exchange(&router, one, 1);
    }
    let conns: Vec<usize> = backend.received().iter().map(|r| r.conn).collect();
    assert_eq!(conns, [0, 0, 0]);
}

/// The backend closes each connection right after its answer, without
/// saying so (no `Connection: close`): the router pools the connection,
/// finds it closed when it reuses it, and sends the request again on a
/// fresh one. Nothing is lost or sent twice, whatever the body.
#[test]
fn a_pooled_connection_closed_by_the_backend_is_replaced_without_an_error() {
    let backend = ScriptedBackend::start(|_| reply(OK, true));
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let big = "x".repeat(100 * 1024);
    let requests = [
        "GET /first HTTP/1.1\r\nHost: edge.example\r\n\r\n".to_string(),
        "GET /no-body HTTP/1.1\r\nHost: edge.example\r\n\r\n".to_string(),
        "POST /small HTTP/1.1\r\nHost: edge.example\r\nContent-Length: 5\r\n\r\nhello".to_string(),
        format!("PUT /large HTTP/1.1\r\nHost: edge.example\r\nContent-Length: {}\r\n\r\n{big}", big.len()),
        "POST /chunked HTTP/1.1\r\nHost: edge.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_string(),
    ];
    for request in &requests {
        // The backend's close has had every chance to arrive before the
        // next request: the pooled connection is certainly dead.
        std::thread::sleep(Duration::from_millis(50));
        let answers = exchange(&router, request.as_bytes(), 1);
        assert!(
            answers[0].starts_with("HTTP/1.1 200 "),
            "{request:.40}: {answers:?}"
        );
    }
    let received = backend.received();
    let paths: Vec<&str> = received
        .iter()
        .map(|r| r.head.split(' ').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        paths,
        ["/first", "/no-body", "/small", "/large", "/chunked"]
    );
    let conns: Vec<usize> = received.iter().map(|r| r.conn).collect();
    assert_eq!(
        conns,
        [0, 1, 2, 3, 4],
        "each request on a connection of its own"
    );
    assert_eq!(received[2].body, b"hello");
    assert_eq!(received[3].body.len(), big.len());
    assert_eq!(received[4].body, b"hello");
}

#[test]
fn answers_are_framed_as_the_backend_framed_them() {
    let backend = ScriptedBackend::start(|r| {
        let answer: &[u8] = match path(r) {
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
            "/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "/interim" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nfin",
            "/until-close" => b"HTTP/1.1 200 OK\r\n\r\nall of it",
            "/conflicting" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "/signed" => b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
            "/status-0" => b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok",
            _ => OK,
        };
        reply(answer, path(r) == "/until-close")
    });
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let get = |path: &str| {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: edge.example\r\nConnection: close\r\n\r\n");
        let conn = TcpStream::connect(router.addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (&conn).write_all(raw.as_bytes()).expect("send");
        let mut got = String::new();
        let _ = (&conn).read_to_string(&mut got);
        got
    };
    let chunked = get("/chunked");
    assert!(chunked.starts_with("HTTP/1.1 200 "), "{chunked}");
    assert!(
        chunked.ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
        "{chunked:?}"
    );
    let empty = get("/no-content");
    assert!(empty.starts_with("HTTP/1.1 204 "), "{empty}");
    assert!(empty.ends_with("\r\n\r\n"), "{empty:?}");
    let interim = get("/interim");
    assert!(interim.starts_with("HTTP/1.1 200 "), "{interim}");
    assert!(interim.ends_with("\r\n\r\nfin"), "{interim:?}");
    assert!(!interim.contains("Early Hints"), "{interim:?}");
    let until_close = get("/until-close");
    // Re-framed for the HTTP/1.1 client: its end is the last chunk.
    assert!(
        until_close.ends_with("\r\n\r\n9\r\nall of it\r\n0\r\n\r\n"),
        "{until_close:?}"
    );
    for broken in ["/conflicting", "/signed", "/status-0"] {
        let got = get(broken);
        assert!(got.starts_with("HTTP/1.1 502 "), "{broken}: {got}");
    }
}

/// Bytes a backend sends after an answer ended (here after a HEAD answer,
/// whose `Content-Length` announces a body that never comes) are not taken
/// for the next request's answer: the pooled connection is left behind.
#[test]
fn late_bytes_after_an_answer_never_reach_another_request() {
    let backend = ScriptedBackend::start(|r| match path(r) {
        "/head" => Reply {
            answer: b"HTTP/1.1 200 OK\r\nContent-Length: 38\r\n\r\n".to_vec(),
            later: Some(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nBAD".to_vec()),
            close: false,
        },
        _ => reply(OK, false),
    });
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let head = exchange(
        &router,
        b"HEAD /head HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        0,
    );
    assert!(head.is_empty());
    // The stray bytes have arrived on the pooled connection by now.
    std::thread::sleep(Duration::from_millis(200));
    let answers = exchange(
        &router,
        b"GET /next HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        1,
    );
    assert!(answers[0].ends_with("\r\n\r\nok"), "{answers:?}");
    let conns: Vec<usize> = backend.received().iter().map(|r| r.conn).collect();
    assert_eq!(conns, [0, 1]);
}

/// The backend reads a request on a reused connection and closes it
/// without an answer. An idempotent request goes again on a fresh
/// connection; a POST does not (the backend may have acted on it): `502`,
/// and the backend saw it once.
#[test]
fn only_idempotent_requests_are_sent_again_after_a_pooled_connection_dies() {
    let backend = ScriptedBackend::start(|r| match (path(r), r.nth) {
        ("/dies", 1..) => reply(b"", true),
        _ => reply(OK, false),
    });
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let warm = b"GET /warm HTTP/1.1\r\nHost: edge.example\r\n\r\n";
    exchange(&router, warm, 1);
    let get = exchange(
        &router,
        b"GET /dies HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        1,
    );
    assert!(get[0].starts_with("HTTP/1.1 200 "), "{get:?}");
    exchange(&router, warm, 1);
    let post = exchange(
        &router,
        b"POST /dies HTTP/1.1\r\nHost: edge.example\r\nContent-Length: 2\r\n\r\nhi",
        1,
    );
    assert!(post[0].starts_with("HTTP/1.1 502 "), "{post:?}");
    let seen: Vec<(usize, String)> = backend
        .received()
        .iter()
        .map(|r| (r.conn, r.head.lines().next().unwrap_or("").to_string()))
        .collect();
    let line = |conn: usize, l: &str| (conn, l.to_string());
    assert_eq!(
        seen,
        [
            line(0, "GET /warm HTTP/1.1"),
            line(0, "GET /dies HTTP/1.1"),
            line(1, "GET /dies HTTP/1.1"),
            line(1, "GET /warm HTTP/1.1"),
            line(1, "POST /dies HTTP/1.1"),
        ]
    );
}

/// An interim answer (103), then the connection closes: part of an answer
/// came, so the request is not sent again, whatever its method.
#[test]
fn a_request_is_not_sent_again_once_an_interim_answer_came() {
    let backend = ScriptedBackend::start(|r| match (path(r), r.nth) {
        ("/hint", 1..) => reply(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", true),
        _ => reply(OK, false),
    });
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    exchange(
        &router,
        b"GET /warm HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        1,
    );
    let hint = exchange(
        &router,
        b"GET /hint HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        1,
    );
    assert!(hint[0].starts_with("HTTP/1.1 502 "), "{hint:?}");
    let paths: Vec<String> = backend
        .received()
        .iter()
        .map(|r| path(r).to_string())
        .collect();
    assert_eq!(paths, ["/warm", "/hint"]);
}

/// A backend that answers an upload before reading it (here `413`, then an
/// abrupt close): the client gets that answer, not a `502`.
#[test]
fn an_answer_sent_before_the_upload_ended_reaches_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = conn.write_all(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
            );
        }
    });
    let router = InProcessRouter::start(&[(HOST, &format!("http://{addr}"))]);
    let size = 8 * 1024 * 1024;
    let conn = TcpStream::connect(router.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut sender = conn.try_clone().expect("clone");
    let head = format!("POST /up HTTP/1.1\r\nHost: edge.example\r\nContent-Length: {size}\r\n\r\n");
    let sending = std::thread::spawn(move || {
        let _ = sender.write_all(head.as_bytes());
        let _ = sender.write_all(&vec![b'x'; size]);
    });
    let mut got = String::new();
    let _ = (&conn).read_to_string(&mut got);
    drop(conn);
    let _ = sending.join();
    assert!(got.starts_with("HTTP/1.1 413 "), "{got:.200}");
    assert!(got.ends_with("too large"), "{got:.200}");
}

/// A backend URL with a path: the path is a prefix of every target.
#[test]
fn a_backend_path_prefixes_the_target() {
    let backend = ScriptedBackend::start(ok);
    let router = InProcessRouter::start(&[(HOST, &format!("{}/api", backend.url()))]);
    exchange(
        &router,
        b"GET /x?y=1 HTTP/1.1\r\nHost: edge.example\r\n\r\n",
        1,
    );
    let seen = backend.received();
    assert!(
        seen[0].head.starts_with("GET /api/x?y=1 HTTP/1.1\r\n"),
        "{seen:?}"
    );
}

/// Requests pipelined in one write of more than the poller's 16 KiB read:
/// the bytes left in the socket after the first full read are read when
/// the connection comes back from its worker, not after the header
/// timeout (5 s here; the client waits at most 3 s for each answer).
#[test]
fn pipelined_requests_past_one_read_are_all_answered() {
    let backend = ScriptedBackend::start(ok);
    let router = InProcessRouter::start(&[(HOST, &backend.url())]);
    let filler = "x".repeat(200);
    let count = 120;
    let mut sent = Vec::new();
    for i in 0..count {
        sent.extend_from_slice(
            format!("GET /{i} HTTP/1.1\r\nHost: {HOST}\r\nX-Filler: {filler}\r\n\r\n").as_bytes(),
        );
    }
    assert!(sent.len() > 16 * 1024);
    let mut conn = TcpStream::connect(router.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    conn.write_all(&sent).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let answers = |got: &[u8]| got.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    while answers(&got) < count {
        let n = conn.read(&mut buf).expect("an answer within 3 s");
        assert!(n > 0, "closed after {} answers", answers(&got));
        got.extend_from_slice(&buf[..n]);
    }
}
