//! `shoal fault-proxy` as `scripts/bench/chaos.sh` drives it: commands on standard input, one
//! answer line each, traffic to a local echo listener cut, healed, delayed and lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
/// Bound on every wait for something that must happen.
const WAIT: Duration = Duration::from_secs(30);

/// An echo listener on loopback; returns its address.
fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut back = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut conn, &mut back);
            });
        }
    });
    addr
}

struct Proxy {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let mut child = Command::new(SHOAL)
            .args(["fault-proxy", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Proxy {
            child,
            stdin,
            stdout,
            addr,
        }
    }

    /// Sends one command; its answer line.
    fn command(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    }

    /// Asks for `stats` until the answer is `expected` (the counters follow the bytes
    /// written), at most [`WAIT`]; the last answer.
    fn stats_become(&mut self, expected: &str) -> String {
        let start = Instant::now();
        loop {
            let answer = self.ok("stats");
            if answer == expected || start.elapsed() > WAIT {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ok(&mut self, cmd: &str) -> String {
        let answer = self.command(cmd);
        assert!(answer.starts_with("ok"), "{cmd}: {answer}");
        answer
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `msg` and reads it back, waiting at most [`WAIT`].
fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

fn nft_tables() -> Option<String> {
    let out = Command::new("nft").args(["list", "tables"]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn commands_on_stdin_cut_heal_delay_and_lose_the_traffic() {
    let mut proxy = Proxy::start(echo());
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    round_trip(&mut s, b"ping");
    let counted = "ok connections=1 to_upstream=4 to_client=4";
    assert_eq!(proxy.stats_become(counted), counted);

    // Cut: the connection stays open, nothing crosses.
    proxy.ok("cut");
    s.write_all(b"lost?").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = [0u8; 5];
    let err = s.read_exact(&mut got).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(proxy.ok("stats"), counted);
    // A connection opened while cut is accepted and held.
    let mut late = TcpStream::connect(proxy.addr).unwrap();

    // Healed: what was held goes through, on both connections.
    proxy.ok("heal");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"lost?");
    round_trip(&mut late, b"late");

    // Delay and loss slow the traffic down; it still arrives, whole and in order.
    proxy.ok("delay 20");
    let loss = proxy.ok("loss 5");
    let port = proxy.addr.port();
    let table = format!("shoal_loss_{port}");
    if loss == "ok nftables" {
        assert!(nft_tables().unwrap().contains(&table));
    } else {
        assert_eq!(loss, "ok emulated");
    }
    let msg: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    round_trip(&mut s, &msg);
    proxy.ok("clear");
    if let Some(tables) = nft_tables() {
        assert!(!tables.contains(&table), "{tables}");
    }
    round_trip(&mut s, b"clear");

    // Bad commands are answered, and the proxy goes on.
    assert!(
        proxy
            .command("partition")
            .starts_with("error: unknown command")
    );
    assert!(proxy.command("loss 100").starts_with("error: loss"));
    proxy.ok("stats");

    // The end of standard input stops it, and its loss rule goes with it.
    proxy.ok("loss 3");
    drop(proxy.stdin.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < WAIT, "the proxy outlived its stdin");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    if let Some(tables) = nft_tables() {
        assert!(!tables.contains(&table), "{tables}");
    }
}
