//! The route table: host → backends, with round robin.
//!
//! A [`RouteTable`] is immutable once built. Discovery makes a new one for
//! every change (copying only the shards of the domains that changed) and
//! publishes it through [`SharedTable`]; request workers
//! take an `Arc` to the current table (a pointer copy under a read lock) and
//! never see a half-applied change. Nothing here does I/O or blocks.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::health::{BackendHealth, EjectPolicy, RetryBudget};
use crate::http1::trim_ows_str;
use crate::httpurl::HttpUrl;
use crate::metrics::DomainStats;

/// One backend of a domain, parsed from an etcd value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The etcd key that registered it, for logs.
    pub key: String,
    /// The value as registered, e.g. `http://10.0.0.5:8000`.
    pub url: String,
    /// `host:port` to connect to.
    pub authority: String,
    /// Path prefix of the backend URL without a trailing `/` (usually empty);
    /// request paths are appended to it.
    pub base_path: String,
}

/// Why an etcd value is not a usable backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBackendUrl(pub &'static str);

impl fmt::Display for BadBackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Backend {
    /// Accepts absolute `http://host[:port][/prefix]` URLs only: the value comes
    /// from whoever can write to etcd, and anything else (empty values,
    /// `https://`, free text, JSON) must be refused rather than guessed at.
    pub fn parse(key: &str, value: &str) -> Result<Backend, BadBackendUrl> {
        Backend::from_owned(key.to_string(), value.to_string()).map_err(|(e, _)| e)
    }

    /// [`Backend::parse`], keeping the strings given (a snapshot's 30,000
    /// keys and values are not copied); a refused value comes back.
    pub fn from_owned(key: String, mut value: String) -> Result<Backend, (BadBackendUrl, String)> {
        let url = match HttpUrl::parse(&value) {
            Ok(url) => url,
            Err(e) => return Err((BadBackendUrl(e), value)),
        };
        let (authority, base_path) = (url.authority(), url.path.trim_end_matches('/').to_string());
        let trimmed = value.trim();
        if trimmed.len() != value.len() {
            value = trimmed.to_string();
        }
        Ok(Backend {
            key,
            url: value,
            authority,
            base_path,
        })
    }
}

/// The backends of one domain, in a stable order (by etcd key), with the
/// round-robin cursor, each backend's health and the domain's retry budget.
#[derive(Debug)]
pub struct Domain {
    backends: Vec<Arc<Backend>>,
    /// `health[i]` belongs to `backends[i]`.
    health: Vec<Arc<BackendHealth>>,
    /// Shared with the same domain in the previous and next tables, so that a
    /// change (a TTL renewal that re-sets a key, say) does not send the next
    /// request back to the first backend: frequent changes would otherwise
    /// pile load onto it. Health and budget carry over the same way.
    cursor: Arc<AtomicUsize>,
    budget: Arc<RetryBudget>,
    stats: Arc<DomainStats>,
}

/// A backend to try, with the record its result goes to.
pub struct Candidate<'a> {
    pub backend: &'a Arc<Backend>,
    pub health: &'a BackendHealth,
}

impl Domain {
    /// A domain with these backends (sorted by key), keeping what `before`
    /// knew: the cursor and budget always, and each backend's health while
    /// its key and URL stay (a new URL is a new backend with a clean slate).
    fn carried_over(backends: Vec<Arc<Backend>>, before: Option<&Domain>) -> Domain {
        let health = backends
            .iter()
            .map(|b| {
                before
                    .and_then(|d| {
                        d.backends
                            .iter()
                            .position(|old| old.key == b.key && old.url == b.url)
                            .map(|i| Arc::clone(&d.health[i]))
                    })
                    .unwrap_or_default()
            })
            .collect();
        Domain {
            backends,
            health,
            cursor: before.map(|d| Arc::clone(&d.cursor)).unwrap_or_default(),
            budget: before.map(|d| Arc::clone(&d.budget)).unwrap_or_default(),
            stats: before.map(|d| Arc::clone(&d.stats)).unwrap_or_default(),
        }
    }

    /// Its backends, in order, with their health (for the admin side).
    pub fn members(&self) -> impl Iterator<Item = (&Backend, &BackendHealth)> {
        self.backends
            .iter()
            .map(AsRef::as_ref)
            .zip(self.health.iter().map(AsRef::as_ref))
    }

