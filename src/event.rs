//! Every log event the router writes, defined once: its name, which queue
//! it travels on, its fields and what it means.
//!
//! The README's event table is generated from these definitions (a test
//! checks that it is), `/metrics` counts events by these kinds
//! (`httprouter_log_events_total{event}`), and the tests read the same
//! names. Code that logs builds an [`Event`]; nothing else names an event.
//!
//! Fields that are `None` are left out of the line.

use serde_json::{Map, Value};

/// Which queue an event travels on (see `log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trail {
    /// The audit trail of what the router serves: never dropped.
    Audit,
    /// Best effort: dropped (and counted) when the queue is full.
    Lossy,
    /// Written by the log thread itself.
    Log,
}

impl Trail {
    pub fn name(self) -> &'static str {
        match self {
            Trail::Audit => "audit",
            Trail::Lossy => "best effort",
            Trail::Log => "log thread",
        }
    }
}

macro_rules! events {
    ($(
        $(#[doc = $doc:literal])+
        $variant:ident = $name:literal, $trail:ident {
            $($field:ident : $ty:ty),* $(,)?
        }
    )*) => {
        /// A log event with its fields. See the module documentation.
        #[derive(Debug, Clone)]
        pub enum Event {
            $($(#[doc = $doc])+ $variant { $($field: $ty),* },)*
        }

        /// What kind of event: its name, queue, fields and meaning.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Kind {
            $($variant,)*
        }

        /// Every kind, in the order of the README's table.
        pub const KINDS: &[Kind] = &[$(Kind::$variant,)*];

        impl Kind {
            pub fn name(self) -> &'static str {
                match self { $(Kind::$variant => $name,)* }
            }

            pub fn trail(self) -> Trail {
                match self { $(Kind::$variant => Trail::$trail,)* }
            }

            /// The fields beyond `timestamp`, `event` and `service`.
            pub fn fields(self) -> &'static [&'static str] {
                match self { $(Kind::$variant => &[$(stringify!($field)),*],)* }
            }

            /// One sentence for the README.
            pub fn meaning(self) -> &'static str {
                match self { $(Kind::$variant => concat!($($doc),+),)* }
            }

            /// Its place in [`KINDS`], for counters.
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl Event {
            pub fn kind(&self) -> Kind {
                match self { $(Event::$variant { .. } => Kind::$variant,)* }
            }

            /// The fields as JSON members, `None`s left out.
            pub fn into_fields(self) -> Map<String, Value> {
                match self {
                    $(Event::$variant { $($field),* } => {
                        #[allow(unused_mut)]
                        let mut fields = Map::new();
                        $(put(&mut fields, stringify!($field), $field);)*
                        fields
                    })*
                }
            }
        }
    };
}

fn put<T: serde::Serialize>(fields: &mut Map<String, Value>, name: &str, value: T) {
    match serde_json::to_value(value) {
        Ok(Value::Null) | Err(_) => {}
        Ok(v) => {
            fields.insert(name.to_string(), v);
        }
    }
}

