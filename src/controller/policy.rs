//! The JitPolicy controller: one deny `SecurityRule` per protected machine, placed per the
//! NSG's user rules, restored when deleted or edited, cleaned up when stale; per-machine
//! state (including user rules above the deny that expose a JIT port) and the request
//! history in status.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use crate::controller::runner::Action;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;

use super::context::Context;
use super::{Config, Error, name_and_namespace};
use crate::access::materialize::{self, LABEL_ROLE, ROLE_DENY};
use crate::access::validate::{model_protocol, policy_ports};
use crate::api::conditions::{self, Decided, reason};
use crate::api::jit_policy::{
    GrantState, GrantStateReason, JitPolicyStatus, MachineState, MachineStatus,
    PolicyVirtualMachine, RequestRecord, RequestRecordMachine, RequestRecordPort,
};
use crate::api::{JitPolicy, JitRequest};
use crate::rules::{AddressPrefix, PortRange, ProtectedPort, exposures, place};

pub const NAME: &str = "policy";
/// How many requests a policy remembers, newest first (Azure keeps a bounded list too).
pub const HISTORY_LIMIT: usize = 50;
/// A safety net: look again this often even without a change.
const RESYNC: Duration = Duration::from_secs(600);
/// Coalesces bursts (many requests on one policy) into one status write.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// However long the burst, the history is at most this old.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Under steady churn (requests on one policy further apart than the debounce) a policy
/// is reconciled at most this often, not once per request: its history is a view for
/// people. What its deny rules depend on (its spec, the denies themselves, the NSG's
/// rules) wakes it without this wait ([`Pace::Prompt`](super::runner::Pace)).
const SPACING: Duration = Duration::from_secs(2);

/// How the policy controller runs: bursts of request changes are coalesced (they only
/// update its history).
pub fn config(config: &Config) -> crate::controller::runner::Settings {
    crate::controller::runner::Settings {
        concurrency: config.concurrency.into(),
        debounce: DEBOUNCE,
        max_delay: MAX_DELAY,
        spacing: SPACING,
    }
}

