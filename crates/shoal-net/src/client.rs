//! The calling side of every link: each call carries the protocol version header and a
//! deadline. The interceptor adds the header and, when the caller set no deadline, a default
//! one, so no RPC can wait forever; tonic enforces the `grpc-timeout` deadline on the client
//! and the server alike.

use shoal_proto::v1::{
    admin_client::AdminClient, coordinator_client::CoordinatorClient,
    enrollment_client::EnrollmentClient, node_client::NodeClient,
};
use shoal_proto::{PROTOCOL_VERSION, VERSION_HEADER};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Metadata key tonic uses for a call's deadline.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Adds the protocol version header and a default deadline to every call.
#[derive(Debug, Clone, Copy)]
pub struct ClientInterceptor {
    default_deadline: Duration,
}

impl ClientInterceptor {
    /// An interceptor giving calls without a deadline `default_deadline`.
    pub fn new(default_deadline: Duration) -> Self {
        ClientInterceptor { default_deadline }
    }
}

impl Interceptor for ClientInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(VERSION_HEADER, MetadataValue::from(PROTOCOL_VERSION));
        if !req.metadata().contains_key(GRPC_TIMEOUT) {
            req.set_timeout(self.default_deadline);
        }
        Ok(req)
    }
}

/// A `Node` service client whose calls carry the version header and a deadline.
pub type ShoalNodeClient = NodeClient<InterceptedService<Channel, ClientInterceptor>>;
/// A `Coordinator` service client whose calls carry the version header and a deadline.
pub type ShoalCoordinatorClient = CoordinatorClient<InterceptedService<Channel, ClientInterceptor>>;

/// An `Admin` service client whose calls carry the version header and a deadline.
pub type ShoalAdminClient = AdminClient<InterceptedService<Channel, ClientInterceptor>>;

/// An `Admin` client on `channel` (operator tooling); calls without their own deadline get
/// `default_deadline`.
pub fn admin_client(channel: Channel, default_deadline: Duration) -> ShoalAdminClient {
    AdminClient::with_interceptor(channel, ClientInterceptor::new(default_deadline))
}

/// A `Node` client on `channel`; calls without their own deadline get `default_deadline`.
pub fn node_client(channel: Channel, default_deadline: Duration) -> ShoalNodeClient {
    NodeClient::with_interceptor(channel, ClientInterceptor::new(default_deadline))
}

/// A `Coordinator` client on `channel`; calls without their own deadline get
/// `default_deadline`.
pub fn coordinator_client(channel: Channel, default_deadline: Duration) -> ShoalCoordinatorClient {
    CoordinatorClient::with_interceptor(channel, ClientInterceptor::new(default_deadline))
}

/// An `Enrollment` service client whose calls carry the version header and a deadline.
pub type ShoalEnrollmentClient = EnrollmentClient<InterceptedService<Channel, ClientInterceptor>>;

/// An `Enrollment` client on `channel`; calls without their own deadline get
/// `default_deadline`.
pub fn enrollment_client(channel: Channel, default_deadline: Duration) -> ShoalEnrollmentClient {
    EnrollmentClient::with_interceptor(channel, ClientInterceptor::new(default_deadline))
}

/// A request for `message` that fails with `DEADLINE_EXCEEDED` after `deadline`.
pub fn with_deadline<T>(message: T, deadline: Duration) -> Request<T> {
    let mut req = Request::new(message);
    req.set_timeout(deadline);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interceptor_adds_the_version_and_keeps_a_callers_deadline() {
        let mut icp = ClientInterceptor::new(Duration::from_secs(7));
        let out = icp.call(Request::new(())).unwrap();
        assert_eq!(
            out.metadata().get(VERSION_HEADER).unwrap(),
            PROTOCOL_VERSION.to_string().as_str()
        );
        assert_eq!(out.metadata().get(GRPC_TIMEOUT).unwrap(), "7000000u");

        let mut own = Request::new(());
        own.set_timeout(Duration::from_millis(250));
        let out = icp.call(own).unwrap();
        assert_eq!(out.metadata().get(GRPC_TIMEOUT).unwrap(), "250000u");
    }

    #[test]
    fn with_deadline_sets_the_timeout_header() {
        let req = with_deadline(5u8, Duration::from_millis(1500));
        assert_eq!(req.metadata().get(GRPC_TIMEOUT).unwrap(), "1500000u");
        assert_eq!(*req.get_ref(), 5);
    }
}
