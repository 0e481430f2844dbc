//! Large reads beneath TLS.
//!
//! rustls asks its transport for at most one record (16 KiB) at a time, and often only
//! 4 KiB, so a bulk transfer costs at least one `recvfrom` per record: ~70,000 per
//! gigabyte on the receiving node-proxy in the sandbox. [`ReadAhead`] reads up to
//! [`READ_AHEAD`] bytes at once and serves rustls from memory, which cut those calls
//! sevenfold. Its buffer exists only while it holds unread bytes, so a quiet connection
//! keeps none, and its size adapts as in `H2Stream::copy_bidirectional`: it doubles
//! while reads fill it and halves while they use under a quarter, so small messages
//! do not pay for a large allocation.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most one read from the socket takes.
pub(crate) const READ_AHEAD: usize = 256 * 1024;
/// The least: where the read size starts, and where request/response traffic keeps it.
const READ_MIN: usize = 16 * 1024;

/// An `AsyncRead + AsyncWrite` that reads ahead in large chunks; writes pass through.
#[derive(Debug)]
pub(crate) struct ReadAhead<T> {
    io: T,
    buf: BytesMut,
    size: usize,
}

impl<T> ReadAhead<T> {
    pub(crate) fn new(io: T) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            size: READ_MIN,
        }
    }
}

impl AsyncRead for ReadAhead<TcpStream> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            // Allocate only once the socket is readable, so waiting costs no memory.
            // The read goes through Tokio's read path, which takes a short read for a
            // drained socket (the next read waits for epoll instead of getting EAGAIN);
            // if it finds nothing after all, the buffer goes and the wait goes on.
            std::task::ready!(this.io.poll_read_ready(cx))?;
            let mut buf = BytesMut::with_capacity(this.size);
            match std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut buf
            )) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(n) => {
                    if n >= this.size {
                        this.size = (this.size * 2).min(READ_AHEAD);
                    } else if n < this.size / 4 {
                        this.size = (this.size / 2).max(READ_MIN);
                    }
                    this.buf = buf;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            // Free the buffer between bursts: an idle connection holds none.
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_small_reads_from_one_large_read_and_frees_the_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut reader = ReadAhead::new(client);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        server.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        let mut small = [0u8; 4096];
        let mut at = reader.read(&mut small).await.unwrap();
        got[..at].copy_from_slice(&small[..at]);
        assert!(!reader.buf.is_empty(), "one read took more than was asked");
        assert!(reader.size > READ_MIN, "a full read grows the next one");
        while at < data.len() {
            let n = reader.read(&mut small).await.unwrap();
            assert!(n > 0);
            got[at..at + n].copy_from_slice(&small[..n]);
            at += n;
        }
        assert_eq!(got, data);
        assert_eq!(reader.buf.capacity(), 0, "a drained buffer is freed");
        // Writes pass through, and EOF is reported as such.
        reader.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        server.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        drop(server);
        assert_eq!(reader.read(&mut small).await.unwrap(), 0);
    }
}
