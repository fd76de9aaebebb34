//! The worker pool: threads that serve requests with blocking I/O, as many
//! as the work needs and no more.
//!
//! A pool of `core` workers serves ordinary requests: more threads than
//! that would only take turns on the same cores (each switch is time no
//! request is served, and at 256 runnable threads on 2 cores the turns are
//! what a p99 measures). A worker held by one job for longer than
//! [`STUCK_AFTER_MILLIS`] (a slow upload, a slow backend, a tunnel) no
//! longer counts towards `core`: while jobs wait, the pool adds a thread
//! for each such one, up to `max`. So a thousand slow uploads cannot starve
//! a normal request, and once they are gone the extra threads leave
//! ([`IDLE_EXIT_SECS`]): a quiet router keeps [`MIN_WORKERS`].
//!
//! Jobs wait in a `crossbeam-channel` queue, whose receivers spin and
//! yield briefly before they sleep. Two alternatives were measured in the
//! harness and not kept: a mutex-and-condvar queue that sleeps at once
//! (no `sched_yield`, fewer `futex` calls, a slightly better p99, but 15 %
//! more CPU per request and lower throughput: every job then wakes a
//! sleeping thread), and the same with one spinning worker (more CPU
//! still). (README, "Performance".)
//!
//! Knows nothing of HTTP: a job is whatever the handler takes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::health::now_ms;

/// A worker in one job for longer than this is taken to be waiting on a
/// slow peer, and replaced while jobs wait.
pub const STUCK_AFTER_MILLIS: u64 = 100;
/// How often [`Pool::check`] should be called while jobs wait.
pub const CHECK_EVERY_MILLIS: u64 = 20;
/// A worker with nothing to do for this long leaves (down to
/// [`MIN_WORKERS`]).
pub const IDLE_EXIT_SECS: u64 = 10;
/// Workers kept when the router is quiet.
pub const MIN_WORKERS: usize = 4;
/// Workers do little on the stack; their buffers live on the heap.
const WORKER_STACK_BYTES: usize = 256 * 1024;

type Handler<J, W> = dyn Fn(J, &mut W) + Send + Sync;

pub struct Pool<J, W> {
    tx: Sender<J>,
    inner: Arc<Inner<J, W>>,
}

struct Inner<J, W> {
    rx: Receiver<J>,
    handler: Box<Handler<J, W>>,
    core: usize,
    max: usize,
    /// Threads alive or being started.
    total: AtomicUsize,
    /// Threads waiting for a job, or starting (about to).
    idle: AtomicUsize,
    /// Per worker: when its current job started ([`now_ms`]), 0 if none.
    seats: Mutex<Vec<Arc<AtomicU64>>>,
}

