//! `SecurityRule` (`nsgrule`): one rule as its own object. The operator materializes JIT
//! denies (owned by a `JitPolicy`) and grants (owned by a `JitRequest`) this way, so that
//! ownership, garbage collection and GitOps all work on whole objects and the user's NSG
//! spec is never rewritten. Users may create their own too.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::jit_policy::EstablishedConnections;
use super::rule_fields::RuleFields;
use super::validation::{DURATION_PATTERN, TIMESTAMP_PATTERN};

/// The standard "managed by" label; with [`MANAGED_BY`] it marks every object Portcullis
/// created, so it never touches a rule it did not create.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`] on Portcullis' objects.
pub const MANAGED_BY: &str = "portcullis";
/// The field a SecurityRule list or watch may be selected by: the NSG it belongs to.
pub const NSG_FIELD: &str = "spec.networkSecurityGroupName";

/// A rule attached to the NSG named in `networkSecurityGroupName`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "jit.portcullis.dev",
    version = "v1alpha1",
    kind = "SecurityRule",
    namespaced,
    shortname = "nsgrule",
    category = "portcullis",
    // An agent watches only its NSG's rules (`--field-selector
    // spec.networkSecurityGroupName=NAME`), not every rule of the namespace.
    selectable = ".spec.networkSecurityGroupName",
    doc = "One NSG rule as an object; JIT denies and grants are materialized as these.",
    printcolumn(
        name = "NSG",
        type_ = "string",
        json_path = ".spec.networkSecurityGroupName"
    ),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Direction", type_ = "string", json_path = ".spec.direction"),
    printcolumn(name = "Access", type_ = "string", json_path = ".spec.access"),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.sourceAddressPrefix"
    ),
    printcolumn(
        name = "Ports",
        type_ = "string",
        json_path = ".spec.destinationPortRanges"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SecurityRuleSpec {
    /// The NSG (same namespace) this rule belongs to.
    #[schemars(length(min = 1, max = 253))]
    pub network_security_group_name: String,
    #[serde(flatten)]
    pub fields: RuleFields,
    /// After this instant the rule is never effective, deleted yet or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "expires_at_schema")]
    pub expires_at: Option<Time>,
    /// With `expiresAt`: whether the connections the rule let in end with it (`Close`) or
    /// outlive it (`Keep`, the default). The operator copies the policy port's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_connections: Option<EstablishedConnections>,
    /// With `expiresAt`: agents report the rule once it has carried no packet for this
    /// long (ISO 8601), and the operator revokes its grant (`Idle`). The operator copies
    /// the policy port's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub idle_timeout: Option<String>,
}

/// `expiresAt` as an RFC 3339 timestamp the operator and the agents can read. The plain
/// `date-time` format is not enough: the apiserver's check for it accepts strings (a stray
/// character where the fraction's dot goes, more than nine fraction digits) that no client
/// can parse, and one such object would stop every cache that lists SecurityRules.
fn expires_at_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
        "nullable": true,
    })
}
