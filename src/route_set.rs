//! Every valid route by etcd key, as discovery knows them, and the one
//! diff both a snapshot and a watch event produce: what was added,
//! removed, changed or rejected, for the log and for the domains the
//! route table must rebuild.
//!
//! Contract: keys `<etcdkey>/<domain>/<route-name>` hold a backend URL.
//! Everything else under `<etcdkey>` is rejected with a reason; segments
//! starting with `_` are etcd's hidden keys and are ignored silently (a
//! live v2 watch never shows them but a history replay does, so honouring
//! them would make routes flicker).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::etcd::{Change, Digest, Leaf, Revision, clip};
use crate::event::{Event, Kind};
use crate::log::Logger;
use crate::routes::{Backend, RouteTable, normalise_host};

/// Diffs larger than this are logged as `route.bulk` lines of up to
/// [`BULK_LINE_ITEMS`] changes each instead of a line per change: a
/// 30,000-route snapshot is 60 lines, and still says what changed.
pub const ITEMISED_DIFF_MAX: usize = 100;
pub const BULK_LINE_ITEMS: usize = 500;

/// One route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Normalised (see [`normalise_host`]); shared by the domain's routes.
    pub domain: Arc<str>,
    pub backend: Arc<Backend>,
}

/// What one snapshot or one batch of events changed.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<Route>,
    /// With the reason (`delete`, `expire`, `invalid`, `resync`, …).
    pub removed: Vec<(Route, String)>,
    /// Old, new.
    pub changed: Vec<(Route, Route)>,
    /// Key, value (clipped), why it is not a route.
    pub rejected: Vec<(String, String, String)>,
    /// Key, action: v2 actions this router does not know.
    pub unknown: Vec<(String, String)>,
}

impl Diff {
    /// Changes to the routes (rejections and unknown actions aside).
    pub fn changes(&self) -> usize {
        self.added.len() + self.removed.len() + self.changed.len()
    }

    /// The domains whose backends changed.
    pub fn domains(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        out.extend(self.added.iter().map(|r| &*r.domain));
        out.extend(self.removed.iter().map(|(r, _)| &*r.domain));
        for (old, new) in &self.changed {
            out.insert(&*old.domain);
            out.insert(&*new.domain);
        }
        out
    }

    /// Logs the diff through `log`'s audit queue (never dropped): a line
    /// per change when small, `route.bulk` lines when large.
    pub fn log(&self, log: &Logger, revision: Option<Revision>) {
        let items = self.changes() + self.rejected.len() + self.unknown.len();
        if items <= ITEMISED_DIFF_MAX {
            self.log_itemised(log);
            return;
        }
        // Written as text item by item, a line at a time: as JSON values
        // the 30,000 items of a large snapshot took 10 MB.
        let items = self
            .added
            .iter()
            .map(|r| ("add", r, None, ""))
            .chain(
                self.removed
                    .iter()
                    .map(|(r, why)| ("remove", r, None, why.as_str())),
            )
            .chain(
                self.changed
                    .iter()
                    .map(|(old, new)| ("change", new, Some(old), "")),
            );
        let total = self.changes() + self.rejected.len() + self.unknown.len();
        let parts = total.div_ceil(BULK_LINE_ITEMS);
        let mut line = Bulk {
            log,
            header: format!(
                "\"revision\":{},\"parts\":{parts},\"added\":{},\"removed\":{},\"changed\":{},\"rejected\":{}",
                revision.map_or("null".to_string(), |r| r.to_string()),
                self.added.len(),
                self.removed.len(),
                self.changed.len(),
                self.rejected.len()
            ),
            text: String::new(),
            count: 0,
            part: 0,
        };
        for (what, route, old, why) in items {
            let mut fields = vec![what, &route.backend.key, &route.backend.url];
            if let Some(old) = old {
                fields.push(&old.backend.url);
            }
            if !why.is_empty() {
                fields.push(why);
            }
            line.item(&fields);
        }
        for (key, value, why) in &self.rejected {
            line.item(&["error", key, value, why]);
        }
        for (key, action) in &self.unknown {
            line.item(&["unknown", key, action]);
        }
        line.flush();
    }

