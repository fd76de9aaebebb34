//! What the admin side shows, read from the running router: the sources
//! it reads ([`Sources`]), the domains in order, a backend's state for
//! people, and the health verdict. Shared by `/healthz`, `/routes`
//! (`admin`), `/metrics` (`prometheus`) and the page (`status_page`),
//! which sit above this module and not above one another.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::discovery::{Status, StatusView, TableSource};
use crate::health::now_ms;
use crate::log::Logger;
use crate::metrics::Metrics;
use crate::routes::{Domain, RouteTable, SharedTable};

/// Version and commit, for `/metrics` and the page.
#[derive(Debug, Clone, Copy)]
pub struct Build {
    pub version: &'static str,
    pub commit: &'static str,
}

/// What the admin side reads.
#[derive(Clone)]
pub struct Sources {
    pub table: Arc<SharedTable>,
    pub status: Arc<Status>,
    pub metrics: Arc<Metrics>,
    pub log: Logger,
    pub build: Build,
}

/// One domain as the admin side shows it.
pub struct DomainView<'a> {
    pub name: &'a str,
    pub domain: &'a Domain,
}

/// A backend's state for people: in rotation, or ejected until a time.
pub struct BackendState {
    pub ejected: bool,
    /// Wall-clock end of the ejection; `None` in rotation.
    pub until: Option<SystemTime>,
    /// The ejection has run out: the next request to come is its probe.
    pub probe_due: bool,
    pub failures_in_a_row: u32,
}

impl BackendState {
    pub fn of(health: &crate::health::BackendHealth) -> BackendState {
        let until_ms = health.ejected_until_ms();
        let left = until_ms.map(|u| Duration::from_millis(u.saturating_sub(now_ms())));
        BackendState {
            ejected: until_ms.is_some(),
            until: left.map(|l| SystemTime::now() + l),
            probe_due: left.is_some_and(|l| l.is_zero()),
            failures_in_a_row: health.failures_in_a_row(),
        }
    }

    pub fn name(&self) -> &'static str {
        match (self.ejected, self.probe_due) {
            (false, _) => "in_rotation",
            (true, false) => "ejected",
            (true, true) => "probe_due",
        }
    }
}

/// The domains of `table`, sorted by name.
pub fn sorted(table: &RouteTable) -> Vec<DomainView<'_>> {
    let mut out: Vec<DomainView<'_>> = table
        .domains()
        .map(|(name, domain)| DomainView { name, domain })
        .collect();
    out.sort_unstable_by(|a, b| a.name.cmp(b.name));
    out
}

/// Seconds since `t`, if it is in the past.
pub fn age_secs(t: SystemTime) -> f64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `n` and its noun, plural unless one: `1 domain`, `2 routes`.
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `/healthz`: ready once a table was loaded, from etcd or the state file.
pub fn health(view: &StatusView) -> (u16, String) {
    let size = format!(
        "{}, {}",
        count(view.domains, "domain"),
        count(view.routes, "route")
    );
    match view.source {
        Some(TableSource::Etcd) => {
            let revision = view
                .revision
                .map_or(String::new(), |r| format!(" at revision {r}"));
            (200, format!("ok: {size} from etcd{revision}\n"))
        }
        Some(TableSource::StateFile) => (
            200,
            format!("ok: {size} from the state file (etcd not reached yet)\n"),
        ),
        None => {
            let why = view
                .last_error
                .as_ref()
                .map_or("etcd not answered yet".to_string(), |(e, _)| e.clone());
            (
                503,
                format!("not ready: no route table loaded yet ({why})\n"),
            )
        }
    }
}

/// The one write helper the page and the text formats share: `out` grows,
/// nothing fails.
pub fn push_fmt(out: &mut String, args: std::fmt::Arguments<'_>) {
    let _ = std::fmt::Write::write_fmt(out, args);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_says_why_it_is_not_ready() {
        let mut v = StatusView {
            endpoint: "http://127.0.0.1:2379".into(),
            last_error: Some(("connection refused".into(), SystemTime::now())),
            ..StatusView::default()
        };
        let (status, text) = health(&v);
        assert_eq!(status, 503);
        assert!(text.contains("connection refused"), "{text}");
        v.source = Some(TableSource::Etcd);
        v.revision = Some(7);
        v.domains = 1;
        v.routes = 2;
        assert_eq!(
            health(&v),
            (
                200,
                "ok: 1 domain, 2 routes from etcd at revision 7\n".into()
            )
        );
    }
}
