//! Design prototype (issue 8), not the router: the hot path of the hybrid
//! design, a `mio` poller that owns idle connections and reads request
//! heads, handing each whole head to a pool of synchronous workers that
//! proxy it with blocking I/O and hand the connection back. GET requests
//! with bodies framed by Content-Length only; two backends in turn. Kept to
//! reproduce the README's design figures:
//!
//! ```text
//! cargo build --release --example proto_hybrid
//! scripts/bench.sh --proxy 'hybrid=target/release/examples/proto_hybrid $LISTEN'
//! ```
//!
//! Backends come from `BACKEND1_URL` and `BACKEND2_URL` (the harness sets
//! them); workers from `WORKERS` (default 16).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

const LISTENER: Token = Token(usize::MAX);
const BUF: usize = 16 * 1024;

fn backend_addr(var: &str) -> SocketAddr {
    let url = std::env::var(var).unwrap_or_default();
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    hostport.parse().expect("BACKENDn_URL=http://ip:port")
}

/// A client connection while the poller owns it.
struct Client {
    sock: TcpStream,
    inbuf: Vec<u8>,
}

/// Who holds each connection; `Busy` entries note a readiness edge that
/// arrived while a worker had it, so the hand-back cannot lose it.
enum Slot {
    Idle(Client),
    Busy { missed: bool },
}

struct Shared {
    slots: Mutex<HashMap<usize, Slot>>,
    registry: Registry,
    work: crossbeam_channel::Sender<(usize, Client)>,
    backends: Vec<SocketAddr>,
    next_backend: AtomicUsize,
    pools: Vec<Mutex<Vec<BufReader<std::net::TcpStream>>>>,
}

fn main() {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .expect("usage: proto_hybrid ADDR")
        .parse()
        .expect("ADDR");
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let backends = vec![backend_addr("BACKEND1_URL"), backend_addr("BACKEND2_URL")];
    let mut poll = Poll::new().expect("poll");
    let mut listener = TcpListener::bind(listen).expect("bind");
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .expect("register");
    let (tx, rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        slots: Mutex::new(HashMap::new()),
        registry: poll.registry().try_clone().expect("registry"),
        work: tx,
        pools: backends.iter().map(|_| Mutex::new(Vec::new())).collect(),
        backends,
        next_backend: AtomicUsize::new(0),
    });
    for _ in 0..workers {
        let s = Arc::clone(&shared);
        let rx = rx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; BUF];
            while let Ok((t, c)) = rx.recv() {
                serve(&s, t, c, &mut buf);
            }
        });
    }
    let mut events = Events::with_capacity(256);
    let mut next = 0usize;
    let mut buf = vec![0u8; BUF];
    loop {
        if poll.poll(&mut events, None).is_err() {
            continue;
        }
        for ev in &events {
            if ev.token() == LISTENER {
                while let Ok((mut sock, _)) = listener.accept() {
                    let _ = sock.set_nodelay(true);
                    next += 1;
                    if poll
                        .registry()
                        .register(&mut sock, Token(next), Interest::READABLE)
                        .is_ok()
                    {
                        let mut slots = shared.slots.lock().unwrap();
                        slots.insert(
                            next,
                            Slot::Idle(Client {
                                sock,
                                inbuf: Vec::new(),
                            }),
                        );
                    }
                }
                continue;
            }
            let t = ev.token().0;
            let mut slots = shared.slots.lock().unwrap();
            match slots.get_mut(&t) {
                Some(Slot::Busy { missed }) => *missed = true,
                Some(Slot::Idle(_)) => {
                    let Some(Slot::Idle(c)) = slots.insert(t, Slot::Busy { missed: false }) else {
                        unreachable!()
                    };
                    drop(slots);
                    read_head(&shared, t, c, &mut buf);
                }
                None => {}
            }
        }
    }
}

