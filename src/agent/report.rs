//! The agent's [`AgentReport`]: what it says, the object it is written as, and when the one
//! in the cluster is no longer what the agent wrote.
//!
//! Pure: the loop writes the object and watches it (by name); these functions decide.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::api::nsg::{
    EnforcementReport, IdleGrant, ListeningPort, MAX_REPORTED_ERROR, MAX_REPORTED_IDLE,
};
use crate::api::{AgentReport, AgentReportSpec, NetworkSecurityGroup};

/// What the agent last reported, to write only when it changes.
#[derive(Clone, Debug, PartialEq)]
pub struct Reported {
    /// The NSG object reported on (its UID, the report's owner): one deleted and created
    /// again gets a report of its own.
    pub nsg: Option<String>,
    pub generation: Option<i64>,
    pub hash: String,
    pub error: Option<String>,
    pub idle: Vec<IdleGrant>,
    pub listening: Vec<ListeningPort>,
}

/// The report object as the agent last wrote it: its UID and generation in the write's
/// answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub uid: String,
    pub generation: i64,
}

impl Written {
    /// What the apiserver answered to a write of `report`.
    pub fn of(report: &AgentReport) -> Option<Self> {
        Some(Self {
            uid: report.metadata.uid.clone()?,
            generation: report.metadata.generation?,
        })
    }
}

/// Whether the report in the cluster (`stored`, as the watch shows it) has stopped being
/// what the agent wrote (`written`): deleted, replaced by another object, or changed by
/// someone else since (a newer generation; its spec is the agent's alone). The watch may
/// still show a generation before the agent's last write: that is lag, not a change.
pub fn stale(written: Option<&Written>, stored: Option<&AgentReport>) -> bool {
    let Some(written) = written else {
        return false;
    };
    match stored {
        None => true,
        Some(stored) => {
            stored.metadata.uid.as_deref() != Some(written.uid.as_str())
                || stored
                    .metadata
                    .generation
                    .is_some_and(|g| g > written.generation)
        }
    }
}

/// The report object `name` for `nsg`, owned by it (deleting the NSG deletes its reports;
/// not a controller reference, and no owner deletion is blocked: the agent needs no rights
/// on the NSG for it). Cut to what the schema accepts: the first idle grants (the rest are
/// reported once these are revoked), an error's first characters.
pub fn object(name: &str, nsg: &NetworkSecurityGroup, mut entry: EnforcementReport) -> AgentReport {
    entry.idle_grants.truncate(MAX_REPORTED_IDLE);
    if let Some(error) = &mut entry.error
        && error.chars().count() > MAX_REPORTED_ERROR
    {
        *error = error.chars().take(MAX_REPORTED_ERROR - 1).collect();
        error.push('…');
    }
    AgentReport {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            owner_references: nsg.metadata.uid.as_ref().map(|uid| {
                vec![OwnerReference {
                    api_version: NetworkSecurityGroup::api_version(&()).into_owned(),
                    kind: NetworkSecurityGroup::kind(&()).into_owned(),
                    name: nsg.metadata.name.clone().unwrap_or_default(),
                    uid: uid.clone(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: AgentReportSpec {
            network_security_group_name: nsg.metadata.name.clone().unwrap_or_default(),
            report: entry,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(error: Option<String>) -> EnforcementReport {
        EnforcementReport {
            error,
            ..crate::api::nsg::report_of("vm-1")
        }
    }

    fn stored(uid: &str, generation: i64) -> AgentReport {
        let mut nsg = crate::api::nsg::empty("default", "web-nsg");
        nsg.metadata.uid = Some("nsg-uid".into());
        let mut report = object("web-nsg.vm-1", &nsg, entry(None));
        report.metadata.uid = Some(uid.into());
        report.metadata.generation = Some(generation);
        report
    }

    #[test]
    fn the_report_is_owned_by_its_nsg_and_names_it() {
        let mut nsg = crate::api::nsg::empty("default", "web-nsg");
        nsg.metadata.uid = Some("nsg-uid".into());
        let report = object("web-nsg.vm-1", &nsg, entry(None));
        let owner = &report.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("NetworkSecurityGroup", "nsg-uid")
        );
        assert_eq!(owner.controller, None);
        assert_eq!(report.spec.network_security_group_name, "web-nsg");
        let value = serde_json::to_value(&report).unwrap();
        assert_eq!(value["kind"], "AgentReport");
        assert_eq!(value["spec"]["agent"], "vm-1");
    }

    #[test]
    fn a_long_error_and_many_idle_grants_are_cut_to_what_the_schema_accepts() {
        let nsg = crate::api::nsg::empty("default", "web-nsg");
        let mut long = entry(Some("é".repeat(5_000)));
        long.idle_grants = (0..MAX_REPORTED_IDLE + 10)
            .map(|i| IdleGrant {
                rule: format!("grant-{i}"),
                last_packet: None,
            })
            .collect();
        let report = object("n", &nsg, long).spec.report;
        let error = report.error.unwrap();
        assert_eq!(error.chars().count(), MAX_REPORTED_ERROR);
        assert!(error.ends_with('…'));
        assert_eq!(report.idle_grants.len(), MAX_REPORTED_IDLE);
        assert_eq!(report.idle_grants[0].rule, "grant-0");
    }

    #[test]
    fn only_a_report_gone_or_changed_by_someone_else_is_stale() {
        let written = Written {
            uid: "r1".into(),
            generation: 4,
        };
        // Nothing written yet: the first round writes anyway.
        assert!(!stale(None, None));
        assert!(!stale(Some(&written), Some(&stored("r1", 4))));
        // The watch has not caught up with the agent's own write.
        assert!(!stale(Some(&written), Some(&stored("r1", 3))));
        assert!(stale(Some(&written), Some(&stored("r1", 5))));
        assert!(stale(Some(&written), Some(&stored("r2", 1))));
        assert!(stale(Some(&written), None));
    }
}
