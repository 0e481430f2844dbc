//! One CONNECT stream as a byte stream: `AsyncRead` + `AsyncWrite` over an h2
//! `SendStream`/`RecvStream` pair.
//!
//! Half-close is END_STREAM (`shutdown` sends it, reading it yields EOF). Dropping the
//! stream closes it like `close(2)` on a socket: what was written is still delivered,
//! then END_STREAM; if the peer was still sending, h2 follows with RST_STREAM CANCEL.
//! [`H2Stream::reset`] aborts at once, which the peer reads as `ConnectionReset`. A
//! [`H2Stream::copy_bidirectional`] dropped before it ends (cancelled from outside)
//! resets both the stream and its TCP side.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Runs when the stream is dropped: releases the pool slot and gauges.
pub(crate) type OnClose = Box<dyn FnOnce() + Send + Sync>;

/// A bidirectional byte stream carried by one HBONE CONNECT.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA frame.
    pending: Bytes,
    write_closed: bool,
    /// A copy is under way: dropped now, the stream was cut, not finished.
    copying: bool,
    on_close: Option<OnClose>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .finish()
    }
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        on_close: Option<OnClose>,
    ) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            copying: false,
            on_close,
        }
    }

    /// Resets the stream (RST_STREAM CANCEL) instead of ending it cleanly: the peer
    /// sees a reset connection, as it would for a TCP RST.
    pub fn reset(mut self) {
        self.write_closed = true;
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if self.copying && !self.write_closed {
            // A copy dropped before its end (a policy that no longer allows the
            // connection, a drain's grace run out): the peer must not take the cut for
            // the end of the stream.
            self.send.send_reset(h2::Reason::CANCEL);
        } else if !self.write_closed {
            // Fails only if the stream is already reset or closed; nothing to do then.
            let _ = self.send.send_data(Bytes::new(), true);
        }
        if let Some(f) = self.on_close.take() {
            f();
        }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL) | Some(h2::Reason::REFUSED_STREAM) => {
            io::ErrorKind::ConnectionReset
        }
        _ if e.is_go_away() || e.is_reset() => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    // Hand the window back as soon as the bytes are ours: we hold at
                    // most one frame, so the peer's window is the buffering bound.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.send
            .reserve_capacity(buf.len().min(super::SEND_BUFFER));
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                // The stream is closed for sending: find out whether it was reset.
                None => {
                    return match ready!(this.send.poll_reset(cx)) {
                        Ok(reason) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by peer: {reason:?}"),
                        ))),
                        Err(e) => Poll::Ready(Err(h2_to_io(e))),
                    }
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes queued frames as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Bounds of one read from the TCP side. A buffer is allocated only when the socket is
/// readable, so an idle connection holds none, and it is handed to h2 without a copy.
/// Its size adapts: it doubles while reads fill it (bulk transfers: fewer, larger
/// frames) and halves when they use little of it (request/response: small, cheap
/// allocations).
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;

/// Told of bytes as [`H2Stream::copy_bidirectional_counted`] moves them, so counters
/// move while a connection is open, not only when it closes.
pub trait Progress: Sync {
    /// `n` bytes went from the TCP side into the stream.
    fn tcp_to_stream(&self, n: u64);
    /// `n` bytes went from the stream to the TCP side.
    fn stream_to_tcp(&self, n: u64);
}

/// Counts nothing.
impl Progress for () {
    fn tcp_to_stream(&self, _: u64) {}
    fn stream_to_tcp(&self, _: u64) {}
}

/// One read of what `rd` holds into `buf`'s spare room, polled once, without waiting:
/// `None` when there was nothing after all (the caller waits for readiness again).
///
/// The buffer is made by the caller once the socket is readable, so a waiting
/// connection holds none. The read goes through Tokio's read path, which takes a short
/// read for a drained socket and waits for epoll next time; `try_read_buf` would try
/// the socket again and get EAGAIN, one wasted `recvfrom` per message. Polled here
/// rather than awaited, so the copy loop's future (one per connection) does not grow.
fn read_now(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut bytes::BytesMut,
) -> Option<io::Result<usize>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match tokio_util::io::poll_read_buf(std::pin::Pin::new(rd), &mut cx, buf) {
        std::task::Poll::Ready(r) => Some(r),
        // Readiness was cleared; the caller's `readable()` registers its own waker.
        std::task::Poll::Pending => None,
    }
}

