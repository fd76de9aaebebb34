//! Design prototype (issue 8), not the router: the hot path of a fully
//! event-driven proxy, one `mio` loop per core, client and backend sockets
//! as state machines, as nginx and HAProxy work. GET requests with bodies
//! framed by Content-Length only; two backends in turn. Kept to reproduce
//! the README's design figures:
//!
//! ```text
//! cargo build --release --example proto_evloop
//! scripts/bench.sh --proxy 'evloop=target/release/examples/proto_evloop $LISTEN'
//! ```
//!
//! Backends come from `BACKEND1_URL` and `BACKEND2_URL` (the harness sets
//! them); loops from `LOOPS` (default: the number of cores).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);
const BUF: usize = 64 * 1024;

fn backend_addr(var: &str) -> SocketAddr {
    let url = std::env::var(var).unwrap_or_default();
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    hostport.parse().expect("BACKENDn_URL=http://ip:port")
}

fn main() {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .expect("usage: proto_evloop ADDR")
        .parse()
        .expect("ADDR");
    let backends = vec![backend_addr("BACKEND1_URL"), backend_addr("BACKEND2_URL")];
    let loops: usize = std::env::var("LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let std_listener = std::net::TcpListener::bind(listen).expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let mut threads = Vec::new();
    for _ in 0..loops {
        let l = std_listener.try_clone().expect("clone");
        let b = backends.clone();
        threads.push(std::thread::spawn(move || {
            Loop::new(TcpListener::from_std(l), b).run()
        }));
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Where a client connection is.
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    /// The request went to backend `b`; relaying its answer.
    Answer { b: usize },
}

struct Client {
    sock: TcpStream,
    inbuf: Vec<u8>,
    /// Bytes for the client not yet written.
    out: Vec<u8>,
    out_at: usize,
    phase: Phase,
    keep_alive: bool,
}

struct Backend {
    sock: TcpStream,
    addr: usize,
    owner: Option<usize>,
    /// The request head, until written.
    out: Vec<u8>,
    out_at: usize,
    head: Vec<u8>,
    head_done: bool,
    body_left: u64,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    backends: Vec<SocketAddr>,
    next_backend: usize,
    clients: HashMap<usize, Client>,
    conns: HashMap<usize, Backend>,
    idle: Vec<Vec<usize>>,
    next_token: usize,
    buf: Vec<u8>,
}

impl Loop {
    fn new(mut listener: TcpListener, backends: Vec<SocketAddr>) -> Loop {
        let poll = Poll::new().expect("poll");
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .expect("register");
        let n = backends.len();
        Loop {
            poll,
            listener,
            backends,
            next_backend: 0,
            clients: HashMap::new(),
            conns: HashMap::new(),
            idle: vec![Vec::new(); n],
            next_token: 0,
            buf: vec![0; BUF],
        }
    }

    fn token(&mut self) -> usize {
        self.next_token += 1;
        self.next_token
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if self.poll.poll(&mut events, None).is_err() {
                continue;
            }
            for ev in &events {
                match ev.token() {
                    LISTENER => self.accept(),
                    Token(t) if t % 2 == 0 => self.client_ready(t),
                    Token(t) => self.backend_ready(t),
                }
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((mut sock, _)) = self.listener.accept() {
            let _ = sock.set_nodelay(true);
            let t = self.token() * 2;
            if self
                .poll
                .registry()
                .register(&mut sock, Token(t), Interest::READABLE | Interest::WRITABLE)
                .is_ok()
            {
                self.clients.insert(
                    t,
                    Client {
                        sock,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_at: 0,
                        phase: Phase::Head,
                        keep_alive: true,
                    },
                );
            }
        }
    }

    fn close_client(&mut self, t: usize) {
        if let Some(mut c) = self.clients.remove(&t) {
            let _ = self.poll.registry().deregister(&mut c.sock);
            if let Phase::Answer { b } = c.phase {
                self.close_backend(b);
            }
        }
    }

    fn close_backend(&mut self, b: usize) {
        if let Some(mut conn) = self.conns.remove(&b) {
            let _ = self.poll.registry().deregister(&mut conn.sock);
            self.idle[conn.addr].retain(|&x| x != b);
        }
    }

    fn client_ready(&mut self, t: usize) {
        // Flush pending output first, then read while reading is wanted.
        if self.flush_client(t).is_err() {
            return self.close_client(t);
        }
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        if !matches!(c.phase, Phase::Head) {
            return;
        }
        loop {
            match c.sock.read(&mut self.buf) {
                Ok(0) => return self.close_client(t),
                Ok(n) => {
                    c.inbuf.extend_from_slice(&self.buf[..n]);
                    if n < self.buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return self.close_client(t),
            }
        }
        self.try_request(t);
    }

    /// Starts the request buffered in client `t`, if its head is whole.
    fn try_request(&mut self, t: usize) {
        let Some(c) = self.clients.get_mut(&t) else {
            return;
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let used = match req.parse(&c.inbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return,
            Err(_) => return self.close_client(t),
        };
        let mut out = Vec::with_capacity(used + 128);
        out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
        out.push(b' ');
        out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut keep_alive = req.version == Some(1);
        let routed = req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("host") && h.value.starts_with(b"bench.example.com")
        });
        if !routed {
            c.inbuf.drain(..used);
            c.out.extend_from_slice(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            );
            if self.flush_client(t).is_err() {
                self.close_client(t);
            }
            return;
        }
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection") {
                keep_alive &= !h.value.eq_ignore_ascii_case(b"close");
                continue;
            }
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n");
        c.inbuf.drain(..used);
        c.keep_alive = keep_alive;
        let addr = self.next_backend % self.backends.len();
        self.next_backend += 1;
        let b = match self.checkout(addr) {
            Some(b) => b,
            None => return self.close_client(t),
        };
        if let Some(c) = self.clients.get_mut(&t) {
            c.phase = Phase::Answer { b };
        }
        let conn = self.conns.get_mut(&b).expect("checked out");
        conn.owner = Some(t);
        conn.out = out;
        conn.out_at = 0;
        conn.head.clear();
        conn.head_done = false;
        self.backend_ready(b);
    }

    fn checkout(&mut self, addr: usize) -> Option<usize> {
        if let Some(b) = self.idle[addr].pop() {
            return Some(b);
        }
        let mut sock = TcpStream::connect(self.backends[addr]).ok()?;
        let _ = sock.set_nodelay(true);
        let b = self.token() * 2 + 1;
        self.poll
            .registry()
            .register(&mut sock, Token(b), Interest::READABLE | Interest::WRITABLE)
            .ok()?;
        self.conns.insert(
            b,
            Backend {
                sock,
                addr,
                owner: None,
                out: Vec::new(),
                out_at: 0,
                head: Vec::new(),
                head_done: false,
                body_left: 0,
            },
        );
        Some(b)
    }

    fn backend_ready(&mut self, b: usize) {
        let Some(conn) = self.conns.get_mut(&b) else {
            return;
        };
        let Some(t) = conn.owner else {
            // Idle and readable: closed by the backend (or junk).
            return self.close_backend(b);
        };
        while conn.out_at < conn.out.len() {
            match conn.sock.write(&conn.out[conn.out_at..]) {
                Ok(n) => conn.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => return self.close_client(t),
            }
        }
        // Relay only as far as the client keeps up.
        let client_full = self
            .clients
            .get(&t)
            .is_none_or(|c| c.out.len() - c.out_at > BUF);
        if client_full {
            return;
        }
        let n = match conn.sock.read(&mut self.buf) {
            Ok(0) => return self.close_client(t),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => return self.close_client(t),
        };
        let full_read = n == self.buf.len();
        let Some(c) = self.clients.get_mut(&t) else {
            return self.close_backend(b);
        };
        let mut data = &self.buf[..n];
        if !conn.head_done {
            conn.head.extend_from_slice(data);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            let used = match resp.parse(&conn.head) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return,
                Err(_) => return self.close_client(t),
            };
            let mut length = 0u64;
            c.out.extend_from_slice(b"HTTP/1.1 ");
            c.out
                .extend_from_slice(resp.code.unwrap_or(502).to_string().as_bytes());
            c.out.push(b' ');
            c.out
                .extend_from_slice(resp.reason.unwrap_or("").as_bytes());
            c.out.extend_from_slice(b"\r\n");
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
                c.out.extend_from_slice(h.name.as_bytes());
                c.out.extend_from_slice(b": ");
                c.out.extend_from_slice(h.value);
                c.out.extend_from_slice(b"\r\n");
            }
            if !c.keep_alive {
                c.out.extend_from_slice(b"Connection: close\r\n");
            }
            c.out.extend_from_slice(b"\r\n");
            conn.head_done = true;
            conn.body_left = length;
            let body = conn.head.split_off(used);
            let take = body
                .len()
                .min(usize::try_from(length).unwrap_or(usize::MAX));
            c.out.extend_from_slice(&body[..take]);
            conn.body_left -= take as u64;
            data = &[];
        }
        let take = data
            .len()
            .min(usize::try_from(conn.body_left).unwrap_or(usize::MAX));
        let mut chunk = &data[..take];
        if c.out.is_empty() {
            // Straight from the read buffer; only what the client does not
            // take now is copied.
            while !chunk.is_empty() {
                match c.sock.write(chunk) {
                    Ok(n) => chunk = &chunk[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return self.close_client(t),
                }
            }
        }
        c.out.extend_from_slice(chunk);
        conn.body_left -= take as u64;
        let done = conn.body_left == 0;
        if done {
            conn.owner = None;
            self.idle[conn.addr].push(b);
            c.phase = Phase::Head;
        }
        if self.flush_client(t).is_err() {
            return self.close_client(t);
        }
        if done {
            let pipelined = self.clients.get(&t).is_some_and(|c| !c.inbuf.is_empty());
            if pipelined {
                self.try_request(t);
            }
        } else if full_read {
            // More of the answer may already be waiting; a short read
            // drained the socket, so its next byte brings a new edge.
            self.backend_ready(b);
        }
    }

    fn flush_client(&mut self, t: usize) -> io::Result<()> {
        let Some(c) = self.clients.get_mut(&t) else {
            return Ok(());
        };
        while c.out_at < c.out.len() {
            match c.sock.write(&c.out[c.out_at..]) {
                Ok(n) => c.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if c.out_at == c.out.len() {
            c.out.clear();
            c.out_at = 0;
            if matches!(c.phase, Phase::Head) && !c.keep_alive {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            if let Phase::Answer { b } = c.phase {
                // The client drained: resume relaying.
                if self.conns.get(&b).is_some_and(|x| x.head_done) {
                    self.backend_ready(b);
                }
            }
        }
        Ok(())
    }
}
