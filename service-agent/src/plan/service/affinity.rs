//! `sessionAffinity: ClientIP`: the timeout the dataplane keeps a client on
//! one backend.
use k8s_openapi::api::core::v1::ServiceSpec;

use super::FieldError;

/// Default of `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Upper bound Kubernetes validation puts on the affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The affinity timeout when the Service asks for affinity; an error names
/// the field that refuses the Service.
pub(super) fn timeout(spec: &ServiceSpec) -> Result<Option<u32>, (&'static str, FieldError)> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_S => Ok(Some(t as u32)),
                Some(t) => Err((
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    FieldError::out_of_range(t, MAX_AFFINITY_TIMEOUT_S),
                )),
            }
        }
        Some(other) => Err((
            "spec.sessionAffinity",
            FieldError::UnknownValue(other.into()),
        )),
    }
}
