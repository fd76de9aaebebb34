//! `/metrics` in the Prometheus text format, version 0.0.4 (the format
//! every Prometheus server and agent scrapes): `# HELP` and `# TYPE` lines,
//! then `name{label="value"} number` lines.
//!
//! Per-domain series are written for every domain in the table, zeros
//! included (a series that appears only at its first count hides that
//! count from `rate()`), and for no other: their number is bounded by the
//! table. Process figures come from `/proc/self` (Linux).

use std::fmt::Write as _;

use crate::admin_view::{BackendState, Sources, age_secs, sorted};
use crate::discovery::Phase;
use crate::discovery::StatusView;
use crate::event::{KINDS, Kind};
use crate::metrics::{CODE_CLASSES, DURATION_BUCKETS_SECS};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value with `\`, `"` and newlines escaped, as the format asks.
fn label(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            label(out, v);
        }
        out.push('}');
    }
    if value.is_finite() {
        let _ = writeln!(out, " {value}");
    } else {
        out.push_str(" NaN\n");
    }
}

/// The whole exposition, written into `out` (emptied first; a buffer
/// reused from scrape to scrape).
pub fn render(sources: &Sources, view: &StatusView, mut out: String) -> String {
    let table = sources.table.load();
    let domains = sorted(&table);
    // About 0.6 KiB of series per domain: sized once, not doubled into.
    out.clear();
    out.reserve(16 * 1024 + domains.len() * 640);
    let metrics = &sources.metrics;
    let counts = sources.log.counts();

    family(
        &mut out,
        "httprouter_build_info",
        "gauge",
        "Version and git commit of the running binary.",
    );
    sample(
        &mut out,
        "httprouter_build_info",
        &[
            ("version", sources.build.version),
            ("commit", sources.build.commit),
        ],
        1.0,
    );

    family(
        &mut out,
        "httprouter_requests_total",
        "counter",
        "Requests answered, by domain and status class; domain=\"\" for requests that reached no domain (unknown host, refused before routing).",
    );
    for d in &domains {
        for (class, n) in CODE_CLASSES.iter().zip(d.domain.stats().requests()) {
            sample(
                &mut out,
                "httprouter_requests_total",
                &[("code_class", class), ("domain", d.name)],
                n as f64,
            );
        }
    }
    for (class, n) in CODE_CLASSES.iter().zip(metrics.unrouted()) {
        sample(
            &mut out,
            "httprouter_requests_total",
            &[("code_class", class), ("domain", "")],
            n as f64,
        );
    }

    let h = metrics.durations();
    family(
        &mut out,
        "httprouter_request_duration_seconds",
        "histogram",
        "Time from a request's head to the end of its answer (tunnels not included).",
    );
    let mut cumulative = 0u64;
    for (i, n) in h.buckets.iter().enumerate() {
        cumulative += n;
        let le = DURATION_BUCKETS_SECS
            .get(i)
            .map_or("+Inf".to_string(), |b| b.to_string());
        sample(
            &mut out,
            "httprouter_request_duration_seconds_bucket",
            &[("le", &le)],
            cumulative as f64,
        );
    }
    sample(
        &mut out,
        "httprouter_request_duration_seconds_sum",
        &[],
        h.sum_secs,
    );
    sample(
        &mut out,
        "httprouter_request_duration_seconds_count",
        &[],
        cumulative as f64,
    );

    type PerDomain = fn(&crate::metrics::DomainStats) -> u64;
    let per_domain: [(&str, &str, PerDomain); 3] = [
        (
            "httprouter_backend_failures_total",
            "Attempts a backend failed (refused, reset, timed out, bad answer), by domain.",
            |s| s.backend_failures(),
        ),
        (
            "httprouter_backend_ejections_total",
            "Backends ejected after failures in a row, by domain.",
            |s| s.ejections(),
        ),
        (
            "httprouter_retries_total",
            "Requests sent on to another backend after one failed to connect, by domain.",
            |s| s.retries(),
        ),
    ];
    for (name, help, get) in per_domain {
        family(&mut out, name, "counter", help);
        for d in &domains {
            let n = get(d.domain.stats());
            sample(&mut out, name, &[("domain", d.name)], n as f64);
        }
    }

    let (mut in_rotation, mut ejected) = (0u64, 0u64);
    for d in &domains {
        for (_, h) in d.domain.members() {
            if BackendState::of(h).ejected {
                ejected += 1;
            } else {
                in_rotation += 1;
            }
        }
    }
    family(
        &mut out,
        "httprouter_domains",
        "gauge",
        "Domains in the route table.",
    );
    sample(&mut out, "httprouter_domains", &[], table.len() as f64);
    family(
        &mut out,
        "httprouter_backends",
        "gauge",
        "Backends in the route table, by state.",
    );
    sample(
        &mut out,
        "httprouter_backends",
        &[("state", "in_rotation")],
        in_rotation as f64,
    );
    sample(
        &mut out,
        "httprouter_backends",
        &[("state", "ejected")],
        ejected as f64,
    );

    family(
        &mut out,
        "httprouter_table_loaded",
        "gauge",
        "1 once a route table was loaded (from etcd or the state file).",
    );
    sample(
        &mut out,
        "httprouter_table_loaded",
        &[],
        if view.source.is_some() { 1.0 } else { 0.0 },
    );
    family(
        &mut out,
        "httprouter_etcd_watching",
        "gauge",
        "1 while discovery watches an etcd member.",
    );
    sample(
        &mut out,
        "httprouter_etcd_watching",
        &[],
        if view.state == Phase::Watching {
            1.0
        } else {
            0.0
        },
    );
    family(
        &mut out,
        "httprouter_etcd_revision",
        "gauge",
        "The etcd revision (v3) or index (v2) the table stands at.",
    );
    sample(
        &mut out,
        "httprouter_etcd_revision",
        &[],
        view.revision.map_or(f64::NAN, |r| r as f64),
    );
    family(
        &mut out,
        "httprouter_etcd_last_event_age_seconds",
        "gauge",
        "Seconds since the last change from etcd or the last snapshot.",
    );
    sample(
        &mut out,
        "httprouter_etcd_last_event_age_seconds",
        &[],
        view.last_event_at.map_or(f64::NAN, age_secs),
    );
    family(
        &mut out,
        "httprouter_etcd_errors_total",
        "counter",
        "etcd failures and unusable answers (etcd.error events).",
    );
    sample(
        &mut out,
        "httprouter_etcd_errors_total",
        &[],
        counts.of(Kind::EtcdError) as f64,
    );
    family(
        &mut out,
        "httprouter_etcd_resyncs_total",
        "counter",
        "Whole re-reads of etcd after the first (compaction, reset store, anti-entropy).",
    );
    sample(
        &mut out,
        "httprouter_etcd_resyncs_total",
        &[],
        counts.of(Kind::EtcdSync).saturating_sub(1) as f64,
    );

    family(
        &mut out,
        "httprouter_connections_open",
        "gauge",
        "Client connections open.",
    );
    sample(
        &mut out,
        "httprouter_connections_open",
        &[],
        metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    family(
        &mut out,
        "httprouter_log_dropped_total",
        "counter",
        "Log lines lost: queue full, or the --logurl buffer full while the collector was down.",
    );
    sample(
        &mut out,
        "httprouter_log_dropped_total",
        &[],
        sources.log.lost() as f64,
    );
    family(
        &mut out,
        "httprouter_log_suppressed_total",
        "counter",
        "503 no-route request lines left out of the log over the rate limit.",
    );
    sample(
        &mut out,
        "httprouter_log_suppressed_total",
        &[],
        sources.log.suppressed() as f64,
    );
    family(
        &mut out,
        "httprouter_log_events_total",
        "counter",
        "Log events, by event name.",
    );
    for kind in KINDS {
        sample(
            &mut out,
            "httprouter_log_events_total",
            &[("event", kind.name())],
            counts.of(*kind) as f64,
        );
    }

    process(&mut out, metrics.started_at);
    out
}

/// The conventional `process_*` family, from `/proc/self`.
fn process(out: &mut String, started_at: std::time::SystemTime) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, so index 0 here is field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
        )
    };
    if let (Some(utime), Some(stime)) = (field(14), field(15))
        && ticks > 0.0
    {
        family(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
        );
        sample(
            out,
            "process_cpu_seconds_total",
            &[],
            (utime + stime) / ticks,
        );
    }
    if let Some(rss) = field(24) {
        family(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        sample(out, "process_resident_memory_bytes", &[], rss * page);
    }
    if let Some(vsize) = field(23) {
        family(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        sample(out, "process_virtual_memory_bytes", &[], vsize);
    }
    if let Some(threads) = field(20) {
        family(out, "process_threads", "gauge", "Threads of the process.");
        sample(out, "process_threads", &[], threads);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        family(out, "process_open_fds", "gauge", "Open file descriptors.");
        // One of them is this listing's own.
        sample(
            out,
            "process_open_fds",
            &[],
            dir.count().saturating_sub(1) as f64,
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        family(
            out,
            "process_max_fds",
            "gauge",
            "The limit on open file descriptors.",
        );
        sample(out, "process_max_fds", &[], limit.rlim_cur as f64);
    }
    if let Ok(since) = started_at.duration_since(std::time::UNIX_EPOCH) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
        );
        sample(out, "process_start_time_seconds", &[], since.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("domain", "a\"b\\c\nd")], 2.0);
        assert_eq!(out, "m{domain=\"a\\\"b\\\\c\\nd\"} 2\n");
        out.clear();
        sample(&mut out, "m", &[], f64::NAN);
        assert_eq!(out, "m NaN\n");
    }
}
