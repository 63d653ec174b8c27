//! `shoal audit verify`: checks an audit log's hash chain.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `shoal audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every entry's hash, sequence and link to the previous one. Prints the entry count
    /// and the last hash (keep it elsewhere to detect entries cut off the end later), or the
    /// first bad line and why, and then exits non-zero.
    Verify(VerifyArgs),
}

/// Arguments of `shoal audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The audit log (JSON lines).
    pub file: PathBuf,
}

/// Runs a `shoal audit` command.
pub fn run(command: AuditCommand) -> Result<()> {
    let AuditCommand::Verify(args) = command;
    let outcome = shoal_api::audit::verify_file(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    match outcome {
        Ok(report) => {
            println!(
                "OK: {} entries in {}; head {}",
                report.entries,
                args.file.display(),
                report.head
            );
            Ok(())
        }
        Err(failure) => bail!("{}: {failure}", args.file.display()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use shoal_api::audit::{AuditEntry, GENESIS_HASH};

    fn entry(seq: u64, prev: &str) -> AuditEntry {
        let mut entry = AuditEntry {
            seq,
            time: "2026-01-01T00:00:00.000Z".into(),
            request_id: format!("r{seq}"),
            key_id: None,
            model: Some("m".into()),
            nodes: vec!["agent-1".into()],
            failovers: 0,
            resumes: Vec::new(),
            prompt_sha256: None,
            response_sha256: None,
            prompt: None,
            response: None,
            outcome: "ok".into(),
            reason: None,
            prompt_tokens: 1,
            completion_tokens: 2,
            latency_ms: 3,
            prev: prev.into(),
            hash: None,
        };
        entry.hash = Some(entry.compute_hash());
        entry
    }

    #[test]
    fn verify_reports_ok_or_the_first_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let first = entry(1, GENESIS_HASH);
        let second = entry(2, first.hash.as_deref().unwrap());
        let lines = [&first, &second]
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .concat();
        std::fs::write(&path, &lines).unwrap();
        let verify = || run(AuditCommand::Verify(VerifyArgs { file: path.clone() }));
        verify().unwrap();
        std::fs::write(&path, lines.replace("\"r2\"", "\"r9\"")).unwrap();
        let err = verify().unwrap_err().to_string();
        assert!(err.contains("line 2: edited"), "{err}");
        std::fs::write(&path, &lines[..lines.len() - 3]).unwrap();
        let err = verify().unwrap_err().to_string();
        assert!(err.contains("line 2: truncated"), "{err}");
        let missing = dir.path().join("missing.jsonl");
        let err = run(AuditCommand::Verify(VerifyArgs { file: missing })).unwrap_err();
        assert!(format!("{err:#}").contains("reading"), "{err:#}");
    }
}
