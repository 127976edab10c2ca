//! Which approvers' decisions a request counts, as pure data.
//!
//! A decision counts when its approver was recorded by admission, is not the requestor,
//! may `approve` the request's policy (the caller asks the apiserver and passes the answers
//! in) and has not decided on this request before: the earliest decision of each approver
//! is the one that counts. One counted rejection denies the request; enough counted
//! approvals let it be granted.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::JitApproval;
use crate::api::jit_approval::{ApprovalRecord, Decision};

/// Why a decision counts or not; the string is the approval's `status.reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Counted,
    /// The approver is the requestor.
    SelfApproval,
    /// The apiserver says the approver may not `approve` the policy (its reason).
    NotAuthorized(String),
    /// The approver decided on this request before; that decision is the one that counts.
    DuplicateApprover,
    /// No approver was recorded (admission did not run).
    ApproverMissing,
}

impl Verdict {
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Counted => "Counted",
            Verdict::SelfApproval => "SelfApproval",
            Verdict::NotAuthorized(_) => "NotAuthorized",
            Verdict::DuplicateApprover => "DuplicateApprover",
            Verdict::ApproverMissing => "ApproverMissing",
        }
    }

    pub fn message(&self, approver: &str, requestor: &str, policy: &str) -> String {
        match self {
            Verdict::Counted => format!("counted: {approver} may approve jitpolicies/{policy}"),
            Verdict::SelfApproval => {
                format!(
                    "not counted: {approver} is the requestor {requestor}; nobody approves their own request"
                )
            }
            Verdict::NotAuthorized(why) => {
                format!("not counted: {approver} may not approve jitpolicies/{policy}: {why}")
            }
            Verdict::DuplicateApprover => {
                format!("not counted: {approver} already decided on this request")
            }
            Verdict::ApproverMissing => {
                "not counted: no approver was recorded by admission".to_owned()
            }
        }
    }
}

/// What the counted decisions add up to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tally {
    /// A counted rejection: who, and their comment.
    Rejected {
        approver: String,
        comment: Option<String>,
    },
    /// This many distinct counted approvals.
    Approved(usize),
}

/// Every decision's verdict (by approval name), the counted ones as the request records
/// them, and the tally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub verdicts: BTreeMap<String, Verdict>,
    pub records: Vec<ApprovalRecord>,
    pub tally: Tally,
}