events! {
    /// The router started: its settings.
    ServiceStart = "service.start", Lossy {
        version: &'static str, commit: &'static str, listen: String, admin: Option<String>,
        etcd_urls: Vec<String>, etcd_key: String, max_connections: usize, workers: usize,
        trusted_proxies: Vec<String>, eject_after: u32, eject_for_secs: f64,
        fd_limit: Option<u64>,
    }
    /// Something in the settings or the host works against them (`message` says what).
    ServiceWarning = "service.warning", Lossy {
        message: &'static str, fd_limit: Option<u64>, max_connections: Option<usize>,
        needed: Option<u64>, admin: Option<String>,
    }
    /// SIGTERM or SIGINT: requests in flight get `grace_secs` to finish.
    ServiceStopping = "service.stopping", Lossy { grace_secs: u64 }
    /// The router stopped, or could not start (`error`).
    ServiceStop = "service.stop", Lossy {
        error: Option<String>, unfinished_requests: Option<usize>, log_events_dropped: Option<u64>,
    }
    /// Which etcd API discovery uses, and why.
    EtcdApi = "etcd.api", Audit { endpoint: String, api: &'static str, reason: String }
    /// A whole snapshot was applied (`reason`: `start`, `resync`, `anti_entropy`); `drift` counts the repairs of an anti-entropy pass.
    EtcdSync = "etcd.sync", Audit {
        endpoint: String, api: &'static str, reason: String, revision: u64,
        domains: usize, routes: usize, digest: String, drift: usize,
    }
    /// Watching for changes, from this endpoint and revision.
    EtcdListen = "etcd.listen", Audit {
        endpoint: String, api: &'static str, revision: u64, index: u64, routes: usize,
    }
    /// etcd failed or answered something unusable (`kind` says how); the table is kept.
    EtcdError = "etcd.error", Audit {
        endpoint: Option<String>, kind: &'static str, error: String, revision: Option<u64>,
        wait_index: Option<u64>, retry_in_ms: Option<u64>, routes: Option<usize>,
        action: Option<String>, key: Option<String>,
    }
    /// The watch cannot go on from where it was (compaction, a reset store): a new snapshot follows.
    EtcdResync = "etcd.resync", Audit {
        endpoint: String, reason: &'static str, detail: String, revision: Option<u64>,
    }
    /// Routes loaded from `--state-file` because no etcd endpoint answered.
    StateLoad = "state.load", Audit {
        path: String, api: String, revision: u64, saved_at: String, domains: usize,
        routes: usize, digest: String,
    }
    /// The state file could not be read (it is ignored) or written.
    StateError = "state.error", Audit { path: String, error: String }
    /// A route was added.
    RouteAdd = "route.add", Audit { key: String, domain: String, url: String }
    /// A route's backend URL changed.
    RouteChange = "route.change", Audit {
        key: String, domain: String, url: String, previous_url: String,
    }
    /// A route was removed (`reason`: `delete`, `expire`, `compareAndDelete`, `resync`, `anti_entropy`, `state_file`, `invalid`).
    RouteRemove = "route.remove", Audit {
        key: String, domain: String, url: String, reason: String,
    }
    /// An etcd value is not a usable backend URL; the key is not routed.
    RouteError = "route.error", Audit { key: String, value: String, error: String }
    /// A change of over 100 routes, in lines of up to 500 `items` (`["add", key, url]`, `["remove", key, url, reason]`, `["change", key, url, previous_url]`, `["error", key, value, why]`).
    RouteBulk = "route.bulk", Audit {
        revision: Option<u64>, parts: usize, added: usize, removed: usize, changed: usize,
        rejected: usize, part: usize, items: Vec<Vec<String>>,
    }
    /// One request answered: `error` when the router answered itself or the answer was cut; tunnels add `bytes_to_backend`.
    RouterRequest = "router.request", Lossy {
        host: String, method: String, path: String, status: u16, upstream: Option<String>,
        duration_ms: f64, bytes: u64, bytes_to_backend: Option<u64>, client_ip: Option<String>,
        user_agent: Option<String>, error: Option<String>,
    }
    /// A backend failed `failures` times in a row and is skipped for `for_secs`.
    BackendEject = "backend.eject", Lossy {
        domain: String, backend: String, key: String, failures: u32, for_secs: f64,
        error: String, all_ejected: bool,
    }
    /// An ejected backend answered its probe and is back in rotation.
    BackendRestore = "backend.restore", Lossy { domain: String, backend: String, key: String }
    /// `--max-connections` reached: new connections wait in the backlog.
    ServerSaturated = "server.saturated", Lossy { max_connections: usize, closed_idle: bool }
    /// The admin listener started.
    AdminStart = "admin.start", Lossy { listen: String }
    /// Events were dropped because the queue was full.
    LogDropped = "log.dropped", Log { dropped: u64, dropped_total: u64 }
    /// `503 no route` request lines left out over the limit.
    LogSuppressed = "log.suppressed", Log {
        suppressed: u64, suppressed_total: u64, what: &'static str, limit_per_sec: u64,
    }
    /// The log file was reopened (`reason`: `sighup`, `deleted_or_moved`, `replaced`).
    LogReopen = "log.reopen", Log { reason: &'static str }
}

/// The README's event table (between its `events:begin` and `events:end`
/// markers).
pub fn readme_table() -> String {
    let mut out = String::from("| event | queue | fields | meaning |\n| --- | --- | --- | --- |\n");
    for kind in KINDS {
        let fields: Vec<String> = kind.fields().iter().map(|f| format!("`{f}`")).collect();
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            kind.name(),
            kind.trail().name(),
            fields.join(" "),
            kind.meaning().trim().replace('|', "\\|"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_dotted() {
        let mut names: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "an event name is defined twice");
        for (i, k) in KINDS.iter().enumerate() {
            assert_eq!(k.index(), i);
            assert!(k.name().contains('.'), "{}", k.name());
        }
    }

    #[test]
    fn none_fields_are_left_out() {
        let e = Event::ServiceStop {
            error: None,
            unfinished_requests: Some(0),
            log_events_dropped: None,
        };
        assert_eq!(e.kind().name(), "service.stop");
        let fields = e.into_fields();
        assert_eq!(fields.len(), 1);
        assert_eq!(fields["unfinished_requests"], 0);
    }

    /// The README's table is this module's: regenerate it with
    /// `UPDATE_README=1 cargo test --lib readme_event_table`.
    #[test]
    fn readme_event_table_matches_the_definitions() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let (begin, end) = ("<!-- events:begin -->\n", "<!-- events:end -->");
        let start = readme
            .find(begin)
            .expect("README has the events:begin marker")
            + begin.len();
        let stop = readme[start..].find(end).expect("events:end marker") + start;
        let table = readme_table();
        if readme[start..stop] != table {
            if std::env::var_os("UPDATE_README").is_some() {
                let updated = format!("{}{table}{}", &readme[..start], &readme[stop..]);
                std::fs::write(path, updated).expect("README.md written");
            } else {
                panic!(
                    "README's event table is out of date; run UPDATE_README=1 cargo test --lib readme_event_table"
                );
            }
        }
    }
}
