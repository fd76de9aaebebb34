//! The poller: one thread that owns the listening socket and every client
//! connection no worker is serving (idle keep-alive connections, and those
//! whose request head has not all arrived), so that such a connection
//! costs a socket and a few dozen bytes, not a thread.
//!
//! With `mio` (epoll, edge-triggered) it reads heads as they come and hands
//! a connection to the worker pool once [`HeadScan`] says a worker can read
//! the head without waiting; the worker hands it back ([`Back`]) when it is
//! idle again. It enforces the head deadline and the keep-alive timeout
//! (ordered sets of deadlines: the next one due is the first), and the
//! connection cap: at the cap the longest-idle keep-alive connection is
//! closed to make room, and when none is idle, accepting pauses (new
//! connections wait in the kernel's backlog) until a connection closes.
//!
//! All of this state is the poller thread's alone; workers talk to it
//! through a channel and wake it only when it sleeps. It never blocks on
//! a socket and never writes an answer: a refusal is a worker's job.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use crate::event::Event;
use crate::health::now_ms;
use crate::http1::HeadScan;
use crate::log::Logger;
use crate::metrics::Metrics;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
/// The poller's read buffer; heads are copied out of it.
const READ_BYTES: usize = 16 * 1024;
/// `server.saturated` is logged at most this often.
const SATURATION_LOG_EVERY_MILLIS: u64 = 10_000;
/// After accept fails for want of file descriptors, it is tried again
/// this much later (the connection waits in the backlog meanwhile).
const ACCEPT_RETRY_MILLIS: u64 = 50;
/// The longest the poller sleeps while workers hold connections: an idle
/// connection handed back without waking it (see [`Handback::send`]) has
/// its keep-alive timeout counted from the poller's next turn, so at most
/// this much late.
pub const LAZY_BACK_MILLIS: u64 = 250;

/// A client connection while the poller holds it.
pub struct Parked {
    pub sock: TcpStream,
    pub peer: SocketAddr,
    /// What has arrived of the next request head (empty when idle).
    pub pending: Vec<u8>,
    /// The client has ended its side (after what is pending): once the
    /// requests it sent are answered, the connection closes. (Its edge is
    /// spent, so nothing would tell the poller again.)
    pub eof: bool,
    /// Set by the poller when the socket became readable while a worker
    /// held it (the edge is spent): the worker then wakes the poller when
    /// it hands the connection back, so the bytes are read at once.
    pub away: Arc<AtomicBool>,
    scan: HeadScan,
}

impl Parked {
    fn new(sock: TcpStream, peer: SocketAddr, pending: Vec<u8>, away: Arc<AtomicBool>) -> Parked {
        let mut scan = HeadScan::default();
        if !pending.is_empty() {
            scan.ready(&pending);
        }
        Parked {
            sock,
            peer,
            pending,
            eof: false,
            away,
            scan,
        }
    }
}

/// A connection handed to a worker.
pub struct Job {
    pub token: usize,
    /// Its head is ready, or its deadline has passed (the worker then
    /// finds nothing more to read, answers 408, or nothing if nothing was
    /// sent, and closes).
    pub conn: Parked,
}

/// What a worker tells the poller about a connection it was given.
pub enum Back {
    /// Served and idle again, or holding part of the next head.
    Park {
        token: usize,
        sock: TcpStream,
        peer: SocketAddr,
        pending: Vec<u8>,
        away: Arc<AtomicBool>,
    },
    /// Closed (the socket is already dropped).
    Closed { token: usize },
    /// Carrying an upgraded connection until [`Back::Closed`]; shut at
    /// shutdown through this handle.
    Tunnel {
        token: usize,
        stream: Arc<std::net::TcpStream>,
    },
}

/// The workers' way back to the poller.
#[derive(Clone)]
pub struct Handback {
    tx: Sender<Back>,
    waker: Arc<Waker>,
    sleeping: Arc<AtomicBool>,
    /// The poller stopped accepting at the cap.
    paused: Arc<AtomicBool>,
}

impl Handback {
    /// Wakes the poller (to see the stop flag).
    pub fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// Sends `back`; false if the poller is gone (the router is stopping:
    /// whatever the message holds is dropped, which closes it).
    ///
    /// An idle connection coming back does not wake the poller (that would
    /// cost a `write` and a turn of the poller per request): the client's
    /// next request wakes it anyway, and it takes the messages in after
    /// the events, so the readiness noted while the connection was away
    /// is seen. Only its keep-alive deadline waits for the poller's next
    /// turn, at most [`LAZY_BACK_MILLIS`]. Anything else wakes it, and so
    /// does any message while accepting is paused at the cap.
    pub fn send(&self, back: Back) -> bool {
        let lazy = match &back {
            Back::Park { pending, away, .. } if pending.is_empty() => {
                Some(Arc::clone(away)).filter(|_| !self.paused.load(Ordering::SeqCst))
            }
            _ => None,
        };
        if self.tx.send(back).is_err() {
            return false;
        }
        // Checked after the send: either the poller noted the readiness
        // before it last took messages in (and so finds this one), or this
        // sees the note. The poller clears `sleeping` before it looks at
        // the channel, so either it sees this message or this sees it
        // asleep.
        let urgent = lazy.is_none_or(|away| away.load(Ordering::SeqCst));
        if urgent && self.sleeping.load(Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
        true
    }
}

/// Limits the poller enforces.
#[derive(Debug, Clone, Copy)]
pub struct PollerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
}