    fn log_itemised(&self, log: &Logger) {
        for (key, value, error) in &self.rejected {
            log.emit(Event::RouteError {
                key: key.clone(),
                value: value.clone(),
                error: error.to_string(),
            });
        }
        for (key, action) in &self.unknown {
            log.emit(Event::EtcdError {
                endpoint: None,
                kind: "unknown_action",
                error: "unknown watch action, skipped".into(),
                revision: None,
                wait_index: None,
                retry_in_ms: None,
                routes: None,
                action: Some(action.to_string()),
                key: Some(key.to_string()),
            });
        }
        for (r, reason) in &self.removed {
            log.emit(Event::RouteRemove {
                key: r.backend.key.clone(),
                domain: r.domain.to_string(),
                url: r.backend.url.clone(),
                reason: reason.to_string(),
            });
        }
        for (old, new) in &self.changed {
            log.emit(Event::RouteChange {
                key: new.backend.key.clone(),
                domain: new.domain.to_string(),
                url: new.backend.url.clone(),
                previous_url: old.backend.url.clone(),
            });
        }
        for r in &self.added {
            log.emit(Event::RouteAdd {
                key: r.backend.key.clone(),
                domain: r.domain.to_string(),
                url: r.backend.url.clone(),
            });
        }
    }
}

/// `route.bulk` lines being written: items are `["add", key, url]`,
/// `["remove", key, url, reason]`, `["change", key, url, previous_url]`,
/// `["error", key, value, why]`, `["unknown", key, action]`.
struct Bulk<'a> {
    log: &'a Logger,
    header: String,
    text: String,
    count: usize,
    part: usize,
}

impl Bulk<'_> {
    fn item(&mut self, fields: &[&str]) {
        self.text.push(if self.count == 0 { '[' } else { ',' });
        self.text.push('[');
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            crate::log::push_json_str(&mut self.text, f);
        }
        self.text.push(']');
        self.count += 1;
        if self.count == BULK_LINE_ITEMS {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        self.part += 1;
        let text = std::mem::take(&mut self.text);
        self.log.audit_raw(
            Kind::RouteBulk,
            format!("{},\"part\":{},\"items\":{text}]", self.header, self.part),
        );
        self.count = 0;
    }
}

/// Every valid route, by etcd key. Owned by the discovery thread.
#[derive(Debug, Default)]
pub struct RouteSet {
    /// `<etcdkey>` as configured (`/domains`, or empty for the root).
    prefix: String,
    routes: BTreeMap<String, Route>,
    /// Each domain's backends in key order, so a change rebuilds one
    /// domain.
    by_domain: HashMap<Arc<str>, Vec<Arc<Backend>>>,
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
            ..RouteSet::default()
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn domains(&self) -> usize {
        self.by_domain.len()
    }

    /// Every route as `(key, url)`, in key order (for the state file).
    pub fn leaves(&self) -> impl Iterator<Item = (&str, &str)> {
        self.routes
            .iter()
            .map(|(k, r)| (k.as_str(), r.backend.url.as_str()))
    }

    /// The same on every router holding the same routes: FNV-1a over
    /// `key NUL url LF` in key order.
    pub fn digest(&self) -> String {
        let mut d = Digest::default();
        for (key, url) in self.leaves() {
            d.add(key.as_bytes());
            d.add(b"\0");
            d.add(url.as_bytes());
            d.add(b"\n");
        }
        d.hex()
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

    /// The route `key = value` names: `Ok(None)` for a hidden key, `Err`
    /// with the reason for anything unusable (and the value, clipped).
    fn parse_route(&self, key: &str, value: String) -> Result<Option<Route>, (String, String)> {
        match self.shape(key) {
            KeyShape::Hidden => Ok(None),
            KeyShape::Other => Err((
                format!(
                    "key is not of the form {}/<domain>/<route-name>",
                    self.prefix
                ),
                clip(&value),
            )),
            KeyShape::Route { domain } => {
                let Some(domain) = normalise_host(domain) else {
                    return Err((format!("'{domain}' is not a valid host name"), clip(&value)));
                };
                let backend =
                    Backend::from_owned(key.to_string(), value).map_err(|(e, value)| {
                        (
                            format!("value is not a usable backend URL: {e}"),
                            clip(&value),
                        )
                    })?;
                // The domain's other routes already hold its name.
                let domain = match self.by_domain.get_key_value(domain.as_str()) {
                    Some((name, _)) => Arc::clone(name),
                    None => Arc::from(domain),
                };
                Ok(Some(Route {
                    domain,
                    backend: Arc::new(backend),
                }))
            }
        }
    }

    /// The one place the set changes: `key` becomes `route` (or goes),
    /// and `diff` records it.
    fn set(&mut self, key: &str, route: Option<Route>, reason: &str, diff: &mut Diff) {
        let old = match &route {
            Some(r) => self.routes.insert(key.to_string(), r.clone()),
            None => self.routes.remove(key),
        };
        if let Some(old) = &old
            && let Some(backends) = self.by_domain.get_mut(&old.domain)
        {
            backends.retain(|b| b.key != key);
            if backends.is_empty() {
                self.by_domain.remove(&old.domain);
            }
        }
        if let Some(r) = &route {
            let backends = self.by_domain.entry(Arc::clone(&r.domain)).or_default();
            let at = backends.partition_point(|b| b.key.as_str() < key);
            backends.insert(at, Arc::clone(&r.backend));
        }
        match (old, route) {
            (None, Some(new)) => diff.added.push(new),
            (Some(old), None) => diff.removed.push((old, reason.to_string())),
            (Some(old), Some(new)) if old != new => diff.changed.push((old, new)),
            _ => {}
        }
    }

    /// `key = value` from etcd: a route, or a rejection that also removes
    /// what the key named before (it no longer names a usable backend).
    fn upsert(&mut self, key: &str, value: String, diff: &mut Diff) {
        match self.parse_route(key, value) {
            Ok(None) => {}
            Ok(Some(route)) => self.set(key, Some(route), "", diff),
            Err((error, clipped)) => {
                diff.rejected.push((key.to_string(), clipped, error));
                self.set(key, None, "invalid", diff);
            }
        }
    }

    /// Applies one change from a watch.
    pub fn apply(&mut self, change: &Change, diff: &mut Diff) {
        match change {
            Change::Upsert { key, value } => self.upsert(key, value.clone(), diff),
            Change::Nothing => {}
            Change::Remove { key, dir, reason } => {
                if *dir {
                    // One event for the whole subtree.
                    let under = format!("{}/", key.trim_end_matches('/'));
                    let doomed: Vec<String> = self
                        .routes
                        .range(under.clone()..)
                        .take_while(|(k, _)| k.starts_with(&under))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        self.set(&k, None, reason, diff);
                    }
                } else {
                    self.set(key, None, reason, diff);
                }
            }
            Change::Unknown { key, action } => diff.unknown.push((key.clone(), action.clone())),
        }
    }

