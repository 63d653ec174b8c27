//! `shoal key`: create, list and revoke the API keys the gateway accepts. A running coordinator
//! or `shoal serve` picks up every change on its next request.

use crate::gateway::default_cluster_dir;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use shoal_api::keys::{self, KEY_FILE_NAME, KeyRecord, Limits};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// `shoal key …`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key and print it. Only its hash is stored: this is the one chance to copy it.
    Create(CreateArgs),
    /// List keys with their limits and the tokens they used.
    List(FileArgs),
    /// Revoke a key; gateways refuse it from their next request on.
    Revoke(RevokeArgs),
}

/// Which key file.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// The key file. Default: `$SHOAL_HOME/cluster/api-keys.json`.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl FileArgs {
    fn path(&self) -> PathBuf {
        self.file
            .clone()
            .unwrap_or_else(|| default_cluster_dir().join(KEY_FILE_NAME))
    }
}

/// Arguments of `shoal key create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A label for the key (who or what uses it).
    #[arg(long)]
    pub name: String,
    /// Requests per second allowed on average (a token bucket); default: unlimited.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Requests allowed at once above the rate; default: the rate rounded up.
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// Total tokens (prompt plus completion) the key may use; default: unlimited.
    #[arg(long)]
    pub quota: Option<u64>,
    #[command(flatten)]
    pub file: FileArgs,
}

/// Arguments of `shoal key revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key's id (the 16 hex digits after `sk-shoal-`, as `shoal key list` shows).
    pub id: String,
    #[command(flatten)]
    pub file: FileArgs,
}

/// Runs a `shoal key` command.
pub fn run(command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::Create(args) => {
            let path = args.file.path();
            let limits = Limits {
                rate_per_second: args.rate,
                burst: args.burst,
                quota_tokens: args.quota,
            };
            let created = keys::create_key(&path, &args.name, limits)
                .with_context(|| format!("adding a key to {}", path.display()))?;
            // The key alone on stdout, so `KEY=$(shoal key create --name ci)` works.
            println!("{}", created.key.expose());
            eprintln!(
                "created key {} ({}) in {}; copy it now, it cannot be shown again",
                created.record.id,
                created.record.name,
                path.display()
            );
            Ok(())
        }
        KeyCommand::List(args) => {
            let path = args.path();
            let records = keys::read_keys(&path)?;
            let usage = keys::read_usage(&path)?;
            print!("{}", table(&records, &usage));
            Ok(())
        }
        KeyCommand::Revoke(args) => {
            let path = args.file.path();
            let record = keys::revoke_key(&path, &args.id)
                .with_context(|| format!("revoking in {}", path.display()))?;
            println!(
                "revoked key {} ({}) at {}",
                record.id,
                record.name,
                record.revoked_at.as_deref().unwrap_or("?")
            );
            Ok(())
        }
    }
}

fn table(records: &[KeyRecord], usage: &HashMap<String, u64>) -> String {
    let mut out = String::new();
    if records.is_empty() {
        out.push_str(
            "no keys (the gateway accepts requests without one unless --require-api-key)\n",
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16}  {:<16}  {:<24}  {:<7}  {:>8}  {:>5}  {:>12}  {:>12}",
        "ID", "NAME", "CREATED", "STATE", "RATE/S", "BURST", "QUOTA", "USED"
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    for r in records {
        let _ = writeln!(
            out,
            "{:<16}  {:<16}  {:<24}  {:<7}  {:>8}  {:>5}  {:>12}  {:>12}",
            r.id,
            r.name,
            r.created,
            if r.revoked { "revoked" } else { "active" },
            or_dash(r.rate_per_second.map(|v| v.to_string())),
            or_dash(r.effective_burst().map(|v| v.to_string())),
            or_dash(r.quota_tokens.map(|v| v.to_string())),
            usage.get(&r.id).copied().unwrap_or(0),
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke_through_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let file = || FileArgs {
            file: Some(dir.path().join("keys.json")),
        };
        run(KeyCommand::Create(CreateArgs {
            name: "ci".into(),
            rate: Some(2.0),
            burst: None,
            quota: Some(1000),
            file: file(),
        }))
        .unwrap();
        let records = keys::read_keys(&file().path()).unwrap();
        assert_eq!(records.len(), 1);
        let text = table(&records, &HashMap::from([(records[0].id.clone(), 42)]));
        assert!(text.contains("ci"), "{text}");
        assert!(text.contains("active"), "{text}");
        assert!(text.contains("1000"), "{text}");
        assert!(text.contains("42"), "{text}");
        run(KeyCommand::Revoke(RevokeArgs {
            id: records[0].id.clone(),
            file: file(),
        }))
        .unwrap();
        let records = keys::read_keys(&file().path()).unwrap();
        assert!(table(&records, &HashMap::new()).contains("revoked"));
        let err = run(KeyCommand::Revoke(RevokeArgs {
            id: "ffffffffffffffff".into(),
            file: file(),
        }))
        .unwrap_err();
        assert!(format!("{err:#}").contains("no key with id"), "{err:#}");
        let err = run(KeyCommand::Create(CreateArgs {
            name: "bad".into(),
            rate: Some(-1.0),
            burst: None,
            quota: None,
            file: file(),
        }))
        .unwrap_err();
        assert!(format!("{err:#}").contains("rate"), "{err:#}");
    }
}
