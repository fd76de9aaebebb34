//! The server edge: tiny_http accepts and parses; a fixed pool of workers
//! takes requests, hands them to [`Proxy`] and streams the answer back.
//!
//! Owns every tiny_http type and the shutdown sequence: stop taking
//! requests, let the ones in flight finish within a grace period. A panic
//! while serving one request costs that request (tiny_http answers 500),
//! never the worker.

use std::io::Read;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::log::{Logger, RequestRecord};
use crate::proxy::{HttpVersion, IncomingRequest, Proxy};

/// Worker stacks: the request path is shallow; small stacks keep many
/// workers cheap on a small host.
const WORKER_STACK_BYTES: usize = 256 * 1024;

pub struct Server {
    http: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
}

impl Server {
    pub fn start(
        listen: SocketAddr,
        workers: usize,
        proxy: Arc<Proxy>,
        log: Logger,
    ) -> Result<Server, String> {
        let http = tiny_http::Server::http(listen)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let http = Arc::new(http);
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let worker = Worker {
                http: Arc::downgrade(&http),
                proxy: Arc::clone(&proxy),
                log: log.clone(),
                stop: Arc::clone(&stop),
                busy: Arc::clone(&busy),
            };
            let handle = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .stack_size(WORKER_STACK_BYTES)
                .spawn(move || worker.run())
                .map_err(|e| format!("cannot start worker threads: {e}"))?;
            handles.push(handle);
        }
        Ok(Server {
            http,
            workers: handles,
            stop,
            busy,
        })
    }

    /// Stops taking requests and waits up to `grace` for those in flight.
    /// Returns how many were still running when the grace period ended.
    pub fn shutdown(self, grace: Duration) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..self.workers.len() {
            self.http.unblock();
        }
        // Idle workers now return from recv and drop their handles; once
        // ours goes too, tiny_http closes the listening socket.
        drop(self.http);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.workers.iter().any(|w| !w.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.busy.load(Ordering::SeqCst)
    }
}

struct Worker {
    /// Weak, so a worker busy with a long request does not keep the
    /// listening socket open during shutdown.
    http: Weak<tiny_http::Server>,
    proxy: Arc<Proxy>,
    log: Logger,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
}

impl Worker {
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            let request = {
                let Some(http) = self.http.upgrade() else {
                    return;
                };
                match http.recv() {
                    Ok(r) => r,
                    // Unblocked for shutdown, or an accept error already
                    // handled by tiny_http: look at the stop flag again.
                    Err(_) => continue,
                }
            };
            self.busy.fetch_add(1, Ordering::SeqCst);
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve(request)));
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn serve(&self, mut request: tiny_http::Request) {
        let started = Instant::now();
        let incoming = IncomingRequest {
            method: request.method().as_str().to_string(),
            target: request.url().to_string(),
            version: match request.http_version() {
                v if *v <= (1, 0) => HttpVersion::Http10,
                _ => HttpVersion::Http11,
            },
            headers: request
                .headers()
                .iter()
                .map(|h| {
                    (
                        h.field.as_str().as_str().to_string(),
                        h.value.as_str().to_string(),
                    )
                })
                .collect(),
            peer: request.remote_addr().copied(),
        };
        let outcome = self.proxy.handle(&incoming, request.as_reader());

        let sent = Arc::new(AtomicU64::new(0));
        let body = CountingReader {
            inner: outcome.response.body,
            count: Arc::clone(&sent),
        };
        let headers = outcome
            .response
            .headers
            .iter()
            .filter_map(|(n, v)| tiny_http::Header::from_bytes(n.as_bytes(), v.as_bytes()).ok())
            .collect();
        let length = outcome
            .response
            .length
            .and_then(|l| usize::try_from(l).ok());
        let response = tiny_http::Response::new(
            tiny_http::StatusCode(outcome.response.status),
            headers,
            body,
            length,
            None,
        )
        // tiny_http would switch large known-length bodies to chunked;
        // keep the backend's framing.
        .with_chunked_threshold(usize::MAX);
        let write_error = request.respond(response).err();

        let header = |name: &str| {
            incoming
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut error = outcome.error;
        if let Some(e) = write_error {
            error.get_or_insert_with(|| format!("response not fully sent: {e}"));
        }
        self.log.request(RequestRecord {
            host: outcome.host,
            path: incoming.target.clone(),
            method: incoming.method.clone(),
            status: outcome.response.status,
            upstream: outcome.upstream,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            bytes: sent.load(Ordering::Relaxed),
            client_ip: incoming.peer.map(|p| p.ip().to_string()),
            user_agent: header("user-agent"),
            error,
        });
    }
}

/// Counts the body bytes handed to the client, for the request log.
struct CountingReader {
    inner: Box<dyn Read + Send>,
    count: Arc<AtomicU64>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
