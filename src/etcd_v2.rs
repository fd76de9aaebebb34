//! etcd's v2 keys API over HTTP: one recursive snapshot, one long-poll wait.
//!
//! Owns the wire protocol only (URLs, status codes, `X-Etcd-Index`, JSON
//! shapes) and turns every answer into a typed result; what to do with it is
//! `discovery`'s business. The behaviour relied on here was measured on etcd
//! 3.4, and each piece of it is described where the code depends on it.

use std::fmt;
use std::io::Read;
use std::time::Duration;

use serde_json::Value;

/// A wait that receives no byte for this long is re-issued: etcd sends
/// nothing at all on an idle wait, and a frozen member accepts
/// connections but never answers.
pub const WATCH_IDLE_TIMEOUT_SECS: u64 = 60;
/// A snapshot must arrive within this; a member without quorum answers a
/// `quorum=true` read with a 500 after about 7 s.
pub const SNAPSHOT_TIMEOUT_SECS: u64 = 15;
const CONNECT_TIMEOUT_SECS: u64 = 3;
/// No sane route tree is this large; the cap keeps a hostile value from
/// eating the host's memory. etcd itself stores values up to 10 MiB.
const MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;

/// etcd's index: a cluster-wide counter of writes.
pub type WatchIndex = u64;

/// A route-tree leaf: full key and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `X-Etcd-Index` of the answer: watch from here + 1 (never a node's
    /// `modifiedIndex`, which lags behind writes elsewhere).
    pub index: WatchIndex,
    pub leaves: Vec<Leaf>,
    /// The key exists but is a plain value, not a directory.
    pub root_is_leaf: bool,
}

/// What a change event means for the route tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// set/create/update/compareAndSwap of a key (and `get` in a snapshot).
    Upsert { key: String, value: String },
    /// A directory created (mkdir): nothing to route yet.
    DirCreated { key: String },
    /// delete/expire/compareAndDelete of a key, or of a directory with
    /// everything under it (one event, no children listed).
    Remove {
        key: String,
        dir: bool,
        action: String,
    },
    /// An action this client does not know; logged and skipped.
    Unknown { key: String, action: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub change: Change,
    /// The next wait starts at this + 1.
    pub modified_index: WatchIndex,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WaitOutcome {
    Event(Event),
    /// Nothing happened for [`WATCH_IDLE_TIMEOUT_SECS`]. `etcd_index` is the
    /// wait's `X-Etcd-Index`: no matching event existed up to it (etcd would
    /// have answered at once), so resuming after it is exact and keeps a
    /// quiet watcher inside the 1000-event history window.
    Idle {
        etcd_index: Option<WatchIndex>,
    },
    /// errorCode 401, sent as HTTP 400: the events since `waitIndex` are gone
    /// and only a new snapshot is safe.
    HistoryCleared {
        detail: String,
    },
    /// etcd's index is behind what we have seen: its data was wiped and it
    /// started again. Only a new snapshot is safe.
    StoreReset {
        etcd_index: WatchIndex,
        wait_index: WatchIndex,
    },
}

#[derive(Debug)]
pub enum EtcdError {
    Unreachable {
        endpoint: String,
        detail: String,
    },
    /// 404 without `X-Etcd-Index`: etcd answers, but not the v2 API.
    V2Disabled {
        endpoint: String,
    },
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    BadAnswer {
        endpoint: String,
        detail: String,
    },
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdError::Unreachable { endpoint, detail } => {
                write!(f, "etcd {endpoint} unreachable: {detail}")
            }
            EtcdError::V2Disabled { endpoint } => write!(
                f,
                "etcd {endpoint} does not serve the v2 API (404 without X-Etcd-Index): \
                 start etcd with --enable-v2=true"
            ),
            EtcdError::Status {
                endpoint,
                status,
                body,
            } => write!(f, "etcd {endpoint} answered {status}: {body}"),
            EtcdError::BadAnswer { endpoint, detail } => {
                write!(
                    f,
                    "etcd {endpoint} sent an answer that cannot be used: {detail}"
                )
            }
        }
    }
}

