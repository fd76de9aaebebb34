//! Route discovery: the one thread that follows etcd and publishes route
//! tables.
//!
//! Contract: keys `<etcdkey>/<domain>/<route-name>` hold a backend URL.
//! Everything else under `<etcdkey>` is skipped with a `route.error` event;
//! segments starting with `_` are etcd's hidden keys and are ignored
//! silently (a live watch never shows them but a history replay does, so
//! honouring them would make routes flicker).
//!
//! The loop: snapshot, then long-poll from the snapshot's index, applying
//! each change and publishing a whole new [`RouteTable`]. On any error the
//! last table keeps serving; the loop backs off (capped at
//! [`BACKOFF_MAX_MILLIS`]), moves to the next endpoint and resumes from the
//! same index, so no change made during the gap is lost. When resuming is
//! impossible (history cleared, store wiped) it takes a fresh snapshot and
//! logs the difference. Nothing here knows about HTTP serving, and nothing
//! from etcd can panic it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::etcd_v2::{Change, EtcdV2, Snapshot, WaitOutcome, WatchIndex};
use crate::log::Logger;
use crate::routes::{Backend, RouteTable, SharedTable, normalise_host};

pub const BACKOFF_MIN_MILLIS: u64 = 100;
pub const BACKOFF_MAX_MILLIS: u64 = 5_000;

/// One route as discovery knows it.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    domain: String,
    backend: Arc<Backend>,
}

/// Every valid route, by etcd key. Owned by the discovery thread.
#[derive(Debug, Default)]
pub struct RouteSet {
    /// `<etcdkey>` as configured (`/domains`, or empty for the root).
    prefix: String,
    routes: BTreeMap<String, Route>,
}

/// What a key under `<etcdkey>` is.
#[derive(Debug, PartialEq)]
enum KeyShape<'a> {
    Route { domain: &'a str },
    Hidden,
    Other,
}

