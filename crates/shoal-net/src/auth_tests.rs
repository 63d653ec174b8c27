//! Decisions of the authorization layer on certificates and headers handed to it directly,
//! including cases the TLS handshake would already stop (expired, foreign cluster) to prove
//! the layer refuses them on its own.

use super::*;
use crate::pki::{ClusterCa, pem_certificates};
use crate::status::class_of;
use crate::tls::TlsMaterial;
use std::time::Duration;

const STATUS: &str = "/shoal.v1.Node/Status";
const JOIN: &str = "/shoal.v1.Coordinator/Join";

struct Fixture {
    ca: ClusterCa,
    layer: AuthLayer,
}

fn fixture() -> Fixture {
    let ca = ClusterCa::generate("lab").unwrap();
    let server = issue(&ca, Role::Agent, "server");
    let layer = AuthLayer::new(
        &TlsMode::Mtls(server),
        AccessPolicy::shoal_default(),
        Revocations::new(),
    )
    .unwrap();
    Fixture { ca, layer }
}

fn issue(ca: &ClusterCa, role: Role, node: &str) -> TlsMaterial {
    let id = PeerIdentity::new(ca.cluster_id(), role, node).unwrap();
    ca.issue(&id, &[], Duration::from_secs(3600))
        .unwrap()
        .into_material(ca.cert_pem())
}

fn der_of(m: &TlsMaterial) -> CertificateDer<'static> {
    CertificateDer::from(pem_certificates(&m.cert_pem).remove(0))
}

fn v1_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        VERSION_HEADER,
        PROTOCOL_VERSION.to_string().parse().unwrap(),
    );
    h
}

fn decide(
    layer: &AuthLayer,
    path: &str,
    der: Option<&CertificateDer<'static>>,
) -> Result<Option<PeerIdentity>, Rejection> {
    layer.authorize(
        path,
        &v1_headers(),
        der.map(std::slice::from_ref),
        SystemTime::now(),
    )
}

#[test]
fn only_agents_move_checkpoints() {
    let f = fixture();
    let agent = der_of(&issue(&f.ca, Role::Agent, "pi-1"));
    let coordinator = der_of(&issue(&f.ca, Role::Coordinator, "coord"));
    let client = der_of(&issue(&f.ca, Role::Client, "laptop"));
    for method in ["PushCheckpoint", "FetchCheckpoint", "DropCheckpoint"] {
        let path = format!("/shoal.v1.Node/{method}");
        assert!(decide(&f.layer, &path, Some(&agent)).is_ok(), "{method}");
        for other in [&coordinator, &client] {
            let err = decide(&f.layer, &path, Some(other)).unwrap_err();
            assert_eq!(
                (err.code, err.reason),
                (Code::PermissionDenied, "role_not_allowed")
            );
        }
    }
    // Only the gateway names a generation's checkpoint holder.
    let path = "/shoal.v1.Node/RetargetCheckpoint";
    assert!(decide(&f.layer, path, Some(&coordinator)).is_ok());
    for other in [&agent, &client] {
        let err = decide(&f.layer, path, Some(other)).unwrap_err();
        assert_eq!(
            (err.code, err.reason),
            (Code::PermissionDenied, "role_not_allowed")
        );
    }
}

#[test]
fn an_agent_may_call_a_node_and_its_identity_comes_back() {
    let f = fixture();
    let agent = der_of(&issue(&f.ca, Role::Agent, "pi-1"));
    let id = decide(&f.layer, STATUS, Some(&agent)).unwrap().unwrap();
    assert_eq!(id, PeerIdentity::new("lab", Role::Agent, "pi-1").unwrap());
    let coordinator = der_of(&issue(&f.ca, Role::Coordinator, "coord"));
    assert!(decide(&f.layer, STATUS, Some(&coordinator)).is_ok());
    assert!(decide(&f.layer, JOIN, Some(&agent)).is_ok());
}

