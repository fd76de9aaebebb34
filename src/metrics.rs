//! What `/metrics` and the status page count, as plain atomics: the request
//! path adds to a counter or two and never takes a lock or allocates.
//!
//! Per-domain counters ([`DomainStats`]) live with the domain in the route
//! table and are carried over when the domain is rebuilt, like its health;
//! a domain that leaves the table takes its counters with it, so what
//! `/metrics` lists is bounded by the table, never by churn. Durations go
//! into one histogram for the whole router with fixed buckets: a histogram
//! per domain or backend would multiply the series by the buckets.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Label values of `code_class`, by `status / 100 - 1`.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Upper bounds of the duration histogram's buckets, in seconds
/// (Prometheus's default buckets); `+Inf` follows.
pub const DURATION_BUCKETS_SECS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The status page's rates are over this window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Samples kept per domain for the rates: one every
/// `RATE_WINDOW / (RATE_SAMPLES - 1)`.
pub const RATE_SAMPLES: usize = 5;

fn class_of(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// Counters of one domain.
#[derive(Debug)]
pub struct DomainStats {
    requests: [AtomicU64; 5],
    backend_failures: AtomicU64,
    ejections: AtomicU64,
    retries: AtomicU64,
    /// Samples for the rates, taken by the admin side's sampler only (the
    /// request path never touches it); allocated at the first sample.
    window: Mutex<Option<Box<Window>>>,
    /// When the domain entered the table: every count is since then, so
    /// it is the first sample of all (nothing is lost before the
    /// sampler's first pass).
    created: Instant,
}

impl Default for DomainStats {
    fn default() -> DomainStats {
        DomainStats {
            requests: Default::default(),
            backend_failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            window: Mutex::new(None),
            created: Instant::now(),
        }
    }
}

/// Totals at a few moments: the rate over the last minute is the
/// difference between now and the oldest.
#[derive(Debug, Default)]
struct Window {
    samples: [Option<(Instant, u64, u64)>; RATE_SAMPLES],
    next: usize,
}

/// Requests and 5xx answers a second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub requests: f64,
    pub errors: f64,
    /// The time the rates are over (up to [`RATE_WINDOW`]).
    pub over: Duration,
}

impl DomainStats {
    pub fn requests(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.requests[i].load(Ordering::Relaxed))
    }

    pub fn backend_failures(&self) -> u64 {
        self.backend_failures.load(Ordering::Relaxed)
    }

    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    pub fn backend_failed(&self) {
        self.backend_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn totals(&self) -> (u64, u64) {
        let r = self.requests();
        (r.iter().sum(), r[4])
    }

    /// Records the totals now (the sampler, every
    /// `RATE_WINDOW / (RATE_SAMPLES - 1)`).
    pub fn sample(&self, now: Instant) {
        let (requests, errors) = self.totals();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let created = self.created;
        let w = w.get_or_insert_with(|| {
            let mut w = Box::<Window>::default();
            w.samples[0] = Some((created, 0, 0));
            w.next = 1;
            w
        });
        let at = w.next;
        w.samples[at] = Some((now, requests, errors));
        w.next = (at + 1) % RATE_SAMPLES;
    }

    /// The rates since the oldest sample in the window (none: no sample
    /// that recent, which a running sampler never lets happen).
    pub fn rates(&self, now: Instant) -> Option<Rates> {
        let (requests, errors) = self.totals();
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let first = [Some((self.created, 0, 0))];
        let samples = w.as_ref().map_or(&first[..], |w| &w.samples[..]);
        let (at, r0, e0) = samples
            .iter()
            .flatten()
            .filter(|(t, _, _)| now.duration_since(*t) <= RATE_WINDOW + RATE_WINDOW / 4)
            .min_by_key(|(t, _, _)| *t)
            .copied()?;
        let over = now.duration_since(at);
        let secs = over.as_secs_f64().max(1.0);
        Some(Rates {
            requests: requests.saturating_sub(r0) as f64 / secs,
            errors: errors.saturating_sub(e0) as f64 / secs,
            over,
        })
    }
}

