//! Network faults for tests and benchmarks: a TCP proxy that delays, stalls or cuts what it
//! forwards, and real packet loss on a loopback port through nftables.
//!
//! Not used by the node or the coordinator. A test puts a [`FaultProxy`] in front of a
//! listener and makes peers dial the proxy instead (an agent advertises the proxy's address),
//! so every byte between them crosses it:
//!
//! - **delay**: each chunk read from one side is written to the other `delay` after it was
//!   read, in order (a fixed one-way latency; the bandwidth is the loopback's);
//! - **cut / heal**: while cut, nothing is read or written in either direction and new
//!   connections are accepted but not served, like a partition (the kernel buffers fill and
//!   the senders stall); healing resumes every connection where it stopped;
//! - **loss**: TCP cannot lose bytes, only packets. [`NftLoss`] drops a share of the
//!   packets to and from a loopback port with an nftables rule (root and `nft` needed), so
//!   the kernel's retransmissions are real. Without it, [`LossModel::Stall`] emulates what a
//!   lost segment costs a TCP stream: the chunk (and everything behind it) waits one
//!   retransmission timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Chunks queued per direction of one proxied connection.
const QUEUE: usize = 1024;
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Linux's minimum TCP retransmission timeout: what one lost segment costs a stream that
/// has no later segments to trigger a fast retransmit.
pub const MIN_RTO: Duration = Duration::from_millis(200);

/// How a proxy loses data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossModel {
    /// Nothing is lost in the proxy (real loss may be added with [`NftLoss`]).
    None,
    /// Each chunk, with probability `probability`, waits `stall` more before it is written,
    /// and so does everything behind it: a lost segment recovered by a retransmission.
    Stall {
        /// Chance per chunk, 0 to 1.
        probability: f64,
        /// Extra wait of a stalled chunk.
        stall: Duration,
    },
}

/// A loopback port nothing listens on right now, for a listener whose address must be known
/// before it is bound (another process may still take it in between).
///
/// # Errors
/// When no socket can be bound on loopback.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What a proxy does to the traffic it forwards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// One-way delay added to every chunk, in both directions.
    pub delay: Duration,
    /// How chunks are lost.
    pub loss: LossModel,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            loss: LossModel::None,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// Bytes forwarded from the client side to the upstream.
    to_upstream: AtomicU64,
    /// Bytes forwarded from the upstream to the client side.
    to_client: AtomicU64,
    connections: AtomicU64,
}

/// A TCP proxy in front of one upstream address that injects [`Faults`]. Dropping it stops
/// it and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    faults: watch::Sender<Faults>,
    /// `true` while cut.
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards every connection to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        faults: Faults,
    ) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (faults, faults_rx) = watch::channel(faults);
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            counters.clone(),
            faults_rx,
            cut_rx,
        ));
        Ok(FaultProxy {
            addr,
            counters,
            faults,
            cut,
            task,
        })
    }

    /// Where the proxy listens: what peers must dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the faults for the chunks read from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    /// Stops all traffic in both directions, on open and new connections, until [`heal`].
    ///
    /// [`heal`]: FaultProxy::heal
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Resumes traffic after [`FaultProxy::cut`].
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Bytes forwarded so far: (client → upstream, upstream → client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.counters.to_upstream.load(Ordering::Relaxed),
            self.counters.to_client.load(Ordering::Relaxed),
        )
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    counters: Arc<Counters>,
    faults: watch::Receiver<Faults>,
    cut: watch::Receiver<bool>,
) {
    // Owned here so aborting the loop closes every connection.
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                tracing::debug!(error = %e, "fault proxy: accept failed");
                continue;
            }
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (counters, faults, cut) = (counters.clone(), faults.clone(), cut.clone());
        conns.spawn(async move {
            if let Err(e) = serve(client, upstream, counters, faults, cut).await {
                tracing::debug!(error = %e, "fault proxy: connection ended");
            }
        });
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    counters: Arc<Counters>,
    faults: watch::Receiver<Faults>,
    mut cut: watch::Receiver<bool>,
) -> io::Result<()> {
    // A cut proxy serves no new connection either.
    cut.wait_for(|c| !c)
        .await
        .map_err(|_| io::Error::other("proxy stopped"))?;
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut dirs = JoinSet::new();
    let c = counters.clone();
    dirs.spawn(pump(cr, sw, faults.clone(), cut.clone(), move |n| {
        c.to_upstream.fetch_add(n, Ordering::Relaxed);
    }));
    dirs.spawn(pump(sr, cw, faults, cut, move |n| {
        counters.to_client.fetch_add(n, Ordering::Relaxed);
    }));
    // When one direction ends, the connection is over (both halves close on drop).
    let first = dirs.join_next().await;
    dirs.abort_all();
    match first {
        Some(Ok(r)) => r,
        _ => Ok(()),
    }
}

