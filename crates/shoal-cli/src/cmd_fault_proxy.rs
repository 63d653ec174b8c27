//! `shoal fault-proxy`: a test and benchmark tool, not part of a cluster. A
//! [`FaultProxy`] in front of one upstream address, driven by commands on standard input, so a
//! shell script (`scripts/bench/chaos.sh`) can cut a node off the network, heal it, delay its
//! traffic or lose some of it.
//!
//! It prints `listening <addr>` once it accepts connections, then reads one command per line
//! and answers each with one line, `ok` (a `stats` answer adds its counters) or
//! `error: <why>`:
//!
//! - `cut`: nothing is forwarded, either way, on open or new connections (they stay open);
//! - `heal`: forwarding resumes where it stopped;
//! - `delay <ms>`: a one-way delay on every chunk, both ways (`delay 0` removes it);
//! - `loss <percent>`: real packet loss to and from the listening port with nftables when
//!   this process may install the rule (root and `nft`), else the proxy's emulation of a lost
//!   segment (the chunk waits one retransmission timeout); `loss 0` removes it;
//! - `clear`: no delay and no loss (a cut stays until `heal`);
//! - `stats`: `ok connections=<n> to_upstream=<bytes> to_client=<bytes>`.
//!
//! It stops when standard input closes (or on Ctrl-C / SIGTERM), removing its loss rule.

use anyhow::{Context, Result};
use clap::Args;
use shoal_net::faults::{FaultProxy, Faults, LossModel, MIN_RTO, NftLoss};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// Longest delay a `delay` command accepts, in milliseconds.
const MAX_DELAY_MS: u64 = 60_000;

/// Arguments of `shoal fault-proxy`.
#[derive(Debug, Args)]
pub struct FaultProxyArgs {
    /// Where the proxy listens (port 0 picks a free one; the `listening` line tells which).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where every accepted connection is forwarded.
    #[arg(long)]
    pub upstream: SocketAddr,
}

/// One line of standard input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCommand {
    /// Stop forwarding.
    Cut,
    /// Resume forwarding.
    Heal,
    /// Delay every chunk this much, each way.
    Delay(Duration),
    /// Lose this percentage of the traffic (0: none).
    Loss(u8),
    /// No delay, no loss.
    Clear,
    /// Report the proxy's counters.
    Stats,
}

/// A command line that cannot be obeyed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not one of the commands.
    #[error(
        "unknown command {0:?} (expected cut, heal, delay <ms>, loss <percent>, clear or stats)"
    )]
    Unknown(String),
    /// A command without its argument, or with one it does not take.
    #[error("{command}: {why}")]
    Argument {
        /// The command.
        command: &'static str,
        /// What is wrong with its argument.
        why: String,
    },
    /// The packet-loss rule could not be installed.
    #[error("installing the packet-loss rule: {0}")]
    Loss(String),
}

fn argument(command: &'static str, why: impl Into<String>) -> CommandError {
    CommandError::Argument {
        command,
        why: why.into(),
    }
}

impl FromStr for ProxyCommand {
    type Err = CommandError;

    fn from_str(line: &str) -> Result<Self, CommandError> {
        let mut words = line.split_whitespace();
        let name = words.next().unwrap_or_default();
        let arg = words.next();
        if words.next().is_some() {
            return Err(CommandError::Unknown(line.trim().to_owned()));
        }
        let none = |command: &'static str, cmd: ProxyCommand| match arg {
            None => Ok(cmd),
            Some(a) => Err(argument(command, format!("takes no argument (got {a:?})"))),
        };
        match name {
            "cut" => none("cut", ProxyCommand::Cut),
            "heal" => none("heal", ProxyCommand::Heal),
            "clear" => none("clear", ProxyCommand::Clear),
            "stats" => none("stats", ProxyCommand::Stats),
            "delay" => {
                let a = arg.ok_or_else(|| argument("delay", "expected milliseconds"))?;
                let ms: u64 = a
                    .parse()
                    .map_err(|_| argument("delay", format!("{a:?} is not milliseconds")))?;
                if ms > MAX_DELAY_MS {
                    return Err(argument(
                        "delay",
                        format!("{ms} ms is more than {MAX_DELAY_MS}"),
                    ));
                }
                Ok(ProxyCommand::Delay(Duration::from_millis(ms)))
            }
            "loss" => {
                let a = arg.ok_or_else(|| argument("loss", "expected a percentage"))?;
                let pct: u8 = a
                    .parse()
                    .map_err(|_| argument("loss", format!("{a:?} is not a percentage")))?;
                if pct > 99 {
                    return Err(argument("loss", format!("{pct} %: expected 0 to 99")));
                }
                Ok(ProxyCommand::Loss(pct))
            }
            _ => Err(CommandError::Unknown(line.trim().to_owned())),
        }
    }
}

