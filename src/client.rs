//! A client connection as a worker holds it: the poller's non-blocking
//! socket, read and written as if it were blocking, with timeouts.
//!
//! The socket stays non-blocking for its whole life (switching modes
//! would cost two system calls per request): a read or write that would
//! block waits in `poll(2)` for at most the timeout in force, then fails
//! with `TimedOut`. Setting a timeout is a store, not a `setsockopt`. The
//! read and write buffers belong to the worker thread and are reused from
//! connection to connection, so an idle connection holds none, and a
//! request allocates none.

use std::cell::Cell;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

/// Size of a worker's client read buffer (and of its write buffer).
pub const CLIENT_BUFFER_BYTES: usize = 16 * 1024;

/// The client's socket, non-blocking, with the timeouts of blocking I/O.
pub struct ClientSocket {
    stream: TcpStream,
    /// `None`: a read that would block fails at once with `WouldBlock`.
    read_timeout: Cell<Option<Duration>>,
    write_timeout: Duration,
}

impl ClientSocket {
    pub fn new(stream: TcpStream, write_timeout: Duration) -> ClientSocket {
        ClientSocket {
            stream,
            read_timeout: Cell::new(None),
            write_timeout,
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        self.read_timeout.set(timeout);
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Waits until the socket is ready for `events` (`POLLIN`/`POLLOUT`),
    /// at most `timeout`.
    fn wait(&self, events: libc::c_short, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let millis = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            let mut fd = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one pollfd that lives across the call, count 1.
            let r = unsafe { libc::poll(&mut fd, 1, millis) };
            match r {
                // Readable, writable, or an error or hang-up, which the
                // next read or write reports.
                1.. => return Ok(()),
                0 => {}
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Read for &ClientSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let Some(timeout) = self.read_timeout.get() else {
                        return Err(e);
                    };
                    self.wait(libc::POLLIN, timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Write for &ClientSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLOUT, self.write_timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match (&self.stream).write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLOUT, self.write_timeout)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A worker's buffers for one client connection at a time.
pub struct ClientBuffers {
    read: Box<[u8]>,
    write: Vec<u8>,
}

impl Default for ClientBuffers {
    fn default() -> Self {
        ClientBuffers {
            read: vec![0u8; CLIENT_BUFFER_BYTES].into_boxed_slice(),
            write: Vec::with_capacity(CLIENT_BUFFER_BYTES),
        }
    }
}

impl ClientBuffers {
    /// A reader and a writer on `sock`, the reader starting with `pending`
    /// (bytes the poller read already).
    pub fn attach<'a>(
        &'a mut self,
        sock: &'a ClientSocket,
        pending: &[u8],
    ) -> (ClientReader<'a>, ClientWriter<'a>) {
        let filled = pending.len().min(self.read.len());
        self.read[..filled].copy_from_slice(&pending[..filled]);
        let mut spill = Vec::new();
        if filled < pending.len() {
            // More than a buffer (a large head): the rest is read first.
            spill = pending[filled..].to_vec();
        }
        self.write.clear();
        (
            ClientReader {
                sock,
                buf: &mut self.read,
                pos: 0,
                filled,
                spill,
            },
            ClientWriter {
                sock,
                buf: &mut self.write,
            },
        )
    }
}

/// Buffered reads from the client, as `BufReader` would make them.
pub struct ClientReader<'a> {
    sock: &'a ClientSocket,
    buf: &'a mut [u8],
    pos: usize,
    filled: usize,
    /// Pending bytes that did not fit the buffer.
    spill: Vec<u8>,
}

impl<'a> ClientReader<'a> {
    pub fn socket(&self) -> &'a ClientSocket {
        self.sock
    }

    /// Read from the socket and not consumed yet.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// Everything read and not consumed, for the poller to keep.
    pub fn take_pending(&mut self) -> Vec<u8> {
        let mut pending = self.buffer().to_vec();
        pending.append(&mut self.spill);
        self.pos = self.filled;
        pending
    }
}

impl Read for ClientReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(out.len());
            out[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ClientReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.filled {
            if !self.spill.is_empty() {
                let n = self.spill.len().min(self.buf.len());
                self.buf[..n].copy_from_slice(&self.spill[..n]);
                self.spill.drain(..n);
                self.filled = n;
            } else {
                self.filled = { self.sock }.read(self.buf)?;
            }
            self.pos = 0;
        }
        Ok(&self.buf[self.pos..self.filled])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.filled);
    }
}

/// Buffered writes to the client, as `BufWriter` would make them.
pub struct ClientWriter<'a> {
    sock: &'a ClientSocket,
    buf: &'a mut Vec<u8>,
}

impl<'a> ClientWriter<'a> {
    pub fn socket(&self) -> &'a ClientSocket {
        self.sock
    }
}

impl Write for ClientWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() <= self.buf.capacity() {
            self.buf.extend_from_slice(data);
            return Ok(data.len());
        }
        if self.buf.is_empty() {
            // Large writes go straight through, as with `BufWriter`.
            return { self.sock }.write(data);
        }
        // What is buffered (a response head) and the start of a large body
        // in one system call.
        let buffered = self.buf.len();
        let n =
            { self.sock }.write_vectored(&[io::IoSlice::new(self.buf), io::IoSlice::new(data)])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n <= buffered {
            // Not past the buffered bytes: the rest of them, then the data.
            self.buf.drain(..n);
            return self.write(data);
        }
        self.buf.clear();
        Ok(n - buffered)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        let result = loop {
            if written == self.buf.len() {
                break Ok(());
            }
            match { self.sock }.write(&self.buf[written..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..written);
        result
    }
}
