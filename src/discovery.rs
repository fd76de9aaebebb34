//! Route discovery: the one thread that follows etcd and publishes route
//! tables.
//!
//! The loop, the same for v2 and v3 ([`crate::etcd::Api`]): a snapshot,
//! then a watch from its revision, applying each change and publishing a
//! new [`RouteTable`] in which only the changed domains are rebuilt.
//! Routes are removed only by etcd's own answers, a watch event or a
//! snapshot: an error, a timeout or an unreachable member leaves the table
//! as it is. The rules (docs/etcd.md has the etcd behaviour behind them):
//!
//! - The watch is read on a thread of its own, so this one sees silence.
//!   Silence is normal (etcd sends nothing while nothing changes), so
//!   after [`PROBE_QUIET_MILLIS`] of it a quorum read with a short timeout
//!   asks the member whether it still answers for its cluster; a frozen or
//!   cut-off member fails it and is left for the next endpoint, where the
//!   watch resumes from the same revision, losing nothing.
//! - History cleared, compacted or a store that went backwards: a fresh
//!   snapshot and a watch from it, the difference logged.
//! - Every `--resync-interval` (jittered) the whole directory is read again
//!   and compared with the table; drift is repaired and logged (`etcd.sync`
//!   says how much), so a watch that stalls silently cannot last.
//! - With `--state-file`, the table and its revision are saved after
//!   changes (at most once a second); a router that starts while etcd
//!   cannot be reached serves from the file, then from etcd when it
//!   answers.
//!
//! Route and etcd events go to the log's audit queue, which drops nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::etcd::{Api, ApiChoice, EtcdError, Recovery, Revision, Snapshot, Watch, Watched};
use crate::etcd_v2::EtcdV2;
use crate::etcd_v3::EtcdV3;
use crate::event::Event;
use crate::log::Logger;
use crate::route_set::{Diff, RouteSet};
use crate::routes::SharedTable;
use crate::state_file;

pub const BACKOFF_MIN_MILLIS: u64 = 100;
pub const BACKOFF_MAX_MILLIS: u64 = 5_000;
/// A watch this quiet gets its member probed (see the module docs).
pub const PROBE_QUIET_MILLIS: u64 = 3_000;
/// The state file is written at most this often.
const STATE_WRITE_MILLIS: u64 = 1_000;
/// Changes a watch thread may queue before it waits for this one.
const WATCH_QUEUE: usize = 64;

/// Discovery's part of the command line.
#[derive(Debug, Clone)]
pub struct DiscoverySettings {
    pub endpoints: Vec<String>,
    /// Normalised: leading `/`, no trailing `/` (the root is empty).
    pub etcd_key: String,
    pub api: ApiChoice,
    pub state_file: Option<PathBuf>,
    /// The period of the full re-read; zero turns it off.
    pub resync_interval: Duration,
}

/// Where the table came from and how discovery is doing, for the admin
/// side to read. Written by the discovery thread only, at its pace (never
/// on the request path).
#[derive(Debug, Default)]
pub struct Status {
    view: Mutex<StatusView>,
}

/// Where the table being served came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableSource {
    Etcd,
    StateFile,
}

impl TableSource {
    pub fn name(self) -> &'static str {
        match self {
            TableSource::Etcd => "etcd",
            TableSource::StateFile => "state_file",
        }
    }
}

/// What discovery is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Choosing the API, taking the first snapshot.
    #[default]
    Starting,
    /// Watching a member.
    Watching,
    /// The last attempt failed; retrying (the table is kept).
    Failing,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Watching => "watching",
            Phase::Failing => "failing",
        }
    }
}

/// A copy of [`Status`] at one moment.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    /// Once a table was loaded; `None` before.
    pub source: Option<TableSource>,
    /// `v2` or `v3`, once chosen.
    pub api: &'static str,
    /// The endpoint in use.
    pub endpoint: String,
    pub state: Phase,
    /// etcd's revision (v3) or index (v2) the table stands at.
    pub revision: Option<Revision>,
    /// The last change etcd sent, or the last snapshot.
    pub last_event_at: Option<SystemTime>,
    /// The last failure, and when.
    pub last_error: Option<(String, SystemTime)>,
    /// The last whole snapshot (or state file): revision, digest, when.
    pub synced: Option<(Revision, String, SystemTime)>,
    pub domains: usize,
    pub routes: usize,
}

