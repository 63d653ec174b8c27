//! The node's own OpenAI API: the gateway's router over a backend that dispatches each request
//! to the loaded shard of its model.

use crate::core::NodeCore;
use futures::future::BoxFuture;
use shoal_api::{
    BackendError, GenerateEvent, GenerateRequest, InferenceBackend, ModelCard, Readiness,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Serves the models this node has loaded; not ready while none is (or while draining).
#[derive(Debug)]
pub(crate) struct NodeBackend {
    core: Arc<NodeCore>,
}

impl NodeBackend {
    pub fn new(core: Arc<NodeCore>) -> Self {
        Self { core }
    }
}

impl InferenceBackend for NodeBackend {
    fn models(&self) -> Vec<ModelCard> {
        self.core
            .shards
            .ready()
            .iter()
            .flat_map(|b| b.models())
            .collect()
    }

    fn readiness(&self) -> Readiness {
        if self.core.is_draining() {
            Readiness::NotReady {
                reason: "draining".into(),
            }
        } else if self.core.shards.ready().is_empty() {
            Readiness::NotReady {
                reason: "no_model_loaded".into(),
            }
        } else {
            Readiness::Ready
        }
    }

    fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<GenerateEvent>, BackendError>> {
        Box::pin(async move {
            self.core.check_accepting()?;
            let backend = self.core.shards.backend_for(req.model.as_str())?;
            backend.generate(req, cancel).await
        })
    }
}