    pub fn stats(&self) -> &Arc<DomainStats> {
        &self.stats
    }

    #[cfg(test)]
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    pub fn all_ejected(&self) -> bool {
        self.health.iter().all(|h| h.is_ejected())
    }

    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// The backends in the order to try them for one request: the round-robin
    /// pick first, then the others once each (failover), skipping ejected
    /// ones. If every backend is ejected, all are offered anyway (fail open):
    /// a backend that may have recovered beats a certain 503.
    ///
    /// Lazy on purpose: asking an ejected backend whether it admits a probe
    /// claims the probe, so only backends actually tried are asked.
    ///
    /// `clock` gives the time (see [`crate::health::now_ms`]) each time a
    /// backend is looked at: a request can spend seconds on connect
    /// timeouts before it reaches the next one.
    pub fn candidates<'a>(&'a self, policy: &'a EjectPolicy, clock: fn() -> u64) -> Candidates<'a> {
        let n = self.backends.len();
        let start = if n == 0 {
            0
        } else {
            self.cursor.fetch_add(1, Ordering::Relaxed) % n
        };
        Candidates {
            domain: self,
            policy,
            clock,
            start,
            next: 0,
            admitted: 0,
            fail_open: false,
        }
    }
}

/// See [`Domain::candidates`].
pub struct Candidates<'a> {
    domain: &'a Domain,
    policy: &'a EjectPolicy,
    clock: fn() -> u64,
    start: usize,
    /// Offset from `start` of the next backend to look at.
    next: usize,
    /// Backends the first pass let through.
    admitted: usize,
    /// In the second pass, which offers every backend.
    fail_open: bool,
}

impl Candidates<'_> {
    /// Whether [`Iterator::next`] may still offer a backend, asked without
    /// claiming a probe: a retry is only worth its budget if there is
    /// somewhere to send it.
    pub fn may_have_more(&self) -> bool {
        let d = self.domain;
        let n = d.backends.len();
        if self.fail_open {
            return self.next < n;
        }
        let now = (self.clock)();
        (self.next..n).any(|i| d.health[(self.start + i) % n].might_admit(now))
            || (self.admitted == 0 && n > 0)
    }
}

impl<'a> Iterator for Candidates<'a> {
    type Item = Candidate<'a>;

    fn next(&mut self) -> Option<Candidate<'a>> {
        let d = self.domain;
        let n = d.backends.len();
        loop {
            if self.next == n {
                if self.fail_open || self.admitted > 0 || n == 0 {
                    return None;
                }
                self.fail_open = true;
                self.next = 0;
            }
            let at = (self.start + self.next) % n;
            self.next += 1;
            if self.fail_open || d.health[at].admits((self.clock)(), self.policy) {
                self.admitted += 1;
                return Some(Candidate {
                    backend: &d.backends[at],
                    health: &d.health[at],
                });
            }
        }
    }
}

/// Shards of the table: a change copies one shard (a few dozen domains at
/// 10,000) and the shard list, not the whole table.
const SHARDS: usize = 256;

/// Host → domain. Build one with [`RouteTable::build`], change one with
/// [`RouteTable::update`].
#[derive(Debug, Clone)]
pub struct RouteTable {
    shards: Vec<Arc<HashMap<String, Arc<Domain>>>>,
    domains: usize,
}

impl Default for RouteTable {
    fn default() -> RouteTable {
        RouteTable {
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
            domains: 0,
        }
    }
}

