//! etcd's v2 keys API over HTTP: one recursive snapshot, long-poll waits,
//! a quorum read as a probe ([`crate::etcd::Api`]).
//!
//! Owns the wire protocol only (URLs, status codes, `X-Etcd-Index`, JSON
//! shapes) and turns every answer into a typed result; what to do with it is
//! `discovery`'s business. The behaviour relied on is in `docs/etcd.md`
//! ("v2"), measured on etcd 3.4.

use std::io::Read;
use std::time::Duration;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::etcd::{
    Api, Change, EtcdError, Event, Leaf, PROBE_TIMEOUT_MILLIS, Revision, SNAPSHOT_TIMEOUT_SECS,
    Snapshot, WATCH_IDLE_TIMEOUT_SECS, Watch, Watched, agent, is_timeout,
};

/// No sane route tree is this large; the cap keeps a hostile value from
/// eating the host's memory. etcd itself stores values up to 10 MiB.
const MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;

/// The v2 API for one directory.
pub struct EtcdV2 {
    /// `/v2/keys` + the directory, each segment percent-encoded.
    keys_path: String,
    snapshot_agent: ureq::Agent,
    watch_agent: ureq::Agent,
    probe_agent: ureq::Agent,
}

impl EtcdV2 {
    /// `dir` is the normalised etcd key (`/domains`, or empty for the root).
    pub fn new(dir: &str) -> EtcdV2 {
        let mut keys_path = String::from("/v2/keys");
        for segment in dir.split('/').filter(|s| !s.is_empty()) {
            keys_path.push('/');
            percent_encode_segment(segment, &mut keys_path);
        }
        if dir.is_empty() {
            keys_path.push('/');
        }
        EtcdV2 {
            keys_path,
            snapshot_agent: agent(Some(Duration::from_secs(SNAPSHOT_TIMEOUT_SECS))),
            watch_agent: agent(None),
            probe_agent: agent(Some(Duration::from_millis(PROBE_TIMEOUT_MILLIS))),
        }
    }

    /// Whether the member serves v2 and has anything in the directory:
    /// `Ok(None)` when v2 is not served, else whether the directory has
    /// children (for `--etcd-api auto`).
    pub fn detect(&self, endpoint: &str) -> Result<Option<bool>, EtcdError> {
        let url = format!("{endpoint}{}?quorum=true", self.keys_path);
        let answer = get(&self.snapshot_agent, &url, endpoint)?;
        match answer.status {
            404 if answer.etcd_index.is_none() => Ok(None),
            404 => Ok(Some(false)),
            200 => {
                let body = answer.json()?;
                let node = &body["node"];
                Ok(Some(
                    node["dir"].as_bool() != Some(true)
                        || node["nodes"].as_array().is_some_and(|n| !n.is_empty()),
                ))
            }
            _ => Err(answer.status_error()),
        }
    }
}

impl Api for EtcdV2 {
    fn name(&self) -> &'static str {
        "v2"
    }

    /// `GET <dir>?recursive=true&quorum=true`. `quorum=true` keeps a member
    /// that lost its cluster from handing out stale routes.
    fn snapshot(&self, endpoint: &str) -> Result<Snapshot, EtcdError> {
        let url = format!("{endpoint}{}?recursive=true&quorum=true", self.keys_path);
        let answer = get(&self.snapshot_agent, &url, endpoint)?;
        let index = answer.etcd_index;
        match answer.status {
            200 => {}
            // 404 without X-Etcd-Index: not etcd's v2 "key not found" but a
            // server without the v2 API.
            404 if index.is_none() => return Err(v2_disabled(endpoint)),
            404 => {
                let body = answer.json()?;
                if body["errorCode"].as_u64() == Some(100) {
                    // The directory does not exist yet: no routes.
                    return Ok(Snapshot {
                        revision: index.unwrap_or_default(),
                        leaves: Vec::new(),
                        root_is_leaf: false,
                    });
                }
                return Err(EtcdError::new(
                    endpoint,
                    "status",
                    format!("answered 404: {}", clip(&body)),
                ));
            }
            _ => return Err(answer.status_error()),
        }
        let Some(index) = index else {
            return Err(EtcdError::new(
                endpoint,
                "bad_answer",
                "snapshot without X-Etcd-Index",
            ));
        };
        let bytes = answer.bytes()?;
        let (leaves, root_is_leaf) = snapshot_leaves(&bytes).map_err(|e| {
            EtcdError::new(endpoint, "bad_answer", format!("invalid snapshot ({e})"))
        })?;
        Ok(Snapshot {
            revision: index,
            leaves,
            root_is_leaf,
        })
    }

    fn watch(&self, endpoint: &str, after: Revision) -> Result<Box<dyn Watch>, EtcdError> {
        Ok(Box::new(Waits {
            agent: self.watch_agent.clone(),
            url: format!("{endpoint}{}?wait=true&recursive=true", self.keys_path),
            endpoint: endpoint.to_string(),
            after,
            done: false,
        }))
    }

    /// A quorum read of a hidden key nobody writes: through raft, so a
    /// member cut off from its cluster or frozen fails it; tiny whatever
    /// the directory holds.
    fn probe(&self, endpoint: &str) -> Result<(), EtcdError> {
        let url = format!(
            "{endpoint}{}/_httprouter_probe?quorum=true",
            self.keys_path.trim_end_matches('/')
        );
        let answer = get(&self.probe_agent, &url, endpoint).map_err(unresponsive)?;
        match answer.status {
            200 => Ok(()),
            // etcd's own "not found" (or "not a directory", should the
            // directory be a plain key): an answer from the cluster.
            400..=499 if answer.etcd_index.is_some() => Ok(()),
            404 => Err(v2_disabled(endpoint)),
            _ => Err(answer.status_error()),
        }
    }
}

