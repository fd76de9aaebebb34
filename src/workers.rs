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
//! Knows nothing of HTTP: a job is whatever the handler takes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

/// The jobs waiting for a worker: a queue under a mutex, and a condvar
/// signalled only when a worker sleeps on it. (A channel's receiver spins
/// and yields before it sleeps: measured, four `sched_yield` per request;
/// and a condvar's notify is a `futex` call whether anyone waits or not.)
/// A worker that finds the queue empty sleeps at once: letting one spin
/// for 15 or 50 µs first saved the `futex` calls but cost more CPU than
/// it gave back on a 2-core host (README, "Performance").
struct JobQueue<J> {
    state: Mutex<QueueState<J>>,
    ready: Condvar,
    /// The queue's length, readable without the lock.
    len: AtomicUsize,
}

struct QueueState<J> {
    jobs: VecDeque<J>,
    /// Workers asleep on `ready`.
    sleeping: usize,
    /// The pool is gone: workers leave once the queue is empty.
    closed: bool,
}

enum Popped<J> {
    Job(J),
    TimedOut,
    Closed,
}

impl<J> JobQueue<J> {
    fn new() -> JobQueue<J> {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                sleeping: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            len: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, job: J) {
        let wake = {
            let mut state = self.lock();
            state.jobs.push_back(job);
            self.len.store(state.jobs.len(), Ordering::Relaxed);
            state.sleeping > 0
        };
        if wake {
            self.ready.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// The next job, waiting for one at most `timeout`.
    fn pop(&self, timeout: Duration) -> Popped<J> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                self.len.store(state.jobs.len(), Ordering::Relaxed);
                return Popped::Job(job);
            }
            if state.closed {
                return Popped::Closed;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Popped::TimedOut;
            }
            state.sleeping += 1;
            state = self
                .ready
                .wait_timeout(state, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            state.sleeping -= 1;
        }
    }
}

pub struct Pool<J, W> {
    inner: Arc<Inner<J, W>>,
}

struct Inner<J, W> {
    queue: JobQueue<J>,
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
        let core = core.max(1);
        let pool = Pool {
            inner: Arc::new(Inner {
                queue: JobQueue::new(),
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
        let inner = &self.inner;
        inner.queue.push(job);
        if inner.idle.load(Ordering::SeqCst) == 0 && inner.total.load(Ordering::SeqCst) < inner.core
        {
            self.spawn();
        }
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.inner.queue.len.load(Ordering::Relaxed)
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

impl<J, W> Drop for Pool<J, W> {
    /// Workers finish the jobs queued, then leave.
    fn drop(&mut self) {
        self.inner.queue.close();
    }
}

fn work<J, W: Default>(inner: &Inner<J, W>, seat: &Arc<AtomicU64>) {
    let mut own = W::default();
    loop {
        match inner.queue.pop(Duration::from_secs(IDLE_EXIT_SECS)) {
            Popped::Job(job) => {
                inner.idle.fetch_sub(1, Ordering::SeqCst);
                seat.store(now_ms().max(1), Ordering::Relaxed);
                (inner.handler)(job, &mut own);
                seat.store(0, Ordering::Relaxed);
                inner.idle.fetch_add(1, Ordering::SeqCst);
            }
            Popped::TimedOut => {
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
            Popped::Closed => {
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