    /// Makes the set what a snapshot says (`reason` for what it removes:
    /// `resync`, `anti_entropy`, `state_file`).
    pub fn replace(&mut self, mut leaves: Vec<Leaf>, root_is_leaf: bool, reason: &str) -> Diff {
        let mut diff = Diff::default();
        if root_is_leaf {
            diff.rejected.push((
                self.prefix.clone(),
                String::new(),
                "the etcd key is a value, not a directory: no routes".into(),
            ));
        }
        if root_is_leaf {
            leaves.clear();
        }
        if self.routes.is_empty() {
            diff.added.reserve_exact(leaves.len());
        }
        // Sorted (v3 ranges are already; v2 lists children in random
        // order), the keys that are gone are found without another set.
        leaves.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let gone: Vec<String> = self
            .routes
            .keys()
            .filter(|k| {
                leaves
                    .binary_search_by(|l| l.key.as_str().cmp(k.as_str()))
                    .is_err()
            })
            .cloned()
            .collect();
        for key in gone {
            self.set(&key, None, reason, &mut diff);
        }
        for Leaf { key, value } in leaves {
            self.upsert(&key, value, &mut diff);
        }
        diff
    }

    /// The table after `diff`: only the domains it touched are rebuilt.
    pub fn table(&self, previous: &RouteTable, diff: &Diff) -> RouteTable {
        let updates = diff.domains().into_iter().map(|domain| {
            let backends = self.by_domain.get(domain).cloned().unwrap_or_default();
            (domain.to_string(), backends)
        });
        previous.update(updates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            reason: "delete".into(),
        }
    }

    fn apply(set: &mut RouteSet, change: &Change) -> Diff {
        let mut diff = Diff::default();
        set.apply(change, &mut diff);
        diff
    }

    fn hosts(set: &RouteSet) -> Vec<(String, String)> {
        set.routes
            .iter()
            .map(|(k, r)| (k.clone(), r.domain.to_string()))
            .collect()
    }

    fn leaf(key: &str, value: &str) -> Leaf {
        Leaf {
            key: key.into(),
            value: value.into(),
        }
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
        let mut set = RouteSet::new("/domains");
        let d = apply(
            &mut set,
            &upsert("/domains/A.com./web", "http://127.0.0.1:1"),
        );
        assert_eq!(d.added.len(), 1);
        assert_eq!(
            hosts(&set),
            [("/domains/A.com./web".into(), "a.com".into())]
        );
        // Same value again (a TTL renewal with set): nothing changes.
        let d = apply(
            &mut set,
            &upsert("/domains/A.com./web", "http://127.0.0.1:1"),
        );
        assert_eq!(d.changes(), 0);
        let d = apply(
            &mut set,
            &upsert("/domains/A.com./web", "http://127.0.0.1:2"),
        );
        assert_eq!(d.changed.len(), 1);
        let d = apply(&mut set, &remove("/domains/A.com./web", false));
        assert_eq!(d.removed.len(), 1);
        assert!(set.is_empty() && set.domains() == 0);
        assert_eq!(
            apply(&mut set, &remove("/domains/A.com./web", false)).changes(),
            0
        );
    }