/// The router's own counters, beyond the domains'.
#[derive(Debug)]
pub struct Metrics {
    /// Answers to requests that reached no domain (unknown hosts, requests
    /// refused before routing), by class.
    unrouted: [AtomicU64; 5],
    duration_buckets: [AtomicU64; DURATION_BUCKETS_SECS.len() + 1],
    duration_sum_micros: AtomicU64,
    /// Client connections open (written by the poller).
    pub connections_open: AtomicUsize,
    pub started_at: SystemTime,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            unrouted: Default::default(),
            duration_buckets: Default::default(),
            duration_sum_micros: AtomicU64::new(0),
            connections_open: AtomicUsize::new(0),
            started_at: SystemTime::now(),
        }
    }
}

/// A copy of the duration histogram: counts per bucket (not cumulative,
/// `+Inf` last) and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Durations {
    pub buckets: Vec<u64>,
    pub sum_secs: f64,
}

impl Metrics {
    /// Counts an answer: by domain when it reached one, and its duration
    /// (tunnels give none: their time is the session's, not a request's).
    pub fn record(&self, domain: Option<&DomainStats>, status: u16, took: Option<Duration>) {
        let class = class_of(status);
        match domain {
            Some(d) => d.requests[class].fetch_add(1, Ordering::Relaxed),
            None => self.unrouted[class].fetch_add(1, Ordering::Relaxed),
        };
        if let Some(took) = took {
            let secs = took.as_secs_f64();
            let bucket = DURATION_BUCKETS_SECS
                .iter()
                .position(|&b| secs <= b)
                .unwrap_or(DURATION_BUCKETS_SECS.len());
            self.duration_buckets[bucket].fetch_add(1, Ordering::Relaxed);
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            self.duration_sum_micros
                .fetch_add(micros, Ordering::Relaxed);
        }
    }

    pub fn unrouted(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.unrouted[i].load(Ordering::Relaxed))
    }

    pub fn durations(&self) -> Durations {
        Durations {
            buckets: self
                .duration_buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_secs: self.duration_sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_class_and_duration() {
        let m = Metrics::default();
        let d = DomainStats::default();
        m.record(Some(&d), 200, Some(Duration::from_millis(3)));
        m.record(Some(&d), 503, Some(Duration::from_millis(30)));
        m.record(None, 400, Some(Duration::from_secs(20)));
        m.record(Some(&d), 101, None);
        m.record(Some(&d), 999, None);
        assert_eq!(d.requests(), [1, 1, 0, 0, 2]);
        assert_eq!(m.unrouted(), [0, 0, 0, 1, 0]);
        let h = m.durations();
        assert_eq!(h.buckets.len(), DURATION_BUCKETS_SECS.len() + 1);
        assert_eq!(h.buckets[0], 1, "3 ms is in the 5 ms bucket");
        assert_eq!(h.buckets[3], 1, "30 ms is in the 50 ms bucket");
        assert_eq!(
            h.buckets[DURATION_BUCKETS_SECS.len()],
            1,
            "20 s is past 10 s"
        );
        assert!((h.sum_secs - 20.033).abs() < 1e-9);
    }

    #[test]
    fn rates_are_over_the_oldest_sample_in_the_window() {
        let d = DomainStats::default();
        let t0 = d.created;
        // Counted from the domain's start before any sample.
        assert_eq!(d.rates(t0).map(|r| r.requests), Some(0.0));
        assert_eq!(d.rates(t0 + Duration::from_secs(600)), None);
        d.sample(t0);
        let m = Metrics::default();
        for i in 0..120 {
            m.record(Some(&d), if i % 4 == 0 { 502 } else { 200 }, None);
        }
        let r = d.rates(t0 + Duration::from_secs(60)).unwrap();
        assert!((r.requests - 2.0).abs() < 1e-9 && (r.errors - 0.5).abs() < 1e-9);
        // Samples older than the window no longer count.
        for i in 1..=RATE_SAMPLES as u64 {
            d.sample(t0 + Duration::from_secs(15 * i + 60));
        }
        let r = d.rates(t0 + Duration::from_secs(150)).unwrap();
        assert_eq!(r.requests, 0.0);
        assert!(r.over <= RATE_WINDOW + RATE_WINDOW / 4);
    }
}
