//! Passive health: which backends to skip for a while, and how many retries
//! a domain may spend.
//!
//! Nothing here probes a backend on its own: health is learnt from the
//! requests that go to it. A backend that fails [`EjectPolicy::after`]
//! times in a row is ejected for [`EjectPolicy::duration_ms`]; when that
//! runs out, the first request to come along tries it (a probe) while the
//! others keep skipping it, and the probe's result decides. Retries are
//! limited per domain by a [`RetryBudget`], so that an outage never turns
//! into a multiple of the load (each failed request trying every backend).
//!
//! All state is atomics: the request path never takes a lock here, and a
//! race between two requests costs at most one count, never a wrong state
//! that lasts.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Milliseconds since the process started: a clock that never goes back,
/// small enough for an atomic.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When a backend is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectPolicy {
    /// Failures in a row that eject a backend.
    pub after: u32,
    /// How long an ejection lasts before a probe.
    pub duration_ms: u64,
}

/// One backend's failure record. Shared by every route table that lists the
/// same backend, so that a table rebuild does not forget an ejection.
#[derive(Debug, Default)]
pub struct BackendHealth {
    failures_in_a_row: AtomicU32,
    /// 0 when not ejected; otherwise the [`now_ms`] at which the next probe
    /// may go. (A real deadline is never 0: it is at least one duration
    /// after the clock's start.)
    ejected_until_ms: AtomicU64,
}

/// What a failure did to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Still in service.
    Counted,
    /// This failure ejected it.
    Ejected,
    /// It was ejected already (a probe or a fail-open try failed): ejected
    /// again for a whole duration.
    StillEjected,
}

impl BackendHealth {
    /// Whether a request may use this backend now. Past the end of an
    /// ejection exactly one caller is let through as the probe: it moves
    /// the deadline on by a duration, so everyone else keeps skipping the
    /// backend until the probe has answered (or the duration passes again,
    /// if the probe hangs).
    pub fn admits(&self, now: u64, policy: &EjectPolicy) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        self.ejected_until_ms
            .compare_exchange(
                until,
                deadline(now, policy),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Failures since the last success.
    pub fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row.load(Ordering::Relaxed)
    }

    /// The [`now_ms`] at which an ejection ends (the next probe may go);
    /// `None` when in rotation.
    pub fn ejected_until_ms(&self) -> Option<u64> {
        match self.ejected_until_ms.load(Ordering::Acquire) {
            0 => None,
            until => Some(until),
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Acquire) != 0
    }

    /// Whether [`BackendHealth::admits`] could say yes now, without
    /// claiming a probe.
    pub fn might_admit(&self, now: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Acquire);
        until == 0 || now >= until
    }

    /// Records an answer. Returns true if this ends an ejection.
    pub fn succeeded(&self) -> bool {
        if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
            self.failures_in_a_row.store(0, Ordering::Relaxed);
        }
        // Read first: the common case (healthy) writes nothing, so busy
        // backends do not bounce a cache line between cores.
        self.ejected_until_ms.load(Ordering::Acquire) != 0
            && self.ejected_until_ms.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a refused, reset or timed-out attempt.
    pub fn failed(&self, now: u64, policy: &EjectPolicy) -> AfterFailure {
        // The ejection is read before the count moves: while ejected the
        // count is past the threshold, and a restore between the two steps
        // must not make this failure look like a fresh ejection.
        let until = self.ejected_until_ms.load(Ordering::Acquire);
        if until != 0 {
            // Only from the deadline seen: if a probe restored the backend
            // meanwhile, this (older) failure is counted like any other.
            let renewed = self.ejected_until_ms.compare_exchange(
                until,
                deadline(now, policy),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            self.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
            return match renewed {
                Err(0) => AfterFailure::Counted,
                _ => AfterFailure::StillEjected,
            };
        }
        let failures = self
            .failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < policy.after {
            return AfterFailure::Counted;
        }
        // Only one of several concurrent failures reports the ejection.
        match self.ejected_until_ms.compare_exchange(
            0,
            deadline(now, policy),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => AfterFailure::Ejected,
            Err(_) => AfterFailure::StillEjected,
        }
    }
}

fn deadline(now: u64, policy: &EjectPolicy) -> u64 {
    now.saturating_add(policy.duration_ms.max(1))
}

/// The window over which retries are weighed against requests.
pub const RETRY_WINDOW_SECS: u64 = 10;
/// Retries allowed as a share of the requests in the window.
pub const RETRY_BUDGET_RATIO: f64 = 0.2;
/// Retries allowed in any second whatever the ratio says, so that a quiet
/// domain can still fail over.
pub const RETRY_BUDGET_MIN_PER_SEC: u32 = 3;

/// Requests and retries of one domain over the last [`RETRY_WINDOW_SECS`],
/// in one-second buckets.
#[derive(Debug, Default)]
pub struct RetryBudget {
    buckets: [Bucket; RETRY_WINDOW_SECS as usize],
}

