//! `Connection: Upgrade`: a WebSocket echo backend written here, with a
//! hand-made handshake and frames, behind the router; refused upgrades;
//! idle tunnels.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Backend, Etcd, RawBackend, Router};

const D: &str = "/domains";
const HOST: &str = "ws.example.com";
/// RFC 6455 §1.3's example key and the accept value it must produce.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket server that echoes every message: checks the handshake,
/// answers `101`, then unmasks each client frame and sends it back
/// unmasked. A close frame is answered with a close frame.
struct WsEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Request heads received.
    heads: Arc<Mutex<Vec<String>>>,
}

impl WsEcho {
    fn start() -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (s, h) = (Arc::clone(&stop), Arc::clone(&heads));
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let h = Arc::clone(&h);
                std::thread::spawn(move || ws_echo(conn, &h));
            }
        });
        WsEcho { addr, stop, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn ws_echo(conn: TcpStream, heads: &Mutex<Vec<String>>) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    let head = read_head(&mut reader);
    heads.lock().unwrap().push(head.clone());
    let lower = head.to_ascii_lowercase();
    if !lower.contains("upgrade: websocket") || !head.contains(&format!(": {KEY}")) {
        let _ = out.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
    );
    if out.write_all(answer.as_bytes()).is_err() {
        return;
    }
    while let Some((opcode, payload)) = read_frame(&mut reader) {
        let _ = out.write_all(&frame(opcode, &payload, None));
        if opcode == 8 {
            return;
        }
    }
}

fn read_head(reader: &mut impl BufRead) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return head,
            Ok(_) => {}
        }
        head.push_str(&line);
        if line == "\r\n" {
            return head;
        }
    }
}

