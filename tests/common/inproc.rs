//! The router's pieces started in-process, for tests of the server front
//! and the backend edge that need neither the binary nor etcd: a server
//! front on a free loopback port, the proxy, the backend edge, and a fixed
//! route table (what discovery would build from etcd).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use httprouter::backend::BackendClient;
use httprouter::health::EjectPolicy;
use httprouter::log::Logger;
use httprouter::proxy::{Proxy, ProxySettings};
use httprouter::routes::{Backend, RouteTable, SharedTable};
use httprouter::server::{Server, ServerSettings};
use httprouter::tunnel::HandshakeTimeouts;

/// Every timeout of the in-process router: short, so that a test that goes
/// wrong fails soon, and long enough for a loaded machine.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A server front serving `routes`; shut down (within a second) on drop.
pub struct InProcessRouter {
    server: Option<Server>,
    pub addr: SocketAddr,
}

impl InProcessRouter {
    /// `routes`: (domain, backend URL) pairs.
    pub fn start(routes: &[(&str, &str)]) -> InProcessRouter {
        let table = Arc::new(SharedTable::default());
        let backends: Vec<(&str, Arc<Backend>)> = routes
            .iter()
            .enumerate()
            .map(|(i, (domain, url))| {
                let key = format!("/domains/{domain}/{i}");
                let backend = Backend::parse(&key, url).expect("a valid backend URL");
                (*domain, Arc::new(backend))
            })
            .collect();
        table.store(RouteTable::build(backends, &RouteTable::default()));
        let proxy = Proxy::new(
            table,
            BackendClient::new(TIMEOUT, TIMEOUT, TIMEOUT, 4),
            ProxySettings {
                eject: EjectPolicy {
                    after: 1000,
                    duration_ms: 1,
                },
                trusted_proxies: Vec::new(),
                handshake: HandshakeTimeouts {
                    connect: TIMEOUT,
                    response: TIMEOUT,
                    body: TIMEOUT,
                },
            },
            Logger::discard(),
        );
        let server = Server::start(
            "127.0.0.1:0".parse().expect("an address"),
            ServerSettings {
                max_connections: 64,
                workers: 8,
                header_timeout: TIMEOUT,
                keepalive_timeout: TIMEOUT,
                client_timeout: TIMEOUT,
                tunnel_timeout: TIMEOUT,
            },
            Arc::new(proxy),
            Logger::discard(),
            Arc::default(),
        )
        .expect("start the server front");
        let addr = server.local_addr();
        InProcessRouter {
            server: Some(server),
            addr,
        }
    }
}

impl Drop for InProcessRouter {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown(Duration::from_secs(1));
        }
    }
}