/// Forwards one direction: a reader queues timestamped chunks, a writer releases each at its
/// due time. Both pause while the proxy is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: watch::Receiver<Faults>,
    mut cut: watch::Receiver<bool>,
    count: impl Fn(u64) + Send + 'static,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let mut read_cut = cut.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        // Chunks are never due before the one ahead of them (order is kept).
        let mut last_due = Instant::now();
        loop {
            if read_cut.wait_for(|c| !c).await.is_err() {
                return Ok::<(), io::Error>(());
            }
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let f = *faults.borrow();
            let mut due = Instant::now() + f.delay;
            if let LossModel::Stall { probability, stall } = f.loss
                && rand::random::<f64>() < probability
            {
                due += stall;
            }
            due = due.max(last_due);
            last_due = due;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if cut.wait_for(|c| !c).await.is_err() {
                break;
            }
            to.write_all(&chunk).await?;
            count(chunk.len() as u64);
        }
        to.shutdown().await
    };
    let (r, w) = tokio::join!(reader, writer);
    r.and(w)
}

/// Real packet loss on a loopback TCP port, for as long as it lives: an nftables table
/// dropping `percent` % of the packets to or from `port` (chosen at random per packet). Needs
/// root and the `nft` program; [`NftLoss::install`] fails otherwise.
#[derive(Debug)]
pub struct NftLoss {
    table: String,
}

impl NftLoss {
    /// Whether this process can install the rule (root, and `nft` answers).
    pub fn available() -> bool {
        std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Starts dropping `percent` % (1 to 99) of the packets to and from `port`.
    pub fn install(port: u16, percent: u8) -> io::Result<NftLoss> {
        if !(1..=99).contains(&percent) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("loss of {percent} %: expected 1 to 99"),
            ));
        }
        let table = format!("shoal_loss_{port}");
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0; }}\n\
             add rule inet {table} out tcp dport {port} numgen random mod 100 < {percent} drop\n\
             add rule inet {table} out tcp sport {port} numgen random mod 100 < {percent} drop\n"
        );
        nft_script(&script)?;
        Ok(NftLoss { table })
    }

    /// The rule's table name (`nft list table inet <name>` shows its counters).
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for NftLoss {
    fn drop(&mut self) {
        if let Err(e) = nft_script(&format!("delete table inet {}\n", self.table)) {
            tracing::warn!(table = %self.table, error = %e, "removing the packet-loss rule failed");
        }
    }
}

fn nft_script(script: &str) -> io::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
        let start = Instant::now();
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
        start.elapsed()
    }

    #[tokio::test]
    async fn delay_is_added_each_way_and_cut_stops_traffic_until_healed() {
        let up = echo().await;
        let delay = Duration::from_millis(30);
        let proxy = FaultProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            up,
            Faults {
                delay,
                ..Faults::default()
            },
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        // Out and back: at least twice the delay.
        let rtt = round_trip(&mut s, b"ping").await;
        assert!(rtt >= 2 * delay, "{rtt:?}");
        assert_eq!(proxy.bytes(), (4, 4));
        assert_eq!(proxy.connections(), 1);

        proxy.set_faults(Faults::default());
        proxy.cut();
        s.write_all(b"lost?").await.unwrap();
        let mut got = [0u8; 5];
        let waited = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got)).await;
        assert!(waited.is_err(), "data crossed a cut proxy");
        assert_eq!(proxy.bytes(), (4, 4));
        proxy.heal();
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"lost?");
        assert_eq!(proxy.bytes(), (9, 9));
    }

    #[tokio::test]
    async fn a_stalled_chunk_keeps_its_place_in_the_stream() {
        let up = echo().await;
        let proxy = FaultProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            up,
            Faults {
                delay: Duration::ZERO,
                loss: LossModel::Stall {
                    probability: 1.0,
                    stall: Duration::from_millis(20),
                },
            },
        )
        .await
        .unwrap();
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let msg: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let rtt = round_trip(&mut s, &msg).await;
        assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
    }
}