impl EtcdError {
    pub fn endpoint(&self) -> &str {
        match self {
            EtcdError::Unreachable { endpoint, .. }
            | EtcdError::V2Disabled { endpoint }
            | EtcdError::Status { endpoint, .. }
            | EtcdError::BadAnswer { endpoint, .. } => endpoint,
        }
    }

    /// A short machine-readable kind for the log event.
    pub fn kind(&self) -> &'static str {
        match self {
            EtcdError::Unreachable { .. } => "unreachable",
            EtcdError::V2Disabled { .. } => "v2_disabled",
            EtcdError::Status { .. } => "status",
            EtcdError::BadAnswer { .. } => "bad_answer",
        }
    }
}

/// A v2 client for one directory, over a list of endpoints.
pub struct EtcdV2 {
    endpoints: Vec<String>,
    current: usize,
    /// `/v2/keys` + the directory, each segment percent-encoded.
    keys_path: String,
    snapshot_agent: ureq::Agent,
    watch_agent: ureq::Agent,
}

impl EtcdV2 {
    /// `endpoints` are origins (`http://host:port`); `dir` is the normalised
    /// etcd key (`/domains`, or empty for the root).
    pub fn new(endpoints: Vec<String>, dir: &str) -> EtcdV2 {
        let mut keys_path = String::from("/v2/keys");
        for segment in dir.split('/').filter(|s| !s.is_empty()) {
            keys_path.push('/');
            percent_encode_segment(segment, &mut keys_path);
        }
        if dir.is_empty() {
            keys_path.push('/');
        }
        let agent = |global: Option<u64>| {
            ureq::Agent::config_builder()
                .proxy(None)
                .http_status_as_error(false)
                .max_redirects(0)
                .max_redirects_will_error(false)
                .user_agent(concat!("httprouter/", env!("CARGO_PKG_VERSION")))
                .timeout_connect(Some(Duration::from_secs(CONNECT_TIMEOUT_SECS)))
                .timeout_recv_response(Some(Duration::from_secs(SNAPSHOT_TIMEOUT_SECS)))
                .timeout_per_read(Some(Duration::from_secs(WATCH_IDLE_TIMEOUT_SECS)))
                .timeout_global(global.map(Duration::from_secs))
                .build()
                .new_agent()
        };
        EtcdV2 {
            endpoints,
            current: 0,
            keys_path,
            snapshot_agent: agent(Some(SNAPSHOT_TIMEOUT_SECS)),
            watch_agent: agent(None),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }

    /// Moves on to the next endpoint (after an error on this one).
    pub fn rotate(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len().max(1);
    }

    /// `GET <dir>?recursive=true&quorum=true`. `quorum=true` keeps a member
    /// that lost its cluster from handing out stale routes.
    pub fn snapshot(&self) -> Result<Snapshot, EtcdError> {
        let endpoint = self.endpoint().to_string();
        let url = format!("{endpoint}{}?recursive=true&quorum=true", self.keys_path);
        let answer = get(&self.snapshot_agent, &url, &endpoint)?;
        let index = answer.etcd_index;
        match answer.status {
            200 => {}
            // 404 without X-Etcd-Index: not etcd's v2 "key not found" but a
            // server without the v2 API.
            404 if index.is_none() => return Err(EtcdError::V2Disabled { endpoint }),
            404 => {
                let body = answer.json()?;
                if body["errorCode"].as_u64() == Some(100) {
                    // The directory does not exist yet: no routes.
                    return Ok(Snapshot {
                        index: index.unwrap_or_default(),
                        leaves: Vec::new(),
                        root_is_leaf: false,
                    });
                }
                return Err(EtcdError::Status {
                    endpoint,
                    status: 404,
                    body: clip(&body),
                });
            }
            _ => return Err(answer.status_error()),
        }
        let Some(index) = index else {
            return Err(EtcdError::BadAnswer {
                endpoint,
                detail: "snapshot without X-Etcd-Index".into(),
            });
        };
        let body = answer.json()?;
        let node = &body["node"];
        let mut leaves = Vec::new();
        let root_is_leaf = node["dir"].as_bool() != Some(true);
        if root_is_leaf {
            if let (Some(key), Some(value)) = (node["key"].as_str(), node["value"].as_str()) {
                leaves.push(Leaf {
                    key: key.into(),
                    value: value.into(),
                });
            }
        } else {
            collect_leaves(node, &mut leaves);
        }
        Ok(Snapshot {
            index,
            leaves,
            root_is_leaf,
        })
    }

    /// `GET <dir>?wait=true&recursive=true&waitIndex=N`: blocks until the
    /// first change at or after `wait_index`, or until the idle timeout.
    pub fn wait(&self, wait_index: WatchIndex) -> Result<WaitOutcome, EtcdError> {
        let endpoint = self.endpoint().to_string();
        let url = format!(
            "{endpoint}{}?wait=true&recursive=true&waitIndex={wait_index}",
            self.keys_path
        );
        let answer = get(&self.watch_agent, &url, &endpoint)?;
        match answer.status {
            200 => {}
            404 if answer.etcd_index.is_none() => return Err(EtcdError::V2Disabled { endpoint }),
            400 => {
                let body = answer.json()?;
                if body["errorCode"].as_u64() == Some(401) {
                    return Ok(WaitOutcome::HistoryCleared {
                        detail: body["cause"].as_str().unwrap_or_default().to_string(),
                    });
                }
                return Err(EtcdError::Status {
                    endpoint,
                    status: 400,
                    body: clip(&body),
                });
            }
            _ => return Err(answer.status_error()),
        }
        let etcd_index = answer.etcd_index;
        if let Some(etcd_index) = etcd_index {
            // The header is the index when the wait was registered; it can
            // only be below what we already saw if the store was wiped.
            if etcd_index.saturating_add(1) < wait_index {
                return Ok(WaitOutcome::StoreReset {
                    etcd_index,
                    wait_index,
                });
            }
        }
        let body = match answer.read() {
            Ok(bytes) => bytes,
            Err(BodyError::Idle) => return Ok(WaitOutcome::Idle { etcd_index }),
            Err(BodyError::Cut(detail)) => {
                return Err(EtcdError::Unreachable { endpoint, detail });
            }
        };
        let value: Value = serde_json::from_slice(&body).map_err(|e| EtcdError::BadAnswer {
            endpoint: endpoint.clone(),
            detail: format!("invalid JSON ({e})"),
        })?;
        parse_event(&value)
            .map(WaitOutcome::Event)
            .map_err(|detail| EtcdError::BadAnswer { endpoint, detail })
    }
}

/// An answer whose head has arrived; the body is read on demand.
struct Answer {
    endpoint: String,
    status: u16,
    etcd_index: Option<WatchIndex>,
    body: ureq::Body,
}

enum BodyError {
    /// No byte for the per-read timeout.
    Idle,
    /// The connection ended before the body was complete (etcd stopped or
    /// killed mid-answer): "reconnect", never "no change".
    Cut(String),
}

fn get(agent: &ureq::Agent, url: &str, endpoint: &str) -> Result<Answer, EtcdError> {
    let resp = agent.get(url).call().map_err(|e| EtcdError::Unreachable {
        endpoint: endpoint.to_string(),
        detail: e.to_string(),
    })?;
    let etcd_index = resp
        .headers()
        .get("X-Etcd-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let status = resp.status().as_u16();
    Ok(Answer {
        endpoint: endpoint.to_string(),
        status,
        etcd_index,
        body: resp.into_body(),
    })
}

impl Answer {
    fn read(self) -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::new();
        let mut reader = self.body.into_reader().take(MAX_BODY_BYTES);
        match reader.read_to_end(&mut out) {
            Ok(_) => Ok(out),
            Err(e) if is_timeout(&e) => Err(BodyError::Idle),
            Err(e) => Err(BodyError::Cut(format!("connection cut mid-answer ({e})"))),
        }
    }

    fn json(self) -> Result<Value, EtcdError> {
        let endpoint = self.endpoint.clone();
        let bytes = self.read().map_err(|e| EtcdError::Unreachable {
            endpoint: endpoint.clone(),
            detail: match e {
                BodyError::Idle => format!("no data for {WATCH_IDLE_TIMEOUT_SECS}s"),
                BodyError::Cut(d) => d,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|e| EtcdError::BadAnswer {
            endpoint,
            detail: format!("invalid JSON ({e})"),
        })
    }

    fn status_error(self) -> EtcdError {
        let mut body = Vec::new();
        let _ = self.body.into_reader().take(512).read_to_end(&mut body);
        EtcdError::Status {
            endpoint: self.endpoint,
            status: self.status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        }
    }
}

/// ureq reports a per-read timeout inside the body reader as an `io::Error`
/// wrapping its own `Error::Timeout`.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    ) || e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)))
}

/// Percent-encodes everything but RFC 3986 unreserved characters: etcd
/// decodes `%2F` into a real `/` and keeps `+` as is, so a
/// segment must go out with nothing left to interpretation.
fn percent_encode_segment(segment: &str, out: &mut String) {
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn collect_leaves(node: &Value, out: &mut Vec<Leaf>) {
    let Some(children) = node["nodes"].as_array() else {
        return;
    };
    for child in children {
        if child["dir"].as_bool() == Some(true) {
            collect_leaves(child, out);
        } else if let Some(key) = child["key"].as_str() {
            out.push(Leaf {
                key: key.to_string(),
                value: child["value"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
}

/// Turns one watch answer into a [`Change`] (`prevNode` is often
/// absent and removals carry no value; neither is needed here).
pub fn parse_event(body: &Value) -> Result<Event, String> {
    let action = body["action"]
        .as_str()
        .ok_or_else(|| format!("event without an action: {}", clip(body)))?;
    let node = &body["node"];
    let key = node["key"]
        .as_str()
        .ok_or_else(|| format!("event without node.key: {}", clip(body)))?
        .to_string();
    let modified_index = node["modifiedIndex"]
        .as_u64()
        .ok_or_else(|| format!("event without node.modifiedIndex: {}", clip(body)))?;
    let dir = node["dir"].as_bool() == Some(true);
    let change = match action {
        "set" | "create" | "update" | "compareAndSwap" | "get" => {
            if dir {
                Change::DirCreated { key }
            } else {
                Change::Upsert {
                    key,
                    value: node["value"].as_str().unwrap_or_default().to_string(),
                }
            }
        }
        "delete" | "expire" | "compareAndDelete" => Change::Remove {
            key,
            dir,
            action: action.to_string(),
        },
        other => Change::Unknown {
            key,
            action: other.to_string(),
        },
    };
    Ok(Event {
        change,
        modified_index,
    })
}

fn clip(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Event {
        parse_event(&serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn events_from_the_measured_samples() {
        let e = event(
            r#"{"action":"set","node":{"key":"/domains/example.com/api","value":"http://10.0.0.9:8080","modifiedIndex":8,"createdIndex":8},"prevNode":{"key":"/domains/example.com/api","value":"http://10.0.0.1:8080","modifiedIndex":4,"createdIndex":4}}"#,
        );
        assert_eq!(e.modified_index, 8);
        assert_eq!(
            e.change,
            Change::Upsert {
                key: "/domains/example.com/api".into(),
                value: "http://10.0.0.9:8080".into()
            }
        );
        let e = event(
            r#"{"action":"expire","node":{"key":"/domains/a.test/ttl","modifiedIndex":18,"createdIndex":16},"prevNode":{"key":"/domains/a.test/ttl","value":"http://4.4.4.4","expiration":"2026-11-26T21:36:00.762817622Z","modifiedIndex":16,"createdIndex":16}}"#,
        );
        assert_eq!(
            e.change,
            Change::Remove {
                key: "/domains/a.test/ttl".into(),
                dir: false,
                action: "expire".into()
            }
        );
        let e = event(
            r#"{"action":"delete","node":{"key":"/domains/a.test","dir":true,"modifiedIndex":20,"createdIndex":9},"prevNode":{"key":"/domains/a.test","dir":true,"modifiedIndex":9,"createdIndex":9}}"#,
        );
        assert!(matches!(e.change, Change::Remove { dir: true, .. }));
        let e = event(
            r#"{"action":"compareAndDelete","node":{"key":"/domains/a.test/r1","modifiedIndex":15,"createdIndex":9},"prevNode":{"key":"/domains/a.test/r1","value":"http://1.1.1.3","modifiedIndex":13,"createdIndex":9}}"#,
        );
        assert!(matches!(e.change, Change::Remove { dir: false, .. }));
        let e = event(
            r#"{"action":"set","node":{"key":"/domains/a.test/emptydir","dir":true,"modifiedIndex":17,"createdIndex":17}}"#,
        );
        assert!(matches!(e.change, Change::DirCreated { .. }));
        for action in ["create", "update", "compareAndSwap"] {
            let e = event(&format!(
                r#"{{"action":"{action}","node":{{"key":"/d/a/b","value":"v","modifiedIndex":3}}}}"#
            ));
            assert!(matches!(e.change, Change::Upsert { .. }), "{action}");
        }
    }

    #[test]
    fn malformed_events_are_errors_not_panics() {
        for body in [
            "{}",
            r#"{"action":"set"}"#,
            r#"{"action":"set","node":{"key":"/a"}}"#,
            r#"{"action":"set","node":{"key":5,"modifiedIndex":1}}"#,
            r#"{"action":7,"node":{"key":"/a","modifiedIndex":1}}"#,
            "[]",
            "null",
        ] {
            let v: Value = serde_json::from_str(body).unwrap();
            assert!(parse_event(&v).is_err(), "{body}");
        }
    }

    #[test]
    fn snapshot_walks_nested_directories() {
        let body: Value = serde_json::from_str(
            r#"{"action":"get","node":{"key":"/domains","dir":true,"nodes":[
  {"key":"/domains/example.com","dir":true,"nodes":[
     {"key":"/domains/example.com/api","value":"http://10.0.0.1:8080","modifiedIndex":4,"createdIndex":4}],
   "modifiedIndex":4,"createdIndex":4},
  {"key":"/domains/other.org","dir":true,"nodes":[
     {"key":"/domains/other.org/nested","dir":true,"nodes":[
        {"key":"/domains/other.org/nested/deep","value":"http://10.0.0.4","modifiedIndex":7,"createdIndex":7}],
      "modifiedIndex":7,"createdIndex":7}],
   "modifiedIndex":6,"createdIndex":6}],
 "modifiedIndex":4,"createdIndex":4}}"#,
        )
        .unwrap();
        let mut leaves = Vec::new();
        collect_leaves(&body["node"], &mut leaves);
        let keys: Vec<_> = leaves.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            ["/domains/example.com/api", "/domains/other.org/nested/deep"]
        );
    }

    #[test]
    fn keys_path_is_encoded_per_segment() {
        assert_eq!(
            EtcdV2::new(vec![], "/domains").keys_path,
            "/v2/keys/domains"
        );
        assert_eq!(EtcdV2::new(vec![], "").keys_path, "/v2/keys/");
        assert_eq!(
            EtcdV2::new(vec![], "/a b/c?d").keys_path,
            "/v2/keys/a%20b/c%3Fd"
        );
    }
}