/// The proxy and the faults it applies now.
#[derive(Debug)]
struct Controller {
    proxy: FaultProxy,
    faults: Faults,
    /// The nftables rule of a `loss` command, while one is in force.
    nft: Option<NftLoss>,
    /// Whether nftables can be used (asked once, on the first `loss`).
    nft_available: Option<bool>,
}

impl Controller {
    /// Obeys `cmd`; the answer's text after `ok`.
    fn apply(&mut self, cmd: ProxyCommand) -> Result<String, CommandError> {
        match cmd {
            ProxyCommand::Cut => self.proxy.cut(),
            ProxyCommand::Heal => self.proxy.heal(),
            ProxyCommand::Delay(delay) => {
                self.faults.delay = delay;
                self.proxy.set_faults(self.faults);
            }
            ProxyCommand::Loss(pct) => return self.set_loss(pct),
            ProxyCommand::Clear => {
                self.nft = None;
                self.faults = Faults::default();
                self.proxy.set_faults(self.faults);
            }
            ProxyCommand::Stats => {
                let (up, down) = self.proxy.bytes();
                return Ok(format!(
                    " connections={} to_upstream={up} to_client={down}",
                    self.proxy.connections()
                ));
            }
        }
        Ok(String::new())
    }

    fn set_loss(&mut self, pct: u8) -> Result<String, CommandError> {
        // The previous rule goes first: one table per port.
        self.nft = None;
        self.faults.loss = LossModel::None;
        self.proxy.set_faults(self.faults);
        if pct == 0 {
            return Ok(String::new());
        }
        let nft = *self.nft_available.get_or_insert_with(NftLoss::available);
        if nft {
            let port = self.proxy.local_addr().port();
            let rule =
                NftLoss::install(port, pct).map_err(|e| CommandError::Loss(e.to_string()))?;
            self.nft = Some(rule);
            Ok(" nftables".to_owned())
        } else {
            self.faults.loss = LossModel::Stall {
                probability: f64::from(pct) / 100.0,
                stall: MIN_RTO,
            };
            self.proxy.set_faults(self.faults);
            Ok(" emulated".to_owned())
        }
    }
}

/// Runs the proxy until standard input closes or the process is asked to stop.
pub fn run(args: FaultProxyArgs) -> Result<()> {
    let runtime = crate::runtime()?;
    let result = runtime.block_on(serve(args));
    // Standard input is read on a blocking thread the runtime would otherwise wait for.
    runtime.shutdown_background();
    result
}

async fn serve(args: FaultProxyArgs) -> Result<()> {
    let proxy = FaultProxy::start(args.listen, args.upstream, Faults::default())
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("listening {}\n", proxy.local_addr()).as_bytes())
        .await?;
    out.flush().await?;
    let mut control = Controller {
        proxy,
        faults: Faults::default(),
        nft: None,
        nft_available: None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line.context("reading standard input")?,
            r = tokio::signal::ctrl_c() => {
                r.context("waiting for Ctrl-C")?;
                None
            }
            _ = term.recv() => None,
        };
        let Some(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let answer = match line.parse::<ProxyCommand>().and_then(|c| control.apply(c)) {
            Ok(detail) => format!("ok{detail}\n"),
            Err(e) => {
                tracing::warn!(command = line.trim(), error = %e, "fault-proxy command refused");
                format!("error: {e}\n")
            }
        };
        out.write_all(answer.as_bytes()).await?;
        out.flush().await?;
    }
    // Dropping the controller removes the loss rule and closes every connection.
    drop(control);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!("cut".parse(), Ok(ProxyCommand::Cut));
        assert_eq!(" heal ".parse(), Ok(ProxyCommand::Heal));
        assert_eq!("clear".parse(), Ok(ProxyCommand::Clear));
        assert_eq!("stats".parse(), Ok(ProxyCommand::Stats));
        assert_eq!(
            "delay 50".parse(),
            Ok(ProxyCommand::Delay(Duration::from_millis(50)))
        );
        assert_eq!("loss 0".parse(), Ok(ProxyCommand::Loss(0)));
        assert_eq!("loss 99".parse(), Ok(ProxyCommand::Loss(99)));
    }

    #[test]
    fn bad_commands_are_refused_with_the_reason() {
        let err = |line: &str| line.parse::<ProxyCommand>().unwrap_err();
        assert!(matches!(err("partition"), CommandError::Unknown(_)));
        assert!(matches!(err("cut now"), CommandError::Argument { .. }));
        assert!(matches!(err("delay"), CommandError::Argument { .. }));
        assert!(matches!(err("delay -5"), CommandError::Argument { .. }));
        assert!(matches!(err("delay 1 2"), CommandError::Unknown(_)));
        assert!(matches!(err("loss 100"), CommandError::Argument { .. }));
        assert!(matches!(err("loss x"), CommandError::Argument { .. }));
        assert!(
            err("delay 999999").to_string().contains("more than 60000"),
            "{}",
            err("delay 999999")
        );
    }
}
