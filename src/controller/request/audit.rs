//! Decision records for a log pipeline.

use crate::api::JitRequest;
use crate::api::jit_request::JitRequestStatus;

use super::lifecycle::requestor;

/// The log target of decision records: one line per decision and port, with everything an
/// auditor asks (who, under which policy, what, from where, from when until when, why), for
/// a log pipeline to keep after the request object and its Events are gone.
pub const AUDIT_TARGET: &str = "portcullis::audit";

/// Writes the decision records for a request that just reached `status.phase`.
pub(super) fn audit(request: &JitRequest, status: &JitRequestStatus) {
    let Some(phase) = status.phase else { return };
    let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
    let name = request.metadata.name.as_deref().unwrap_or_default();
    let requestor = requestor(request).unwrap_or_default();
    let policy = request.spec.policy_name.as_str();
    let reason = status.reason.as_deref().unwrap_or_default();
    let start = status.start_time.as_ref().map(|t| t.0.to_string());
    if status.grants.is_empty() {
        tracing::info!(
            target: AUDIT_TARGET,
            decision = ?phase, namespace, request = name, requestor, policy, reason,
            violations = %status.violations.join("; "),
            "access decision"
        );
    }
    for grant in &status.grants {
        tracing::info!(
            target: AUDIT_TARGET,
            decision = ?phase, namespace, request = name, requestor, policy,
            machine = %grant.virtual_machine, port = grant.number, protocol = ?grant.protocol,
            source = %grant.allowed_source_address_prefixes.join(","),
            start = start.as_deref().unwrap_or_default(), end = %grant.end_time.0,
            reason = grant.status_reason.map_or(reason.to_owned(), |r| format!("{r:?}")),
            "access decision"
        );
    }
}