impl Status {
    pub fn view(&self) -> StatusView {
        // A poisoned lock still holds a whole view: every write is a
        // field assignment.
        match self.view.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut StatusView)) {
        let mut v = match self.view.lock() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        change(&mut v);
    }
}

/// Capped exponential backoff.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(BACKOFF_MIN_MILLIS),
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(BACKOFF_MIN_MILLIS);
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_millis(BACKOFF_MAX_MILLIS));
        now
    }
}

/// Why a watch session ended.
enum Ended {
    /// Reopen the watch on the same member (it went idle).
    Reopen,
    /// A failure, handled by [`Discovery::fail`].
    Failed(EtcdError),
    /// Time for the periodic re-read.
    Resync,
    Stopped,
}

/// The discovery thread's state.
pub struct Discovery {
    settings: DiscoverySettings,
    api: Option<Box<dyn Api>>,
    current: usize,
    routes: RouteSet,
    /// Where the table is in etcd's history; `None` until a snapshot (a
    /// table from the state file has none: it is replaced by etcd's view).
    revision: Option<Revision>,
    table: Arc<SharedTable>,
    status: Arc<Status>,
    log: Logger,
    stop: Arc<AtomicBool>,
    backoff: Backoff,
    /// Failures in a row, to know when every endpoint has failed once.
    failures: usize,
    state_loaded: bool,
    /// A snapshot from etcd has been applied.
    synced: bool,
    /// The current member answered since the last failure.
    member_checked: bool,
    /// Changes not yet in the state file.
    unsaved: bool,
    saved_at: Option<Instant>,
    next_resync: Option<Instant>,
    /// The watch has been announced (`etcd.listen`) since the last
    /// snapshot or failure.
    announced: bool,
}

impl Discovery {
    pub fn new(
        settings: DiscoverySettings,
        table: Arc<SharedTable>,
        status: Arc<Status>,
        log: Logger,
        stop: Arc<AtomicBool>,
    ) -> Discovery {
        status.update(|v| {
            v.state = Phase::Starting;
            v.endpoint = settings.endpoints.first().cloned().unwrap_or_default();
        });
        Discovery {
            routes: RouteSet::new(&settings.etcd_key),
            settings,
            api: None,
            current: 0,
            revision: None,
            table,
            status,
            log,
            stop,
            backoff: Backoff::new(),
            failures: 0,
            state_loaded: false,
            synced: false,
            member_checked: false,
            unsaved: false,
            saved_at: None,
            next_resync: None,
            announced: false,
        }
    }