impl<J: Send + 'static, W: Default + 'static> Pool<J, W> {
    /// `core` workers serve ordinary requests; `max` threads at most in all.
    /// Each thread makes its own `W` (its buffers) once.
    pub fn new(
        core: usize,
        max: usize,
        handler: impl Fn(J, &mut W) + Send + Sync + 'static,
    ) -> Pool<J, W> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let core = core.max(1);
        let pool = Pool {
            tx,
            inner: Arc::new(Inner {
                rx,
                handler: Box::new(handler),
                core,
                max: max.max(core),
                total: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                seats: Mutex::new(Vec::new()),
            }),
        };
        for _ in 0..MIN_WORKERS.min(core) {
            pool.spawn();
        }
        pool
    }

    /// Queues a job. Starts a worker when none is free and the pool is
    /// below `core`.
    pub fn submit(&self, job: J) {
        // The receiver lives as long as `inner`, which `self` holds.
        let _ = self.tx.send(job);
        let inner = &self.inner;
        if inner.idle.load(Ordering::SeqCst) == 0 && inner.total.load(Ordering::SeqCst) < inner.core
        {
            self.spawn();
        }
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Threads alive.
    pub fn threads(&self) -> usize {
        self.inner.total.load(Ordering::SeqCst)
    }

    /// While jobs wait: replaces workers stuck in long jobs, so that `core`
    /// workers are free for ordinary ones.
    pub fn check(&self) {
        // A free worker is about to take the job.
        if self.queued() == 0 || self.inner.idle.load(Ordering::SeqCst) > 0 {
            return;
        }
        let now = now_ms();
        let stuck = {
            let seats = self.inner.seats.lock().unwrap_or_else(|e| e.into_inner());
            seats
                .iter()
                .filter(|s| {
                    let since = s.load(Ordering::Relaxed);
                    since != 0 && now.saturating_sub(since) >= STUCK_AFTER_MILLIS
                })
                .count()
        };
        let total = self.threads();
        let serving = total.saturating_sub(stuck);
        let wanted = self
            .inner
            .core
            .saturating_sub(serving)
            .min(self.inner.max.saturating_sub(total));
        for _ in 0..wanted {
            self.spawn();
        }
    }

    fn spawn(&self) {
        let inner = Arc::clone(&self.inner);
        inner.total.fetch_add(1, Ordering::SeqCst);
        inner.idle.fetch_add(1, Ordering::SeqCst);
        let seat = Arc::new(AtomicU64::new(0));
        inner
            .seats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::clone(&seat));
        let started = std::thread::Builder::new()
            .name("worker".into())
            .stack_size(WORKER_STACK_BYTES)
            .spawn({
                let inner = Arc::clone(&inner);
                let seat = Arc::clone(&seat);
                move || work(&inner, &seat)
            });
        if started.is_err() {
            // Out of threads: the jobs wait for the workers there are.
            leave(&inner, &seat);
        }
    }
}

fn work<J, W: Default>(inner: &Inner<J, W>, seat: &Arc<AtomicU64>) {
    let mut own = W::default();
    loop {
        let job = inner.rx.recv_timeout(Duration::from_secs(IDLE_EXIT_SECS));
        match job {
            Ok(job) => {
                inner.idle.fetch_sub(1, Ordering::SeqCst);
                seat.store(now_ms().max(1), Ordering::Relaxed);
                (inner.handler)(job, &mut own);
                seat.store(0, Ordering::Relaxed);
                inner.idle.fetch_add(1, Ordering::SeqCst);
            }
            Err(RecvTimeoutError::Timeout) => {
                let retired = inner
                    .total
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n > MIN_WORKERS).then(|| n - 1)
                    })
                    .is_ok();
                if retired {
                    inner.idle.fetch_sub(1, Ordering::SeqCst);
                    remove_seat(inner, seat);
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                leave(inner, seat);
                return;
            }
        }
    }
}

/// A waiting (or never started) worker leaves.
fn leave<J, W>(inner: &Inner<J, W>, seat: &Arc<AtomicU64>) {
    inner.idle.fetch_sub(1, Ordering::SeqCst);
    inner.total.fetch_sub(1, Ordering::SeqCst);
    remove_seat(inner, seat);
}

fn remove_seat<J, W>(inner: &Inner<J, W>, seat: &Arc<AtomicU64>) {
    let mut seats = inner.seats.lock().unwrap_or_else(|e| e.into_inner());
    seats.retain(|s| !Arc::ptr_eq(s, seat));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_quiet_pool_keeps_a_handful_of_threads() {
        let pool: Pool<(), ()> = Pool::new(64, 1000, |_, _| {});
        assert_eq!(pool.threads(), MIN_WORKERS);
    }

    #[test]
    fn stuck_workers_are_replaced_while_jobs_wait() {
        let (release_tx, release_rx) = crossbeam_channel::unbounded::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let done_tx = Mutex::new(done_tx);
        // Jobs `true` block until released; `false` finish at once.
        let pool: Pool<bool, ()> = Pool::new(2, 100, move |slow, _| {
            if slow {
                let _ = release_rx.recv();
            } else {
                let _ = done_tx.lock().unwrap().send(());
            }
        });
        for _ in 0..10 {
            pool.submit(true);
        }
        pool.submit(false);
        // Everything blocks until the pool sees its workers stuck.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(CHECK_EVERY_MILLIS));
            pool.check();
            if done_rx.try_recv().is_ok() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the quick job was never served"
            );
        }
        assert!(pool.threads() > 2 && pool.threads() <= 100);
        drop(release_tx);
    }
}
