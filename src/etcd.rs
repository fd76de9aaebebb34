//! What discovery needs from etcd, whichever API serves it: a snapshot of
//! the route directory, a watch for the changes after a revision, and a
//! cheap read that says whether a member still answers for its cluster.
//! [`crate::etcd_v2`] and [`crate::etcd_v3`] implement it; `docs/etcd.md`
//! describes the etcd behaviour both rely on.
//!
//! Every failure is one [`EtcdError`] carrying what discovery should do
//! about it ([`Recovery`]), so the watch loop has one place that decides
//! and never parses an error to find out.

use std::fmt;
use std::time::Duration;

/// A watch read that receives no byte for this long ends, and the next
/// one starts from where it left off: etcd sends nothing at all on an idle
/// watch. (Frozen members are found by the probe long before this.)
pub const WATCH_IDLE_TIMEOUT_SECS: u64 = 60;
/// A snapshot must arrive within this; a member without quorum answers a
/// quorum read with an error after about 7 s.
pub const SNAPSHOT_TIMEOUT_SECS: u64 = 15;
/// The probe's whole exchange; a healthy member answers in milliseconds.
pub const PROBE_TIMEOUT_MILLIS: u64 = 2_500;
const CONNECT_TIMEOUT_SECS: u64 = 3;

/// An HTTP client for etcd: no proxy, no redirects, statuses as answers;
/// `global` bounds a whole exchange (none for watches).
pub fn agent(global: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .user_agent(concat!("httprouter/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_SECS)))
        .timeout_recv_response(Some(Duration::from_secs(SNAPSHOT_TIMEOUT_SECS)))
        .timeout_per_read(Some(Duration::from_secs(WATCH_IDLE_TIMEOUT_SECS)))
        .timeout_global(global)
        .build()
        .new_agent()
}

/// etcd's position: the v2 index or the v3 revision, both cluster-wide
/// counters of writes, so resuming on another member is exact.
pub type Revision = u64;

/// Which etcd API to use (`--etcd-api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiChoice {
    /// Decided by what the first member that answers serves and holds
    /// (README, "Routes in etcd").
    Auto,
    V2,
    V3,
}

/// One key under the route directory, with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub key: String,
    pub value: String,
}

/// The route directory at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Watch for changes after this.
    pub revision: Revision,
    pub leaves: Vec<Leaf>,
    /// v2 only: the directory's key is a plain value, not a directory.
    pub root_is_leaf: bool,
}

/// What a change means for the route tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key written (any kind of v2 set, a v3 put).
    Upsert { key: String, value: String },
    /// A key deleted or expired, or (v2, `dir`) a directory with
    /// everything under it, as one event with no children listed.
    Remove {
        key: String,
        dir: bool,
        /// The etcd action (`delete`, `expire`, …), for the log.
        reason: String,
    },
    /// Nothing for routes: a v2 directory created.
    Nothing,
    /// A v2 action this client does not know: logged, skipped.
    Unknown { key: String, action: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub change: Change,
    pub revision: Revision,
}

/// What a watch says next.
#[derive(Debug, Clone, PartialEq)]
pub enum Watched {
    /// Changes in order (one v3 message may carry many, of one
    /// transaction).
    Events(Vec<Event>),
    /// Nothing under the directory changed up to this revision: resuming
    /// after it is exact.
    Progress(Revision),
    /// Nothing at all for the watch's idle timeout: this watch is done,
    /// and a new one from the same place loses nothing.
    Idle,
}

/// What discovery does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The events since our revision cannot be had (history cleared,
    /// compacted, the store wiped): a fresh snapshot, then a watch from it.
    Resync,
    /// This member cannot serve us now (down, frozen, without a leader,
    /// answering errors): the next endpoint, from the same revision.
    NextEndpoint,
}

/// A failure talking to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdError {
    pub endpoint: String,
    /// For the log and the tests: `unreachable`, `unresponsive`,
    /// `no_leader`, `v2_disabled`, `v3_unavailable`, `status`,
    /// `bad_answer`, `stream_ended`, `history_cleared`, `compacted`,
    /// `store_reset`.
    pub kind: &'static str,
    pub detail: String,
    pub recovery: Recovery,
}

impl EtcdError {
    pub fn new(endpoint: &str, kind: &'static str, detail: impl Into<String>) -> EtcdError {
        let recovery = match kind {
            "history_cleared" | "compacted" | "store_reset" => Recovery::Resync,
            _ => Recovery::NextEndpoint,
        };
        EtcdError {
            endpoint: endpoint.to_string(),
            kind,
            detail: detail.into(),
            recovery,
        }
    }
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd {}: {}", self.endpoint, self.detail)
    }
}

/// ureq reports a per-read timeout inside the body reader as an `io::Error`
/// wrapping its own `Error::Timeout`.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) || e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)))
}

/// One etcd API, v2 or v3, for one route directory.
pub trait Api: Send {
    /// `v2` or `v3`, for the log.
    fn name(&self) -> &'static str;
    /// The whole directory, read through the cluster's quorum (a member
    /// cut off from it fails instead of handing out stale routes).
    fn snapshot(&self, endpoint: &str) -> Result<Snapshot, EtcdError>;
    /// A watch for the changes after `after`.
    fn watch(&self, endpoint: &str, after: Revision) -> Result<Box<dyn Watch>, EtcdError>;
    /// A small read through the quorum, with a short timeout: succeeds
    /// only while the member answers for its cluster.
    fn probe(&self, endpoint: &str) -> Result<(), EtcdError>;
}

/// An open watch. [`Watch::next`] blocks until something happens or the
/// idle timeout passes; after an error or [`Watched::Idle`] it is done.
pub trait Watch: Send {
    fn next(&mut self) -> Result<Watched, EtcdError>;
}

/// A stable 64-bit FNV-1a digest, the same on every build and platform:
/// routers holding the same routes show the same digest in `etcd.sync`.
#[derive(Debug, Clone, Copy)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Values over this are clipped in logs.
const CLIP_BYTES: usize = 256;

/// A value for a log line: whole when short, else its start and length.
pub fn clip(value: &str) -> String {
    if value.len() <= CLIP_BYTES {
        return value.to_string();
    }
    let mut end = CLIP_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_fnv1a() {
        // The published FNV-1a 64 test vectors.
        let mut d = Digest::default();
        assert_eq!(d.hex(), "cbf29ce484222325");
        d.add(b"a");
        assert_eq!(d.hex(), "af63dc4c8601ec8c");
        let mut d = Digest::default();
        d.add(b"foobar");
        assert_eq!(d.hex(), "85944171f73967e8");
    }

    #[test]
    fn recovery_follows_the_kind() {
        assert_eq!(
            EtcdError::new("e", "compacted", "").recovery,
            Recovery::Resync
        );
        assert_eq!(
            EtcdError::new("e", "no_leader", "").recovery,
            Recovery::NextEndpoint
        );
    }
}
