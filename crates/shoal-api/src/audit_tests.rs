#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use super::*;
use crate::backend::{ChatMessage, Role};

fn record(i: u32) -> AuditRecord {
    AuditRecord {
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(i)),
        request_id: format!("req-{i}"),
        key_id: i.is_multiple_of(2).then(|| "0123456789abcdef".to_owned()),
        model: Some("m".into()),
        nodes: vec!["agent-1".into()],
        failovers: 0,
        resumes: Vec::new(),
        prompt_sha256: Some("ab".repeat(32)),
        response_sha256: Some("cd".repeat(32)),
        prompt: None,
        response: None,
        outcome: "ok",
        reason: None,
        prompt_tokens: 3,
        completion_tokens: i,
        latency_ms: 12,
    }
}

fn config(path: &Path) -> AuditConfig {
    AuditConfig::new(path)
}

/// Writes `n` entries through a fresh writer, then closes it.
async fn write_entries(path: &Path, from: u32, n: u32) {
    let log = AuditLog::open(&config(path), Arc::new(Metrics::new())).unwrap();
    for i in from..from + n {
        log.reserve().await.unwrap().send(record(i));
    }
    assert!(log.close().await);
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn verify_path(path: &Path) -> Result<VerifyReport, VerifyFailure> {
    verify_file(path).unwrap()
}

#[tokio::test]
async fn written_log_verifies_and_resumes_its_chain_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs").join("audit.jsonl");
    write_entries(&path, 0, 3).await;
    let first = verify_path(&path).unwrap();
    assert_eq!(first.entries, 3);
    write_entries(&path, 3, 2).await;
    let report = verify_path(&path).unwrap();
    assert_eq!(report.entries, 5);
    let all = lines(&path);
    let third: AuditEntry = serde_json::from_str(&all[2]).unwrap();
    let fourth: AuditEntry = serde_json::from_str(&all[3]).unwrap();
    assert_eq!(third.hash.as_deref(), Some(first.head.as_str()));
    assert_eq!(fourth.seq, 4);
    assert_eq!(fourth.prev, first.head);
    assert_eq!(fourth.request_id, "req-3");
    assert_eq!(fourth.time, "2023-11-14T22:13:23.000Z");
    assert_eq!(fourth.key_id, None);
    let first_entry: AuditEntry = serde_json::from_str(&all[0]).unwrap();
    assert_eq!(first_entry.prev, GENESIS_HASH);
    // Digests only: no text fields unless asked for.
    assert!(!all[0].contains("\"prompt\""), "{}", all[0]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn an_empty_log_verifies() {
    let report = verify(&b""[..]).unwrap();
    assert_eq!(report.entries, 0);
    assert_eq!(report.head, GENESIS_HASH);
}

#[tokio::test]
async fn verify_names_the_first_bad_line_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_entries(&path, 0, 5).await;
    let good = lines(&path);
    let check = |edited: Vec<String>| {
        let bad = dir.path().join("bad.jsonl");
        write_lines(&bad, &edited);
        verify_path(&bad).unwrap_err()
    };

    // Edited: a field changed, the hash left alone.
    let mut edited = good.clone();
    edited[2] = edited[2].replace("\"completion_tokens\":2", "\"completion_tokens\":200");
    assert_ne!(edited[2], good[2]);
    assert_eq!(
        check(edited),
        VerifyFailure {
            line: 3,
            problem: VerifyProblem::Edited
        }
    );

    // Edited with the hash recomputed: the next entry's link breaks.
    let mut entry: AuditEntry = serde_json::from_str(&good[1]).unwrap();
    entry.completion_tokens = 99;
    entry.hash = Some(entry.compute_hash());
    let mut forged = good.clone();
    forged[1] = serde_json::to_string(&entry).unwrap();
    assert_eq!(
        check(forged),
        VerifyFailure {
            line: 3,
            problem: VerifyProblem::BrokenChain
        }
    );

    // Removed from the middle.
    let mut removed = good.clone();
    removed.remove(2);
    assert_eq!(
        check(removed),
        VerifyFailure {
            line: 3,
            problem: VerifyProblem::OutOfSequence {
                expected: 3,
                found: 4
            }
        }
    );

    // Removed from the start.
    assert_eq!(
        check(good[1..].to_vec()),
        VerifyFailure {
            line: 1,
            problem: VerifyProblem::OutOfSequence {
                expected: 1,
                found: 2
            }
        }
    );

    // Reordered.
    let mut reordered = good.clone();
    reordered.swap(1, 3);
    assert_eq!(
        check(reordered),
        VerifyFailure {
            line: 2,
            problem: VerifyProblem::OutOfSequence {
                expected: 2,
                found: 4
            }
        }
    );

    // Bad JSON.
    let mut garbled = good.clone();
    garbled[3] = "{\"seq\": 4, oops".into();
    let failure = check(garbled);
    assert_eq!(failure.line, 4);
    assert!(matches!(failure.problem, VerifyProblem::Malformed(_)));

    // An unknown field is not an entry either.
    let mut extra = good.clone();
    extra[0] = extra[0].replacen('{', "{\"admin\":true,", 1);
    let failure = check(extra);
    assert_eq!(failure.line, 1);
    assert!(matches!(failure.problem, VerifyProblem::Malformed(_)));

    // Truncated last line.
    let text = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, &text[..text.len() - 10]).unwrap();
    assert_eq!(
        verify_path(&cut).unwrap_err(),
        VerifyFailure {
            line: 5,
            problem: VerifyProblem::Truncated
        }
    );
    // Even cut exactly before the final newline.
    std::fs::write(&cut, &text[..text.len() - 1]).unwrap();
    assert_eq!(
        verify_path(&cut).unwrap_err().problem,
        VerifyProblem::Truncated
    );
}

