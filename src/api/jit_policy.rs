//! `JitPolicy` (`jitp`): which machines are JIT-protected, on which ports, from where and for
//! how long at most. Mirrors Azure's `jitNetworkAccessPolicies`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validation::{
    DURATION_MESSAGE, DURATION_PATTERN, MAX_PENDING_SECONDS, PENDING_MESSAGE, SOURCE_MESSAGE,
    SOURCE_RULE, SOURCES_RULE, duration_rule, duration_rule_up_to,
};

/// The ports a machine gets when its policy lists none, as in Azure: SSH, RDP, WinRM.
pub const DEFAULT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
/// The longest access a default port allows.
pub const DEFAULT_MAX_DURATION: &str = "PT3H";

/// The policy: machines, their JIT ports and the rules a request must respect.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "jit.portcullis.dev",
    version = "v1alpha1",
    kind = "JitPolicy",
    namespaced,
    shortname = "jitp",
    category = "portcullis",
    status = "JitPolicyStatus",
    doc = "A just-in-time access policy: protected machines and what may be requested.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Machines",
        type_ = "string",
        json_path = ".status.configuredMachines",
        description = "Configured / total machines"
    ),
    printcolumn(
        name = "Justification",
        type_ = "boolean",
        json_path = ".spec.requireJustification",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct JitPolicySpec {
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub virtual_machines: Vec<PolicyVirtualMachine>,
    /// Requests must say why.
    #[serde(default)]
    pub require_justification: bool,
    /// Approvals a request needs before it is granted; omitted: none, a request with
    /// `initiate` is granted at once (Azure's behaviour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalPolicy>,
    /// How long a request may stay `Pending` (waiting for approval, for this policy or its
    /// NSG, or for a priority) before it ends `Expired` with reason `PendingTimeout`; ISO
    /// 8601, from PT1S to P7D, default PT1H. A scheduled request's wait for its
    /// `startTime` does not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(duration_rule_up_to(MAX_PENDING_SECONDS)).message(PENDING_MESSAGE))]
    pub pending_timeout: Option<String>,
}

/// The approval step of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalPolicy {
    /// How many distinct approvers, none of them the requestor, must approve.
    #[schemars(range(min = 1, max = 5))]
    pub approvals_required: u8,
}

/// A request's wait when its policy says nothing.
pub const DEFAULT_PENDING_TIMEOUT: &str = "PT1H";

/// A protected machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVirtualMachine {
    /// Unique within the policy; requests name machines by it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The machine's internal IP: every JIT rule for it targets exactly this address.
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address"))]
    pub address: String,
    /// The NSG (same namespace) that guards the machine.
    #[schemars(length(min = 1, max = 253))]
    pub network_security_group_name: String,
    /// The JIT ports; omitted means 22, 3389, 5985 and 5986 over TCP, any source, PT3H.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["number".into(), "protocol".into()]))]
    pub ports: Option<Vec<PolicyPort>>,
}

/// A protocol as policies and requests spell it (Azure's `TCP`/`UDP`/`*`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum PolicyProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[default]
    #[serde(rename = "*")]
    Any,
}

/// A port that may be opened on request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!(has(self.allowedSourceAddressPrefix) && has(self.allowedSourceAddressPrefixes))"
).message("set at most one of allowedSourceAddressPrefix or allowedSourceAddressPrefixes"))]
pub struct PolicyPort {
    #[schemars(range(min = 1, max = 65535))]
    pub number: u16,
    #[serde(default)]
    #[schemars(default = "default_protocol")]
    pub protocol: PolicyProtocol,
    /// Where requests may come from; omitted (with the plural too) means any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 43))]
    #[x_kube(validation = Rule::new(SOURCE_RULE).message(SOURCE_MESSAGE))]
    pub allowed_source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new(SOURCES_RULE).message(SOURCE_MESSAGE))]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    /// The longest access one request may get, ISO 8601, from PT1S to PT24H.
    #[serde(default = "default_max_duration")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(duration_rule()).message(DURATION_MESSAGE))]
    pub max_request_access_duration: String,
    /// What happens to the connections a grant of this port let in when it ends (expiry or
    /// revocation): `Keep` (the default, and Azure's behaviour) lets them run on; `Close`
    /// cuts them within a second.
    #[serde(default, skip_serializing_if = "EstablishedConnections::is_keep")]
    #[schemars(default = "EstablishedConnections::keep")]
    pub established_connections: EstablishedConnections,
    /// A grant of this port that carries no packet for this long (ISO 8601, PT1S to PT24H)
    /// is revoked with reason `Idle`. Omitted: a grant lasts its whole duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new(duration_rule()).message(DURATION_MESSAGE))]
    pub idle_timeout: Option<String>,
}

/// The fate of a grant's established connections when the grant ends.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
pub enum EstablishedConnections {
    /// Connections opened while the grant was in force outlive it (Azure's promise).
    #[default]
    Keep,
    /// They end with the grant: their next packet is refused, TCP with a reset.
    Close,
}

impl EstablishedConnections {
    pub fn is_keep(&self) -> bool {
        *self == Self::Keep
    }

    fn keep() -> Self {
        Self::Keep
    }
}

fn default_protocol() -> PolicyProtocol {
    PolicyProtocol::Any
}

fn default_max_duration() -> String {
    DEFAULT_MAX_DURATION.to_owned()
}

/// What the operator did with the policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JitPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `configured/total` machines (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured_machines: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub virtual_machines: Vec<MachineStatus>,
    /// Past and current requests, newest first, bounded like Azure's `requests[]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRecord>,
}

/// The state of one machine's JIT configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MachineState {
    /// Its deny rule is in place.
    Configured,
    /// The NSG it names does not exist (yet).
    NetworkSecurityGroupNotFound,
    /// No free priority below the user rules that match its ports.
    NoPriorityAvailable,
    /// Its deny rule is in place, but a user rule above it lets a protected port in from a
    /// source the policy does not allow; the message names the rule and the port.
    Exposed,
    /// A rule of the deny rule's name exists and is not this policy's (a user's rule, or
    /// another owner's): it is left alone and named in the message, so the machine is not
    /// protected until it is renamed or removed.
    RuleConflict,
}

/// One machine's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    pub name: String,
    pub state: MachineState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The deny `SecurityRule` guarding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_priority: Option<u32>,
}

/// One request as the policy remembers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// The `JitRequest` object's name.
    pub request: String,
    pub requestor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    pub start_time: Time,
    pub virtual_machines: Vec<RequestRecordMachine>,
}

/// The ports one request opened on one machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecordMachine {
    pub name: String,
    pub ports: Vec<RequestRecordPort>,
}

/// One opened port and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecordPort {
    pub number: u16,
    pub allowed_source_address_prefix: String,
    pub end_time: Time,
    pub status: GrantState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<GrantStateReason>,
}

/// Azure's per-port request status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GrantState {
    Initiated,
    Revoked,
}

/// Why a port's access ended (or will).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum GrantStateReason {
    Expired,
    UserRequested,
    NewerRequestInitiated,
    PolicyChanged,
    /// The grant carried no packet for the port's `idleTimeout`.
    Idle,
}