#[test]
fn missing_or_nameless_certificates_are_unauthenticated() {
    let f = fixture();
    let r = decide(&f.layer, STATUS, None).unwrap_err();
    assert_eq!(
        (r.code, r.class, r.reason),
        (
            Code::Unauthenticated,
            ErrorClass::Unauthenticated,
            "no_client_certificate"
        )
    );

    let key = rcgen::KeyPair::generate().unwrap();
    let anonymous = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = CertificateDer::from(anonymous.der().to_vec());
    assert_eq!(
        decide(&f.layer, STATUS, Some(&der)).unwrap_err().reason,
        "no_shoal_identity"
    );
}

#[test]
fn a_peer_of_another_cluster_is_refused_even_if_the_chain_were_accepted() {
    let f = fixture();
    let other = ClusterCa::generate("elsewhere").unwrap();
    let der = der_of(&issue(&other, Role::Agent, "pi-1"));
    let r = decide(&f.layer, STATUS, Some(&der)).unwrap_err();
    assert_eq!(
        (r.class, r.reason),
        (ErrorClass::Unauthenticated, "wrong_cluster")
    );
}

#[test]
fn certificates_outside_their_window_are_refused_per_call() {
    let f = fixture();
    let now = SystemTime::now();
    let id = PeerIdentity::new("lab", Role::Agent, "old").unwrap();
    let expired =
        f.ca.issue_with_window(
            &id,
            &[],
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap()
        .into_material(f.ca.cert_pem());
    let r = decide(&f.layer, STATUS, Some(&der_of(&expired))).unwrap_err();
    assert_eq!(
        (r.class, r.reason),
        (ErrorClass::Unauthenticated, "certificate_expired")
    );

    // A connection opened while the certificate was valid is refused once it has expired.
    let valid = issue(&f.ca, Role::Agent, "pi-1");
    let info = CertificateInfo::from_der(&der_of(&valid)).unwrap();
    let later = info.not_after + Duration::from_secs(1);
    let r = f
        .layer
        .authorize(STATUS, &v1_headers(), Some(&[der_of(&valid)]), later)
        .unwrap_err();
    assert_eq!(r.reason, "certificate_expired");
    let earlier = info.not_before - Duration::from_secs(1);
    let r = f
        .layer
        .authorize(STATUS, &v1_headers(), Some(&[der_of(&valid)]), earlier)
        .unwrap_err();
    assert_eq!(r.reason, "certificate_not_yet_valid");
}

#[test]
fn revocation_by_node_or_serial_takes_effect_on_the_next_decision() {
    let f = fixture();
    let a = issue(&f.ca, Role::Agent, "pi-1");
    let a2 = issue(&f.ca, Role::Agent, "pi-1");
    let b = issue(&f.ca, Role::Agent, "pi-2");
    let revocations = f.layer.revocations().clone();

    assert!(revocations.revoke_node("pi-1"));
    assert!(!revocations.revoke_node("pi-1"));
    for m in [&a, &a2] {
        let r = decide(&f.layer, STATUS, Some(&der_of(m))).unwrap_err();
        assert_eq!(
            (r.class, r.reason),
            (ErrorClass::Unauthenticated, "revoked")
        );
    }
    assert!(decide(&f.layer, STATUS, Some(&der_of(&b))).is_ok());
    assert_eq!(revocations.revoked_nodes(), vec!["pi-1".to_owned()]);
    assert!(revocations.restore_node("pi-1"));
    assert!(decide(&f.layer, STATUS, Some(&der_of(&a))).is_ok());

    // Retiring one certificate leaves the node's other certificate working.
    let serial = CertificateInfo::from_der(&der_of(&a)).unwrap().serial;
    assert!(revocations.revoke_serial(&serial.to_uppercase()));
    assert!(revocations.is_serial_revoked(&serial));
    assert_eq!(
        decide(&f.layer, STATUS, Some(&der_of(&a)))
            .unwrap_err()
            .reason,
        "revoked"
    );
    assert!(decide(&f.layer, STATUS, Some(&der_of(&a2))).is_ok());
    assert!(revocations.restore_serial(&serial));
    assert!(decide(&f.layer, STATUS, Some(&der_of(&a))).is_ok());
}

#[test]
fn roles_outside_the_policy_are_permission_denied() {
    let f = fixture();
    let client = der_of(&issue(&f.ca, Role::Client, "cli"));
    let coordinator = der_of(&issue(&f.ca, Role::Coordinator, "coord"));
    for (path, der) in [
        (STATUS, &client),
        (JOIN, &client),
        (JOIN, &coordinator),
        ("/shoal.v1.Coordinator/Heartbeat", &coordinator),
        ("/shoal.v1.Unknown/Thing", &coordinator),
    ] {
        let r = decide(&f.layer, path, Some(der)).unwrap_err();
        assert_eq!(
            (r.code, r.class, r.reason),
            (
                Code::PermissionDenied,
                ErrorClass::PermissionDenied,
                "role_not_allowed"
            ),
            "{path}"
        );
        let (class, reason) = class_of(&r.to_status());
        assert_eq!(class, ErrorClass::PermissionDenied);
        assert_eq!(reason.as_deref(), Some("role_not_allowed"));
    }
}

#[test]
fn only_agents_open_stage_links() {
    let f = fixture();
    const OPEN: &str = "/shoal.v1.Stage/Open";
    let agent = der_of(&issue(&f.ca, Role::Agent, "pi-1"));
    let id = decide(&f.layer, OPEN, Some(&agent)).unwrap().unwrap();
    assert_eq!(id.node_id, "pi-1");
    for role in [Role::Coordinator, Role::Client] {
        let der = der_of(&issue(&f.ca, role, "other"));
        let r = decide(&f.layer, OPEN, Some(&der)).unwrap_err();
        assert_eq!(
            (r.class, r.reason),
            (ErrorClass::PermissionDenied, "role_not_allowed"),
            "{role}"
        );
    }
    // Only `Open` is allowed: another method of the service stays denied.
    let r = decide(&f.layer, "/shoal.v1.Stage/Other", Some(&agent)).unwrap_err();
    assert_eq!(r.reason, "role_not_allowed");
    assert_eq!(
        decide(&f.layer, OPEN, None).unwrap_err().reason,
        "no_client_certificate"
    );
}

#[test]
fn enroll_is_open_to_anonymous_callers_on_the_enrollment_policy_only() {
    const ENROLL: &str = "/shoal.v1.Enrollment/Enroll";
    const RENEW: &str = "/shoal.v1.Enrollment/Renew";
    let f = fixture();
    let coord = issue(&f.ca, Role::Coordinator, "coord");
    let enrollment = AccessPolicy::enrollment();
    assert!(enrollment.allows_anonymous(ENROLL));
    assert!(!enrollment.allows_anonymous(RENEW));
    assert!(!enrollment.allows_anonymous("/shoal.v1.Enrollment/Enroll/x"));
    let layer = AuthLayer::new(&TlsMode::Mtls(coord), enrollment, Revocations::new()).unwrap();
    assert_eq!(decide(&layer, ENROLL, None), Ok(None));
    // The version is still required of anonymous callers.
    let r = layer
        .authorize(ENROLL, &HeaderMap::new(), None, SystemTime::now())
        .unwrap_err();
    assert_eq!(r.reason, "protocol_version_missing");
    for path in [RENEW, STATUS, JOIN, "/shoal.v1.Admin/ClusterStatus"] {
        let r = decide(&layer, path, None).unwrap_err();
        assert_eq!(
            (r.code, r.class, r.reason),
            (
                Code::Unauthenticated,
                ErrorClass::Unauthenticated,
                "no_client_certificate"
            ),
            "{path}"
        );
    }

    // On the main listener's policy Enroll is nobody's, with or without a certificate, and
    // only agents renew.
    assert!(!AccessPolicy::shoal_default().allows_anonymous(ENROLL));
    assert_eq!(
        decide(&f.layer, ENROLL, None).unwrap_err().reason,
        "no_client_certificate"
    );
    let agent = der_of(&issue(&f.ca, Role::Agent, "pi-1"));
    assert_eq!(
        decide(&f.layer, ENROLL, Some(&agent)).unwrap_err().reason,
        "role_not_allowed"
    );
    assert!(decide(&f.layer, RENEW, Some(&agent)).is_ok());
    for role in [Role::Client, Role::Coordinator] {
        let der = der_of(&issue(&f.ca, role, "x"));
        assert_eq!(
            decide(&f.layer, RENEW, Some(&der)).unwrap_err().reason,
            "role_not_allowed"
        );
    }
}

#[test]
fn a_published_revocation_list_replaces_the_previous_one() {
    let r = Revocations::new();
    assert!(r.replace_all(&["a".into(), "b".into()], &["00AB".into()]));
    assert!(r.is_node_revoked("a") && r.is_serial_revoked("ab"));
    assert!(!r.replace_all(&["b".into(), "a".into()], &["ab".into()]));
    assert!(r.replace_all(&["b".into()], &[]));
    assert!(!r.is_node_revoked("a") && !r.is_serial_revoked("ab"));
    assert_eq!(r.revoked_nodes(), vec!["b".to_owned()]);
    assert!(r.revoked_serials().is_empty());
}

#[test]
fn policy_paths_parse_strictly_and_methods_override_services() {
    let p = AccessPolicy::deny_all()
        .allow_service("pkg.S", &[Role::Agent])
        .allow_method("pkg.S", "Admin", &[Role::Coordinator]);
    assert!(p.allows("/pkg.S/Any", Role::Agent));
    assert!(!p.allows("/pkg.S/Any", Role::Client));
    assert!(!p.allows("/pkg.S/Admin", Role::Agent));
    assert!(p.allows("/pkg.S/Admin", Role::Coordinator));
    for bad in [
        "pkg.S/Any",
        "/pkg.S",
        "/pkg.S/",
        "//Any",
        "/pkg.S/Any/x",
        "",
    ] {
        assert!(!p.allows(bad, Role::Agent), "{bad}");
    }
    assert!(!AccessPolicy::deny_all().allows(STATUS, Role::Coordinator));
}

#[test]
fn the_protocol_version_is_required_and_compared_by_major() {
    let f = fixture();
    let agent = der_of(&issue(&f.ca, Role::Agent, "pi-1"));
    let with = |value: Option<&'static str>| {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(VERSION_HEADER, v.parse().unwrap());
        }
        f.layer.authorize(
            STATUS,
            &h,
            Some(std::slice::from_ref(&agent)),
            SystemTime::now(),
        )
    };
    for (value, reason) in [
        (None, "protocol_version_missing"),
        (Some("2"), "protocol_version_mismatch"),
        (Some("0.9"), "protocol_version_mismatch"),
        (Some("one"), "protocol_version_invalid"),
        (Some(""), "protocol_version_invalid"),
    ] {
        let r = with(value).unwrap_err();
        assert_eq!(
            (r.code, r.class, r.reason),
            (Code::FailedPrecondition, ErrorClass::InvalidRequest, reason),
            "{value:?}"
        );
        let status = r.to_status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(class_of(&status).1.as_deref(), Some(reason));
    }
    assert!(with(Some("1")).is_ok());
    assert!(with(Some(" 1.4")).is_ok());
}

#[test]
fn plaintext_skips_identities_but_not_the_version() {
    let layer = AuthLayer::new(
        &TlsMode::Plaintext,
        AccessPolicy::deny_all(),
        Revocations::new(),
    )
    .unwrap();
    assert_eq!(
        layer.authorize(STATUS, &v1_headers(), None, SystemTime::now()),
        Ok(None)
    );
    let r = layer
        .authorize(STATUS, &HeaderMap::new(), None, SystemTime::now())
        .unwrap_err();
    assert_eq!(r.reason, "protocol_version_missing");
}
