//! `shoal token create`: a one-time, expiring join token for a new node.

use crate::cmd_status::{AdminTarget, admin};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use shoal_proto::v1;
use std::time::Duration;

/// `shoal token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token: a new node enrolls with it once, before it expires.
    Create(CreateArgs),
}

/// Arguments of `shoal token create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// How long the token may be used (e.g. 90s, 15m, 2h, 1d).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The role the enrolled node gets.
    #[arg(long, default_value = "agent")]
    pub role: String,
    #[command(flatten)]
    pub target: AdminTarget,
}

/// Parses `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let Ok(n) = number.parse::<u64>() else {
        bail!("{text:?} is not a duration like 90s, 15m, 2h or 1d");
    };
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => bail!("unknown duration unit {other:?} (use ms, s, m, h or d)"),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// Runs `shoal token …`.
pub fn run(cmd: TokenCommand) -> Result<()> {
    let TokenCommand::Create(args) = cmd;
    crate::runtime()?.block_on(async {
        let mut admin = admin(&args.target).await?;
        let r = admin
            .create_join_token(v1::CreateJoinTokenRequest {
                ttl_ms: u64::try_from(args.ttl.as_millis()).unwrap_or(u64::MAX),
                role: args.role.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        println!("{}", r.token);
        eprintln!(
            "token {} for one {} · valid for {:?} · enroll with:\n  shoal agent --join {} --join-token <token> --data-dir <dir> --name <node>",
            r.token_id, args.role, args.ttl, args.target.coordinator
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        for bad in ["", "m", "5w", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