/// Which shard holds `host`: FNV-1a, cheap and stable.
fn shard_of(host: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in host.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

impl RouteTable {
    /// Builds a table from `(normalised domain, backend)` pairs, carrying
    /// over the round-robin cursors, health and budgets of `previous` for
    /// domains that continue.
    pub fn build<'a>(
        routes: impl IntoIterator<Item = (&'a str, Arc<Backend>)>,
        previous: &RouteTable,
    ) -> RouteTable {
        let mut grouped: HashMap<String, Vec<Arc<Backend>>> = HashMap::new();
        for (domain, backend) in routes {
            grouped.entry(domain.to_string()).or_default().push(backend);
        }
        let gone: Vec<(String, Vec<Arc<Backend>>)> = previous
            .shards
            .iter()
            .flat_map(|s| s.keys())
            .filter(|d| !grouped.contains_key(*d))
            .map(|d| (d.clone(), Vec::new()))
            .collect();
        previous.update(grouped.into_iter().chain(gone))
    }

    /// This table with each given domain's backends replaced (none: the
    /// domain is gone). Copies only the shards the domains live in.
    pub fn update(
        &self,
        domains: impl IntoIterator<Item = (String, Vec<Arc<Backend>>)>,
    ) -> RouteTable {
        let mut next = self.clone();
        for (name, mut backends) in domains {
            let shard = Arc::make_mut(&mut next.shards[shard_of(&name)]);
            if backends.is_empty() {
                if shard.remove(&name).is_some() {
                    next.domains -= 1;
                }
                continue;
            }
            // etcd lists children in random order; sort so round robin and
            // failover order do not change with every snapshot.
            backends.sort_by(|a, b| a.key.cmp(&b.key));
            let domain = Domain::carried_over(backends, shard.get(&name).map(Arc::as_ref));
            if shard.insert(name, Arc::new(domain)).is_none() {
                next.domains += 1;
            }
        }
        next
    }

    /// Domains in the table.
    pub fn len(&self) -> usize {
        self.domains
    }

    pub fn is_empty(&self) -> bool {
        self.domains == 0
    }

    /// Every domain, in no particular order.
    pub fn domains(&self) -> impl Iterator<Item = (&str, &Domain)> {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(k, d)| (k.as_str(), d.as_ref())))
    }

    fn get(&self, host: &str) -> Option<&Domain> {
        self.shards[shard_of(host)].get(host).map(Arc::as_ref)
    }

    /// Finds the domain for a normalised host (see [`normalise_host`]): the
    /// exact `host:port` first, then the host without its port, so keys
    /// registered either way work.
    pub fn lookup(&self, host: &str) -> Option<&Domain> {
        if let Some(d) = self.get(host) {
            return Some(d);
        }
        let (name, port) = split_port(host);
        port.and_then(|_| self.get(name))
    }
}

/// The current table. Written by discovery only; read by every worker.
#[derive(Debug, Default)]
pub struct SharedTable {
    current: RwLock<Arc<RouteTable>>,
}

impl SharedTable {
    pub fn load(&self) -> Arc<RouteTable> {
        // A poisoned lock still holds a whole table: the writer only ever
        // replaces the Arc, so there is no partial state to fear.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn store(&self, table: RouteTable) {
        let table = Arc::new(table);
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            table,
        );
        // Freed (if this was the last reference) after the lock is released,
        // so readers never wait for a table to be torn down.
        drop(old);
    }
}

/// Splits `name:port` / `[v6]:port` into the name and the port. A bare IPv6
/// literal without brackets has no port.
fn split_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find("]:") {
            Some(i) => (&host[..=i], Some(&host[i + 2..])),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (host, None),
    }
}