/// What the poller needs from the server: where jobs go.
pub trait Dispatch {
    fn dispatch(&self, job: Job);
    /// Called at least every [`crate::workers::CHECK_EVERY_MILLIS`] while
    /// jobs wait.
    fn check(&self);
    fn queued(&self) -> usize;
}

/// Who holds a connection.
enum Slot {
    Free,
    Parked {
        conn: Parked,
        deadline: Instant,
        /// In the keep-alive set (no byte of a next request yet), not the
        /// head set.
        idle: bool,
    },
    /// A worker has it; `away` notes readiness that came meanwhile (the
    /// edge is spent, so the poller reads when it comes back).
    Busy {
        away: Arc<AtomicBool>,
    },
    /// The poller itself is reading it (within one call).
    Reading,
    Tunnel(Arc<std::net::TcpStream>),
}

/// A poller made on the caller's thread (so that errors are reported
/// there), to be run on its own with [`Poller::run`].
pub struct Poller {
    poll: Poll,
    listener: TcpListener,
    limits: PollerLimits,
    log: Logger,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    back_rx: Receiver<Back>,
    sleeping: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl Poller {
    pub fn new(
        listener: std::net::TcpListener,
        limits: PollerLimits,
        log: Logger,
        stop: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> io::Result<(Poller, Handback, Registry)> {
        let poll = Poll::new()?;
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let registry = poll.registry().try_clone()?;
        let (tx, back_rx) = crossbeam_channel::unbounded();
        let sleeping = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let handback = Handback {
            tx,
            waker,
            sleeping: Arc::clone(&sleeping),
            paused: Arc::clone(&paused),
        };
        let poller = Poller {
            poll,
            listener,
            limits,
            log,
            stop,
            metrics,
            back_rx,
            sleeping,
            paused,
        };
        Ok((poller, handback, registry))
    }

    /// Runs until the stop flag is set (and the poller woken): then closes
    /// the listener, every parked connection and every tunnel.
    pub fn run<D: Dispatch>(self, dispatch: D) {
        Running {
            poll: self.poll,
            listener: Some(self.listener),
            limits: self.limits,
            dispatch,
            log: self.log,
            stop: self.stop,
            metrics: self.metrics,
            back_rx: self.back_rx,
            sleeping: self.sleeping,
            paused_flag: self.paused,
            busy: 0,
            slots: Vec::new(),
            free: Vec::new(),
            open: 0,
            heads: BTreeSet::new(),
            keepalive: BTreeSet::new(),
            paused: false,
            retry_accept_at: None,
            saturation_logged_ms: 0,
            buf: vec![0u8; READ_BYTES].into_boxed_slice(),
        }
        .run();
    }
}

/// The running poller's state.
struct Running<D> {
    poll: Poll,
    listener: Option<TcpListener>,
    limits: PollerLimits,
    dispatch: D,
    log: Logger,
    stop: Arc<AtomicBool>,
    /// Where `open` is published.
    metrics: Arc<Metrics>,
    back_rx: Receiver<Back>,
    sleeping: Arc<AtomicBool>,
    /// `paused`, for the workers (see [`Handback::send`]).
    paused_flag: Arc<AtomicBool>,
    /// Connections workers hold.
    busy: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    open: usize,
    /// Parked connections waiting for a head, by deadline.
    heads: BTreeSet<(Instant, usize)>,
    /// Idle keep-alive connections, by deadline (also the order in which
    /// they are closed at the cap).
    keepalive: BTreeSet<(Instant, usize)>,
    /// Not accepting: at the cap with nothing idle.
    paused: bool,
    /// Not accepting until then: out of file descriptors.
    retry_accept_at: Option<Instant>,
    saturation_logged_ms: u64,
    buf: Box<[u8]>,
}

impl<D: Dispatch> Running<D> {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.timeout();
            self.sleeping.store(true, Ordering::SeqCst);
            let timeout = if self.back_rx.is_empty() {
                timeout
            } else {
                Some(Duration::ZERO)
            };
            let polled = self.poll.poll(&mut events, timeout);
            self.sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = polled
                && e.kind() != io::ErrorKind::Interrupted
            {
                // Nothing the poller can mend; a short pause keeps a
                // persistent failure from spinning.
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => self.readable(t, event.is_read_closed()),
                }
            }
            while let Ok(back) = self.back_rx.try_recv() {
                self.take_back(back);
            }
            self.expire();
            if self.paused || self.retry_accept_at.is_some_and(|t| Instant::now() >= t) {
                self.retry_accept_at = None;
                self.set_paused(false);
                self.accept();
            }
            if self.dispatch.queued() > 0 {
                self.dispatch.check();
            }
        }
        self.close_all();
    }

    /// Until the next deadline, or the next pool check while jobs wait.
    fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next = [self.heads.first(), self.keepalive.first()]
            .into_iter()
            .flatten()
            .map(|&(at, _)| at)
            .chain(self.retry_accept_at)
            .min();
        let tick = if self.dispatch.queued() > 0 {
            Some(crate::workers::CHECK_EVERY_MILLIS)
        } else if self.busy > 0 {
            Some(LAZY_BACK_MILLIS)
        } else {
            None
        };
        if let Some(millis) = tick {
            let at = now + Duration::from_millis(millis);
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        // Rounded up to whole milliseconds (epoll's unit), so a deadline is
        // never polled for just before it is due.
        next.map(|at| {
            let left = at.saturating_duration_since(now);
            Duration::from_millis(
                u64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u64::MAX),
            )
        })
    }

    fn accept(&mut self) {
        while !self.paused && self.retry_accept_at.is_none() {
            if self.open >= self.limits.max_connections {
                let closed_idle = self.close_longest_idle();
                self.log_saturated(closed_idle);
                if !closed_idle {
                    self.set_paused(true);
                    return;
                }
            }
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((sock, peer)) => self.admit(sock, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(_) => {
                    // EMFILE and friends: try again shortly.
                    self.retry_accept_at =
                        Some(Instant::now() + Duration::from_millis(ACCEPT_RETRY_MILLIS));
                }
            }
        }
    }

    fn admit(&mut self, mut sock: TcpStream, peer: SocketAddr) {
        let _ = sock.set_nodelay(true);
        let token = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::Free);
            self.slots.len() - 1
        });
        if self
            .poll
            .registry()
            .register(&mut sock, Token(token), Interest::READABLE)
            .is_err()
        {
            self.free.push(token);
            return;
        }
        self.open += 1;
        self.metrics
            .connections_open
            .store(self.open, Ordering::Relaxed);
        // The first request's head is due within the header timeout of
        // the accept: a silent connection cannot sit on a slot.
        let deadline = Instant::now() + self.limits.header_timeout;
        // Bytes that came before the registration are reported by it.
        let away = Arc::new(AtomicBool::new(false));
        self.park(
            token,
            Parked::new(sock, peer, Vec::new(), away),
            deadline,
            false,
        );
    }

    fn park(&mut self, token: usize, conn: Parked, deadline: Instant, idle: bool) {
        let set = if idle {
            &mut self.keepalive
        } else {
            &mut self.heads
        };
        set.insert((deadline, token));
        self.slots[token] = Slot::Parked {
            conn,
            deadline,
            idle,
        };
    }

    /// Takes a parked connection out of its deadline set, with its
    /// deadline.
    fn unpark(&mut self, token: usize) -> Option<(Parked, Instant)> {
        let slot = std::mem::replace(&mut self.slots[token], Slot::Reading);
        match slot {
            Slot::Parked {
                conn,
                deadline,
                idle,
            } => {
                let set = if idle {
                    &mut self.keepalive
                } else {
                    &mut self.heads
                };
                set.remove(&(deadline, token));
                Some((conn, deadline))
            }
            other => {
                self.slots[token] = other;
                None
            }
        }
    }

    fn readable(&mut self, token: usize, read_closed: bool) {
        match self.slots.get_mut(token) {
            Some(Slot::Parked { .. }) => self.read(token, read_closed),
            Some(Slot::Busy { away }) => away.store(true, Ordering::SeqCst),
            _ => {}
        }
    }

    /// Reads what has arrived on a parked connection; hands it to a worker
    /// once its head is ready, closes it when the client has.
    fn read(&mut self, token: usize, read_closed: bool) {
        let Some((mut conn, mut deadline)) = self.unpark(token) else {
            return;
        };
        let was_idle = conn.pending.is_empty();
        conn.eof |= read_closed;
        loop {
            match (&conn.sock).read(&mut self.buf) {
                // A client that ends its side after part of a head is
                // answered (400) by a worker, as any cut head is.
                Ok(0) if conn.pending.is_empty() => return self.close(token, conn),
                Ok(0) => {
                    conn.eof = true;
                    return self.dispatch(token, conn);
                }
                Ok(n) => {
                    conn.pending.extend_from_slice(&self.buf[..n]);
                    if conn.scan.ready(&conn.pending) || conn.eof {
                        // A full read may have left bytes whose edge is
                        // spent: the worker's hand-back must then wake the
                        // poller to read them.
                        if n == self.buf.len() {
                            conn.away.store(true, Ordering::SeqCst);
                        }
                        return self.dispatch(token, conn);
                    }
                    // A short read emptied the socket: its next byte brings
                    // a new edge.
                    if n < self.buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(token, conn),
            }
        }
        let idle = conn.pending.is_empty();
        if was_idle && !idle {
            // The first byte of a head starts its deadline (empty lines
            // before a request line too, so that sending them now and
            // then cannot keep a connection open).
            deadline = Instant::now() + self.limits.header_timeout;
        }
        self.park(token, conn, deadline, idle);
    }

    fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        self.paused_flag.store(paused, Ordering::SeqCst);
    }

    fn dispatch(&mut self, token: usize, conn: Parked) {
        self.busy += 1;
        self.slots[token] = Slot::Busy {
            away: Arc::clone(&conn.away),
        };
        self.dispatch.dispatch(Job { token, conn });
    }

    fn close(&mut self, token: usize, conn: Parked) {
        drop(conn);
        self.release(token);
    }

    fn free_slot(&mut self, token: usize) {
        self.slots[token] = Slot::Free;
        self.free.push(token);
        self.open = self.open.saturating_sub(1);
        self.metrics
            .connections_open
            .store(self.open, Ordering::Relaxed);
    }

    /// A connection has closed: its slot is free, and accepting resumes if
    /// it was paused at the cap.
    fn release(&mut self, token: usize) {
        self.free_slot(token);
        if self.paused {
            self.set_paused(false);
            self.accept();
        }
    }

    fn take_back(&mut self, back: Back) {
        match back {
            Back::Park {
                token,
                sock,
                peer,
                pending,
                away,
            } => {
                self.busy = self.busy.saturating_sub(1);
                let missed = away.swap(false, Ordering::SeqCst);
                let idle = pending.is_empty();
                let timeout = if idle {
                    self.limits.keepalive_timeout
                } else {
                    self.limits.header_timeout
                };
                self.park(
                    token,
                    Parked::new(sock, peer, pending, away),
                    Instant::now() + timeout,
                    idle,
                );
                if missed {
                    self.read(token, false);
                } else if self.paused {
                    // Idle now, so it can give way to a new connection.
                    self.set_paused(false);
                    self.accept();
                }
            }
            Back::Closed { token } => {
                self.busy = self.busy.saturating_sub(1);
                self.release(token);
            }
            Back::Tunnel { token, stream } => self.slots[token] = Slot::Tunnel(stream),
        }
    }

    /// Heads past their deadline go to a worker (to be answered 408);
    /// keep-alive connections past theirs are closed.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(at, token)) = self.heads.first() {
            if at > now {
                break;
            }
            self.heads.pop_first();
            if let Some((conn, _)) = self.unpark(token) {
                self.dispatch(token, conn);
            }
        }
        while let Some(&(at, token)) = self.keepalive.first() {
            if at > now {
                break;
            }
            self.keepalive.pop_first();
            if let Some((conn, _)) = self.unpark(token) {
                self.close(token, conn);
            }
        }
    }

    /// At the cap: closes the keep-alive connection idle the longest, as
    /// its timeout would have. False if none is idle.
    fn close_longest_idle(&mut self) -> bool {
        let Some((_, token)) = self.keepalive.pop_first() else {
            return false;
        };
        match self.unpark(token) {
            Some((conn, _)) => {
                drop(conn);
                self.free_slot(token);
                true
            }
            None => false,
        }
    }

    fn log_saturated(&mut self, closed_idle: bool) {
        let now = now_ms();
        if self.saturation_logged_ms != 0
            && now.saturating_sub(self.saturation_logged_ms) < SATURATION_LOG_EVERY_MILLIS
        {
            return;
        }
        self.saturation_logged_ms = now.max(1);
        self.log.emit(Event::ServerSaturated {
            max_connections: self.limits.max_connections,
            closed_idle,
        });
    }

    fn close_all(&mut self) {
        // The listening socket first: new connections are refused now.
        self.listener = None;
        while let Ok(back) = self.back_rx.try_recv() {
            self.take_back(back);
        }
        for slot in &mut self.slots {
            match std::mem::replace(slot, Slot::Free) {
                Slot::Tunnel(stream) => {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
                busy @ Slot::Busy { .. } => *slot = busy,
                _ => {}
            }
        }
    }
}
