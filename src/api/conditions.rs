//! Condition types and reasons, as constants so that controllers, tests and users agree on
//! the words, and the one helper that keeps `lastTransitionTime` stable.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The object is fully reconciled.
pub const READY: &str = "Ready";
/// Two NSG rules share a direction and a priority.
pub const CONFLICT: &str = "PriorityConflict";
/// Every agent on the NSG reports its current generation applied, without an error.
pub const ENFORCED: &str = "Enforced";
/// A JIT request's access is open.
pub const GRANTED: &str = "Granted";

/// Reasons, CamelCase as the API conventions ask.
pub mod reason {
    pub const RECONCILED: &str = "Reconciled";
    pub const NO_CONFLICT: &str = "NoConflict";
    pub const CONFLICTING_PRIORITIES: &str = "ConflictingPriorities";
    pub const INVALID_RULE: &str = "InvalidRule";
    /// Every agent reports the NSG's generation applied, and no error.
    pub const AGENTS_IN_SYNC: &str = "AgentsInSync";
    /// Some agent reports an error (it keeps its last good rules).
    pub const AGENT_ERROR: &str = "AgentError";
    /// Some agent has not applied the NSG's current generation yet.
    pub const AGENTS_BEHIND: &str = "AgentsBehind";
    /// No agent reports on the NSG: nothing enforces it.
    pub const NO_AGENTS: &str = "NoAgents";
    pub const NSG_NOT_FOUND: &str = "NetworkSecurityGroupNotFound";
    pub const NO_PRIORITY_AVAILABLE: &str = "NoPriorityAvailable";
    /// A user rule above a JIT deny lets a protected port in from a source the policy does
    /// not allow: the machine is not fully protected.
    pub const EXPOSED: &str = "Exposed";
    pub const POLICY_NOT_FOUND: &str = "PolicyNotFound";
    pub const REQUESTOR_MISSING: &str = "RequestorMissing";
    pub const NOT_AUTHORIZED: &str = "NotAuthorized";
    pub const RULE_CONFLICT: &str = "RuleConflict";
    pub const POLICY_VIOLATION: &str = "PolicyViolation";
    pub const ACCESS_GRANTED: &str = "AccessGranted";
    pub const EXPIRED: &str = "Expired";
    pub const USER_REQUESTED: &str = "UserRequested";
    pub const NEWER_REQUEST_INITIATED: &str = "NewerRequestInitiated";
    pub const POLICY_CHANGED: &str = "PolicyChanged";
    pub const IDLE: &str = "Idle";
    /// The policy wants approvals the request has not received yet.
    pub const AWAITING_APPROVAL: &str = "AwaitingApproval";
    /// The request waits for its `startTime`.
    pub const SCHEDULED: &str = "Scheduled";
    /// An approver rejected the request.
    pub const REJECTED: &str = "Rejected";
    /// The request stayed `Pending` for its policy's `pendingTimeout`.
    pub const PENDING_TIMEOUT: &str = "PendingTimeout";
}

/// A condition as a controller decides it, before the transition time is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Decided {
    /// Turns the decision into a condition, keeping the previous `lastTransitionTime` when
    /// the status did not change: a fresh timestamp on every reconcile would make every
    /// status write differ and the controller trigger itself forever.
    pub fn into_condition(
        self,
        previous: &[Condition],
        generation: Option<i64>,
        now: &Time,
    ) -> Condition {
        let status = if self.status { "True" } else { "False" }.to_owned();
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == self.type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: self.type_.to_owned(),
            status,
            reason: self.reason.to_owned(),
            message: self.message,
            observed_generation: generation,
            last_transition_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_is_kept_while_status_holds_and_moves_when_it_flips() {
        let first = Decided {
            type_: READY,
            status: true,
            reason: reason::RECONCILED,
            message: "ok".into(),
        }
        .into_condition(&[], Some(1), &at(100));
        assert_eq!(first.last_transition_time, at(100));

        let same = Decided {
            type_: READY,
            status: true,
            reason: reason::RECONCILED,
            message: "still ok".into(),
        }
        .into_condition(std::slice::from_ref(&first), Some(2), &at(200));
        assert_eq!(same.last_transition_time, at(100));
        assert_eq!(same.observed_generation, Some(2));

        let flipped = Decided {
            type_: READY,
            status: false,
            reason: reason::NSG_NOT_FOUND,
            message: "gone".into(),
        }
        .into_condition(&[same], Some(2), &at(300));
        assert_eq!(flipped.last_transition_time, at(300));
        assert_eq!(flipped.status, "False");
    }
}