/// Reads what is there; a whole head goes to a worker, a partial one back
/// to the poller.
fn read_head(shared: &Shared, t: usize, mut c: Client, buf: &mut [u8]) {
    loop {
        match c.sock.read(buf) {
            Ok(0) => return close(shared, t, c),
            Ok(n) => {
                c.inbuf.extend_from_slice(&buf[..n]);
                if n < buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return close(shared, t, c),
        }
    }
    if c.inbuf.windows(4).any(|w| w == b"\r\n\r\n") {
        let _ = shared.work.send((t, c));
    } else {
        hand_back(shared, t, c);
    }
}

fn close(shared: &Shared, t: usize, mut c: Client) {
    let _ = shared.registry.deregister(&mut c.sock);
    shared.slots.lock().unwrap().remove(&t);
}

fn hand_back(shared: &Shared, t: usize, c: Client) {
    let mut slots = shared.slots.lock().unwrap();
    let missed = matches!(slots.get(&t), Some(Slot::Busy { missed: true }));
    if missed {
        // Bytes came while a worker held it: the edge is spent, read now.
        slots.insert(t, Slot::Busy { missed: false });
        drop(slots);
        let _ = shared.work.send((t, c));
    } else {
        slots.insert(t, Slot::Idle(c));
    }
}

/// Waits until the non-blocking socket is ready, as blocking I/O would.
fn wait(sock: &TcpStream, events: libc::c_short) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, 5000) };
    if r <= 0 {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(())
}

fn write_all(sock: &mut TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match sock.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(sock, libc::POLLOUT)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve(shared: &Shared, t: usize, mut c: Client, buf: &mut [u8]) {
    loop {
        if !c.inbuf.windows(4).any(|w| w == b"\r\n\r\n") {
            // Read what may have come (the poller's edge may be spent).
            match c.sock.read(buf) {
                Ok(0) => return close(shared, t, c),
                Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return hand_back(shared, t, c),
                Err(_) => return close(shared, t, c),
            }
            continue;
        }
        if proxy_one(shared, &mut c).is_err() {
            return close(shared, t, c);
        }
        if c.inbuf.is_empty() {
            return hand_back(shared, t, c);
        }
    }
}

fn proxy_one(shared: &Shared, c: &mut Client) -> io::Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(&c.inbuf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(io::ErrorKind::InvalidData.into()),
    };
    let routed = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("host") && h.value.starts_with(b"bench.example.com"));
    if !routed {
        c.inbuf.drain(..used);
        return write_all(
            &mut c.sock,
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
        );
    }
    let mut out = Vec::with_capacity(used + 128);
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n");
    c.inbuf.drain(..used);
    let i = shared.next_backend.fetch_add(1, Ordering::Relaxed) % shared.backends.len();
    let pooled = shared.pools[i].lock().unwrap().pop();
    let mut be = match pooled {
        Some(be) => be,
        None => {
            let s = std::net::TcpStream::connect(shared.backends[i])?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            BufReader::with_capacity(BUF, s)
        }
    };
    be.get_mut().write_all(&out)?;
    // The answer head, then the body by its length.
    let mut seen = Vec::with_capacity(512);
    let (length, mut head) = loop {
        let avail = be.fill_buf()?;
        if avail.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let start = seen.len();
        seen.extend_from_slice(avail);
        let mut h = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut h);
        match resp.parse(&seen) {
            Ok(httparse::Status::Complete(n)) => {
                be.consume(n - start);
                let mut length = 0u64;
                let mut rebuilt = Vec::with_capacity(n);
                rebuilt.extend_from_slice(b"HTTP/1.1 ");
                rebuilt.extend_from_slice(resp.code.unwrap_or(502).to_string().as_bytes());
                rebuilt.push(b' ');
                rebuilt.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
                rebuilt.extend_from_slice(b"\r\n");
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("connection")
                        || h.name.eq_ignore_ascii_case("keep-alive")
                    {
                        continue;
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                    }
                    rebuilt.extend_from_slice(h.name.as_bytes());
                    rebuilt.extend_from_slice(b": ");
                    rebuilt.extend_from_slice(h.value);
                    rebuilt.extend_from_slice(b"\r\n");
                }
                rebuilt.extend_from_slice(b"\r\n");
                break (length, rebuilt);
            }
            Ok(httparse::Status::Partial) => {
                let n = avail.len();
                be.consume(n);
            }
            Err(_) => return Err(io::ErrorKind::InvalidData.into()),
        }
    };
    // Head and the first of the body in one write.
    let mut left = length;
    let first = be
        .buffer()
        .len()
        .min(usize::try_from(left).unwrap_or(usize::MAX));
    head.extend_from_slice(&be.buffer()[..first]);
    be.consume(first);
    left -= first as u64;
    write_all(&mut c.sock, &head)?;
    while left > 0 {
        let avail = be.fill_buf()?;
        if avail.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = avail.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        write_all(&mut c.sock, &avail[..n])?;
        be.consume(n);
        left -= n as u64;
    }
    shared.pools[i].lock().unwrap().push(be);
    Ok(())
}
