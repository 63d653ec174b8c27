//! One guard per generation request that owns everything which must be released or recorded
//! exactly once: the admission permit, the in-flight gauge, the request's cancellation token,
//! its outcome, the key's token usage and the request's audit entry. Dropping the guard before
//! an outcome was recorded means the client went away (handler future or response body
//! dropped), so the drop cancels the generation.

use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use shoal_types::{ErrorClass, ModelId, RequestId};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditRecord, AuditResume, AuditSlot, prompt_digest};
use crate::auth::Principal;
use crate::backend::{GenerateEvent, Prompt, Usage};
use crate::error::{RequestError, reason};
use crate::metrics::{Metrics, Outcome};

/// Tracks one generation request from the moment its handler runs.
#[derive(Debug)]
pub(crate) struct RequestTracker {
    metrics: Arc<Metrics>,
    arrived: Instant,
    request_id: RequestId,
    admitted: Option<Admitted>,
    recorded: bool,
    principal: Option<Principal>,
    audit: Option<AuditDraft>,
    /// The backend accepted the generation.
    generating: bool,
    prompt_tokens: u32,
    tokens: u32,
    usage: Option<Usage>,
}

#[derive(Debug)]
struct Admitted {
    _permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
    start: Instant,
    last_token: Option<Instant>,
}

/// What the audit entry needs, gathered as the request goes.
#[derive(Debug)]
struct AuditDraft {
    slot: AuditSlot,
    include_text: bool,
    model: Option<String>,
    nodes: Vec<String>,
    failovers: u32,
    resumes: Vec<AuditResume>,
    prompt_sha256: Option<String>,
    prompt: Option<String>,
    response_hash: Sha256,
    response: String,
}

impl RequestTracker {
    /// Starts tracking; nothing is held yet.
    pub(crate) fn new(metrics: Arc<Metrics>, request_id: RequestId) -> Self {
        Self {
            metrics,
            arrived: Instant::now(),
            request_id,
            admitted: None,
            recorded: false,
            principal: None,
            audit: None,
            generating: false,
            prompt_tokens: 0,
            tokens: 0,
            usage: None,
        }
    }

    /// The request holds a slot in the audit log and will write its entry into it.
    pub(crate) fn attach_audit(&mut self, slot: AuditSlot, include_text: bool) {
        self.audit = Some(AuditDraft {
            slot,
            include_text,
            model: None,
            nodes: Vec::new(),
            failovers: 0,
            resumes: Vec::new(),
            prompt_sha256: None,
            prompt: None,
            response_hash: Sha256::new(),
            response: String::new(),
        });
    }

    /// The key that authenticated the request; its usage is charged at the end.
    pub(crate) fn set_principal(&mut self, principal: Principal) {
        self.principal = Some(principal);
    }

    /// The validated request's model and prompt.
    pub(crate) fn on_request(&mut self, model: &ModelId, prompt: &Prompt) {
        if let Some(draft) = &mut self.audit {
            let (digest, text) = prompt_digest(prompt);
            draft.model = Some(model.as_str().to_owned());
            draft.prompt_sha256 = Some(digest);
            draft.prompt = draft.include_text.then_some(text);
        }
    }

    /// The request got an admission permit and will run under `cancel`.
    pub(crate) fn admit(&mut self, permit: OwnedSemaphorePermit, cancel: CancellationToken) {
        self.metrics.in_flight_add(1);
        self.admitted = Some(Admitted {
            _permit: permit,
            cancel,
            start: Instant::now(),
            last_token: None,
        });
    }

    /// The backend accepted the generation.
    pub(crate) fn generation_started(&mut self) {
        self.generating = true;
    }

    /// Notes a backend event: token timing and text, token counts, the nodes on the path.
    pub(crate) fn on_event(&mut self, event: &GenerateEvent) {
        match event {
            GenerateEvent::Started { prompt_tokens } => self.prompt_tokens = *prompt_tokens,
            GenerateEvent::Token { text, .. } => self.on_token(text),
            GenerateEvent::Finished { usage, .. } => self.usage = Some(*usage),
            GenerateEvent::Path { nodes, failovers } => {
                if let Some(draft) = &mut self.audit {
                    draft.nodes.clone_from(nodes);
                    draft.failovers = *failovers;
                }
            }
            GenerateEvent::Resumed(stall) => {
                if let Some(draft) = &mut self.audit {
                    draft.resumes.push(AuditResume::from(*stall));
                }
            }
            GenerateEvent::Failed(_) => {}
        }
    }

