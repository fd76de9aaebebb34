//! The status page at `/`: plain HTML with its style inline and no script,
//! refreshed by the browser every 10 s. Every text from etcd or a client
//! is escaped: keys, URLs and domain names are whatever was written to
//! etcd.

use std::time::{Instant, SystemTime};

use crate::admin_view::{BackendState, Sources, age_secs, health, push_fmt, sorted};
use crate::discovery::{StatusView, TableSource};
use crate::log::rfc3339;

/// Domains listed at most; `/routes` has them all.
pub const PAGE_MAX_DOMAINS: usize = 2_000;

/// `s` with `& < > " '` escaped, for text and attribute values.
pub fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

fn row(out: &mut String, name: &str, value: &str) {
    out.push_str("<tr><th>");
    escape(out, name);
    out.push_str("</th><td>");
    escape(out, value);
    out.push_str("</td></tr>\n");
}

fn ago(t: SystemTime) -> String {
    let secs = age_secs(t);
    if secs < 120.0 {
        format!("{secs:.1} s ago")
    } else {
        format!("{:.0} min ago", secs / 60.0)
    }
}

/// The page, written into `out` (emptied first).
pub fn render(sources: &Sources, view: &StatusView, mut out: String) -> String {
    let table = sources.table.load();
    let domains = sorted(&table);
    let now = Instant::now();
    out.clear();
    out.reserve(8 * 1024 + domains.len().min(PAGE_MAX_DOMAINS) * 400);
    out.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"refresh\" content=\"10\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>httprouter status</title><style>",
        "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}",
        "table{border-collapse:collapse;margin-bottom:1.5em}",
        "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}",
        "th{background:#f3f3f3}.num{text-align:right}",
        ".ok{color:#176117}.bad{color:#a31515;font-weight:bold}.warn{color:#8a5a00}",
        "ul{margin:0;padding-left:1.1em}",
        "</style></head><body>\n<h1>httprouter</h1>\n"
    ));

    // Discovery.
    let (health_status, health_text) = health(view);
    push_fmt(
        &mut out,
        format_args!(
            "<p id=\"health\" class=\"{}\">",
            if health_status == 200 { "ok" } else { "bad" }
        ),
    );
    escape(&mut out, health_text.trim_end());
    out.push_str("</p>\n<h2>etcd</h2>\n<table id=\"etcd\">\n");
    row(&mut out, "state", view.state.name());
    row(
        &mut out,
        "API",
        if view.api.is_empty() {
            "not chosen yet"
        } else {
            view.api
        },
    );
    row(&mut out, "endpoint", &view.endpoint);
    row(
        &mut out,
        "revision",
        &view.revision.map_or("none yet".into(), |r| r.to_string()),
    );
    row(
        &mut out,
        "last event",
        &view.last_event_at.map_or("none yet".into(), ago),
    );
    row(
        &mut out,
        "table from",
        match view.source {
            Some(TableSource::Etcd) => "etcd",
            Some(TableSource::StateFile) => "the state file (etcd not reached yet)",
            None => "nowhere yet",
        },
    );
    if let Some((revision, digest, at)) = &view.synced {
        row(
            &mut out,
            "last snapshot",
            &format!("revision {revision}, digest {digest}, {}", ago(*at)),
        );
    }
    if let Some((error, at)) = &view.last_error {
        row(&mut out, "last error", &format!("{error} ({})", ago(*at)));
    }
    out.push_str("</table>\n");

    // The router.
    out.push_str("<h2>Router</h2>\n<table id=\"router\">\n");
    row(
        &mut out,
        "version",
        &format!(
            "{} (commit {})",
            sources.build.version, sources.build.commit
        ),
    );
    row(
        &mut out,
        "started",
        &format!(
            "{} ({})",
            rfc3339(sources.metrics.started_at),
            ago(sources.metrics.started_at)
        ),
    );
    row(
        &mut out,
        "connections open",
        &sources
            .metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed)
            .to_string(),
    );
    row(&mut out, "domains", &table.len().to_string());
    row(&mut out, "log lines lost", &sources.log.lost().to_string());
    out.push_str("</table>\n");

    // Domains.
    push_fmt(
        &mut out,
        format_args!("<h2>Domains ({})</h2>\n", table.len()),
    );
    if domains.is_empty() {
        out.push_str("<p>No routes.</p>\n");
    } else {
        out.push_str(concat!(
            "<table id=\"domains\"><tr><th>domain</th><th>backends</th>",
            "<th>requests/s</th><th>errors/s (5xx)</th><th>errors</th></tr>\n"
        ));
    }
    for d in domains.iter().take(PAGE_MAX_DOMAINS) {
        out.push_str("<tr class=\"domain\"><td class=\"name\">");
        escape(&mut out, d.name);
        out.push_str("</td><td><ul>");
        for (backend, health) in d.domain.members() {
            let s = BackendState::of(health);
            let (class, text) = match (s.ejected, s.probe_due, s.until) {
                (false, _, _) => ("ok", "in rotation".to_string()),
                (true, true, _) | (true, _, None) => {
                    ("warn", "ejected, the next request probes it".to_string())
                }
                (true, false, Some(until)) => {
                    let left = until
                        .duration_since(SystemTime::now())
                        .map_or(0.0, |l| l.as_secs_f64());
                    (
                        "bad",
                        format!("ejected until {} (in {left:.0} s)", rfc3339(until)),
                    )
                }
            };
            push_fmt(
                &mut out,
                format_args!("<li class=\"backend\" data-state=\"{}\">", s.name()),
            );
            escape(&mut out, &backend.url);
            push_fmt(&mut out, format_args!(" <span class=\"{class}\">"));
            escape(&mut out, &text);
            out.push_str("</span>");
            if s.failures_in_a_row > 0 {
                push_fmt(
                    &mut out,
                    format_args!(", {} failures in a row", s.failures_in_a_row),
                );
            }
            out.push_str("</li>");
        }
        out.push_str("</ul></td>");
        match d.domain.stats().rates(now) {
            Some(r) => {
                let share = if r.requests > 0.0 {
                    format!("{:.1} %", 100.0 * r.errors / r.requests)
                } else {
                    "-".into()
                };
                push_fmt(
                    &mut out,
                    format_args!(
                        "<td class=\"num rate\" title=\"over the last {:.0} s\">{:.2}</td>\
                         <td class=\"num\">{:.2}</td><td class=\"num\">{share}</td></tr>\n",
                        r.over.as_secs_f64(),
                        r.requests,
                        r.errors
                    ),
                );
            }
            None => out.push_str(
                "<td class=\"num rate\">-</td><td class=\"num\">-</td><td class=\"num\">-</td></tr>\n",
            ),
        }
    }
    if !domains.is_empty() {
        out.push_str("</table>\n");
    }
    if domains.len() > PAGE_MAX_DOMAINS {
        push_fmt(
            &mut out,
            format_args!(
                "<p>{} more domains: see <a href=\"/routes\">/routes</a>.</p>\n",
                domains.len() - PAGE_MAX_DOMAINS
            ),
        );
    }
    out.push_str(concat!(
        "<p>Rates are over the last minute, sampled every 15 s. ",
        "Also: <a href=\"/routes\">/routes</a> (JSON), <a href=\"/metrics\">/metrics</a> ",
        "(Prometheus), <a href=\"/healthz\">/healthz</a>.</p>\n</body></html>\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_etcd_is_escaped() {
        let mut out = String::new();
        escape(&mut out, "<script>alert('x')</script>&\"");
        assert_eq!(
            out,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }
}