#[derive(Debug, Default)]
struct Bucket {
    /// The second (of [`now_ms`]) this bucket counts, plus one (0: unused).
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    /// The bucket for `second`, emptied first if it still holds an older
    /// second. Counts made by a racing thread between the two steps can be
    /// lost: the budget is an estimate, and a lost count errs either way by
    /// one.
    fn bucket(&self, second: u64) -> &Bucket {
        let b = &self.buckets[(second % RETRY_WINDOW_SECS) as usize];
        let tag = second + 1;
        let seen = b.second.load(Ordering::Acquire);
        if seen != tag
            && b.second
                .compare_exchange(seen, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    pub fn record_request(&self, now: u64) {
        self.bucket(now / 1000)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one left.
    pub fn try_retry(&self, now: u64) -> bool {
        let second = now / 1000;
        let current = self.bucket(second);
        // Taken first and given back if over: concurrent callers then
        // cannot all pass the same check.
        let this_second = current.retries.fetch_add(1, Ordering::AcqRel) + 1;
        if this_second <= RETRY_BUDGET_MIN_PER_SEC {
            return true;
        }
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let tag = b.second.load(Ordering::Acquire);
            if tag != 0 && tag - 1 + RETRY_WINDOW_SECS > second {
                requests += u64::from(b.requests.load(Ordering::Relaxed));
                retries += u64::from(b.retries.load(Ordering::Relaxed));
            }
        }
        if retries as f64 <= RETRY_BUDGET_RATIO * requests as f64 {
            return true;
        }
        // Never below zero: the bucket may have been emptied meanwhile.
        let _ = current
            .retries
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectPolicy = EjectPolicy {
        after: 3,
        duration_ms: 10_000,
    };

    #[test]
    fn ejected_after_failures_in_a_row_then_one_probe() {
        let h = BackendHealth::default();
        assert_eq!(h.failed(1_000, &POLICY), AfterFailure::Counted);
        assert_eq!(h.failed(1_000, &POLICY), AfterFailure::Counted);
        // A success in between starts the count again.
        assert!(!h.succeeded());
        assert_eq!(h.failed(1_000, &POLICY), AfterFailure::Counted);
        assert_eq!(h.failed(1_000, &POLICY), AfterFailure::Counted);
        assert_eq!(h.failed(1_000, &POLICY), AfterFailure::Ejected);
        assert!(!h.admits(5_000, &POLICY));
        assert!(!h.admits(10_999, &POLICY));
        // Time is up: one probe, and only one.
        assert!(h.admits(11_000, &POLICY));
        assert!(!h.admits(11_001, &POLICY));
        // The probe fails: another whole duration.
        assert_eq!(h.failed(11_500, &POLICY), AfterFailure::StillEjected);
        assert!(!h.admits(21_000, &POLICY));
        assert!(h.admits(21_500, &POLICY));
        // The probe answers: back in service.
        assert!(h.succeeded());
        assert!(!h.is_ejected());
        assert!(h.admits(21_501, &POLICY));
        assert_eq!(h.failed(22_000, &POLICY), AfterFailure::Counted);
    }

    #[test]
    fn a_late_failure_after_a_restore_is_counted_not_an_ejection() {
        let h = BackendHealth::default();
        for _ in 0..3 {
            h.failed(0, &POLICY);
        }
        assert!(h.admits(10_000, &POLICY));
        assert!(h.succeeded());
        // A request that started before the restore fails now.
        assert_eq!(h.failed(10_001, &POLICY), AfterFailure::Counted);
        assert!(!h.is_ejected());
    }

    #[test]
    fn a_hung_probe_lets_another_through_a_duration_later() {
        let h = BackendHealth::default();
        for _ in 0..3 {
            h.failed(0, &POLICY);
        }
        assert!(h.admits(10_000, &POLICY));
        assert!(!h.admits(19_999, &POLICY));
        assert!(h.admits(20_000, &POLICY));
    }

    #[test]
    fn budget_allows_a_few_per_second_and_a_share_beyond() {
        let b = RetryBudget::default();
        // A quiet domain: 3 retries in a second, then none.
        b.record_request(0);
        assert!(b.try_retry(0));
        assert!(b.try_retry(10));
        assert!(b.try_retry(20));
        assert!(!b.try_retry(30));
        // The next second has its own 3.
        assert!(b.try_retry(1_000));
        // A busy domain: 100 requests in the window allow 20 retries in all.
        let b = RetryBudget::default();
        for i in 0..100 {
            b.record_request(2_000 + i);
        }
        let granted = (0..50).filter(|i| b.try_retry(2_500 + i)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the old requests no longer count.
        assert_eq!((0..10).filter(|_| b.try_retry(12_500)).count(), 3);
    }
}
