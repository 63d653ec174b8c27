//! `shoal up`: a whole cluster on this machine — a coordinator and N agents as separate
//! processes on loopback, secured with a cluster CA created on first use — serving the default
//! model until Ctrl-C.

use crate::catalog;
use crate::tls;
use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_net::Role;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// How long children may take to stop after their stdin closes.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Arguments of `shoal up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Agents to start.
    #[arg(long, default_value_t = 3)]
    pub agents: usize,
    /// Where clients reach the OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the coordinator's gRPC services listen.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub grpc_listen: SocketAddr,
    /// The model to serve: a catalogue name or a GGUF path.
    #[arg(long, default_value = catalog::DEFAULT_MODEL)]
    pub model: String,
    /// Compute threads per agent.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Replicas of the model (default: one per agent with room).
    #[arg(long)]
    pub replicas: Option<usize>,
    /// A silent agent is declared dead after this many milliseconds.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Checkpoint each generation's KV cache to another replica every this many positions
    /// (see `shoal coordinator --checkpoint-every`).
    #[arg(long)]
    pub checkpoint_every: Option<u32>,
    /// Cluster directory (CA, certificates, logs). Default: `$SHOAL_HOME/cluster`.
    #[arg(long)]
    pub cluster_dir: Option<PathBuf>,
    /// The key of an encrypted model, passed on to the coordinator and every agent.
    #[command(flatten)]
    pub keys: crate::cmd_model::ModelKeyArgs,
    /// Give up if the cluster is not serving after this many seconds.
    #[arg(long, default_value_t = 180)]
    pub ready_timeout_secs: u64,
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    exited: bool,
}

fn spawn(exe: &Path, name: &str, args: &[String], logs: &Path) -> Result<Proc> {
    let log = logs.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .args(args)
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        log,
        exited: false,
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `GET path` on `addr`; the HTTP status code, if the server answered.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.ok()?;
        let head = std::str::from_utf8(&buf[..n]).ok()?;
        head.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()
        .flatten()
}

/// Fails if the coordinator exited, or any process while the cluster is starting (`starting`);
/// once serving, an agent that exited is reported once and left out (the cluster goes on
/// without it, as it would on separate machines).
fn check_alive(procs: &mut [Proc], starting: bool) -> Result<()> {
    for (i, p) in procs.iter_mut().enumerate() {
        if p.exited {
            continue;
        }
        if let Some(status) = p.child.try_wait()? {
            p.exited = true;
            if i == 0 || starting {
                bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log)
                );
            }
            eprintln!(
                "{} exited ({status}); the cluster goes on without it (log: {})",
                p.name,
                p.log.display()
            );
        }
    }
    Ok(())
}

