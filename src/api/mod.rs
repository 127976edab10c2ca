//! The Kubernetes API of Portcullis: the six custom resources of group
//! `jit.portcullis.dev/v1alpha1`, their schemas (with CEL validation so that bad input is
//! refused at `kubectl apply` time) and their conversion into the pure [`crate::rules`] model.
//!
//! Everything here is data: no client, no reconciler. Field names follow Azure's
//! `jitNetworkAccessPolicies` and NSG APIs because they are the public contract users write.

// kube's derive takes one `printcolumn(...)` per column, so their `type_ = "string"` repeat.
#![allow(clippy::duplicated_attributes)]

pub mod agent_report;
pub mod conditions;
pub mod convert;
pub mod jit_approval;
pub mod jit_policy;
pub mod jit_request;
pub mod nsg;
pub mod nsg_model;
pub mod rule_fields;
pub mod security_rule;
pub mod validation;

pub use agent_report::{AgentReport, AgentReportSpec};
pub use jit_approval::{JitApproval, JitApprovalSpec, JitApprovalStatus};
pub use jit_policy::{JitPolicy, JitPolicySpec, JitPolicyStatus};
pub use jit_request::{JitRequest, JitRequestSpec, JitRequestStatus};
pub use nsg::{NetworkSecurityGroup, NetworkSecurityGroupSpec, NetworkSecurityGroupStatus};
pub use security_rule::{SecurityRule, SecurityRuleSpec};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Portcullis kind.
pub const GROUP: &str = "jit.portcullis.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The custom verb on `jitpolicies` that lets a user request access under a policy: the
/// analogue of Azure's `jitNetworkAccessPolicies/initiate/action`.
pub const INITIATE: &str = "initiate";

/// What an access review asks about: `verb` on the Portcullis `resource` (`name`, when
/// one) in `namespace`. The operator (SubjectAccessReview) and `kubectl jit`
/// (SelfSubjectAccessReview) ask the same question.
pub fn access_attributes(
    namespace: &str,
    verb: &str,
    resource: &str,
    name: Option<&str>,
) -> k8s_openapi::api::authorization::v1::ResourceAttributes {
    k8s_openapi::api::authorization::v1::ResourceAttributes {
        namespace: Some(namespace.to_owned()),
        verb: Some(verb.to_owned()),
        group: Some(GROUP.to_owned()),
        resource: Some(resource.to_owned()),
        name: name.map(str::to_owned),
        ..Default::default()
    }
}

/// All CRDs in a stable order: what `portcullis crds` prints and `crds/` holds.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        NetworkSecurityGroup::crd(),
        SecurityRule::crd(),
        JitPolicy::crd(),
        JitRequest::crd(),
        JitApproval::crd(),
        AgentReport::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, byte-for-byte what `make crds` writes.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// `crds/` is what users and GitOps apply: it must be exactly what the code generates.
    #[test]
    fn committed_crds_match_the_code() {
        let committed = include_str!("../../crds/portcullis.yaml");
        let generated = super::crds_yaml().expect("CRDs render");
        assert!(
            committed == generated,
            "crds/portcullis.yaml is stale: run `make crds` and commit the result"
        );
    }
}
