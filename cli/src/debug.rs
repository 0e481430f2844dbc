//! `weftctl debug`: tools for poking at a mesh by hand (and for the end-to-end tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::hbone::{BoxFuture, ConnectRequest, Pool, PoolConfig, SocketFactory};
use tunnel::identity::{CertificateAuthority, Identity, TrustBundle, LEAF_TTL};
use tunnel::metrics::Metrics;
use tunnel::tls::TlsIdentity;

/// Options of `weftctl debug hbone`.
#[derive(Debug, Clone, clap::Args)]
pub struct HboneArgs {
    /// CA certificate (PEM) to mint the client leaf from and to trust.
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// CA key (PEM).
    #[arg(long)]
    pub ca_key: PathBuf,
    /// The identity to present.
    #[arg(long)]
    pub identity: Identity,
    /// The identity the server must prove.
    #[arg(long)]
    pub peer: Identity,
    /// The HBONE address (ip:15008).
    #[arg(long)]
    pub to: SocketAddr,
    /// The CONNECT target (ip:port).
    #[arg(long)]
    pub target: SocketAddr,
    /// Socket mark for the connection (0x539 passes a pod's capture rules).
    #[arg(long, value_parser = parse_mark)]
    pub mark: Option<u32>,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let (digits, radix) = match s.strip_prefix("0x") {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    u32::from_str_radix(digits, radix).map_err(|e| format!("mark {s:?}: {e}"))
}

struct Marked(u32);

impl SocketFactory for Marked {
    fn socket(&self, dst: SocketAddr) -> BoxFuture<'_, std::io::Result<tokio::net::TcpSocket>> {
        let mark = self.0;
        Box::pin(async move {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_mark(mark)?;
            s.set_nonblocking(true)?;
            Ok(tokio::net::TcpSocket::from_std_stream(s.into()))
        })
    }
}

/// Opens one HBONE stream presenting `identity`, sends an HTTP/1.0 GET through it and
/// prints the first line of the answer. Errors (a refusal included) are returned.
pub async fn hbone(args: HboneArgs) -> anyhow::Result<String> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let ca_pem = read(&args.ca_cert)?;
    let ca = CertificateAuthority::from_pem(&ca_pem, &read(&args.ca_key)?)?;
    let cert = ca.issue(&args.identity, LEAF_TTL)?;
    let tls = TlsIdentity::new(&cert, TrustBundle::from_pem(&ca_pem)?)?;
    let pool = Pool::new(PoolConfig::default(), Metrics::default());
    let request = ConnectRequest {
        src: tls,
        src_addr: None,
        socket: args
            .mark
            .map(|m| Arc::new(Marked(m)) as Arc<dyn SocketFactory>),
        dst: args.peer.clone(),
        dst_addr: args.to,
        target: args.target,
        forwarded_for: None,
        traceparent: None,
        on_behalf_of: None,
    };
    let mut stream = pool.connect(&request).await?;
    stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {}\r\n\r\n", args.target).as_bytes())
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .context("no answer within 5 s")??;
    Ok(String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Options of `weftctl debug certificate`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertificateArgs {
    /// The controller (host:port).
    #[arg(long)]
    pub controller: String,
    /// The name in the controller's certificate.
    #[arg(long, default_value = "weft-controller.weft-system.svc")]
    pub controller_name: String,
    /// The roots (PEM) the controller's certificate chains to.
    #[arg(long)]
    pub controller_ca: PathBuf,
    /// The node token to ask with.
    #[arg(long)]
    pub token_file: PathBuf,
    /// The identity to ask for.
    #[arg(long)]
    pub identity: Identity,
}

/// Asks the controller's CA for a leaf as a node-proxy would (a fresh key, a CSR, the
/// node's token) and says what came back: whether a node may have that identity.
pub async fn certificate(args: CertificateArgs) -> anyhow::Result<String> {
    use runtime::state::CertSource;
    let config = runtime::config_client::ControllerConfig {
        addr: args.controller,
        server_name: args.controller_name,
        roots: args.controller_ca,
        token: args.token_file,
        node: String::new(),
        waypoint: None,
    };
    let ca = runtime::config_client::CaClient::new(
        config.clone(),
        runtime::config_client::channel(&config),
    );
    let (cert, bundle) = ca.fetch(&args.identity).await?;
    let left = cert
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Ok(format!(
        "signed: {} (valid for {} s more; trust bundle of {} root{})",
        cert.identity,
        left.as_secs(),
        bundle.roots().len(),
        if bundle.roots().len() == 1 { "" } else { "s" }
    ))
}

/// A TCP echo server: every connection gets back what it sends.
pub async fn tcp_echo(port: u16) -> anyhow::Result<()> {
    let listener = tunnel::net::listen(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
        .with_context(|| format!("cannot listen on port {port}"))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// One-byte round trips on one connection: returns (p50, p99) in microseconds.
pub async fn pingpong(to: SocketAddr, rounds: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = tokio::net::TcpStream::connect(to)
        .await
        .with_context(|| format!("connect {to}"))?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let t = std::time::Instant::now();
        s.write_all(b"p").await?;
        s.read_exact(&mut b).await?;
        if i >= rounds / 10 {
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    Ok((q(0.50).as_secs_f64() * 1e6, q(0.99).as_secs_f64() * 1e6))
}

/// New connections per second for `seconds`: connect, one byte each way, close.
pub async fn connrate(to: SocketAddr, seconds: u64) -> anyhow::Result<f64> {
    let start = std::time::Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < Duration::from_secs(seconds) {
        let mut s = tokio::net::TcpStream::connect(to)
            .await
            .with_context(|| format!("connect {to}"))?;
        s.set_nodelay(true)?;
        s.write_all(b"c").await?;
        s.read_exact(&mut b).await?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Opens `count` connections, checks each echoes, prints `holding N`, and keeps them
/// open until killed.
pub async fn hold(to: SocketAddr, count: usize) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(count);
    let mut b = [0u8; 1];
    for i in 0..count {
        let mut s = tokio::net::TcpStream::connect(to)
            .await
            .with_context(|| format!("connection {i} to {to}"))?;
        s.write_all(b"h").await?;
        s.read_exact(&mut b).await?;
        held.push(s);
    }
    println!("holding {count}");
    use std::io::Write;
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}