/// Starts the cluster and serves until Ctrl-C or SIGTERM.
pub fn run(args: UpArgs) -> Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let model = catalog::resolve_model(&args.model, true)?;
    let dir = args
        .cluster_dir
        .clone()
        .unwrap_or_else(|| catalog::shoal_home().join("cluster"));
    let ca = tls::open_or_create_ca(&dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let peer_dir = |name: &str| dir.join("peers").join(name);
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    // Children resolve the same argument (a catalogue name keeps its name; the file is cached
    // by now, so nothing is fetched twice).
    let model_arg = args.model.clone();
    let key_arg = args.keys.model_key_file.as_ref().map(|k| {
        // Children run in the same directory, but an absolute path survives any change.
        let abs = std::path::absolute(k).unwrap_or_else(|_| k.clone());
        format!("--model-key-file={}", abs.display())
    });

    let coord_dir = peer_dir("coordinator");
    tls::issue(&ca, Role::Coordinator, "coordinator", &[])?.save(&coord_dir)?;
    // New machines join with `shoal token create` + `shoal agent --join-token`: the
    // coordinator enrolls them on the gRPC port + 1.
    let mut enroll = args.grpc_listen;
    enroll.set_port(match args.grpc_listen.port() {
        0 => 0,
        p => p.checked_add(1).unwrap_or(0),
    });
    let mut coord_args = vec![
        "coordinator".to_owned(),
        format!("--listen={}", args.listen),
        format!("--grpc-listen={}", args.grpc_listen),
        format!("--model={model_arg}"),
        format!("--tls-dir={}", coord_dir.display()),
        format!(
            "--api-keys={}",
            dir.join(shoal_api::keys::KEY_FILE_NAME).display()
        ),
        format!("--audit-log={}", dir.join("audit.jsonl").display()),
        format!("--enroll-listen={enroll}"),
        format!("--ca-dir={}", dir.display()),
    ];
    if let Some(r) = args.replicas {
        coord_args.push(format!("--replicas={r}"));
    }
    if let Some(l) = args.lease_ms {
        coord_args.push(format!("--lease-ms={l}"));
    }
    if let Some(c) = args.checkpoint_every {
        coord_args.push(format!("--checkpoint-every={c}"));
    }
    coord_args.extend(key_arg.clone());

    let runtime = crate::runtime()?;
    runtime.block_on(async move {
        let mut procs = vec![spawn(&exe, "coordinator", &coord_args, &logs)?];
        let result = async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout_secs);
            // The coordinator must listen before agents try to join.
            while http_status(args.listen, "/healthz").await != Some(200) {
                check_alive(&mut procs, true)?;
                if tokio::time::Instant::now() > deadline {
                    bail!("the coordinator did not come up; see {}", procs[0].log.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for i in 1..=args.agents {
                let name = format!("agent-{i}");
                let tls_dir = peer_dir(&name);
                tls::issue(&ca, Role::Agent, &name, &[])?.save(&tls_dir)?;
                let mut agent_args = vec![
                    "agent".to_owned(),
                    format!("--join={}", args.grpc_listen),
                    format!("--name={name}"),
                    format!("--model={model_arg}"),
                    format!("--threads={}", args.threads),
                    "--http=127.0.0.1:0".to_owned(),
                    format!("--tls-dir={}", tls_dir.display()),
                ];
                agent_args.extend(key_arg.clone());
                procs.push(spawn(&exe, &name, &agent_args, &logs)?);
                // One at a time: each agent benchmarks the model at start, and agents measuring
                // together on shared cores would report each other's contention as their speed.
                let log = procs.last().map(|p| p.log.clone()).unwrap_or_default();
                while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("data plane")) {
                    check_alive(&mut procs, true)?;
                    if tokio::time::Instant::now() > deadline {
                        bail!("{name} did not start; see {}", log.display());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            while http_status(args.listen, "/readyz").await != Some(200) {
                check_alive(&mut procs, true)?;
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "the cluster is not serving after {} s; logs are in {}",
                        args.ready_timeout_secs,
                        logs.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            println!(
                "shoal is up: {} served by {} agents (coordinator + agents as separate processes; logs in {})",
                model.name,
                args.agents,
                logs.display()
            );
            println!("API: http://{}/v1 (OpenAI-compatible) · status: shoal status", args.listen);
            println!("ready");
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut poll = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => { r?; break; }
                    _ = term.recv() => break,
                    _ = poll.tick() => check_alive(&mut procs, false)?,
                }
            }
            Ok(())
        }
        .await;
        eprintln!("stopping the cluster");
        stop_all(&mut procs).await;
        result
    })
}

/// Closes the agents' stdin (their signal to stop) so they leave the coordinator cleanly,
/// waits for them, then stops the coordinator; stragglers are killed.
async fn stop_all(procs: &mut [Proc]) {
    let (coordinator, agents) = procs.split_at_mut(1);
    for p in agents.iter_mut() {
        drop(p.child.stdin.take());
    }
    for p in agents.iter_mut().chain(coordinator.iter_mut()) {
        drop(p.child.stdin.take());
        if tokio::time::timeout(STOP_GRACE, p.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop in {STOP_GRACE:?}; killing it", p.name);
            let _ = p.child.kill().await;
        }
    }
}
