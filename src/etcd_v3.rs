//! etcd's v3 API through its JSON gateway ([`crate::etcd::Api`]), with
//! ureq and serde_json rather than a gRPC stack: a paginated range by
//! prefix pinned to one revision, `POST /v3/watch` read as a stream of
//! newline-delimited JSON, and a one-key linearizable range as the probe.
//!
//! The gateway's conventions (`docs/etcd.md`, "v3"): keys and values are
//! standard base64; 64-bit numbers are JSON strings; absent fields mean
//! zero or empty; every watch message is wrapped in `result`; an `error`
//! line ends a stream; `canceled` ends a watch while the HTTP stream stays
//! open.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::etcd::{
    Api, Change, EtcdError, Event, Leaf, PROBE_TIMEOUT_MILLIS, Revision, SNAPSHOT_TIMEOUT_SECS,
    Snapshot, WATCH_IDLE_TIMEOUT_SECS, Watch, Watched, agent, is_timeout,
};

/// Keys per range page: a page of long values stays a few MiB, and the
/// router never holds a huge answer whole.
const PAGE_KEYS: u64 = 1000;
/// Leaves reserved at most from a range's `count` (12 MiB of them).
const MAX_RESERVED_LEAVES: usize = 256 * 1024;
/// One watch message at most: a transaction or a prefix delete puts every
/// event of it in one line.
const MAX_LINE_BYTES: u64 = 64 * 1024 * 1024;
/// One range page at most (etcd's own request limit is 1.5 MiB per value).
const MAX_PAGE_BYTES: u64 = 256 * 1024 * 1024;

/// The v3 API for one directory.
pub struct EtcdV3 {
    /// `<etcdkey>/`: the directory and everything under it, nothing beside
    /// it (`/domains` alone would also match `/domainsX`).
    prefix: Vec<u8>,
    /// The prefix with its last byte plus one: the end of the range.
    range_end: Vec<u8>,
    snapshot_agent: ureq::Agent,
    watch_agent: ureq::Agent,
    probe_agent: ureq::Agent,
}

impl EtcdV3 {
    /// `dir` is the normalised etcd key (`/domains`, or empty for the root).
    pub fn new(dir: &str) -> EtcdV3 {
        let prefix = format!("{dir}/").into_bytes();
        let mut range_end = prefix.clone();
        // The prefix ends in `/`, so the last byte is never 0xFF.
        if let Some(last) = range_end.last_mut() {
            *last += 1;
        }
        EtcdV3 {
            prefix,
            range_end,
            snapshot_agent: agent(Some(Duration::from_secs(SNAPSHOT_TIMEOUT_SECS))),
            watch_agent: agent(None),
            probe_agent: agent(Some(Duration::from_millis(PROBE_TIMEOUT_MILLIS))),
        }
    }

    /// Whether the member serves the v3 gateway: `Ok(None)` when it does
    /// not, else whether any key is under the directory (for
    /// `--etcd-api auto`).
    pub fn detect(&self, endpoint: &str) -> Result<Option<bool>, EtcdError> {
        let body = json!({
            "key": BASE64.encode(&self.prefix),
            "range_end": BASE64.encode(&self.range_end),
            "count_only": true,
        });
        match post(&self.snapshot_agent, endpoint, "/v3/kv/range", &body)? {
            (200, answer) => Ok(Some(number(&answer["count"]) > 0)),
            (404 | 405 | 501, _) => Ok(None),
            (status, answer) => Err(status_error(endpoint, status, &answer)),
        }
    }
}