impl H2Stream {
    /// [`copy_bidirectional_counted`](Self::copy_bidirectional_counted) without a
    /// [`Progress`].
    pub async fn copy_bidirectional(self, tcp: tokio::net::TcpStream) -> io::Result<(u64, u64)> {
        self.copy_bidirectional_counted(tcp, &()).await
    }

    /// Moves bytes between this stream and `tcp` until both directions end, without a
    /// buffer per idle connection and without copying DATA frames: TCP reads go into a
    /// fresh buffer that becomes the frame, received frames are written to TCP as they
    /// are. Half-closes pass through (EOF <-> END_STREAM); a failure on either side
    /// resets the other (RST_STREAM CANCEL <-> TCP RST). Returns (bytes TCP -> stream,
    /// bytes stream -> TCP), and tells `progress` of them as they move.
    pub async fn copy_bidirectional_counted(
        mut self,
        tcp: tokio::net::TcpStream,
        progress: &impl Progress,
    ) -> io::Result<(u64, u64)> {
        use tokio::io::AsyncWriteExt;

        self.copying = true;
        let mut tcp = CutOnDrop {
            tcp,
            finished: false,
        };
        let (mut rd, mut wr) = tcp.tcp.split();
        let (send, recv, pending) = (
            &mut self.send,
            &mut self.recv,
            std::mem::take(&mut self.pending),
        );
        let upload = async {
            let mut total = 0u64;
            let mut size = READ_MIN;
            loop {
                rd.readable().await?;
                let mut buf = bytes::BytesMut::with_capacity(size);
                let Some(read) = read_now(&mut rd, &mut buf) else {
                    continue;
                };
                match read {
                    Ok(0) => {
                        send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                        return Ok::<u64, io::Error>(total);
                    }
                    Ok(n) => {
                        total += n as u64;
                        if n >= size {
                            size = (size * 2).min(READ_MAX);
                        } else if n < size / 4 {
                            size = (size / 2).max(READ_MIN);
                        }
                        let mut chunk = buf.freeze();
                        while !chunk.is_empty() {
                            send.reserve_capacity(chunk.len());
                            let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                                .await
                                .ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionReset))?
                                .map_err(h2_to_io)?;
                            let piece = chunk.split_to(cap.min(chunk.len()));
                            let len = piece.len() as u64;
                            send.send_data(piece, false).map_err(h2_to_io)?;
                            progress.tcp_to_stream(len);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let download = async {
            let mut total = pending.len() as u64;
            if !pending.is_empty() {
                wr.write_all(&pending).await?;
                progress.stream_to_tcp(pending.len() as u64);
            }
            while let Some(data) = recv.data().await {
                let data = data.map_err(h2_to_io)?;
                let _ = recv.flow_control().release_capacity(data.len());
                total += data.len() as u64;
                wr.write_all(&data).await?;
                progress.stream_to_tcp(data.len() as u64);
            }
            wr.shutdown().await?;
            Ok::<u64, io::Error>(total)
        };
        let result = tokio::try_join!(upload, download);
        self.write_closed = true;
        self.copying = false;
        if result.is_err() {
            // One side failed: abort the other instead of ending it cleanly.
            self.send.send_reset(h2::Reason::CANCEL);
        } else {
            tcp.finished = true;
        }
        result
    }
}

/// The TCP side of a copy. Dropped before the copy finished (failed, or cancelled from
/// outside), it closes with RST, so the application does not take the cut for the end
/// of the connection.
struct CutOnDrop {
    tcp: tokio::net::TcpStream,
    finished: bool,
}

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            let _ = socket2::SockRef::from(&self.tcp).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}