fn v2_disabled(endpoint: &str) -> EtcdError {
    EtcdError::new(
        endpoint,
        "v2_disabled",
        "does not serve the v2 API (404 without X-Etcd-Index): start etcd with \
         --enable-v2=true, or use --etcd-api v3",
    )
}

/// A probe that did not get through in time: the member is frozen or cut
/// off, whatever the transport said.
fn unresponsive(mut e: EtcdError) -> EtcdError {
    e.kind = "unresponsive";
    e.detail = format!(
        "no answer to a quorum read within {PROBE_TIMEOUT_MILLIS} ms ({})",
        e.detail
    );
    e
}

/// v2's watch: one long-poll wait after another, from the index after the
/// last event (never the answer's `X-Etcd-Index`, which is the index when
/// the wait started).
struct Waits {
    agent: ureq::Agent,
    url: String,
    endpoint: String,
    after: Revision,
    done: bool,
}

impl Watch for Waits {
    fn next(&mut self) -> Result<Watched, EtcdError> {
        if self.done {
            return Ok(Watched::Idle);
        }
        let wait_index = self.after.saturating_add(1);
        let result = self.wait(wait_index);
        if !matches!(result, Ok(Watched::Events(_))) {
            self.done = true;
        }
        result
    }
}

impl Waits {
    /// `GET …&waitIndex=N`: blocks until the first change at or after `N`,
    /// or until the idle timeout.
    fn wait(&mut self, wait_index: Revision) -> Result<Watched, EtcdError> {
        let endpoint = self.endpoint.as_str();
        let url = format!("{}&waitIndex={wait_index}", self.url);
        let answer = get(&self.agent, &url, endpoint)?;
        match answer.status {
            200 => {}
            404 if answer.etcd_index.is_none() => return Err(v2_disabled(endpoint)),
            400 => {
                let body = answer.json()?;
                if body["errorCode"].as_u64() == Some(401) {
                    return Err(EtcdError::new(
                        endpoint,
                        "history_cleared",
                        format!(
                            "the events from index {wait_index} are gone ({})",
                            body["cause"].as_str().unwrap_or_default()
                        ),
                    ));
                }
                return Err(EtcdError::new(
                    endpoint,
                    "status",
                    format!("answered 400: {}", clip(&body)),
                ));
            }
            _ => return Err(answer.status_error()),
        }
        let etcd_index = answer.etcd_index;
        // The header is the index when the wait was registered; it can
        // only be below what we already saw if the store was wiped.
        if let Some(etcd_index) = etcd_index
            && etcd_index.saturating_add(1) < wait_index
        {
            return Err(EtcdError::new(
                endpoint,
                "store_reset",
                format!(
                    "index {etcd_index} is behind the {} already seen",
                    wait_index - 1
                ),
            ));
        }
        let body = match answer.read() {
            Ok(bytes) => bytes,
            // No matching event existed up to the wait's index (etcd would
            // have answered at once), so resuming after it is exact, and
            // keeps a quiet watcher inside the 1000-event history window.
            Err(BodyError::Idle) => {
                return Ok(match etcd_index {
                    Some(i) if i > self.after => {
                        self.after = i;
                        Watched::Progress(i)
                    }
                    _ => Watched::Idle,
                });
            }
            Err(BodyError::Cut(detail)) => {
                return Err(EtcdError::new(endpoint, "stream_ended", detail));
            }
        };
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| EtcdError::new(endpoint, "bad_answer", format!("invalid JSON ({e})")))?;
        let event = parse_event(&value).map_err(|d| EtcdError::new(endpoint, "bad_answer", d))?;
        self.after = self.after.max(event.revision);
        Ok(Watched::Events(vec![event]))
    }
}

