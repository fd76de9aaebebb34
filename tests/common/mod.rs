//! Test helpers: a real etcd, real HTTP backends on loopback, and the router
//! binary itself. Every process started here is stopped by PID when its
//! handle drops, so a failing test leaves nothing behind.

#![allow(dead_code)]

pub mod inproc;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test waits for something that should happen "at once"
/// (a route change to arrive, a process to start). Generous: CI machines are
/// shared and slow; no test asserts on speed.
pub const SETTLE: Duration = Duration::from_secs(20);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "httprouter-test-{}-{}-{tag}",
            std::process::id(),
            n
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that was free a moment ago. Ports are handed out once
/// per test process, from below the kernel's ephemeral range (which starts
/// at 32768): asking the kernel for port 0 can give two parallel tests the
/// same port, and an ephemeral port can be taken by an outgoing connection
/// before the server that was to use it binds it.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: std::sync::OnceLock<AtomicUsize> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicUsize::new((std::process::id() % SPAN) as usize));
    for _ in 0..SPAN {
        let port = (LOW + (next.fetch_add(1, Ordering::SeqCst) as u32 % SPAN)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {}", LOW + SPAN);
}

/// Polls `f` until it returns `Some`, or panics with `what` after `SETTLE`.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_within(what, SETTLE, f)
}

/// [`eventually`] with a bound of its own.
pub fn eventually_within<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------- etcd ----

/// A single-member etcd 3.4 with the v2 API, on free loopback ports and a
/// temporary data dir.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    v2: bool,
    dir: TempDir,
    /// Its name and `--initial-cluster` when a member of a cluster.
    member: Option<(String, String)>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(true)
    }

    pub fn start_without_v2() -> Etcd {
        Etcd::start_with(false)
    }

    fn start_with(v2: bool) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            v2,
            dir: TempDir::new("etcd"),
            member: None,
        };
        etcd.spawn();
        etcd
    }

    /// A three-member cluster (v3 only), each member on its own ports
    /// and data dir; returns once it has a leader.
    pub fn cluster() -> Vec<Etcd> {
        Etcd::cluster_with(false)
    }

    /// [`Etcd::cluster`] with the v2 API on.
    pub fn cluster_with_v2() -> Vec<Etcd> {
        Etcd::cluster_with(true)
    }

    fn cluster_with(v2: bool) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (0..3)
            .map(|i| Etcd {
                child: None,
                client_port: free_port(),
                peer_port: free_port(),
                v2,
                dir: TempDir::new("etcd-member"),
                member: Some((format!("m{i}"), String::new())),
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| {
                let name = &m.member.as_ref().expect("a member").0;
                format!("{name}=http://127.0.0.1:{}", m.peer_port)
            })
            .collect();
        let initial = initial.join(",");
        for m in &mut members {
            if let Some((_, cluster)) = m.member.as_mut() {
                *cluster = initial.clone();
            }
        }
        // All at once: each waits for the others to form the cluster.
        for m in &mut members {
            m.spawn_process();
        }
        for m in &mut members {
            m.wait_started();
        }
        eventually("the cluster to elect a leader", || {
            members[0].put3_try("/cluster-ready", "1").map(|_| ())
        });
        members
    }

    /// Picks ports now but starts nothing (for "etcd started after the
    /// router").
    pub fn planned() -> Etcd {
        Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            v2: true,
            dir: TempDir::new("etcd"),
            member: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn spawn(&mut self) {
        self.spawn_process();
        self.wait_started();
    }

    fn spawn_process(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let (name, cluster) = match &self.member {
            Some((name, cluster)) => (name.clone(), cluster.clone()),
            None => ("t".to_string(), format!("t={peer}")),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .arg(format!("--name={name}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={cluster}"))
            .arg(format!("--enable-v2={}", self.v2))
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (is etcd-server installed?)");
        self.child = Some(child);
    }

    fn wait_started(&mut self) {
        let client = self.url();
        let url = format!("{client}/version");
        eventually("etcd to answer /version", || {
            agent(Duration::from_secs(1))
                .get(&url)
                .call()
                .ok()
                .map(|_| ())
        });
        // The answer must have come from this etcd, not from one that
        // already held the port.
        if let Some(c) = self.child.as_mut() {
            assert!(
                matches!(c.try_wait(), Ok(None)),
                "etcd exited at start: see {}",
                self.dir.path().join("etcd.log").display()
            );
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        self.thaw();
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }

    /// Stop, then start again on the same ports and data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stop, wipe the data dir, start again: etcd's index starts over.
    pub fn wipe_and_restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("data"));
        self.spawn();
    }

    fn keys_url(&self, key: &str) -> String {
        format!("{}/v2/keys{key}", self.url())
    }

    fn write(&self, method: &str, key: &str, query: &str, form: Option<&str>) -> Value {
        let url = format!("{}{query}", self.keys_url(key));
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form.unwrap_or("").as_bytes().to_vec())
            .expect("etcd request");
        match agent(Duration::from_secs(10)).run(req) {
            Ok(r) => serde_json::from_str(&r.into_body().read_to_string().unwrap_or_default())
                .unwrap_or(Value::Null),
            Err(e) => panic!("etcd {method} {key}: {e}"),
        }
    }

    pub fn put(&self, key: &str, value: &str) -> Value {
        self.write("PUT", key, "", Some(&form_value(value)))
    }

    pub fn put_ttl(&self, key: &str, value: &str, ttl: u64) -> Value {
        self.write("PUT", key, &format!("?ttl={ttl}"), Some(&form_value(value)))
    }

    pub fn delete(&self, key: &str) -> Value {
        self.write("DELETE", key, "", None)
    }

    pub fn delete_dir(&self, key: &str) -> Value {
        self.write("DELETE", key, "?recursive=true", None)
    }

    pub fn index(&self) -> u64 {
        let resp = agent(Duration::from_secs(10))
            .get(&format!("{}/v2/keys/", self.url()))
            .call()
            .expect("etcd GET");
        resp.headers()
            .get("X-Etcd-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("X-Etcd-Index")
    }
}