/// Reads one frame (RFC 6455 §5.2), unmasking it. `None` at the end.
fn read_frame(reader: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut two = [0u8; 2];
    reader.read_exact(&mut two).ok()?;
    let opcode = two[0] & 0x0f;
    let masked = two[1] & 0x80 != 0;
    let len = match two[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            reader.read_exact(&mut b).ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            reader.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut mask = [0u8; 4];
    if masked {
        reader.read_exact(&mut mask).ok()?;
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).ok()?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((opcode, payload))
}

/// A final frame; masked with `mask` when given (client to server).
fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(bit | n as u8),
        n if n <= 0xffff => {
            f.push(bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A client connection after a successful handshake.
struct WsClient {
    reader: BufReader<TcpStream>,
    out: TcpStream,
    head: String,
}

fn handshake(router: &Router, host: &str) -> WsClient {
    let conn = TcpStream::connect(router.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = conn.try_clone().unwrap();
    let request = format!(
        "GET /chat?room=1 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
         Sec-WebSocket-Version: 13\r\nUser-Agent: ws-test\r\n\r\n"
    );
    out.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let head = read_head(&mut reader);
    WsClient { reader, out, head }
}

impl WsClient {
    fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.out
            .write_all(&frame(opcode, payload, Some([1, 2, 3, 4])))
            .unwrap();
    }

    fn receive(&mut self) -> Option<(u8, Vec<u8>)> {
        read_frame(&mut self.reader)
    }

    /// True if the router closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

fn setup(extra: &[&str]) -> (Etcd, WsEcho, Backend, Router) {
    let etcd = Etcd::start();
    let ws = WsEcho::start();
    let other = Backend::start("other");
    etcd.put(&format!("{D}/{HOST}/ws"), &ws.url());
    etcd.put(&format!("{D}/other.example.com/o"), &other.url());
    let router = Router::start(&etcd.url(), extra);
    router.wait_backends("other.example.com", &["other"]);
    router.wait_route(HOST);
    (etcd, ws, other, router)
}

#[test]
fn websocket_messages_flow_both_ways_through_the_tunnel() {
    let admin = common::free_port();
    let (_etcd, ws, _other, router) = setup(&["--admin", &format!("127.0.0.1:{admin}")]);
    let mut client = handshake(&router, HOST);
    assert!(client.head.starts_with("HTTP/1.1 101 "), "{}", client.head);
    assert!(
        client
            .head
            .contains(&format!("Sec-WebSocket-Accept: {ACCEPT}"))
    );
    let lower = client.head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{}", client.head);
    assert!(lower.contains("connection: upgrade"), "{}", client.head);

    // The backend saw the upgrade request with the forwarding headers.
    let seen = ws.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(seen.starts_with("get /chat?room=1 http/1.1"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
    assert!(seen.contains("connection: upgrade"), "{seen}");

    let big = vec![b'x'; 200_000];
    for msg in [&b"hello"[..], b"second message", &big] {
        client.send(1, msg);
        let (opcode, echoed) = client.receive().expect("an echo");
        assert_eq!(opcode, 1);
        assert_eq!(echoed, msg);
        // Other requests are served meanwhile.
        assert_eq!(router.get("other.example.com", "/").status, 200);
    }
    // The 101 is counted as it goes out, while the tunnel is open.
    let metrics = common::agent(Duration::from_secs(10))
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .call()
        .expect("/metrics")
        .into_body()
        .read_to_string()
        .expect("the metrics");
    let line = format!("httprouter_requests_total{{code_class=\"1xx\",domain=\"{HOST}\"}} 1\n");
    assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    client.send(8, b"\x03\xe8bye");
    assert_eq!(client.receive().map(|f| f.0), Some(8));
    drop(client);
    let logged = router.wait_event("router.request", |e| e["host"] == HOST);
    assert_eq!(logged["status"], 101);
    assert_eq!(logged["upstream"], ws.url());
    assert!(logged["bytes"].as_u64().unwrap() > 200_000, "{logged}");
    assert!(
        logged["bytes_to_backend"].as_u64().unwrap() > 200_000,
        "{logged}"
    );
}

#[test]
fn a_refused_upgrade_gets_the_backends_answer() {
    let etcd = Etcd::start();
    let refuses = RawBackend::start(
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 11\r\nX-Why: no\r\n\r\nnot today\r\n",
    );
    let ignores = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nplain\r\n0\r\n\r\n",
    );
    etcd.put(&format!("{D}/refuse.example.com/r"), &refuses.url());
    etcd.put(&format!("{D}/ignore.example.com/r"), &ignores.url());
    let router = Router::start(&etcd.url(), &[]);
    for host in ["refuse.example.com", "ignore.example.com"] {
        common::eventually("the routes", || {
            (router.get(host, "/").status != 503).then_some(())
        });
    }

    let mut refused = handshake(&router, "refuse.example.com");
    assert!(
        refused.head.starts_with("HTTP/1.1 426 "),
        "{}",
        refused.head
    );
    assert!(refused.head.contains("X-Why: no"));
    let mut body = vec![0u8; 11];
    refused.reader.read_exact(&mut body).unwrap();
    assert_eq!(body, b"not today\r\n");
    assert!(refused.closed());

    let mut ignored = handshake(&router, "ignore.example.com");
    assert!(
        ignored.head.starts_with("HTTP/1.1 200 "),
        "{}",
        ignored.head
    );
    let mut rest = String::new();
    ignored.reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "5\r\nplain\r\n0\r\n\r\n");
    router.wait_event("router.request", |e| {
        e["host"] == "refuse.example.com" && e["status"] == 426
    });
}

#[test]
fn an_idle_tunnel_is_closed_and_a_busy_one_is_not() {
    let (_etcd, _ws, _other, router) = setup(&["--tunnel-timeout", "3"]);
    // Busy: a message every 300 ms for 5 s, well past the idle timeout.
    let mut busy = handshake(&router, HOST);
    assert!(busy.head.starts_with("HTTP/1.1 101 "), "{}", busy.head);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        busy.send(1, b"ping");
        assert_eq!(busy.receive().map(|f| f.1), Some(b"ping".to_vec()));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Idle: closed by the router (the test's read timeout is 10 s).
    let mut idle = handshake(&router, HOST);
    assert!(idle.head.starts_with("HTTP/1.1 101 "), "{}", idle.head);
    assert!(idle.closed(), "the idle tunnel was not closed");
    router.wait_event("router.request", |e| {
        e["status"] == 101 && e["error"] == "tunnel idle timeout"
    });
    assert_eq!(router.get("other.example.com", "/").status, 200);
}

#[test]
fn an_upgrade_to_a_dead_backend_fails_over_or_is_502() {
    let etcd = Etcd::start();
    let ws = WsEcho::start();
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    etcd.put(&format!("{D}/{HOST}/a-dead"), &dead);
    etcd.put(&format!("{D}/{HOST}/b-live"), &ws.url());
    etcd.put(&format!("{D}/dead.example.com/r"), &dead);
    let router = Router::start(&etcd.url(), &[]);
    common::eventually("the routes", || {
        (router.get("dead.example.com", "/").status == 502).then_some(())
    });
    for _ in 0..4 {
        let mut c = handshake(&router, HOST);
        assert!(c.head.starts_with("HTTP/1.1 101 "), "{}", c.head);
        c.send(1, b"hi");
        assert_eq!(c.receive().map(|f| f.1), Some(b"hi".to_vec()));
    }
    let c = handshake(&router, "dead.example.com");
    assert!(c.head.starts_with("HTTP/1.1 502 "), "{}", c.head);
}

#[test]
fn a_101_for_a_protocol_nobody_asked_for_is_not_tunnelled() {
    let etcd = Etcd::start();
    let rogue = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    );
    etcd.put(&format!("{D}/rogue.example.com/r"), &rogue.url());
    let router = Router::start(&etcd.url(), &[]);
    common::eventually("the route", || {
        (router.get("rogue.example.com", "/").status != 503).then_some(())
    });
    let c = handshake(&router, "rogue.example.com");
    assert!(c.head.starts_with("HTTP/1.1 502 "), "{}", c.head);
    // The handshake's line, not the plain probe's above (a 101 to a
    // request that asked for no upgrade is a 502 too).
    let logged = router.wait_event("router.request", |e| {
        e["host"] == "rogue.example.com" && e["status"] == 502 && e["path"] == "/chat?room=1"
    });
    assert!(
        logged["error"].as_str().unwrap_or("").contains("h2c"),
        "{logged}"
    );
}

/// A backend that accepts the upgrade, then holds the connection open and
/// silent whatever the client does (even after the client has closed).
fn sticky_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        while let Ok((conn, _)) = listener.accept() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                read_head(&mut reader);
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
                );
                let _ = (&conn).write_all(answer.as_bytes());
                std::thread::sleep(Duration::from_secs(60));
                drop(conn);
            });
        }
    });
    addr
}