/// An answer whose head has arrived; the body is read on demand.
struct Answer {
    endpoint: String,
    status: u16,
    etcd_index: Option<Revision>,
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
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| EtcdError::new(endpoint, "unreachable", e.to_string()))?;
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

    /// The whole body, or the error a snapshot or an error answer makes
    /// of a body that did not arrive.
    fn bytes(self) -> Result<Vec<u8>, EtcdError> {
        let endpoint = self.endpoint.clone();
        self.read().map_err(|e| {
            let detail = match e {
                BodyError::Idle => format!("no data for {WATCH_IDLE_TIMEOUT_SECS}s"),
                BodyError::Cut(d) => d,
            };
            EtcdError::new(&endpoint, "unreachable", detail)
        })
    }

    fn json(self) -> Result<Value, EtcdError> {
        let endpoint = self.endpoint.clone();
        let bytes = self.bytes()?;
        serde_json::from_slice(&bytes)
            .map_err(|e| EtcdError::new(&endpoint, "bad_answer", format!("invalid JSON ({e})")))
    }

    fn status_error(self) -> EtcdError {
        let mut body = Vec::new();
        let _ = self.body.into_reader().take(512).read_to_end(&mut body);
        EtcdError::new(
            &self.endpoint,
            "status",
            format!(
                "answered {}: {}",
                self.status,
                String::from_utf8_lossy(&body).trim()
            ),
        )
    }
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

/// The leaves of a recursive snapshot, and whether the directory's key is a
/// plain value. Read straight off the JSON with serde's visitors: as a
/// `serde_json::Value`, 30,000 routes took 20 MB more than their text.
fn snapshot_leaves(body: &[u8]) -> Result<(Vec<Leaf>, bool), serde_json::Error> {
    let mut leaves = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let root_is_dir = SnapshotAnswer(&mut leaves).deserialize(&mut de)?;
    de.end()?;
    Ok((leaves, !root_is_dir))
}

/// `{"action":…,"node":{…}}`: the node's leaves go to the vector; says
/// whether the node is a directory.
struct SnapshotAnswer<'a>(&'a mut Vec<Leaf>);

impl<'de> DeserializeSeed<'de> for SnapshotAnswer<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SnapshotAnswer<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an etcd v2 answer")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut dir = None;
        while let Some(name) = map.next_key::<String>()? {
            if name == "node" {
                dir = Some(map.next_value_seed(Node(&mut *self.0))?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        dir.ok_or_else(|| serde::de::Error::missing_field("node"))
    }
}

/// One node: a leaf is pushed, a directory's `nodes` walked.
struct Node<'a>(&'a mut Vec<Leaf>);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an etcd v2 node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let (mut key, mut value, mut dir) = (None, None, false);
        while let Some(name) = map.next_key::<String>()? {
            match name.as_str() {
                "key" => key = Some(map.next_value::<String>()?),
                "value" => value = Some(map.next_value::<String>()?),
                "dir" => dir = map.next_value::<bool>()?,
                "nodes" => map.next_value_seed(Children(&mut *self.0))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !dir && let Some(key) = key {
            self.0.push(Leaf {
                key,
                value: value.unwrap_or_default(),
            });
        }
        Ok(dir)
    }
}

struct Children<'a>(&'a mut Vec<Leaf>);

impl<'de> DeserializeSeed<'de> for Children<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Children<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of etcd v2 nodes")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Node(&mut *self.0))?.is_some() {}
        Ok(())
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
    let revision = node["modifiedIndex"]
        .as_u64()
        .ok_or_else(|| format!("event without node.modifiedIndex: {}", clip(body)))?;
    let dir = node["dir"].as_bool() == Some(true);
    let change = match action {
        "set" | "create" | "update" | "compareAndSwap" | "get" => {
            if dir {
                Change::Nothing
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
            reason: action.to_string(),
        },
        other => Change::Unknown {
            key,
            action: other.to_string(),
        },
    };
    Ok(Event { change, revision })
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
        assert_eq!(e.revision, 8);
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
                reason: "expire".into()
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
        assert!(matches!(e.change, Change::Nothing));
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
        let (leaves, root_is_leaf) = snapshot_leaves(body.to_string().as_bytes()).unwrap();
        let keys: Vec<_> = leaves.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(
            keys,
            ["/domains/example.com/api", "/domains/other.org/nested/deep"]
        );
        assert!(!root_is_leaf);
        let (leaves, root_is_leaf) =
            snapshot_leaves(br#"{"action":"get","node":{"key":"/domains","value":"oops"}}"#)
                .unwrap();
        assert!(root_is_leaf);
        assert_eq!(leaves[0].value, "oops");
        for bad in [
            &b"{}"[..],
            b"[]",
            b"{\"node\":5}",
            b"{\"node\":{\"nodes\":{}}}",
            b"{\"node\":{}} x",
        ] {
            assert!(
                snapshot_leaves(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn keys_path_is_encoded_per_segment() {
        assert_eq!(EtcdV2::new("/domains").keys_path, "/v2/keys/domains");
        assert_eq!(EtcdV2::new("").keys_path, "/v2/keys/");
        assert_eq!(EtcdV2::new("/a b/c?d").keys_path, "/v2/keys/a%20b/c%3Fd");
    }
}