/// The approvals that need the apiserver's answer: those whose approver is recorded and
/// is not the requestor. Their names, so that the caller asks once per approver.
pub fn to_authorize<'a>(requestor: &str, approvals: &'a [&'a JitApproval]) -> Vec<&'a JitApproval> {
    approvals
        .iter()
        .filter(|a| {
            a.spec
                .approver
                .as_ref()
                .is_some_and(|who| who.username != requestor)
        })
        .copied()
        .collect()
}

/// Judges `approvals` of a request by `requestor`; `refusals` holds, by approver username,
/// why the apiserver refused `approve` to those it refused (an approver absent from it was
/// allowed).
///
/// A decision's verdict depends only on its own approver's answer (and on the order of
/// that approver's decisions), never on another approver's: so whoever needs one
/// approval's verdict need ask about its approver alone.
pub fn judge(
    requestor: &str,
    approvals: &[&JitApproval],
    refusals: &BTreeMap<String, String>,
) -> Judgement {
    let mut ordered: Vec<&JitApproval> = approvals.to_vec();
    ordered.sort_by_key(|a| (created(a), a.metadata.name.clone()));
    let mut decided: BTreeSet<String> = BTreeSet::new();
    let mut verdicts = BTreeMap::new();
    let mut records = Vec::new();
    for approval in ordered {
        let name = approval.metadata.name.clone().unwrap_or_default();
        let verdict = match &approval.spec.approver {
            None => Verdict::ApproverMissing,
            Some(who) if who.username == requestor => Verdict::SelfApproval,
            Some(who) => match refusals.get(&who.username) {
                Some(why) => Verdict::NotAuthorized(why.clone()),
                None if !decided.insert(who.username.clone()) => Verdict::DuplicateApprover,
                None => Verdict::Counted,
            },
        };
        if verdict == Verdict::Counted {
            records.push(ApprovalRecord {
                approver: approval
                    .spec
                    .approver
                    .as_ref()
                    .map(|a| a.username.clone())
                    .unwrap_or_default(),
                decision: approval.spec.decision,
                time: Time(created(approval)),
                comment: approval.spec.comment.clone(),
            });
        }
        verdicts.insert(name, verdict);
    }
    let tally = match records.iter().find(|r| r.decision == Decision::Reject) {
        Some(rejection) => Tally::Rejected {
            approver: rejection.approver.clone(),
            comment: rejection.comment.clone(),
        },
        None => Tally::Approved(records.len()),
    };
    Judgement {
        verdicts,
        records,
        tally,
    }
}

fn created(approval: &JitApproval) -> Timestamp {
    approval
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn approval(name: &str, approver: Option<&str>, decision: &str, second: u32) -> JitApproval {
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitApproval",
            "metadata": {"name": name, "creationTimestamp": format!("2030-01-01T00:00:{second:02}Z")},
            "spec": {
                "requestName": "ask", "decision": decision, "comment": format!("by {name}"),
                "approver": approver.map(|a| json!({"username": a})),
            },
        }))
        .unwrap()
    }

    #[test]
    fn counts_each_authorized_approver_once_and_never_the_requestor() {
        let approvals = [
            approval("self", Some("alice"), "Approve", 1),
            approval("bob-1", Some("bob"), "Approve", 2),
            approval("mallory", Some("mallory"), "Approve", 3),
            approval("bob-2", Some("bob"), "Approve", 4),
            approval("carol", Some("carol"), "Approve", 5),
            approval("forged", None, "Approve", 6),
        ];
        let all: Vec<&JitApproval> = approvals.iter().collect();
        let asked: Vec<&str> = to_authorize("alice", &all)
            .iter()
            .map(|a| a.metadata.name.as_deref().unwrap())
            .collect();
        assert_eq!(asked, ["bob-1", "mallory", "bob-2", "carol"]);
        let refusals = BTreeMap::from([("mallory".to_owned(), "no role".to_owned())]);
        let judged = judge("alice", &all, &refusals);
        let reasons: Vec<(&str, &str)> = judged
            .verdicts
            .iter()
            .map(|(name, v)| (name.as_str(), v.reason()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("bob-1", "Counted"),
                ("bob-2", "DuplicateApprover"),
                ("carol", "Counted"),
                ("forged", "ApproverMissing"),
                ("mallory", "NotAuthorized"),
                ("self", "SelfApproval"),
            ]
        );
        assert_eq!(judged.tally, Tally::Approved(2));
        let approvers: Vec<&str> = judged.records.iter().map(|r| r.approver.as_str()).collect();
        assert_eq!(approvers, ["bob", "carol"]);
    }

    #[test]
    fn a_verdict_depends_on_its_own_approvers_answer_alone() {
        let approvals = [
            approval("self", Some("alice"), "Approve", 1),
            approval("bob-1", Some("bob"), "Approve", 2),
            approval("mallory", Some("mallory"), "Reject", 3),
            approval("bob-2", Some("bob"), "Reject", 4),
            approval("carol", Some("carol"), "Approve", 5),
            approval("forged", None, "Approve", 6),
        ];
        let all: Vec<&JitApproval> = approvals.iter().collect();
        let approvers = ["alice", "bob", "mallory", "carol"];
        // Every set of refusals over the approvers: each approval's verdict judged with all
        // of them equals its verdict judged with its own approver's answer alone.
        for set in 0..1u32 << approvers.len() {
            let refused = |who: &str| {
                let i = approvers.iter().position(|a| *a == who).unwrap();
                set & 1 << i != 0
            };
            let refusals: BTreeMap<String, String> = approvers
                .iter()
                .filter(|a| refused(a))
                .map(|a| (a.to_string(), "no role".to_owned()))
                .collect();
            let everyone = judge("alice", &all, &refusals);
            for one in &approvals {
                let name = one.metadata.name.clone().unwrap();
                let own: BTreeMap<String, String> = refusals
                    .iter()
                    .filter(|(who, _)| one.spec.approver.as_ref().map(|a| &a.username) == Some(who))
                    .map(|(who, why)| (who.clone(), why.clone()))
                    .collect();
                let alone = judge("alice", &all, &own);
                assert_eq!(
                    alone.verdicts[&name], everyone.verdicts[&name],
                    "{name} in set {set:#b}"
                );
            }
        }
    }

    #[test]
    fn one_counted_rejection_denies_but_an_unauthorized_one_does_not() {
        let approvals = [
            approval("bob", Some("bob"), "Approve", 1),
            approval("mallory", Some("mallory"), "Reject", 2),
            approval("carol", Some("carol"), "Reject", 3),
        ];
        let all: Vec<&JitApproval> = approvals.iter().collect();
        let refusals = BTreeMap::from([("mallory".to_owned(), "no role".to_owned())]);
        let judged = judge("alice", &all, &refusals);
        assert_eq!(
            judged.tally,
            Tally::Rejected {
                approver: "carol".into(),
                comment: Some("by carol".into())
            }
        );
        let judged = judge("alice", &all[..2], &refusals);
        assert_eq!(judged.tally, Tally::Approved(1));
    }
}
