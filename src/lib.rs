//! httprouter: a host-based HTTP reverse proxy whose routes live in etcd.
//!
//! Data flows one way:
//! etcd (`etcd_v2` or `etcd_v3`, behind `etcd`) → `discovery` (one thread,
//! with `route_set` and `state_file`) → `routes::SharedTable` (immutable
//! tables) → `poller` → `server` on `workers` → `proxy` → `backend`; every part sends log
//! events down a bounded channel to the one `log` thread. `http1` is the
//! wire format below both edges. The binary (`main.rs`) only wires these
//! together; the library exists so that tests can start a server front, a
//! proxy and a backend edge in-process, without etcd or the binary.

pub mod admin;
pub mod admin_view;
pub mod backend;
pub mod cidr;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod etcd;
pub mod etcd_v2;
pub mod etcd_v3;
pub mod event;
pub mod health;
pub mod http1;
pub mod httpurl;
pub mod log;
pub mod memcpy;
pub mod metrics;
pub mod poller;
pub mod prometheus;
pub mod proxy;
pub mod route_set;
pub mod routes;
pub mod server;
pub mod state_file;
pub mod status_page;
pub mod tunnel;
pub mod workers;