#[tokio::test]
async fn a_damaged_last_line_stops_the_writer_from_continuing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_entries(&path, 0, 2).await;
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() - 5]).unwrap();
    let err = AuditLog::open(&config(&path), Arc::new(Metrics::new())).unwrap_err();
    match err {
        AuditError::Damaged { line, problem, .. } => {
            assert_eq!(line, 2);
            assert_eq!(problem, VerifyProblem::Truncated);
        }
        other => panic!("{other:?}"),
    }
    let mut edited = lines(&path);
    edited.truncate(1);
    edited[0] = edited[0].replace("req-0", "req-X");
    write_lines(&path, &edited);
    assert!(matches!(
        AuditLog::open(&config(&path), Arc::new(Metrics::new())),
        Err(AuditError::Damaged {
            line: 1,
            problem: VerifyProblem::Edited,
            ..
        })
    ));
}

#[tokio::test]
async fn a_long_last_line_is_found_across_read_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(
        &AuditConfig {
            include_text: true,
            ..config(&path)
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    for i in 0..2 {
        let mut r = record(i);
        r.prompt = Some("p".repeat(150_000));
        log.reserve().await.unwrap().send(r);
    }
    assert!(log.close().await);
    write_entries(&path, 2, 1).await;
    assert_eq!(verify_path(&path).unwrap().entries, 3);
}

#[tokio::test]
async fn one_writer_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&config(&path), Arc::new(Metrics::new())).unwrap();
    assert!(matches!(
        AuditLog::open(&config(&path), Arc::new(Metrics::new())),
        Err(AuditError::InUse { .. })
    ));
    assert!(log.close().await);
    let again = AuditLog::open(&config(&path), Arc::new(Metrics::new())).unwrap();
    assert!(again.close().await);
}

#[tokio::test]
async fn a_full_queue_waits_then_refuses_and_a_stopped_writer_refuses_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = Arc::new(Metrics::new());
    let log = AuditLog::open(
        &AuditConfig {
            queue_capacity: 1,
            max_wait: Duration::from_millis(50),
            ..config(&path)
        },
        metrics.clone(),
    )
    .unwrap();
    let held = log.reserve().await.unwrap();
    let err = log.reserve().await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Unavailable);
    assert_eq!(err.reason, reason::AUDIT_UNAVAILABLE);
    // The slot frees once the writer took its entry.
    held.send(record(0));
    assert!(log.flush().await);
    let slot = log.reserve().await.unwrap();
    slot.send(record(1));
    assert!(log.close().await);
    assert!(log.reserve().await.is_err());
    let text = metrics.encode().unwrap();
    assert!(text.contains("shoal_audit_waits_total 1"), "{text}");
    assert!(
        text.contains("shoal_audit_failures_total{reason=\"queue_timeout\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shoal_audit_failures_total{reason=\"writer_stopped\"} 1"),
        "{text}"
    );
    assert!(text.contains("shoal_audit_entries_total 2"), "{text}");
    assert_eq!(verify_path(&path).unwrap().entries, 2);
}

#[test]
fn prompt_digests_cover_text_and_chat() {
    let (digest, text) = prompt_digest(&Prompt::Text("hello".into()));
    assert_eq!(text, "hello");
    assert_eq!(
        digest,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    let (digest, text) = prompt_digest(&Prompt::Chat(vec![ChatMessage {
        role: Role::User,
        content: "hi".into(),
    }]));
    assert_eq!(text, r#"[{"content":"hi","role":"user"}]"#);
    assert_eq!(digest, hex::encode(Sha256::digest(text.as_bytes())));
}
