//! Loopback benchmark of the tunnel against its own baselines, measured in one run:
//! plain TCP, plain TLS 1.3 (same provider, same mTLS certificates), and HBONE.
//!
//! `cargo bench -p weft-tunnel --bench tunnel` prints a Markdown table. Sizes can be
//! scaled with `WEFT_BENCH_MB` (bulk transfer size, default 512) and
//! `WEFT_BENCH_ROUNDS` (ping-pong round trips, default 20000); `WEFT_BENCH_ONLY=HBONE`
//! (or `TCP`, `TLS`) measures one path alone, for profiling.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_tunnel::hbone::{ConnectRequest, Handler, InboundRequest, Pool, PoolConfig, ServerConfig};
use weft_tunnel::metrics::Metrics;
use weft_tunnel::testing::{start_server, TestMesh};
use weft_tunnel::tls::{self, TlsIdentity};

// Weft's binaries run on jemalloc, and so does this benchmark. With glibc malloc the
// HBONE path allocates and frees frame-sized buffers fast enough that glibc keeps
// returning the heap top to the kernel and page-faulting it back in (measured: ~350k
// page faults per GiB moved, ~60% of TLS throughput instead of ~85%).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;
type Dial<'a> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = BoxIo> + Send + 'a>> + 'a>;

/// What every server side does with a stream: the first byte says which test runs.
/// `s`: sink — read to EOF, answer one byte. `e`: echo until EOF.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 256 * 1024];
    match mode[0] {
        b's' => {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = s.write_all(b"k").await;
            let _ = s.flush().await;
        }
        _ => loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                        break;
                    }
                }
            }
        },
    }
}

struct Bench;

impl Handler for Bench {
    async fn handle(self: Arc<Self>, request: InboundRequest) {
        if let Ok(stream) = request.accept() {
            serve_stream(stream).await;
        }
    }
}

async fn tcp_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve_stream(s));
        }
    });
    addr
}

async fn tls_server(tls: &Arc<TlsIdentity>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(t) = acceptor.accept(s).await {
                    serve_stream(t).await;
                }
            });
        }
    });
    addr
}

async fn tls_dial(client: &Arc<TlsIdentity>, server: &Arc<TlsIdentity>, addr: SocketAddr) -> BoxIo {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    let t = tokio_rustls::TlsConnector::from(client.client_config(server.identity()))
        .connect(tls::server_name(addr.ip()), tcp)
        .await
        .expect("tls");
    Box::new(t)
}

/// Sends `bytes` and waits for the sink's answer; returns MiB/s.
async fn throughput(mut s: BoxIo, bytes: usize) -> f64 {
    let chunk = vec![0x5au8; 256 * 1024];
    s.write_all(b"s").await.expect("mode");
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.expect("write");
        left -= n;
    }
    s.shutdown().await.expect("shutdown");
    let mut k = [0u8; 1];
    s.read_exact(&mut k).await.expect("sink answer");
    bytes as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