/// Standard base64, as the v3 gateway wants keys and values.
pub fn b64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Etcd {
    /// POSTs to the v3 gateway; the JSON answer, or why there is none.
    pub fn v3(&self, path: &str, body: Value) -> Result<Value, String> {
        let resp = agent(Duration::from_secs(10))
            .post(&format!("{}{path}", self.url()))
            .send(body.to_string())
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        if status != 200 {
            return Err(format!("{status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| e.to_string())
    }

    fn put3_try(&self, key: &str, value: &str) -> Option<u64> {
        let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes())});
        let answer = self.v3("/v3/kv/put", body).ok()?;
        answer["header"]["revision"].as_str()?.parse().ok()
    }

    /// A v3 put; the revision it made.
    /// Retried while the cluster has no leader (an election after a member
    /// died takes a second or two).
    pub fn put3(&self, key: &str, value: &str) -> u64 {
        eventually(&format!("v3 put {key} through {}", self.url()), || {
            self.put3_try(key, value)
        })
    }

    /// A v3 put under a new lease of `ttl` seconds that nobody keeps alive.
    pub fn put3_leased(&self, key: &str, value: &str, ttl: u64) {
        let lease = self
            .v3(
                "/v3/lease/grant",
                serde_json::json!({"TTL": ttl.to_string()}),
            )
            .expect("lease grant");
        let id = lease["ID"].as_str().expect("lease ID").to_string();
        let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes()), "lease": id});
        self.v3("/v3/kv/put", body).expect("leased put");
    }

    pub fn delete3(&self, key: &str) {
        self.v3(
            "/v3/kv/deleterange",
            serde_json::json!({"key": b64(key.as_bytes())}),
        )
        .expect("v3 delete");
    }

    /// Compacts the v3 history up to the current revision.
    pub fn compact3(&self) {
        let rev = self.put3("/compact-marker", "x");
        self.v3(
            "/v3/kv/compaction",
            serde_json::json!({"revision": rev.to_string(), "physical": true}),
        )
        .expect("compaction");
    }

    /// SIGSTOP: the member keeps its sockets and answers nothing.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-STOP");
        }
    }

    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "-CONT");
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn form_value(value: &str) -> String {
    let mut out = String::from("value=");
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------- backends ----

/// What a test backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// A real HTTP server on loopback (tiny_http), answering with its name.
///
/// Paths: `/` → its name; `/bytes/N` → N bytes, with Content-Length;
/// `/chunked/N` → N bytes, chunked; `/slow/MS` → waits MS ms first;
/// `/status/N` → status N; `/redirect` → 302; `/gzip` → a gzip body;
/// `/upload` → the request body's length. Every answer has `X-Backend`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("backend listen"));
        let addr = server
            .server_addr()
            .to_ip()
            .expect("backend has an IP address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..8)
            .map(|_| {
                let server = Arc::clone(&server);
                let seen = Arc::clone(&seen);
                let name = name.to_string();
                std::thread::spawn(move || {
                    while let Ok(rq) = server.recv() {
                        serve_backend(&name, rq, &seen);
                    }
                })
            })
            .collect();
        Backend {
            name: name.to_string(),
            addr,
            server,
            threads,
            seen,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the backend saw a request")
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
    }
}

/// A reader of `n` bytes of a repeating pattern, made as it is read.
pub struct Pattern {
    pub left: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = b"0123456789abcdef"[i % 16];
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn serve_backend(name: &str, mut rq: tiny_http::Request, seen: &Mutex<Vec<Seen>>) {
    let mut body_len = 0u64;
    if !rq.method().as_str().eq_ignore_ascii_case("GET") {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rq.as_reader().read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => body_len += n as u64,
            }
        }
    }
    let url = rq.url().to_string();
    seen.lock().unwrap().push(Seen {
        method: rq.method().as_str().to_string(),
        url: url.clone(),
        headers: rq
            .headers()
            .iter()
            .map(|h| {
                (
                    h.field.as_str().as_str().to_string(),
                    h.value.as_str().to_string(),
                )
            })
            .collect(),
        body_len,
    });
    let tag = tiny_http::Header::from_bytes("X-Backend", name.as_bytes()).unwrap();
    let parts: Vec<&str> = url.trim_start_matches('/').split('/').collect();
    let num = |i: usize| {
        parts
            .get(i)
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let _ = match parts.first().copied().unwrap_or("") {
        "bytes" => rq.respond(
            tiny_http::Response::new(
                tiny_http::StatusCode(200),
                vec![tag],
                Pattern { left: num(1) },
                Some(num(1) as usize),
                None,
            )
            .with_chunked_threshold(usize::MAX),
        ),
        "chunked" => rq.respond(tiny_http::Response::new(
            tiny_http::StatusCode(200),
            vec![tag],
            Pattern { left: num(1) },
            None,
            None,
        )),
        "slow" => {
            std::thread::sleep(Duration::from_millis(num(1)));
            rq.respond(tiny_http::Response::from_string(name).with_header(tag))
        }
        "status" => rq.respond(
            tiny_http::Response::from_string(format!("status from {name}"))
                .with_status_code(num(1) as u16)
                .with_header(tag),
        ),
        "redirect" => rq.respond(
            tiny_http::Response::from_string("moved")
                .with_status_code(302)
                .with_header(tag)
                .with_header(tiny_http::Header::from_bytes("Location", "/elsewhere").unwrap()),
        ),
        "gzip" => rq.respond(
            tiny_http::Response::from_data(GZIP_HELLO.to_vec())
                .with_header(tag)
                .with_header(tiny_http::Header::from_bytes("Content-Encoding", "gzip").unwrap())
                .with_header(tiny_http::Header::from_bytes("Connection", "close, X-Hop").unwrap())
                .with_header(tiny_http::Header::from_bytes("X-Hop", "secret").unwrap())
                .with_header(tiny_http::Header::from_bytes("Keep-Alive", "timeout=5").unwrap()),
        ),
        "upload" => {
            rq.respond(tiny_http::Response::from_string(body_len.to_string()).with_header(tag))
        }
        _ => rq.respond(tiny_http::Response::from_string(name).with_header(tag)),
    };
}

/// `printf hello | gzip -n`: the router must pass these bytes untouched.
pub const GZIP_HELLO: &[u8] = &[
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x07,
    0x00, 0x86, 0xa6, 0x10, 0x36, 0x05, 0x00, 0x00, 0x00,
];

/// A log line is one of the events `src/event.rs` defines, with only the
/// fields its definition names (every test that reads the log checks the
/// schema this way).
pub fn check_event(v: &Value) {
    let name = v["event"]
        .as_str()
        .unwrap_or_else(|| panic!("no event name: {v}"));
    let kind = httprouter::event::KINDS
        .iter()
        .find(|k| k.name() == name)
        .unwrap_or_else(|| panic!("{name} is not a defined event: {v}"));
    for key in v.as_object().expect("an object").keys() {
        assert!(
            matches!(key.as_str(), "timestamp" | "event" | "service")
                || kind.fields().contains(&key.as_str()),
            "{name} has a field its definition does not name: {key} in {v}"
        );
    }
}

// --------------------------------------------------------------- router ----

/// The router binary, started with `--listen` on a free port; its stdout
/// (the JSON log) is collected line by line.
pub struct Router {
    child: Option<Child>,
    pub port: u16,
    pub lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Router {
    pub fn start(etcd_url: &str, extra: &[&str]) -> Router {
        let mut args = vec!["--etcdurl", etcd_url];
        args.extend_from_slice(extra);
        Router::start_with(&args)
    }

    /// Starts the router with `args` plus `--listen` on a free port.
    pub fn start_with(args: &[&str]) -> Router {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_httprouter"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start httprouter");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => sink.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        let mut router = Router {
            child: Some(child),
            port,
            lines,
            reader: Some(reader),
        };
        eventually("the router to listen", || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        if let Some(c) = router.child.as_mut() {
            assert!(
                matches!(c.try_wait(), Ok(None)),
                "the router exited at start"
            );
        }
        router
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("router running")
    }

    /// Parsed log events seen so far, each checked against its definition
    /// ([`check_event`]).
    pub fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                let v = serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}"));
                check_event(&v);
                v
            })
            .collect()
    }

    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// Waits for a log event named `name` for which `pred` holds.
    /// Waits until a route for `domain` has been added (without sending it
    /// a request, which some tests' backends answer only once).
    pub fn wait_route(&self, domain: &str) {
        self.wait_event("route.add", |e| e["domain"] == domain);
    }

    /// The etcd endpoint watched when the route event for `key` was
    /// logged (the last `etcd.listen` before it).
    pub fn watched_at(&self, key: &str) -> String {
        self.wait_event("route.add", |e| e["key"] == key);
        let listen = self.events_named("etcd.listen");
        let last = listen.last().expect("an etcd.listen event");
        last["endpoint"].as_str().expect("an endpoint").to_string()
    }

    pub fn wait_event(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(&format!("log event {name}"), || {
            self.events_named(name).into_iter().find(|e| pred(e))
        })
    }

    /// GET `path` with `Host: host`; (status, X-Backend, body).
    pub fn get(&self, host: &str, path: &str) -> Reply {
        request(&self.addr(), "GET", host, path, &[], None)
    }

    /// Waits until `host` is routed to exactly the backends named in `want`
    /// (checking several requests), or until it answers 503 when `want` is
    /// empty.
    pub fn wait_backends(&self, host: &str, want: &[&str]) {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        eventually(&format!("{host} to be served by {want:?}"), || {
            let mut got: Vec<String> = (0..want.len().max(1) * 2)
                .map(|_| self.get(host, "/"))
                .map(|r| {
                    if r.status == 503 {
                        "503".to_string()
                    } else {
                        r.backend.unwrap_or_default()
                    }
                })
                .collect();
            got.sort();
            got.dedup();
            let expect = if want.is_empty() {
                vec!["503".to_string()]
            } else {
                want.clone()
            };
            (got == expect).then_some(())
        });
    }

    /// Sends a signal (`-TERM`, `-INT`, ...) without waiting.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Sends SIGTERM and waits for the exit status (panics after `SETTLE`).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.wait_exit()
    }

    /// Waits for the process to exit (panics after `SETTLE`).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("router running");
        let status = eventually("the router to exit", || child.try_wait().ok().flatten());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub backend: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// A ureq client for tests: no redirects, no proxy from the environment,