impl RouteSet {
    pub fn new(prefix: &str) -> RouteSet {
        RouteSet {
            prefix: prefix.to_string(),
            routes: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn shape<'a>(&self, key: &'a str) -> KeyShape<'a> {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return KeyShape::Other;
        };
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.iter().any(|s| s.starts_with('_')) {
            return KeyShape::Hidden;
        }
        match segments.as_slice() {
            [domain, name] if !domain.is_empty() && !name.is_empty() => KeyShape::Route { domain },
            _ => KeyShape::Other,
        }
    }

    /// Applies one change, logging what it did. Returns true when the set of
    /// routes changed (a new table is needed).
    pub fn apply(&mut self, change: &Change, log: &Logger) -> bool {
        match change {
            Change::Upsert { key, value } => self.upsert(key, value, log),
            Change::DirCreated { .. } => false,
            Change::Remove { key, dir, action } => {
                if *dir {
                    self.remove_dir(key, action, log)
                } else {
                    self.remove(key, action, log)
                }
            }
            Change::Unknown { key, action } => {
                log.event(
                    "etcd.error",
                    json!({"error": "unknown watch action, skipped", "action": action, "key": key}),
                );
                false
            }
        }
    }

    /// The route `key = value` names: `Ok(None)` for a hidden key, `Err`
    /// with the reason for anything unusable.
    fn parse_route(&self, key: &str, value: &str) -> Result<Option<Route>, String> {
        match self.shape(key) {
            KeyShape::Hidden => Ok(None),
            KeyShape::Other => Err(format!(
                "key is not of the form {}/<domain>/<route-name>",
                self.prefix
            )),
            KeyShape::Route { domain } => {
                let domain = normalise_host(domain)
                    .ok_or_else(|| format!("'{domain}' is not a valid host name"))?;
                let backend = Backend::parse(key, value)
                    .map_err(|e| format!("value is not a usable backend URL: {e}"))?;
                Ok(Some(Route {
                    domain,
                    backend: Arc::new(backend),
                }))
            }
        }
    }

    fn upsert(&mut self, key: &str, value: &str, log: &Logger) -> bool {
        let parsed = match self.parse_route(key, value) {
            Ok(None) => return false,
            Ok(Some(route)) => Ok(route),
            Err(e) => Err(e),
        };
        match parsed {
            Ok(route) => {
                let previous = self.routes.insert(key.to_string(), route.clone());
                match previous {
                    None => {
                        log.event(
                            "route.add",
                            json!({"key": key, "domain": route.domain, "url": route.backend.url}),
                        );
                        true
                    }
                    Some(old) if old == route => false,
                    Some(old) => {
                        log.event(
                            "route.change",
                            json!({"key": key, "domain": route.domain,
                                   "url": route.backend.url, "previous_url": old.backend.url}),
                        );
                        true
                    }
                }
            }
            Err(error) => {
                log.event(
                    "route.error",
                    json!({"key": key, "value": clip(value), "error": error}),
                );
                // The key no longer names a usable backend: stop sending
                // traffic to what it named before.
                self.remove(key, "invalid", log)
            }
        }
    }

    fn remove(&mut self, key: &str, reason: &str, log: &Logger) -> bool {
        match self.routes.remove(key) {
            Some(old) => {
                log.event(
                    "route.remove",
                    json!({"key": key, "domain": old.domain, "url": old.backend.url, "reason": reason}),
                );
                true
            }
            None => false,
        }
    }

    /// A directory delete/expire arrives as one event for the whole subtree.
    fn remove_dir(&mut self, dir: &str, reason: &str, log: &Logger) -> bool {
        let dir = dir.trim_end_matches('/');
        let under = format!("{dir}/");
        let doomed: Vec<String> = self
            .routes
            .range(under.clone()..)
            .take_while(|(k, _)| k.starts_with(&under))
            .map(|(k, _)| k.clone())
            .collect();
        let mut changed = false;
        for key in doomed {
            changed |= self.remove(&key, reason, log);
        }
        changed
    }

    /// Replaces everything with a snapshot, logging the difference as
    /// add/change/remove events.
    pub fn replace(&mut self, snapshot: &Snapshot, log: &Logger) -> bool {
        if snapshot.root_is_leaf {
            log.event(
                "route.error",
                json!({"key": self.prefix, "error": "the etcd key is a value, not a directory: no routes"}),
            );
        }
        let mut next: BTreeMap<String, Route> = BTreeMap::new();
        for leaf in snapshot.leaves.iter().filter(|_| !snapshot.root_is_leaf) {
            match self.parse_route(&leaf.key, &leaf.value) {
                Ok(Some(route)) => {
                    next.insert(leaf.key.clone(), route);
                }
                Ok(None) => {}
                Err(error) => log.event(
                    "route.error",
                    json!({"key": leaf.key, "value": clip(&leaf.value), "error": error}),
                ),
            }
        }
        let mut changed = false;
        for (key, old) in &self.routes {
            if !next.contains_key(key) {
                log.event(
                    "route.remove",
                    json!({"key": key, "domain": old.domain, "url": old.backend.url, "reason": "resync"}),
                );
                changed = true;
            }
        }
        for (key, new) in &next {
            match self.routes.get(key) {
                None => {
                    log.event(
                        "route.add",
                        json!({"key": key, "domain": new.domain, "url": new.backend.url}),
                    );
                    changed = true;
                }
                Some(old) if old != new => {
                    log.event(
                        "route.change",
                        json!({"key": key, "domain": new.domain,
                               "url": new.backend.url, "previous_url": old.backend.url}),
                    );
                    changed = true;
                }
                Some(_) => {}
            }
        }
        self.routes = next;
        changed
    }

    pub fn table(&self, previous: &RouteTable) -> RouteTable {
        RouteTable::build(
            self.routes
                .values()
                .map(|r| (r.domain.as_str(), Arc::clone(&r.backend))),
            previous,
        )
    }
}

fn clip(value: &str) -> String {
    const MAX: usize = 256;
    if value.len() <= MAX {
        return value.to_string();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

/// Capped exponential backoff.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(BACKOFF_MIN_MILLIS),
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(BACKOFF_MIN_MILLIS);
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_millis(BACKOFF_MAX_MILLIS));
        now
    }
}

/// The discovery thread's state machine.
pub struct Discovery {
    client: EtcdV2,
    routes: RouteSet,
    table: Arc<SharedTable>,
    log: Logger,
    stop: Arc<AtomicBool>,
}

enum State {
    NeedSnapshot,
    Watching { last: WatchIndex },
}

impl Discovery {
    pub fn new(
        endpoints: Vec<String>,
        etcd_key: &str,
        table: Arc<SharedTable>,
        log: Logger,
        stop: Arc<AtomicBool>,
    ) -> Discovery {
        Discovery {
            client: EtcdV2::new(endpoints, etcd_key),
            routes: RouteSet::new(etcd_key),
            table,
            log,
            stop,
        }
    }