    fn endpoint(&self) -> String {
        self.settings
            .endpoints
            .get(self.current)
            .cloned()
            .unwrap_or_default()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Runs until `stop` is set (checked at least every
    /// [`PROBE_QUIET_MILLIS`]; a snapshot in progress can hold the thread
    /// for its timeout, so the caller does not join it).
    pub fn run(mut self) {
        while !self.stopped() {
            let step = match (self.api.is_some(), self.revision) {
                (false, _) => self.choose_api().map(|api| {
                    self.api = Some(api);
                }),
                (true, None) => self.sync("start"),
                (true, Some(revision)) => match self.follow(revision) {
                    Ended::Reopen => Ok(()),
                    Ended::Stopped => break,
                    Ended::Resync => {
                        // Not again at once should this one fail.
                        self.next_resync = self.resync_deadline();
                        self.sync("anti_entropy")
                    }
                    Ended::Failed(e) => Err(e),
                },
            };
            match step {
                Ok(()) => {}
                Err(e) if e.recovery == Recovery::Resync => {
                    self.log.emit(Event::EtcdResync {
                        endpoint: e.endpoint.clone(),
                        reason: e.kind,
                        detail: e.detail.clone(),
                        revision: self.revision,
                    });
                    self.revision = None;
                    sleep_unless_stopped(self.backoff.step(), &self.stop);
                }
                Err(e) => self.fail(&e),
            }
        }
        self.save_state(true);
    }

    /// `--etcd-api auto`: v3 if the member's v3 store has keys under the
    /// directory; else v2 if the member serves v2 (etcd has served it only
    /// when started with `--enable-v2` since 3.4, and 3.4 and 3.5 keep
    /// the two stores apart, so a cluster with v2 on is one whose routes
    /// are written through v2, as the original tool's were); else v3.
    fn choose_api(&mut self) -> Result<Box<dyn Api>, EtcdError> {
        let key = self.settings.etcd_key.clone();
        let (api, reason): (Box<dyn Api>, String) = match self.settings.api {
            ApiChoice::V2 => (Box::new(EtcdV2::new(&key)), "--etcd-api v2".into()),
            ApiChoice::V3 => (Box::new(EtcdV3::new(&key)), "--etcd-api v3".into()),
            ApiChoice::Auto => {
                let endpoint = self.endpoint();
                let v3 = EtcdV3::new(&key).detect(&endpoint)?;
                let v2 = EtcdV2::new(&key).detect(&endpoint)?;
                match (v3, v2) {
                    (Some(true), Some(true)) => (
                        Box::new(EtcdV3::new(&key)),
                        format!("both the v2 and the v3 store hold keys under {key}/: v3 (--etcd-api v2 to use v2)"),
                    ),
                    (Some(true), _) => (Box::new(EtcdV3::new(&key)), format!("the v3 store holds keys under {key}/")),
                    (_, Some(_)) => (
                        Box::new(EtcdV2::new(&key)),
                        "etcd serves the v2 API (started with --enable-v2) and its v3 store has nothing under the key".into(),
                    ),
                    (Some(false), None) => (Box::new(EtcdV3::new(&key)), "etcd does not serve the v2 API".into()),
                    (None, None) => {
                        return Err(EtcdError::new(
                            &endpoint,
                            "v3_unavailable",
                            "serves neither the v2 API nor the v3 JSON gateway",
                        ));
                    }
                }
            }
        };
        self.log.emit(Event::EtcdApi {
            endpoint: self.endpoint(),
            api: api.name(),
            reason,
        });
        let name = api.name();
        self.status.update(|v| v.api = name);
        Ok(api)
    }

    /// A whole new snapshot, compared with the table: the difference is
    /// applied and logged, and `etcd.sync` says where the table stands.
    fn sync(&mut self, reason: &str) -> Result<(), EtcdError> {
        let endpoint = self.endpoint();
        let Some(api) = &self.api else {
            return Ok(());
        };
        // A frozen member would hold the snapshot for its whole timeout.
        api.probe(&endpoint)?;
        let Snapshot {
            revision,
            leaves,
            root_is_leaf,
        } = api.snapshot(&endpoint)?;
        let reason = if reason == "start" && self.synced {
            "resync"
        } else {
            reason
        };
        let removal = if reason == "start" { "resync" } else { reason };
        let diff = self.routes.replace(leaves, root_is_leaf, removal);
        self.publish(&diff, Some(revision));
        self.revision = Some(revision);
        self.synced = true;
        self.member_checked = true;
        self.announced = false;
        self.backoff.reset();
        self.failures = 0;
        let digest = self.routes.digest();
        let (domains, routes) = (self.routes.domains(), self.routes.len());
        let now = SystemTime::now();
        self.status.update(|v| {
            v.source = Some(TableSource::Etcd);
            v.endpoint = endpoint.clone();
            v.revision = Some(revision);
            v.last_event_at = Some(now);
            v.synced = Some((revision, digest.clone(), now));
            (v.domains, v.routes) = (domains, routes);
        });
        self.log.emit(Event::EtcdSync {
            endpoint,
            api: self.api_name(),
            reason: reason.to_string(),
            revision,
            domains,
            routes,
            digest,
            drift: if reason == "anti_entropy" {
                diff.changes()
            } else {
                0
            },
        });
        self.next_resync = self.resync_deadline();
        self.save_state(false);
        Ok(())
    }

    fn api_name(&self) -> &'static str {
        self.api.as_ref().map_or("", |a| a.name())
    }

    /// The next full re-read: the interval, give or take a fifth, so a
    /// fleet of routers started together does not read together.
    fn resync_deadline(&self) -> Option<Instant> {
        let every = self.settings.resync_interval;
        if every.is_zero() {
            return None;
        }
        // Jitter from the clock's nanoseconds and the pid: no RNG needed.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let factor = 0.8 + f64::from(seed % 1000) / 2500.0;
        Some(Instant::now() + every.mul_f64(factor))
    }

    /// Applies a diff to the table, logs it and marks the state unsaved.
    fn publish(&mut self, diff: &Diff, revision: Option<Revision>) {
        // The table first: logging a large diff can wait for the log thread.
        if diff.changes() > 0 {
            let previous = self.table.load();
            self.table.store(self.routes.table(&previous, diff));
        }
        diff.log(&self.log, revision);
        self.unsaved |= diff.changes() > 0 || self.saved_at.is_none();
    }

    /// Watches from `revision` until the watch ends, fails or is given up.
    fn follow(&mut self, revision: Revision) -> Ended {
        let endpoint = self.endpoint();
        let Some(api) = &self.api else {
            return Ended::Reopen;
        };
        // On a member not yet checked (after a failure), the probe first: a
        // frozen one would hold the watch's first answer.
        if !self.member_checked {
            if let Err(e) = api.probe(&endpoint) {
                return Ended::Failed(e);
            }
            self.member_checked = true;
        }
        let watch = match api.watch(&endpoint, revision) {
            Ok(w) => w,
            Err(e) => return Ended::Failed(e),
        };
        if !self.announced {
            self.log.emit(Event::EtcdListen {
                endpoint: endpoint.clone(),
                api: self.api_name(),
                revision,
                index: revision,
                routes: self.routes.len(),
            });
            self.status.update(|v| {
                v.state = Phase::Watching;
                v.endpoint = endpoint.clone();
            });
            self.announced = true;
        }
        let events = spawn_reader(watch);
        let mut quiet_since = Instant::now();
        loop {
            if self.stopped() {
                return Ended::Stopped;
            }
            self.save_state(false);
            if self.next_resync.is_some_and(|t| Instant::now() >= t) {
                return Ended::Resync;
            }
            let wait = Duration::from_millis(PROBE_QUIET_MILLIS)
                .saturating_sub(quiet_since.elapsed())
                .min(Duration::from_millis(STATE_WRITE_MILLIS / 2));
            match events.recv_timeout(wait) {
                Ok(Ok(Watched::Events(batch))) => {
                    quiet_since = Instant::now();
                    self.backoff.reset();
                    self.failures = 0;
                    let mut diff = Diff::default();
                    let mut last = self.revision.unwrap_or(revision);
                    for event in &batch {
                        self.routes.apply(&event.change, &mut diff);
                        last = last.max(event.revision);
                    }
                    self.revision = Some(last);
                    self.publish(&diff, Some(last));
                    let (domains, routes) = (self.routes.domains(), self.routes.len());
                    self.status.update(|v| {
                        v.revision = Some(last);
                        v.last_event_at = Some(SystemTime::now());
                        (v.domains, v.routes) = (domains, routes);
                    });
                }
                Ok(Ok(Watched::Progress(at))) => {
                    quiet_since = Instant::now();
                    self.revision = Some(self.revision.unwrap_or(revision).max(at));
                    let revision = self.revision;
                    self.status.update(|v| v.revision = revision);
                }
                Ok(Ok(Watched::Idle)) => return Ended::Reopen,
                Ok(Err(e)) => return Ended::Failed(e),
                Err(RecvTimeoutError::Disconnected) => {
                    return Ended::Failed(EtcdError::new(
                        &endpoint,
                        "stream_ended",
                        "the watch thread ended",
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    if quiet_since.elapsed() < Duration::from_millis(PROBE_QUIET_MILLIS) {
                        continue;
                    }
                    // Silent for a while: is the member still there?
                    let Some(api) = &self.api else {
                        return Ended::Reopen;
                    };
                    if let Err(e) = api.probe(&endpoint) {
                        return Ended::Failed(e);
                    }
                    quiet_since = Instant::now();
                }
            }
        }
    }

    /// Logs the failure, moves to the next endpoint and backs off. Loads
    /// the state file once every endpoint has failed and no table came
    /// from etcd yet.
    fn fail(&mut self, e: &EtcdError) {
        let delay = self.backoff.step();
        self.failures += 1;
        self.log.emit(Event::EtcdError {
            endpoint: Some(e.endpoint.clone()),
            kind: e.kind,
            error: e.to_string(),
            revision: self.revision,
            wait_index: self.revision.map(|r| r.saturating_add(1)),
            retry_in_ms: Some(delay.as_millis() as u64),
            routes: Some(self.routes.len()),
            action: None,
            key: None,
        });
        self.status.update(|v| {
            v.state = Phase::Failing;
            v.last_error = Some((e.to_string(), SystemTime::now()));
        });
        self.announced = false;
        self.member_checked = false;
        self.current = (self.current + 1) % self.settings.endpoints.len().max(1);
        if self.revision.is_none() && self.failures >= self.settings.endpoints.len() {
            self.load_state();
        }
        sleep_unless_stopped(delay, &self.stop);
    }

    fn load_state(&mut self) {
        let Some(path) = self.settings.state_file.clone() else {
            return;
        };
        if std::mem::replace(&mut self.state_loaded, true) {
            return;
        }
        match state_file::load(&path, &self.settings.etcd_key) {
            Ok(saved) => {
                let diff = self.routes.replace(saved.leaves, false, "state_file");
                self.publish(&diff, None);
                // Nothing new to save: this is what the file says.
                self.unsaved = false;
                let digest = self.routes.digest();
                let (domains, routes) = (self.routes.domains(), self.routes.len());
                self.status.update(|v| {
                    v.source = Some(TableSource::StateFile);
                    v.synced = Some((saved.revision, digest.clone(), SystemTime::now()));
                    (v.domains, v.routes) = (domains, routes);
                });
                self.log.emit(Event::StateLoad {
                    path: path.display().to_string(),
                    api: saved.api,
                    revision: saved.revision,
                    saved_at: saved.saved_at,
                    domains,
                    routes,
                    digest,
                });
            }
            Err(why) => self.log.emit(Event::StateError {
                path: path.display().to_string(),
                error: format!("state file ignored: {why}"),
            }),
        }
    }

    /// Writes the state file if there are unsaved changes and the last
    /// write is old enough (or `now`).
    fn save_state(&mut self, now: bool) {
        let (Some(path), Some(revision)) = (&self.settings.state_file, self.revision) else {
            return;
        };
        if !self.unsaved
            || (!now
                && self
                    .saved_at
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(STATE_WRITE_MILLIS)))
        {
            return;
        }
        self.saved_at = Some(Instant::now());
        match state_file::save(
            path,
            self.api_name(),
            &self.settings.etcd_key,
            revision,
            self.routes.leaves(),
        ) {
            Ok(()) => self.unsaved = false,
            Err(e) => self.log.emit(Event::StateError {
                path: path.display().to_string(),
                error: format!("cannot write the state file: {e}"),
            }),
        }
    }
}

/// Reads `watch` on a thread of its own until it ends. A watch given up
/// (its receiver dropped) ends at its next message or idle timeout.
fn spawn_reader(mut watch: Box<dyn Watch>) -> Receiver<Result<Watched, EtcdError>> {
    let (tx, rx) = crossbeam_channel::bounded(WATCH_QUEUE);
    let spawned = std::thread::Builder::new()
        .name("etcd-watch".into())
        .spawn(move || {
            loop {
                let next = watch.next();
                let more = matches!(next, Ok(Watched::Events(_) | Watched::Progress(_)));
                if tx.send(next).is_err() || !more {
                    return;
                }
            }
        });
    // Without a thread, the receiver reports disconnection at once: a
    // failure like any other, and the next try comes after a backoff.
    drop(spawned);
    rx
}

fn sleep_unless_stopped(total: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut slept = Duration::ZERO;
    while slept < total && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(step.min(total - slept));
        slept += step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let mut b = Backoff::new();
        let steps: Vec<u64> = (0..10).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps[0], BACKOFF_MIN_MILLIS);
        assert!(steps.iter().all(|&s| s <= BACKOFF_MAX_MILLIS));
        assert_eq!(*steps.last().unwrap(), BACKOFF_MAX_MILLIS);
    }
}