impl Api for EtcdV3 {
    fn name(&self) -> &'static str {
        "v3"
    }

    /// Pages of [`PAGE_KEYS`], every page after the first pinned to the
    /// first one's revision, so the whole is one consistent view.
    fn snapshot(&self, endpoint: &str) -> Result<Snapshot, EtcdError> {
        let mut leaves = Vec::new();
        let mut start = self.prefix.clone();
        let mut revision: Option<Revision> = None;
        loop {
            let mut body = json!({
                "key": BASE64.encode(&start),
                "range_end": BASE64.encode(&self.range_end),
                "limit": PAGE_KEYS.to_string(),
            });
            if let Some(r) = revision {
                body["revision"] = r.to_string().into();
            }
            let answer = match post(&self.snapshot_agent, endpoint, "/v3/kv/range", &body)? {
                (200, answer) => answer,
                (404 | 405 | 501, _) => return Err(v3_unavailable(endpoint)),
                (status, answer) => return Err(status_error(endpoint, status, &answer)),
            };
            let at = number(&answer["header"]["revision"]);
            if at == 0 {
                return Err(EtcdError::new(
                    endpoint,
                    "bad_answer",
                    "range without a revision",
                ));
            }
            if revision.is_none() {
                // The whole range's size, from the first page: no regrowth.
                // Capped: the count is etcd's word, and a wrong one must not
                // reserve gigabytes (past the cap the vector grows as usual).
                let count = usize::try_from(number(&answer["count"])).unwrap_or(0);
                leaves.reserve_exact(count.min(MAX_RESERVED_LEAVES));
            }
            revision.get_or_insert(at);
            let kvs = answer["kvs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            for kv in kvs {
                let key = decode(&kv["key"]).map_err(|d| bad(endpoint, d))?;
                let value = decode(&kv["value"]).map_err(|d| bad(endpoint, d))?;
                leaves.push(Leaf {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    value: String::from_utf8_lossy(&value).into_owned(),
                });
                start = key;
            }
            if answer["more"].as_bool() != Some(true) || kvs.is_empty() {
                break;
            }
            // The next page starts just after the last key.
            start.push(0);
        }
        Ok(Snapshot {
            revision: revision.unwrap_or_default(),
            leaves,
            root_is_leaf: false,
        })
    }

    fn watch(&self, endpoint: &str, after: Revision) -> Result<Box<dyn Watch>, EtcdError> {
        let body = json!({"create_request": {
            "key": BASE64.encode(&self.prefix),
            "range_end": BASE64.encode(&self.range_end),
            "start_revision": after.saturating_add(1).to_string(),
            "progress_notify": true,
        }});
        let resp = self
            .watch_agent
            .post(format!("{endpoint}/v3/watch"))
            // A member without a leader says so at once instead of
            // accepting the watch and going silent.
            .header("Grpc-Metadata-hasleader", "true")
            .content_type("application/json")
            .send(body.to_string())
            .map_err(|e| EtcdError::new(endpoint, "unreachable", e.to_string()))?;
        let status = resp.status().as_u16();
        let reader = BufReader::new(resp.into_body().into_reader());
        if status != 200 {
            let mut text = Vec::new();
            let _ = reader.take(4096).read_to_end(&mut text);
            let answer = serde_json::from_slice(&text).unwrap_or(Value::Null);
            return Err(match status {
                404 | 405 | 501 => v3_unavailable(endpoint),
                _ => status_error(endpoint, status, &answer),
            });
        }
        let mut stream = Stream {
            reader: Box::new(reader),
            endpoint: endpoint.to_string(),
            after,
            done: false,
        };
        // The first message confirms the watch, at the store's current
        // revision: behind what we have already seen, the store was wiped.
        match stream.message()? {
            Some(result) if result["created"].as_bool() == Some(true) => {
                let now = number(&result["header"]["revision"]);
                if now < after {
                    return Err(EtcdError::new(
                        endpoint,
                        "store_reset",
                        format!("revision {now} is behind the {after} already seen"),
                    ));
                }
            }
            Some(other) => {
                return Err(bad(
                    endpoint,
                    format!("watch not confirmed: {}", clip(&other)),
                ));
            }
            None => return Err(stream.idle_error()),
        }
        Ok(Box::new(stream))
    }

    /// A linearizable read of one key (the directory's own, which routes
    /// never use): a frozen member or one cut off from its leader fails
    /// it within the probe timeout.
    fn probe(&self, endpoint: &str) -> Result<(), EtcdError> {
        let body = json!({"key": BASE64.encode(&self.prefix)});
        match post(&self.probe_agent, endpoint, "/v3/kv/range", &body) {
            Ok((200, _)) => Ok(()),
            Ok((404 | 405 | 501, _)) => Err(v3_unavailable(endpoint)),
            Ok((status, answer)) => Err(status_error(endpoint, status, &answer)),
            Err(e) => Err(EtcdError::new(
                endpoint,
                "unresponsive",
                format!(
                    "no answer to a quorum read within {PROBE_TIMEOUT_MILLIS} ms ({})",
                    e.detail
                ),
            )),
        }
    }
}