/// 1-byte round trips; returns (p50, p99) in microseconds.
async fn ping_pong(mut s: BoxIo, rounds: usize) -> (f64, f64) {
    s.write_all(b"e").await.expect("mode");
    s.flush().await.expect("flush");
    let mut b = [0u8; 1];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + 1000 {
        let t = Instant::now();
        s.write_all(b"p").await.expect("ping");
        s.flush().await.expect("flush");
        s.read_exact(&mut b).await.expect("pong");
        if i >= 1000 {
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    (q(0.50).as_secs_f64() * 1e6, q(0.99).as_secs_f64() * 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Row {
    name: &'static str,
    mib_s: f64,
    p50: f64,
    p99: f64,
}

async fn measure(name: &'static str, dial: Dial<'_>, bytes: usize, rounds: usize) -> Row {
    // WEFT_BENCH_ONLY=HBONE (or TCP, TLS) runs one path alone, for profiling.
    if std::env::var("WEFT_BENCH_ONLY").is_ok_and(|only| !name.starts_with(only.as_str())) {
        return Row {
            name,
            mib_s: f64::NAN,
            p50: f64::NAN,
            p99: f64::NAN,
        };
    }
    // Three bulk runs, median reported; one warm-up first.
    throughput(dial().await, bytes / 8).await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(throughput(dial().await, bytes).await);
    }
    let (p50, p99) = ping_pong(dial().await, rounds).await;
    Row {
        name,
        mib_s: median(runs),
        p50,
        p99,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let bytes = env_usize("WEFT_BENCH_MB", 512) * 1024 * 1024;
    let rounds = env_usize("WEFT_BENCH_ROUNDS", 20_000);
    let mesh = TestMesh::new();
    let server = mesh.workload("bench", "server");
    let client = mesh.workload("bench", "client");

    let tcp_addr = tcp_server().await;
    let tls_addr = tls_server(&server).await;
    let hbone = start_server(&server, ServerConfig::default(), Arc::new(Bench), None).await;
    let pool = Arc::new(Pool::new(PoolConfig::default(), Metrics::default()));
    let request = ConnectRequest {
        src: client.clone(),
        src_addr: None,
        socket: None,
        dst: server.identity(),
        dst_addr: hbone.addr,
        // The bench handler serves the stream itself; the target only has to be
        // well-formed and on the dialled IP.
        target: SocketAddr::new(hbone.addr.ip(), 9),
        forwarded_for: None,
        traceparent: None,
        on_behalf_of: None,
    };

    let tcp = measure(
        "TCP",
        Box::new(move || {
            Box::pin(async move {
                let s = TcpStream::connect(tcp_addr).await.expect("connect");
                let _ = s.set_nodelay(true);
                Box::new(s) as BoxIo
            })
        }),
        bytes,
        rounds,
    )
    .await;
    let (c, s) = (client.clone(), server.clone());
    let tls_row = measure(
        "TLS 1.3 (mTLS)",
        Box::new(move || {
            let (c, s) = (c.clone(), s.clone());
            Box::pin(async move { tls_dial(&c, &s, tls_addr).await })
        }),
        bytes,
        rounds,
    )
    .await;
    let (p, r) = (pool.clone(), request.clone());
    let hbone_row = measure(
        "HBONE",
        Box::new(move || {
            let (p, r) = (p.clone(), r.clone());
            Box::pin(async move { Box::new(p.connect(&r).await.expect("hbone")) as BoxIo })
        }),
        bytes,
        rounds,
    )
    .await;

    // New streams per second over the warm pooled connection: CONNECT, 200, one
    // echoed byte, close.
    let streams = env_usize("WEFT_BENCH_STREAMS", 10_000);
    let start = Instant::now();
    for _ in 0..streams {
        let mut s = pool.connect(&request).await.expect("stream");
        s.write_all(b"ex").await.expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("read");
    }
    let streams_s = streams as f64 / start.elapsed().as_secs_f64();

    // New mTLS connections per second: TCP connect + full TLS 1.3 handshake with client
    // certificate and X25519MLKEM768, one byte each way, close.
    let conns = env_usize("WEFT_BENCH_CONNS", 1_000);
    let start = Instant::now();
    for _ in 0..conns {
        let mut t = tls_dial(&client, &server, tls_addr).await;
        t.write_all(b"ex").await.expect("write");
        t.flush().await.expect("flush");
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.expect("read");
    }
    let conns_s = conns as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..conns {
        let mut t = TcpStream::connect(tcp_addr).await.expect("connect");
        let _ = t.set_nodelay(true);
        t.write_all(b"ex").await.expect("write");
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.expect("read");
    }
    let tcp_conns_s = conns as f64 / start.elapsed().as_secs_f64();

    println!("| path | throughput MiB/s | ping-pong p50 µs | ping-pong p99 µs |");
    println!("|---|---:|---:|---:|");
    for r in [&tcp, &tls_row, &hbone_row] {
        println!(
            "| {} | {:.0} | {:.1} | {:.1} |",
            r.name, r.mib_s, r.p50, r.p99
        );
    }
    println!();
    println!("| rate | per second |");
    println!("|---|---:|");
    println!("| new HBONE streams over a warm connection | {streams_s:.0} |");
    println!("| new mTLS connections (TLS 1.3, X25519MLKEM768) | {conns_s:.0} |");
    println!("| new TCP connections (baseline) | {tcp_conns_s:.0} |");
    println!();
    let tput_ratio = hbone_row.mib_s / tls_row.mib_s;
    let pp_ratio = hbone_row.p50 / tls_row.p50;
    println!(
        "HBONE throughput = {:.0}% of TLS (target >= 60%): {}",
        tput_ratio * 100.0,
        if tput_ratio >= 0.6 { "met" } else { "NOT met" }
    );
    println!(
        "HBONE ping-pong p50 = {:.2}x TLS (target <= 2x): {}",
        pp_ratio,
        if pp_ratio <= 2.0 { "met" } else { "NOT met" }
    );
    println!(
        "bulk size {} MiB x 3 runs (median), {} ping-pong rounds, {} streams, {} connections",
        bytes / (1024 * 1024),
        rounds,
        streams,
        conns
    );
    hbone.drain.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), hbone.task).await;
}