/// Normalises a `Host` header value or a domain from an etcd key:
/// lowercased (hosts are case-insensitive, RFC 3986 §3.2.2, and etcd keys are
/// not), a trailing dot dropped (`example.com.` is the same name), the port
/// kept. Returns `None` for something that cannot be a host: empty, a bad
/// port, or characters that would let a value smuggle a path or userinfo.
pub fn normalise_host(raw: &str) -> Option<String> {
    // SP and HTAB only (see `http1::trim_ows`): `a.com\xa0` is not `a.com`.
    let raw = trim_ows_str(raw);
    let (name, port) = split_port(raw);
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let name = if name.starts_with('[') {
        if !name.ends_with(']')
            || name.len() < 3
            || !name[1..name.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        name
    } else {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return None;
        }
        name
    };
    let mut out = name.to_ascii_lowercase();
    if let Some(port) = port {
        out.push(':');
        out.push_str(port);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectPolicy = EjectPolicy {
        after: 1,
        duration_ms: 1_000,
    };

    fn backend(key: &str, url: &str) -> Arc<Backend> {
        Arc::new(Backend::parse(key, url).expect("valid test URL"))
    }

    fn table(routes: &[(&str, &str, &str)], previous: &RouteTable) -> RouteTable {
        RouteTable::build(routes.iter().map(|(d, k, u)| (*d, backend(k, u))), previous)
    }

    fn picks(t: &RouteTable, host: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let d = t.lookup(host).expect("domain present");
                d.candidates(&POLICY, || 0)
                    .next()
                    .expect("a backend")
                    .backend
                    .key
                    .clone()
            })
            .collect()
    }

    #[test]
    fn normalises_hosts() {
        let cases = [
            ("Example.COM", Some("example.com")),
            ("example.com.", Some("example.com")),
            ("example.com.:8080", Some("example.com:8080")),
            ("EXAMPLE.com:80", Some("example.com:80")),
            ("[::1]:8080", Some("[::1]:8080")),
            ("[::1]", Some("[::1]")),
            ("[FE80::1]", Some("[fe80::1]")),
            ("127.0.0.1:3000", Some("127.0.0.1:3000")),
            ("", None),
            (".", None),
            ("a.com:", None),
            ("a.com:http", None),
            ("a.com:123456", None),
            ("a b.com", None),
            ("user@a.com", None),
            ("a.com/evil", None),
            ("[::1", None),
            ("[zz]", None),
        ];
        for (raw, want) in cases {
            assert_eq!(normalise_host(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn lookup_tries_host_port_then_host() {
        let t = table(
            &[
                ("a.com", "/d/a.com/r", "http://127.0.0.1:1"),
                ("a.com:8080", "/d/a.com:8080/r", "http://127.0.0.1:2"),
                ("[::1]", "/d/[::1]/r", "http://127.0.0.1:3"),
            ],
            &RouteTable::default(),
        );
        let key = |h: &str| t.lookup(h).map(|d| d.backends()[0].key.clone());
        assert_eq!(key("a.com:8080").as_deref(), Some("/d/a.com:8080/r"));
        assert_eq!(key("a.com:9090").as_deref(), Some("/d/a.com/r"));
        assert_eq!(key("a.com").as_deref(), Some("/d/a.com/r"));
        assert_eq!(key("[::1]:8080").as_deref(), Some("/d/[::1]/r"));
        assert_eq!(key("b.com"), None);
    }

    #[test]
    fn round_robin_is_even_and_stable_across_rebuilds() {
        let routes = [
            ("a.com", "/d/a.com/1", "http://127.0.0.1:1"),
            ("a.com", "/d/a.com/2", "http://127.0.0.1:2"),
        ];
        let t1 = table(&routes, &RouteTable::default());
        assert_eq!(
            picks(&t1, "a.com", 3),
            ["/d/a.com/1", "/d/a.com/2", "/d/a.com/1"]
        );
        // A rebuild (e.g. a TTL key re-set) continues the rotation instead of
        // starting over at the first backend.
        let t2 = table(&routes, &t1);
        assert_eq!(picks(&t2, "a.com", 2), ["/d/a.com/2", "/d/a.com/1"]);
    }

    #[test]
    fn round_robin_follows_adds_removes_and_changes() {
        let mut t = table(
            &[
                ("a.com", "/d/a.com/1", "http://127.0.0.1:1"),
                ("a.com", "/d/a.com/2", "http://127.0.0.1:2"),
                ("a.com", "/d/a.com/3", "http://127.0.0.1:3"),
            ],
            &RouteTable::default(),
        );
        // Remove the middle one: exactly the other two remain, alternating
        // (the original tool's ring removal dropped the wrong element).
        t = table(
            &[
                ("a.com", "/d/a.com/1", "http://127.0.0.1:1"),
                ("a.com", "/d/a.com/3", "http://127.0.0.1:3"),
            ],
            &t,
        );
        let mut got = picks(&t, "a.com", 4);
        got.sort();
        assert_eq!(
            got,
            ["/d/a.com/1", "/d/a.com/1", "/d/a.com/3", "/d/a.com/3"]
        );
        // Change one URL and add one: every backend is served equally.
        t = table(
            &[
                ("a.com", "/d/a.com/1", "http://127.0.0.1:11"),
                ("a.com", "/d/a.com/3", "http://127.0.0.1:3"),
                ("a.com", "/d/a.com/4", "http://127.0.0.1:4"),
            ],
            &t,
        );
        let mut urls: Vec<String> = (0..6)
            .map(|_| {
                t.lookup("a.com")
                    .unwrap()
                    .candidates(&POLICY, || 0)
                    .next()
                    .unwrap()
                    .backend
                    .url
                    .clone()
            })
            .collect();
        urls.sort();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:11",
                "http://127.0.0.1:11",
                "http://127.0.0.1:3",
                "http://127.0.0.1:3",
                "http://127.0.0.1:4",
                "http://127.0.0.1:4"
            ]
        );
        // Remove all: the domain is gone.
        t = table(&[], &t);
        assert!(t.lookup("a.com").is_none());
    }

    #[test]
    fn rotation_visits_each_backend_once() {
        let t = table(
            &[
                ("a.com", "/d/a.com/1", "http://127.0.0.1:1"),
                ("a.com", "/d/a.com/2", "http://127.0.0.1:2"),
                ("a.com", "/d/a.com/3", "http://127.0.0.1:3"),
            ],
            &RouteTable::default(),
        );
        let d = t.lookup("a.com").unwrap();
        d.candidates(&POLICY, || 0).next();
        let order: Vec<_> = d
            .candidates(&POLICY, || 0)
            .map(|c| c.backend.key.as_str())
            .collect();
        assert_eq!(order, ["/d/a.com/2", "/d/a.com/3", "/d/a.com/1"]);
    }

    #[test]
    fn ejected_backends_are_skipped_unless_all_are() {
        let routes = [
            ("a.com", "/d/a.com/1", "http://127.0.0.1:1"),
            ("a.com", "/d/a.com/2", "http://127.0.0.1:2"),
        ];
        let t = table(&routes, &RouteTable::default());
        let d = t.lookup("a.com").unwrap();
        let first = d.candidates(&POLICY, || 0).next().unwrap();
        assert_eq!(first.backend.key, "/d/a.com/1");
        first.health.failed(0, &POLICY);
        // Backend 1 is ejected: every request goes to 2, and only to 2.
        for _ in 0..3 {
            let keys: Vec<_> = d
                .candidates(&POLICY, || 10)
                .map(|c| c.backend.key.clone())
                .collect();
            assert_eq!(keys, ["/d/a.com/2"]);
        }
        // The ejection survives a table rebuild.
        let t = table(&routes, &t);
        let d = t.lookup("a.com").unwrap();
        let second = d.candidates(&POLICY, || 20).next().unwrap();
        assert_eq!(second.backend.key, "/d/a.com/2");
        second.health.failed(20, &POLICY);
        // Both ejected: both offered (fail open).
        assert!(d.all_ejected());
        assert_eq!(d.candidates(&POLICY, || 30).count(), 2);
        // Backend 1's time is up: it alone is offered (the probe), then
        // skipped by the next request while the probe runs.
        let probe: Vec<_> = d
            .candidates(&POLICY, || 1_000)
            .map(|c| c.backend.key.clone())
            .collect();
        assert_eq!(probe, ["/d/a.com/1"]);
        assert_eq!(d.candidates(&POLICY, || 1_001).count(), 2);
        // A changed URL is a new backend, with a clean record.
        let t = table(
            &[
                ("a.com", "/d/a.com/1", "http://127.0.0.1:11"),
                ("a.com", "/d/a.com/2", "http://127.0.0.1:2"),
            ],
            &t,
        );
        let d = t.lookup("a.com").unwrap();
        let keys: Vec<_> = d
            .candidates(&POLICY, || 1_002)
            .map(|c| c.backend.key.clone())
            .collect();
        assert_eq!(keys, ["/d/a.com/1"]);
    }

    #[test]
    fn backend_urls() {
        let b = Backend::parse("k", " http://10.0.0.5:8000 \n").unwrap();
        assert_eq!(b.authority, "10.0.0.5:8000");
        assert_eq!(b.base_path, "");
        assert_eq!(b.url, "http://10.0.0.5:8000");
        let b = Backend::parse("k", "http://backend.local/app/").unwrap();
        assert_eq!(b.authority, "backend.local:80");
        assert_eq!(b.base_path, "/app");
        assert!(Backend::parse("k", "https://10.0.0.1").is_err());
    }
}