#[test]
fn tunnels_are_closed_at_shutdown_without_waiting_for_the_grace_period() {
    let etcd = Etcd::start();
    let ws = WsEcho::start();
    let sticky = sticky_backend();
    etcd.put(&format!("{D}/{HOST}/ws"), &ws.url());
    etcd.put(
        &format!("{D}/sticky.example.com/s"),
        &format!("http://{sticky}"),
    );
    let mut router = Router::start(&etcd.url(), &[]);
    router.wait_route(HOST);
    router.wait_route("sticky.example.com");
    let mut echo = handshake(&router, HOST);
    assert!(echo.head.starts_with("HTTP/1.1 101 "), "{}", echo.head);
    echo.send(1, b"hello");
    assert!(echo.receive().is_some());
    let mut held = handshake(&router, "sticky.example.com");
    assert!(held.head.starts_with("HTTP/1.1 101 "), "{}", held.head);
    let asked = Instant::now();
    router.signal("-TERM");
    assert!(echo.closed(), "the tunnel outlived the shutdown");
    assert!(
        held.closed(),
        "the tunnel to a silent backend outlived the shutdown"
    );
    assert!(router.wait_exit().success());
    // Well inside the 10 s grace period that requests in flight get.
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    let stopped = router.events_named("service.stop");
    assert_eq!(stopped[0]["unfinished_requests"], 0, "{stopped:?}");
}
