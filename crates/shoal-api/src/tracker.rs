//! One guard per generation request that owns everything which must be released or recorded
//! exactly once: the admission permit, the in-flight gauge, the request's cancellation token and
//! its outcome. Dropping the guard before an outcome was recorded means the client went away
//! (handler future or response body dropped), so the drop cancels the generation.

use std::sync::Arc;

use shoal_types::ErrorClass;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Outcome};

/// Tracks one generation request from the moment its handler runs.
#[derive(Debug)]
pub(crate) struct RequestTracker {
    metrics: Arc<Metrics>,
    admitted: Option<Admitted>,
    recorded: bool,
}

#[derive(Debug)]
struct Admitted {
    _permit: OwnedSemaphorePermit,
    cancel: CancellationToken,
    start: Instant,
    last_token: Option<Instant>,
}

impl RequestTracker {
    /// Starts tracking; nothing is held yet.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            admitted: None,
            recorded: false,
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

    /// A token arrived: feeds the TTFT or inter-token histogram.
    pub(crate) fn on_token(&mut self) {
        if let Some(admitted) = &mut self.admitted {
            let now = Instant::now();
            match admitted.last_token {
                None => self.metrics.ttft(now - admitted.start),
                Some(previous) => self.metrics.inter_token(now - previous),
            }
            admitted.last_token = Some(now);
        }
    }

    /// Records the outcome and releases the permit. Later calls do nothing.
    pub(crate) fn finish(&mut self, outcome: Outcome) {
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
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        if !self.recorded {
            if let Some(admitted) = &self.admitted {
                admitted.cancel.cancel();
            }
            tracing::info!("client went away; generation cancelled");
            self.finish(Outcome::Error(ErrorClass::Cancelled));
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
        let mut tracker = RequestTracker::new(metrics.clone());
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
        let mut tracker = RequestTracker::new(metrics.clone());
        tracker.admit(
            semaphore.clone().try_acquire_owned().unwrap(),
            cancel.clone(),
        );
        tracker.on_token();
        tracker.on_token();
        tracker.finish(Outcome::Ok);
        assert_eq!(semaphore.available_permits(), 1);
        tracker.finish(Outcome::Error(ErrorClass::Internal));
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
