//! Plain TCP to TCP relaying (passthrough and inbound plaintext) without a buffer per
//! idle connection.
//!
//! `tokio::io::copy_bidirectional` keeps an 8 KiB buffer per direction for the life of
//! the connection: ~20 KiB per idle passthrough connection in the sandbox. Here a buffer
//! is allocated only when a socket is readable and freed once written, sized like
//! `H2Stream::copy_bidirectional`'s: it doubles while reads fill it and halves while they
//! use little of it.

use std::io;
use std::net::Shutdown;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tunnel::hbone::Progress;

const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;

/// Relays bytes between `a` and `b` until both directions end, counting what moves as
/// it moves: `a` plays the TCP side of [`Progress`] (`tcp_to_stream` is a -> b), `b` the
/// stream side. EOF on one side half-closes the other; an error on either side resets
/// both (linger 0), as a TCP RST would, and so does dropping the relay before it ends (a
/// policy that no longer allows the connection, a drain's grace run out): neither side
/// takes the cut for the end of the connection. Returns (bytes a -> b, bytes b -> a).
pub async fn relay(a: TcpStream, b: TcpStream, progress: &impl Progress) -> io::Result<(u64, u64)> {
    let mut ends = Ends {
        a,
        b,
        finished: false,
    };
    let result = tokio::try_join!(
        one_way(&ends.a, &ends.b, |n| progress.tcp_to_stream(n)),
        one_way(&ends.b, &ends.a, |n| progress.stream_to_tcp(n))
    );
    ends.finished = result.is_ok();
    result
}

/// A relay's two connections: closed with RST unless the relay finished.
struct Ends {
    a: TcpStream,
    b: TcpStream,
    finished: bool,
}

impl Drop for Ends {
    fn drop(&mut self) {
        if !self.finished {
            for s in [&self.a, &self.b] {
                let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
            }
        }
    }
}

async fn one_way(from: &TcpStream, to: &TcpStream, count: impl Fn(u64)) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = READ_MIN;
    loop {
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(size);
        let n = match from.try_read_buf(&mut buf) {
            Ok(0) => {
                // Half-close: the other side reads EOF, the reverse direction goes on. A
                // failure here (the other side was reset) resets both.
                socket2::SockRef::from(to).shutdown(Shutdown::Write)?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == size {
            size = (size * 2).min(READ_MAX);
        } else if n < size / 4 {
            size = (size / 2).max(READ_MIN);
        }
        write_all(to, &buf).await?;
        total += n as u64;
        count(n as u64);
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes a -> b and b -> a.
    #[derive(Default)]
    struct Counted(AtomicU64, AtomicU64);

    impl Progress for Counted {
        fn tcp_to_stream(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn stream_to_tcp(&self, n: u64) {
            self.1.fetch_add(n, Ordering::Relaxed);
        }
    }
    use tokio::net::TcpListener;

    /// (accepted, connecting) ends of one loopback connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(l.local_addr().unwrap());
        let (near, accepted) = tokio::join!(near, l.accept());
        (accepted.unwrap().0, near.unwrap())
    }

    #[tokio::test]
    async fn relays_both_ways_counts_and_passes_half_close() {
        // client <-> [a | relay | b] <-> server
        let ((a, mut client), (mut server, b)) = (pair().await, pair().await);
        let counted = std::sync::Arc::new(Counted::default());
        let c = counted.clone();
        let relay = tokio::spawn(async move { relay(a, b, &*c).await });

        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == payload, "server got the client's bytes, then EOF");
        // Counted while the connection is still open in the other direction.
        assert_eq!(counted.0.load(Ordering::Relaxed), payload.len() as u64);
        server.write_all(b"done").await.unwrap();
        drop(server);
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(
            relay.await.unwrap().unwrap(),
            (payload.len() as u64, 4),
            "totals"
        );
        assert_eq!(counted.1.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_relay_cut_from_outside_resets_both_sides() {
        let ((a, mut client), (mut server, b)) = (pair().await, pair().await);
        let cut = tokio_util::sync::CancellationToken::new();
        let c = cut.clone();
        let relay = tokio::spawn(async move {
            let counted = Counted::default();
            tokio::select! {
                _ = relay(a, b, &counted) => {}
                _ = c.cancelled() => {}
            }
        });
        client.write_all(b"req").await.unwrap();
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).await.unwrap();
        cut.cancel();
        relay.await.unwrap();
        for (side, end) in [("client", &mut client), ("server", &mut server)] {
            let read = end.read(&mut buf).await;
            assert!(
                read.is_err(),
                "the {side} sees a reset, not an end: {read:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_reset_on_one_side_resets_the_other() {
        let ((a, mut client), (server, b)) = (pair().await, pair().await);
        let relay = tokio::spawn(async move { relay(a, b, &Counted::default()).await });
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        assert!(relay.await.unwrap().is_err(), "the relay sees the reset");
        let mut buf = [0u8; 1];
        let read = client.read(&mut buf).await;
        assert!(read.is_err(), "the client sees a reset, got {read:?}");
    }
}