    fn publish(&self) {
        let previous = self.table.load();
        self.table.store(self.routes.table(&previous));
    }

    /// Runs until `stop` is set (checked between etcd calls; an idle wait
    /// can hold the thread for up to the watch idle timeout, so the caller
    /// does not join it).
    pub fn run(mut self) {
        let mut state = State::NeedSnapshot;
        let mut backoff = Backoff::new();
        while !self.stop.load(Ordering::Relaxed) {
            state = match state {
                State::NeedSnapshot => match self.client.snapshot() {
                    Ok(snapshot) => {
                        if self.routes.replace(&snapshot, &self.log) {
                            self.publish();
                        }
                        self.log.event(
                            "etcd.listen",
                            json!({"endpoint": self.client.endpoint(), "index": snapshot.index,
                                   "routes": self.routes.len()}),
                        );
                        backoff.reset();
                        State::Watching {
                            last: snapshot.index,
                        }
                    }
                    Err(e) => {
                        self.fail(&e, &mut backoff, None);
                        State::NeedSnapshot
                    }
                },
                State::Watching { last } => match self.client.wait(last.saturating_add(1)) {
                    Ok(WaitOutcome::Event(event)) => {
                        backoff.reset();
                        if self.routes.apply(&event.change, &self.log) {
                            self.publish();
                        }
                        State::Watching {
                            last: last.max(event.modified_index),
                        }
                    }
                    Ok(WaitOutcome::Idle { etcd_index }) => {
                        // A member that lost its cluster still answers a new
                        // wait, then stays silent: moving on after every
                        // quiet period keeps one from holding us forever.
                        self.client.rotate();
                        State::Watching {
                            last: last.max(etcd_index.unwrap_or(last)),
                        }
                    }
                    Ok(WaitOutcome::HistoryCleared { detail }) => {
                        self.log.event(
                            "etcd.resync",
                            json!({"endpoint": self.client.endpoint(), "reason": "history_cleared",
                                   "wait_index": last.saturating_add(1), "detail": detail}),
                        );
                        State::NeedSnapshot
                    }
                    Ok(WaitOutcome::StoreReset {
                        etcd_index,
                        wait_index,
                    }) => {
                        self.log.event(
                            "etcd.resync",
                            json!({"endpoint": self.client.endpoint(), "reason": "index_went_backwards",
                                   "etcd_index": etcd_index, "wait_index": wait_index}),
                        );
                        State::NeedSnapshot
                    }
                    Err(e) => {
                        self.fail(&e, &mut backoff, Some(last.saturating_add(1)));
                        State::Watching { last }
                    }
                },
            };
        }
    }

    fn fail(
        &mut self,
        e: &crate::etcd_v2::EtcdError,
        backoff: &mut Backoff,
        wait_index: Option<WatchIndex>,
    ) {
        let delay = backoff.step();
        self.log.event(
            "etcd.error",
            json!({"endpoint": e.endpoint(), "kind": e.kind(), "error": e.to_string(),
                   "wait_index": wait_index, "retry_in_ms": delay.as_millis() as u64,
                   "routes": self.routes.len()}),
        );
        self.client.rotate();
        sleep_unless_stopped(delay, &self.stop);
    }
}

fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut slept = Duration::ZERO;
    while slept < total && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(step.min(total - slept));
        slept += step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_v2::Leaf;

    fn upsert(key: &str, value: &str) -> Change {
        Change::Upsert {
            key: key.into(),
            value: value.into(),
        }
    }

    fn remove(key: &str, dir: bool) -> Change {
        Change::Remove {
            key: key.into(),
            dir,
            action: "delete".into(),
        }
    }

    fn hosts(set: &RouteSet) -> Vec<(String, String)> {
        set.routes
            .iter()
            .map(|(k, r)| (k.clone(), r.domain.clone()))
            .collect()
    }

    #[test]
    fn key_shapes() {
        let set = RouteSet::new("/domains");
        assert_eq!(
            set.shape("/domains/a.com/web"),
            KeyShape::Route { domain: "a.com" }
        );
        assert_eq!(set.shape("/domains/a.com/_hidden"), KeyShape::Hidden);
        assert_eq!(set.shape("/domains/_a.com/web"), KeyShape::Hidden);
        assert_eq!(set.shape("/domains/a.com"), KeyShape::Other);
        assert_eq!(set.shape("/domains/a.com/x/y"), KeyShape::Other);
        assert_eq!(set.shape("/domainsX/a.com/web"), KeyShape::Other);
        assert_eq!(set.shape("/domains"), KeyShape::Other);
        let root = RouteSet::new("");
        assert_eq!(
            root.shape("/a.com/web"),
            KeyShape::Route { domain: "a.com" }
        );
    }

    #[test]
    fn upsert_change_remove() {
        let log = Logger::discard();
        let mut set = RouteSet::new("/domains");
        assert!(set.apply(&upsert("/domains/A.com./web", "http://127.0.0.1:1"), &log));
        assert_eq!(
            hosts(&set),
            [("/domains/A.com./web".into(), "a.com".into())]
        );
        // Same value again (a TTL renewal with set): nothing changes.
        assert!(!set.apply(&upsert("/domains/A.com./web", "http://127.0.0.1:1"), &log));
        assert!(set.apply(&upsert("/domains/A.com./web", "http://127.0.0.1:2"), &log));
        assert!(set.apply(&remove("/domains/A.com./web", false), &log));
        assert!(set.is_empty());
        assert!(!set.apply(&remove("/domains/A.com./web", false), &log));
    }

    #[test]
    fn bad_values_and_keys_are_skipped_and_remove_the_old_route() {
        let log = Logger::discard();
        let mut set = RouteSet::new("/domains");
        assert!(!set.apply(&upsert("/domains/a.com", "http://127.0.0.1:1"), &log));
        assert!(!set.apply(&upsert("/domains/a.com/x/y", "http://127.0.0.1:1"), &log));
        assert!(!set.apply(&upsert("/domains/sp ace.com/r", "http://127.0.0.1:1"), &log));
        assert!(!set.apply(&upsert("/domains/a.com/_h", "http://127.0.0.1:1"), &log));
        assert!(set.is_empty());
        set.apply(&upsert("/domains/a.com/r", "http://127.0.0.1:1"), &log);
        assert!(set.apply(&upsert("/domains/a.com/r", "garbage"), &log));
        assert!(set.is_empty());
    }

    #[test]
    fn directory_removal_removes_the_subtree_only() {
        let log = Logger::discard();
        let mut set = RouteSet::new("/domains");
        for key in [
            "/domains/a.com/1",
            "/domains/a.com/2",
            "/domains/a.com.evil/1",
            "/domains/b.com/1",
        ] {
            set.apply(&upsert(key, "http://127.0.0.1:1"), &log);
        }
        assert!(set.apply(&remove("/domains/a.com", true), &log));
        let keys: Vec<_> = set.routes.keys().cloned().collect();
        assert_eq!(keys, ["/domains/a.com.evil/1", "/domains/b.com/1"]);
        assert!(set.apply(&remove("/domains", true), &log));
        assert!(set.is_empty());
    }

    #[test]
    fn snapshot_replaces_and_reports_the_difference() {
        let log = Logger::discard();
        let mut set = RouteSet::new("/domains");
        set.apply(&upsert("/domains/a.com/1", "http://127.0.0.1:1"), &log);
        set.apply(&upsert("/domains/a.com/2", "http://127.0.0.1:2"), &log);
        let snap = Snapshot {
            index: 10,
            leaves: vec![
                Leaf {
                    key: "/domains/a.com/2".into(),
                    value: "http://127.0.0.1:2".into(),
                },
                Leaf {
                    key: "/domains/b.com/1".into(),
                    value: "http://127.0.0.1:3".into(),
                },
                Leaf {
                    key: "/domains/bad".into(),
                    value: "http://127.0.0.1:3".into(),
                },
            ],
            root_is_leaf: false,
        };
        assert!(set.replace(&snap, &log));
        let keys: Vec<_> = set.routes.keys().cloned().collect();
        assert_eq!(keys, ["/domains/a.com/2", "/domains/b.com/1"]);
        assert!(!set.replace(&snap, &log));
    }

    #[test]
    fn backoff_is_capped() {
        let mut b = Backoff::new();
        let steps: Vec<u64> = (0..10).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps[0], BACKOFF_MIN_MILLIS);
        assert!(steps.iter().all(|&s| s <= BACKOFF_MAX_MILLIS));
        assert_eq!(*steps.last().unwrap(), BACKOFF_MAX_MILLIS);
    }
}