    /// A token arrived: feeds the TTFT or inter-token histogram and the response digest.
    fn on_token(&mut self, text: &str) {
        self.tokens = self.tokens.saturating_add(1);
        if let Some(draft) = &mut self.audit {
            draft.response_hash.update(text.as_bytes());
            if draft.include_text {
                draft.response.push_str(text);
            }
        }
        if let Some(admitted) = &mut self.admitted {
            let now = Instant::now();
            match admitted.last_token {
                None => self.metrics.ttft(now - admitted.start),
                Some(previous) => self.metrics.inter_token(now - previous),
            }
            admitted.last_token = Some(now);
        }
    }

    /// Records success and releases the permit. Later calls do nothing.
    pub(crate) fn finish(&mut self, outcome: Outcome) {
        self.record(outcome, None);
    }

    /// Records a failure and releases the permit. Later calls do nothing.
    pub(crate) fn fail(&mut self, err: &RequestError) {
        self.record(Outcome::Error(err.class), Some(&err.reason));
    }

    fn record(&mut self, outcome: Outcome, reason: Option<&str>) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.metrics.outcome(outcome);
        if let Some(admitted) = self.admitted.take() {
            let elapsed = admitted.start.elapsed();
            self.metrics.duration(elapsed);
            self.metrics.in_flight_add(-1);
            tracing::info!(
                outcome = outcome.as_str(),
                duration_ms = elapsed.as_millis() as u64,
                "generation finished"
            );
        } else {
            tracing::info!(outcome = outcome.as_str(), "request refused");
        }
        let usage = self.usage.unwrap_or(Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.tokens,
        });
        if let Some(principal) = &self.principal {
            principal.charge(u64::from(usage.total_tokens()));
        }
        if let Some(draft) = self.audit.take() {
            let response_sha256 = self
                .generating
                .then(|| hex::encode(draft.response_hash.finalize()));
            draft.slot.send(AuditRecord {
                time: SystemTime::now(),
                request_id: self.request_id.as_str().to_owned(),
                key_id: self.principal.as_ref().map(|p| p.key_id().to_owned()),
                model: draft.model,
                nodes: draft.nodes,
                failovers: draft.failovers,
                resumes: draft.resumes,
                prompt_sha256: draft.prompt_sha256,
                response: (draft.include_text && self.generating).then_some(draft.response),
                response_sha256,
                prompt: draft.prompt,
                outcome: outcome.as_str(),
                reason: reason.map(str::to_owned),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                latency_ms: u64::try_from(self.arrived.elapsed().as_millis()).unwrap_or(u64::MAX),
            });
        }
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        if !self.recorded {
            if let Some(admitted) = &self.admitted {
                admitted.cancel.cancel();
            }
            tracing::info!("client went away; generation cancelled");
            self.record(
                Outcome::Error(ErrorClass::Cancelled),
                Some(reason::CLIENT_DISCONNECTED),
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    #[tokio::test]
    async fn drop_without_outcome_cancels_and_counts_cancelled() {
        let metrics = Arc::new(Metrics::new());
        let semaphore = Arc::new(Semaphore::new(1));
        let cancel = CancellationToken::new();
        let mut tracker = RequestTracker::new(metrics.clone(), RequestId::new("r"));
        tracker.admit(
            semaphore.clone().try_acquire_owned().unwrap(),
            cancel.clone(),
        );
        assert_eq!(metrics.in_flight(), 1);
        assert_eq!(semaphore.available_permits(), 0);
        drop(tracker);
        assert!(cancel.is_cancelled());
        assert_eq!(metrics.in_flight(), 0);
        assert_eq!(semaphore.available_permits(), 1);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("shoal_request_outcomes_total{class=\"cancelled\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn finish_releases_permit_once_and_does_not_cancel() {
        let metrics = Arc::new(Metrics::new());
        let semaphore = Arc::new(Semaphore::new(1));
        let cancel = CancellationToken::new();
        let mut tracker = RequestTracker::new(metrics.clone(), RequestId::new("r"));
        tracker.admit(
            semaphore.clone().try_acquire_owned().unwrap(),
            cancel.clone(),
        );
        let token = GenerateEvent::Token {
            text: "x".into(),
            token_id: 1,
        };
        tracker.on_event(&token);
        tracker.on_event(&token);
        tracker.finish(Outcome::Ok);
        assert_eq!(semaphore.available_permits(), 1);
        tracker.fail(&RequestError::new(ErrorClass::Internal, "x", "y"));
        drop(tracker);
        assert!(!cancel.is_cancelled());
        assert_eq!(metrics.in_flight(), 0);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("shoal_request_outcomes_total{class=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_request_outcomes_total{class=\"internal\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("shoal_request_ttft_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("shoal_inter_token_seconds_count 1"), "{text}");
        assert!(
            text.contains("shoal_request_duration_seconds_count 1"),
            "{text}"
        );
    }
}