/// An open watch stream.
struct Stream {
    reader: Box<dyn BufRead + Send>,
    endpoint: String,
    after: Revision,
    done: bool,
}

/// A stream read ended by the idle timeout: the watch is done, a new one
/// from the same revision loses nothing.
struct IdleRead;

impl Stream {
    /// The next message's `result`; `Ok(None)` on the idle timeout.
    fn message(&mut self) -> Result<Option<Value>, EtcdError> {
        let endpoint = self.endpoint.clone();
        let endpoint = endpoint.as_str();
        loop {
            let line = match self.line() {
                Ok(Some(line)) => line,
                Ok(None) => {
                    return Err(EtcdError::new(
                        endpoint,
                        "stream_ended",
                        "the watch stream ended",
                    ));
                }
                Err(Ok(IdleRead)) => return Ok(None),
                Err(Err(detail)) => return Err(EtcdError::new(endpoint, "stream_ended", detail)),
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let value: Value = serde_json::from_slice(&line)
                .map_err(|e| bad(endpoint, format!("invalid JSON in the watch stream ({e})")))?;
            if let Some(error) = value.get("error") {
                // A member shutting down or losing its leader ends the
                // stream with one of these.
                let text = error["message"].as_str().unwrap_or_default();
                let kind = if text.contains("no leader") {
                    "no_leader"
                } else {
                    "stream_ended"
                };
                return Err(EtcdError::new(
                    endpoint,
                    kind,
                    format!("watch stream error: {}", clip(error)),
                ));
            }
            return match value.get("result") {
                Some(result) => Ok(Some(result.clone())),
                None => Err(bad(
                    endpoint,
                    format!("watch message without a result: {}", clip(&value)),
                )),
            };
        }
    }

    /// One line, its end included or not (the last line of a stream may
    /// lack its newline).
    fn line(&mut self) -> Result<Option<Vec<u8>>, Result<IdleRead, String>> {
        let mut line = Vec::new();
        match (&mut self.reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => Ok(None),
            Ok(_) if line.last() != Some(&b'\n') && line.len() as u64 >= MAX_LINE_BYTES => {
                Err(Err(format!("a watch message over {MAX_LINE_BYTES} bytes")))
            }
            Ok(_) => Ok(Some(line)),
            Err(e) if is_timeout(&e) => Err(Ok(IdleRead)),
            Err(e) => Err(Err(format!("connection cut mid-stream ({e})"))),
        }
    }

    fn idle_error(&self) -> EtcdError {
        EtcdError::new(
            &self.endpoint,
            "unresponsive",
            format!("no answer to a watch within {WATCH_IDLE_TIMEOUT_SECS} s"),
        )
    }
}

impl Watch for Stream {
    fn next(&mut self) -> Result<Watched, EtcdError> {
        if self.done {
            return Ok(Watched::Idle);
        }
        let result = self.read_next();
        if !matches!(result, Ok(Watched::Events(_) | Watched::Progress(_))) {
            self.done = true;
        }
        result
    }
}

impl Stream {
    fn read_next(&mut self) -> Result<Watched, EtcdError> {
        let endpoint = self.endpoint.clone();
        loop {
            let Some(result) = self.message()? else {
                return Ok(Watched::Idle);
            };
            if result["canceled"].as_bool() == Some(true) {
                let compacted = number(&result["compact_revision"]);
                return Err(if compacted > 0 {
                    EtcdError::new(
                        &endpoint,
                        "compacted",
                        format!(
                            "the events from revision {} are compacted (up to {compacted})",
                            self.after.saturating_add(1)
                        ),
                    )
                } else {
                    EtcdError::new(
                        &endpoint,
                        "stream_ended",
                        format!("watch canceled: {}", clip(&result["cancel_reason"])),
                    )
                });
            }
            if let Some(events) = result["events"].as_array().filter(|e| !e.is_empty()) {
                let mut out = Vec::with_capacity(events.len());
                for e in events {
                    out.push(parse_event(e).map_err(|d| bad(&endpoint, d))?);
                }
                self.after = out
                    .iter()
                    .map(|e| e.revision)
                    .fold(self.after, Revision::max);
                return Ok(Watched::Events(out));
            }
            if result["created"].as_bool() == Some(true) {
                continue;
            }
            // A progress notification. Only these say nothing is left
            // before their revision: a catch-up batch of events carries
            // the current revision while more history is still to come.
            let at = number(&result["header"]["revision"]);
            if at > self.after {
                self.after = at;
                return Ok(Watched::Progress(at));
            }
        }
    }
}

/// One event of a watch message.
pub fn parse_event(e: &Value) -> Result<Event, String> {
    let kv = &e["kv"];
    let key = String::from_utf8_lossy(&decode(&kv["key"])?).into_owned();
    if key.is_empty() {
        return Err(format!("watch event without a key: {}", clip(e)));
    }
    let revision = number(&kv["mod_revision"]);
    if revision == 0 {
        return Err(format!("watch event without mod_revision: {}", clip(e)));
    }
    let change = match e["type"].as_str() {
        // Absent means PUT, the enum's zero.
        None | Some("PUT") => Change::Upsert {
            key,
            value: String::from_utf8_lossy(&decode(&kv["value"])?).into_owned(),
        },
        // Deleted, or its lease expired: the same event in v3.
        Some("DELETE") => Change::Remove {
            key,
            dir: false,
            reason: "delete".into(),
        },
        Some(other) => Change::Unknown {
            key,
            action: other.to_string(),
        },
    };
    Ok(Event { change, revision })
}

/// POSTs `body` and reads the JSON answer (an empty object when the body
/// is not JSON, as a gateway's 404 is not).
fn post(
    agent: &ureq::Agent,
    endpoint: &str,
    path: &str,
    body: &Value,
) -> Result<(u16, Value), EtcdError> {
    let resp = agent
        .post(format!("{endpoint}{path}"))
        .content_type("application/json")
        .send(body.to_string())
        .map_err(|e| EtcdError::new(endpoint, "unreachable", e.to_string()))?;
    let status = resp.status().as_u16();
    let mut bytes = Vec::new();
    resp.into_body()
        .into_reader()
        .take(MAX_PAGE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| EtcdError::new(endpoint, "unreachable", format!("answer cut short ({e})")))?;
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        if status == 200 {
            Value::Null
        } else {
            Value::String(String::from_utf8_lossy(&bytes).trim().to_string())
        }
    });
    if status == 200 && !value.is_object() {
        return Err(bad(
            endpoint,
            "an answer that is not a JSON object".to_string(),
        ));
    }
    Ok((status, value))
}