pub async fn reconcile(policy: Arc<JitPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let now = ctx.now();
    let (name, namespace) = name_and_namespace(policy.as_ref(), "JitPolicy")?;
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingField {
            kind: "JitPolicy",
            field: "metadata.uid",
        })?;

    let mut machines = Vec::new();
    let mut desired = Vec::new();
    for machine in &policy.spec.virtual_machines {
        let Some(nsg) = ctx.nsg(&namespace, &machine.network_security_group_name) else {
            machines.push(machine_status(
                &machine.name,
                MachineState::NetworkSecurityGroupNotFound,
                format!(
                    "NetworkSecurityGroup {:?} not found in {namespace}",
                    machine.network_security_group_name
                ),
                None,
            ));
            continue;
        };
        let Ok(address) = machine.address.parse::<IpAddr>() else {
            machines.push(machine_status(
                &machine.name,
                MachineState::NoPriorityAvailable,
                format!("address {:?} is not an IP address", machine.address),
                None,
            ));
            continue;
        };
        let view = ctx.nsg_view(&nsg, now);
        let ports: Vec<_> = policy_ports(machine)
            .iter()
            .map(|p| (PortRange::single(p.number), model_protocol(p.protocol)))
            .collect();
        match place(&view.user_rules, address, &ports, &view.scope) {
            Ok(placement) => {
                let rule = materialize::deny_rule(
                    materialize::Owner {
                        name: &name,
                        uid: &owner.uid,
                    },
                    machine,
                    placement.deny,
                );
                let denied = format!(
                    "inbound to {} denied at priority {} unless granted",
                    machine.address, placement.deny
                );
                // The deny is still materialized: it protects the machine from everyone
                // the exposing rules do not let in.
                let exposed = exposures(
                    &view.user_rules,
                    &view.scope,
                    address,
                    placement.deny,
                    &protected_ports(machine),
                );
                let (state, message) = if exposed.is_empty() {
                    (MachineState::Configured, denied)
                } else {
                    let exposed: Vec<String> = exposed.iter().map(ToString::to_string).collect();
                    (
                        MachineState::Exposed,
                        format!("{denied}, but {}", exposed.join("; ")),
                    )
                };
                machines.push(machine_status(
                    &machine.name,
                    state,
                    message,
                    Some((rule.name.clone(), placement.deny)),
                ));
                desired.push(rule);
            }
            Err(error) => machines.push(machine_status(
                &machine.name,
                MachineState::NoPriorityAvailable,
                error.to_string(),
                None,
            )),
        }
    }

    for rule in &desired {
        match ctx.ensure_rule(&namespace, rule, owner.clone()).await {
            Ok(_) => {}
            // Someone else's rule holds the name: reported on the machine, never taken over.
            Err(conflict @ Error::RuleConflict { .. }) => {
                if let Some(machine) = machines
                    .iter_mut()
                    .find(|m| m.deny_rule.as_deref() == Some(rule.name.as_str()))
                {
                    machine.state = MachineState::RuleConflict;
                    machine.message = conflict.to_string();
                }
            }
            Err(error) => return Err(error),
        }
    }
    let keep: BTreeSet<&str> = desired.iter().map(|r| r.name.as_str()).collect();
    let uid = owner.uid.as_str();
    for stale in ctx.rules_owned_by(&namespace, uid) {
        let is_deny = stale.labels.get(LABEL_ROLE) == Some(ROLE_DENY);
        let stale_name = stale.name.as_str();
        if is_deny && !keep.contains(stale_name) {
            tracing::info!(policy = %name, rule = stale_name, "removing stale deny rule");
            ctx.delete_rule(&namespace, stale_name).await?;
        }
    }

    let previous = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let configured = machines
        .iter()
        .filter(|m| m.state == MachineState::Configured)
        .count();
    let ready = match machines
        .iter()
        .find(|m| m.state != MachineState::Configured)
    {
        None => Decided {
            type_: conditions::READY,
            status: true,
            reason: reason::RECONCILED,
            message: format!("{configured} machine(s) protected"),
        },
        Some(m) => Decided {
            type_: conditions::READY,
            status: false,
            reason: match m.state {
                MachineState::NetworkSecurityGroupNotFound => reason::NSG_NOT_FOUND,
                MachineState::Exposed => reason::EXPOSED,
                MachineState::RuleConflict => reason::RULE_CONFLICT,
                _ => reason::NO_PRIORITY_AVAILABLE,
            },
            message: format!("{}: {}", m.name, m.message),
        },
    };
    let status = JitPolicyStatus {
        observed_generation: generation,
        conditions: vec![ready.into_condition(&previous.conditions, generation, &Time(now))],
        configured_machines: Some(format!("{configured}/{}", machines.len())),
        virtual_machines: machines,
        requests: history(
            &previous.requests,
            ctx.departed.take(&namespace, &name),
            &ctx.requests_of(&namespace, &name),
            &namespace,
            &name,
            now,
        ),
    };
    if status != previous {
        ctx.apply_status(policy.as_ref(), &status).await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// The machine's JIT ports as exposure reads them. A source that is not `*`, an address or
/// a CIDR allows nothing, as validation refuses it for requests, so an entry the schema
/// should have refused can only make a machine look more exposed, never less.
fn protected_ports(machine: &PolicyVirtualMachine) -> Vec<ProtectedPort> {
    policy_ports(machine)
        .into_iter()
        .map(|p| ProtectedPort {
            number: p.number,
            protocol: model_protocol(p.protocol),
            allowed_sources: p
                .allowed_sources
                .iter()
                .filter_map(|s| s.parse::<AddressPrefix>().ok())
                .filter(|s| matches!(s, AddressPrefix::Any | AddressPrefix::Net(_)))
                .collect(),
        })
        .collect()
}

fn machine_status(
    name: &str,
    state: MachineState,
    message: String,
    deny: Option<(String, u32)>,
) -> MachineStatus {
    let (deny_rule, deny_priority) = deny.map_or((None, None), |(n, p)| (Some(n), Some(p)));
    MachineStatus {
        name: name.to_owned(),
        state,
        message,
        deny_rule,
        deny_priority,
    }
}

/// The last records of requests that were just deleted, by namespace and policy, from the
/// request watch's delete events, until the policy's next reconcile folds them into its
/// history.
///
/// A request deleted right after it was granted is gone from the cache before its policy
/// looks, and deleting a request waits for nothing (its finalizer only revokes), so without
/// these its end would be missing from the history. What is kept is drained on every
/// reconcile of the policy, so it stays small.
#[derive(Clone, Default)]
pub struct Departed(Arc<Mutex<HashMap<PolicyKey, Vec<RequestRecord>>>>);

/// A policy's namespace and name.
type PolicyKey = (String, String);

impl Departed {
    /// Keeps the record of `request` if it is being deleted. (The watch's delete event
    /// carries the state before the finalizer went, so every state once deletion began is
    /// kept; the latest wins, and a request still in the cache overrides them all.)
    pub fn note(&self, request: &JitRequest) {
        let (Some(namespace), Some(record)) = (request.metadata.namespace.clone(), record(request))
        else {
            return;
        };
        if request.metadata.deletion_timestamp.is_some() {
            self.0
                .lock()
                .expect("departed lock")
                .entry((namespace, request.spec.policy_name.clone()))
                .or_default()
                .push(record);
        }
    }

    /// The records kept for `policy`, which are forgotten here.
    pub fn take(&self, namespace: &str, policy: &str) -> Vec<RequestRecord> {
        self.0
            .lock()
            .expect("departed lock")
            .remove(&(namespace.to_owned(), policy.to_owned()))
            .unwrap_or_default()
    }
}

/// The request history: the records the current requests give, plus the last records of
/// requests just deleted (`departed`) and earlier records of requests since deleted, newest
/// first, at most [`HISTORY_LIMIT`].
///
/// A request that disappeared while its ports were open was revoked by its deletion (or
/// ran out, if its end time has passed): its record says so even when the operator missed
/// the request's last status write.
pub fn history(
    previous: &[RequestRecord],
    departed: Vec<RequestRecord>,
    requests: &[Arc<JitRequest>],
    namespace: &str,
    policy: &str,
    now: jiff::Timestamp,
) -> Vec<RequestRecord> {
    let mut by_request: HashMap<String, RequestRecord> = previous
        .iter()
        .map(|r| (r.request.clone(), closed_by_deletion(r.clone(), now)))
        .collect();
    for record in departed {
        by_request.insert(record.request.clone(), record);
    }
    for request in requests {
        if request.metadata.namespace.as_deref() != Some(namespace)
            || request.spec.policy_name != policy
        {
            continue;
        }
        if let Some(record) = record(request) {
            by_request.insert(record.request.clone(), record);
        }
    }
    let mut records: Vec<RequestRecord> = by_request.into_values().collect();
    records.sort_by(|a, b| {
        b.start_time
            .0
            .cmp(&a.start_time.0)
            .then_with(|| a.request.cmp(&b.request))
    });
    records.truncate(HISTORY_LIMIT);
    records
}

/// Marks still-open ports of a record as closed, for a request that no longer exists.
fn closed_by_deletion(mut record: RequestRecord, now: jiff::Timestamp) -> RequestRecord {
    for port in record
        .virtual_machines
        .iter_mut()
        .flat_map(|m| m.ports.iter_mut())
    {
        if port.status == GrantState::Initiated {
            port.status = GrantState::Revoked;
            port.status_reason = Some(if port.end_time.0 <= now {
                GrantStateReason::Expired
            } else {
                GrantStateReason::UserRequested
            });
        }
    }
    record
}

/// A granted (or once granted) request as Azure's `requests[]` shows it.
fn record(request: &JitRequest) -> Option<RequestRecord> {
    let status = request.status.as_ref()?;
    let start_time = status.start_time.clone()?;
    if status.grants.is_empty() {
        return None;
    }
    let mut machines: Vec<RequestRecordMachine> = Vec::new();
    for grant in &status.grants {
        let port = RequestRecordPort {
            number: grant.number,
            allowed_source_address_prefix: grant.allowed_source_address_prefixes.join(","),
            end_time: grant.end_time.clone(),
            status: grant.status,
            status_reason: grant.status_reason,
        };
        match machines
            .iter_mut()
            .find(|m| m.name == grant.virtual_machine)
        {
            Some(machine) => machine.ports.push(port),
            None => machines.push(RequestRecordMachine {
                name: grant.virtual_machine.clone(),
                ports: vec![port],
            }),
        }
    }
    Some(RequestRecord {
        request: request.metadata.name.clone()?,
        requestor: request
            .spec
            .requestor
            .as_ref()
            .map_or_else(|| "unknown".to_owned(), |r| r.username.clone()),
        justification: request.spec.justification.clone(),
        start_time,
        virtual_machines: machines,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A request `name` that was granted port 22 on web-1 at second `start`, its grant now in
    /// `state` (with `reason`), deleted if `deleted`.
    fn request(
        name: &str,
        start: i64,
        state: &str,
        reason: Option<&str>,
        deleted: bool,
    ) -> JitRequest {
        let at = |s: i64| jiff::Timestamp::from_second(s).unwrap().to_string();
        let mut grant = json!({
            "virtualMachine": "web-1", "number": 22, "protocol": "TCP",
            "allowedSourceAddressPrefixes": ["198.19.0.10"], "rule": "r",
            "endTime": at(start + 60), "status": state,
        });
        if let Some(reason) = reason {
            grant["statusReason"] = json!(reason);
        }
        let mut metadata = json!({ "name": name, "namespace": "ns" });
        if deleted {
            metadata["deletionTimestamp"] = json!(at(start + 1));
        }
        serde_json::from_value(json!({
            "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitRequest",
            "metadata": metadata,
            "spec": {
                "policyName": "web", "requestor": { "username": "alice" },
                "virtualMachines": [{ "name": "web-1", "ports": [{
                    "number": 22, "duration": "PT1M", "allowedSourceAddressPrefix": "198.19.0.10"
                }] }],
            },
            "status": { "phase": "Revoked", "startTime": at(start), "grants": [grant] },
        }))
        .unwrap()
    }

    fn reason_of(records: &[RequestRecord], name: &str) -> Option<GrantStateReason> {
        let record = records.iter().find(|r| r.request == name)?;
        record.virtual_machines[0].ports[0].status_reason
    }

    #[test]
    fn a_request_deleted_before_its_policy_looked_keeps_its_last_record() {
        let now = jiff::Timestamp::from_second(1_000).unwrap();
        let departed = Departed::default();
        // Seen by the watch only in its last state: revoked because its user deleted it.
        departed.note(&request(
            "gone",
            900,
            "Revoked",
            Some("UserRequested"),
            true,
        ));
        // A request that is not being deleted is the cache's business.
        departed.note(&request("live", 901, "Initiated", None, false));
        let records = history(&[], departed.take("ns", "web"), &[], "ns", "web", now);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            reason_of(&records, "gone"),
            Some(GrantStateReason::UserRequested)
        );
        assert!(
            departed.take("ns", "web").is_empty(),
            "taken records are forgotten"
        );
    }

    #[test]
    fn history_is_bounded_newest_first_and_closes_what_vanished() {
        let now = jiff::Timestamp::from_second(10_000).unwrap();
        let live: Vec<Arc<JitRequest>> = (0..HISTORY_LIMIT as i64 + 5)
            .map(|i| {
                Arc::new(request(
                    &format!("r-{i:03}"),
                    100 + i,
                    "Initiated",
                    None,
                    false,
                ))
            })
            .collect();
        let records = history(&[], Vec::new(), &live, "ns", "web", now);
        assert_eq!(records.len(), HISTORY_LIMIT);
        assert_eq!(records[0].request, format!("r-{:03}", HISTORY_LIMIT + 4));
        assert!(
            !records.iter().any(|r| r.request == "r-000"),
            "the oldest falls out"
        );
        // A request that vanished with its port open: ended by its deletion, or by its end.
        let early = history(
            &records[..1],
            Vec::new(),
            &[],
            "ns",
            "web",
            jiff::Timestamp::from_second(100).unwrap(),
        );
        assert_eq!(
            reason_of(&early, &records[0].request),
            Some(GrantStateReason::UserRequested)
        );
        let late = history(&records[..1], Vec::new(), &[], "ns", "web", now);
        assert_eq!(
            reason_of(&late, &records[0].request),
            Some(GrantStateReason::Expired)
        );
    }
}