/// statuses returned rather than turned into errors.
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .max_idle_connections(0)
        .timeout_global(Some(timeout))
        .allow_non_standard_methods(true)
        .build()
        .new_agent()
}

/// One request over a fresh connection (no redirects followed).
pub fn request(
    addr: &str,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut req = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("Host", host);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(body.unwrap_or_default().to_vec())
        .expect("request");
    let resp = agent(Duration::from_secs(60))
        .run(req)
        .unwrap_or_else(|e| panic!("{method} {path} (Host {host}): {e}"));
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let backend = headers
        .iter()
        .find(|(n, _)| n == "x-backend")
        .map(|(_, v)| v.clone());
    let mut body = Vec::new();
    let _ = resp.into_body().into_reader().read_to_end(&mut body);
    Reply {
        status,
        backend,
        headers,
        body,
    }
}

/// Writes `raw` on a new connection and returns everything read until the
/// server closes or `timeout` passes.
pub fn raw_exchange(addr: &str, raw: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to router");
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(raw).expect("write request");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Peak resident memory of a process, from /proc (KiB).
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Current resident memory of a process (KiB).
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------ forwarder ----

/// A TCP forwarder in front of a server, which a test can cut (every open
/// connection closed, new ones closed at once) and restore, while the server
/// behind it keeps running.
pub struct Forwarder {
    pub port: u16,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// While set, bytes are read but not passed on, in both directions: a
    /// frozen server that still accepts connections.
    pub frozen: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::atomic::AtomicBool>,
    /// While set, the listening socket is closed: connections are refused.
    refusing: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Forwarder {
    pub fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("forwarder bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (o, s, c, a, f, r) = (
            Arc::clone(&open),
            Arc::clone(&stop),
            Arc::clone(&conns),
            Arc::clone(&accepted),
            Arc::clone(&frozen),
            Arc::clone(&refusing),
        );
        std::thread::spawn(move || {
            let mut listener = Some(listener);
            while !s.load(Ordering::SeqCst) {
                if r.load(Ordering::SeqCst) {
                    listener = None;
                } else if listener.is_none() {
                    // std sets SO_REUSEADDR, so the port can be taken again.
                    listener = TcpListener::bind(("127.0.0.1", port)).ok();
                    if let Some(l) = &listener {
                        l.set_nonblocking(true).unwrap();
                    }
                }
                let Some(l) = &listener else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let client = match l.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                a.fetch_add(1, Ordering::SeqCst);
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = c.lock().unwrap();
                for s in [&client, &server] {
                    if let Ok(clone) = s.try_clone() {
                        list.push(clone);
                    }
                }
                drop(list);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let frozen = Arc::clone(&f);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while frozen.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Forwarder {
            port,
            accepted,
            frozen,
            open,
            refusing,
            conns,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Closes the listening socket, so connections are refused, as by a
    /// backend that is down. Returns once a connection is refused.
    pub fn refuse(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        eventually("the forwarder to refuse connections", || {
            TcpStream::connect(("127.0.0.1", self.port))
                .err()
                .map(|_| ())
        });
    }

    /// Listens again on the same port. Returns once the check connection
    /// made here has been counted in `accepted`.
    pub fn listen_again(&self) {
        let before = self.accepted.load(Ordering::SeqCst);
        self.refusing.store(false, Ordering::SeqCst);
        let _check = eventually("the forwarder to listen again", || {
            TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
        eventually("the check connection to be accepted", || {
            (self.accepted.load(Ordering::SeqCst) > before).then_some(())
        });
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

// ---------------------------------------------------------- raw backend ----

/// A backend that answers every connection with the same bytes, written
/// as given, then closes: for answers a well-behaved server library would
/// refuse to produce.
pub struct RawBackend {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// With several parts: each part after the first waits for this.
    pub release: Arc<std::sync::atomic::AtomicBool>,
}

impl RawBackend {
    pub fn start(answer: &'static [u8]) -> RawBackend {
        RawBackend::start_parts(&[answer])
    }

    /// Answers with `parts[0]`, then each next part once `release` is set.
    pub fn start_parts(parts: &[&'static [u8]]) -> RawBackend {
        let parts: Vec<&'static [u8]> = parts.to_vec();
        let listener = TcpListener::bind("127.0.0.1:0").expect("raw backend bind");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&release));
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                // Read the request head, then answer.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                for (i, part) in parts.iter().enumerate() {
                    while i > 0 && !r.load(Ordering::SeqCst) && !s.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ = conn.write_all(part);
                }
            }
        });
        RawBackend {
            addr,
            stop,
            release,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