/// A base64 field; absent means empty.
fn decode(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => BASE64
            .decode(s)
            .map_err(|e| format!("bad base64 {:?}: {e}", crate::etcd::clip(s))),
        other => Err(format!(
            "a bytes field that is not a string: {}",
            clip(other)
        )),
    }
}

/// A 64-bit number, which the gateway writes as a string; absent is 0.
fn number(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    }
}

fn v3_unavailable(endpoint: &str) -> EtcdError {
    EtcdError::new(
        endpoint,
        "v3_unavailable",
        "does not serve the v3 JSON gateway (/v3/kv/range not found): use --etcd-api v2",
    )
}

fn status_error(endpoint: &str, status: u16, answer: &Value) -> EtcdError {
    let message = answer["error"]
        .as_str()
        .or(answer["message"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| clip(answer));
    let kind = if message.contains("compacted") {
        "compacted"
    } else if message.contains("no leader") {
        "no_leader"
    } else {
        "status"
    };
    EtcdError::new(endpoint, kind, format!("answered {status}: {message}"))
}

fn bad(endpoint: &str, detail: String) -> EtcdError {
    EtcdError::new(endpoint, "bad_answer", detail)
}

fn clip(v: &Value) -> String {
    crate::etcd::clip(&v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> Stream {
        Stream {
            reader: Box::new(std::io::Cursor::new(json.as_bytes().to_vec())),
            endpoint: "e".into(),
            after: 4,
            done: false,
        }
    }

    #[test]
    fn ranges_cover_the_directory_and_nothing_beside_it() {
        let v3 = EtcdV3::new("/domains");
        assert_eq!(v3.prefix, b"/domains/");
        assert_eq!(v3.range_end, b"/domains0");
        assert_eq!(BASE64.encode(&v3.prefix), "L2RvbWFpbnMv");
        assert_eq!(BASE64.encode(&v3.range_end), "L2RvbWFpbnMw");
        let root = EtcdV3::new("");
        assert_eq!(
            (root.prefix.as_slice(), root.range_end.as_slice()),
            (&b"/"[..], &b"0"[..])
        );
    }

    /// The messages of the measured stream (`docs/etcd.md`, "v3 watch").
    #[test]
    fn watch_messages_from_the_measured_samples() {
        let mut s = line(concat!(
            r#"{"result":{"header":{"revision":"8"},"events":[{"kv":{"key":"L2RvbWFpbnMvZXhhbXBsZS5jb20vYXBp","create_revision":"5","mod_revision":"5","version":"1","value":"aHR0cDovLzEwLjIuMC4z"}},{"kv":{"key":"L2RvbWFpbnMvZXhhbXBsZS5jb20vYXBp","mod_revision":"6","version":"2","value":"aHR0cDovLzEwLjIuMC40"}}]}}"#,
            "\n",
            r#"{"result":{"header":{"revision":"10"},"events":[{"type":"DELETE","kv":{"key":"L2RvbWFpbnMvbGl2ZS5jb20vcg==","mod_revision":"10"}}]}}"#,
            "\n",
            r#"{"result":{"header":{"revision":"11"},"events":[{"kv":{"key":"L2RvbWFpbnMvZW1wdHkuY29tL3I=","create_revision":"11","mod_revision":"11","version":"1"}}]}}"#,
            "\n",
            r#"{"result":{"header":{"revision":"13","raft_term":"2"}}}"#,
            "\n",
            r#"{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing","http_status":"Service Unavailable"}}"#,
        ));
        let Ok(Watched::Events(batch)) = s.next() else {
            panic!("events")
        };
        assert_eq!(batch.len(), 2, "one message, two events");
        assert_eq!(
            batch[1],
            Event {
                change: Change::Upsert {
                    key: "/domains/example.com/api".into(),
                    value: "http://10.2.0.4".into()
                },
                revision: 6
            }
        );
        let Ok(Watched::Events(batch)) = s.next() else {
            panic!("delete")
        };
        assert_eq!(
            batch[0].change,
            Change::Remove {
                key: "/domains/live.com/r".into(),
                dir: false,
                reason: "delete".into()
            }
        );
        let Ok(Watched::Events(batch)) = s.next() else {
            panic!("empty value")
        };
        assert_eq!(
            batch[0].change,
            Change::Upsert {
                key: "/domains/empty.com/r".into(),
                value: String::new()
            }
        );
        assert_eq!(s.next(), Ok(Watched::Progress(13)));
        let end = s.next().unwrap_err();
        assert_eq!(end.kind, "stream_ended");
        assert_eq!(s.next(), Ok(Watched::Idle), "done after an error");
    }

    #[test]
    fn cancel_compaction_and_no_leader_are_told_apart() {
        let mut s = line(
            r#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"9"}}"#,
        );
        let e = s.next().unwrap_err();
        assert_eq!(
            (e.kind, e.recovery),
            ("compacted", crate::etcd::Recovery::Resync)
        );
        let mut s = line(
            r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#,
        );
        assert_eq!(s.next().unwrap_err().kind, "no_leader");
        let mut s = line("");
        assert_eq!(s.next().unwrap_err().kind, "stream_ended");
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for body in [
            "not json",
            "[]",
            r#"{"x":1}"#,
            r#"{"result":{"events":[{"kv":{"key":"!!!","mod_revision":"3"}}]}}"#,
            r#"{"result":{"events":[{"kv":{"key":"L2E=","mod_revision":"x"}}]}}"#,
            r#"{"result":{"events":[{"kv":{"key":5,"mod_revision":"3"}}]}}"#,
            r#"{"result":{"events":[{"kv":{"mod_revision":"3"}}]}}"#,
        ] {
            assert!(line(body).next().is_err(), "{body}");
        }
    }

    #[test]
    fn numbers_are_strings_and_absent_is_zero() {
        assert_eq!(number(&json!("18446744073709551615")), u64::MAX);
        assert_eq!(number(&json!(7)), 7);
        assert_eq!(number(&Value::Null), 0);
        assert_eq!(decode(&Value::Null).unwrap(), b"");
    }
}