    #[test]
    fn bad_values_and_keys_are_rejected_and_remove_the_old_route() {
        let mut set = RouteSet::new("/domains");
        for (key, value) in [
            ("/domains/a.com", "http://127.0.0.1:1"),
            ("/domains/a.com/x/y", "http://127.0.0.1:1"),
            ("/domains/sp ace.com/r", "http://127.0.0.1:1"),
        ] {
            let d = apply(&mut set, &upsert(key, value));
            assert_eq!((d.changes(), d.rejected.len()), (0, 1), "{key}");
        }
        let d = apply(&mut set, &upsert("/domains/a.com/_h", "http://127.0.0.1:1"));
        assert_eq!((d.changes(), d.rejected.len()), (0, 0), "hidden: silent");
        assert!(set.is_empty());
        apply(&mut set, &upsert("/domains/a.com/r", "http://127.0.0.1:1"));
        let d = apply(&mut set, &upsert("/domains/a.com/r", "garbage"));
        assert_eq!((d.removed.len(), d.removed[0].1.as_str()), (1, "invalid"));
        assert!(set.is_empty());
    }

    #[test]
    fn directory_removal_removes_the_subtree_only() {
        let mut set = RouteSet::new("/domains");
        for key in [
            "/domains/a.com/1",
            "/domains/a.com/2",
            "/domains/a.com.evil/1",
            "/domains/b.com/1",
        ] {
            apply(&mut set, &upsert(key, "http://127.0.0.1:1"));
        }
        assert_eq!(
            apply(&mut set, &remove("/domains/a.com", true))
                .removed
                .len(),
            2
        );
        let keys: Vec<_> = set.routes.keys().cloned().collect();
        assert_eq!(keys, ["/domains/a.com.evil/1", "/domains/b.com/1"]);
        assert_eq!(apply(&mut set, &remove("/domains", true)).removed.len(), 2);
        assert!(set.is_empty());
    }

    #[test]
    fn snapshot_and_events_make_the_same_diff() {
        let mut set = RouteSet::new("/domains");
        apply(&mut set, &upsert("/domains/a.com/1", "http://127.0.0.1:1"));
        apply(&mut set, &upsert("/domains/a.com/2", "http://127.0.0.1:2"));
        let snap = [
            leaf("/domains/a.com/2", "http://127.0.0.1:9"),
            leaf("/domains/b.com/1", "http://127.0.0.1:3"),
            leaf("/domains/bad", "http://127.0.0.1:3"),
        ];
        let d = set.replace(snap.to_vec(), false, "resync");
        assert_eq!(
            (
                d.added.len(),
                d.removed.len(),
                d.changed.len(),
                d.rejected.len()
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(d.removed[0].1, "resync");
        assert_eq!(
            d.domains().into_iter().collect::<Vec<_>>(),
            ["a.com", "b.com"]
        );
        let keys: Vec<_> = set.routes.keys().cloned().collect();
        assert_eq!(keys, ["/domains/a.com/2", "/domains/b.com/1"]);
        assert_eq!(set.replace(snap.to_vec(), false, "resync").changes(), 0);
    }

    #[test]
    fn the_digest_depends_on_the_routes_only() {
        let mut a = RouteSet::new("/domains");
        let mut b = RouteSet::new("/domains");
        let one = leaf("/domains/a.com/1", "http://127.0.0.1:1");
        let two = leaf("/domains/b.com/1", "http://127.0.0.1:2");
        a.replace(vec![one.clone(), two.clone()], false, "resync");
        b.replace(vec![two, one], false, "resync");
        assert_eq!(a.digest(), b.digest());
        apply(&mut b, &upsert("/domains/b.com/1", "http://127.0.0.1:3"));
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn the_table_follows_the_set_one_domain_at_a_time() {
        let mut set = RouteSet::new("/domains");
        let mut diff = Diff::default();
        set.apply(&upsert("/domains/a.com/1", "http://127.0.0.1:1"), &mut diff);
        set.apply(&upsert("/domains/b.com/1", "http://127.0.0.1:2"), &mut diff);
        let table = set.table(&RouteTable::default(), &diff);
        assert!(table.lookup("a.com").is_some() && table.lookup("b.com").is_some());
        let diff = apply(&mut set, &remove("/domains/a.com/1", false));
        let table = set.table(&table, &diff);
        assert!(table.lookup("a.com").is_none());
        assert_eq!(table.lookup("b.com").map(|d| d.backends().len()), Some(1));
        assert_eq!(table.len(), 1);
    }
}
