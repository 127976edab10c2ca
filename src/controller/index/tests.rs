use serde_json::json;

use super::*;
use crate::api::security_rule::{LABEL_MANAGED_BY, MANAGED_BY};

const NS: &str = "team";

fn k(name: &str) -> Key {
    key(NS, name)
}

fn keys(names: &[&str]) -> BTreeSet<Key> {
    names.iter().map(|n| k(n)).collect()
}

fn policy(generation: i64, nsgs: &[&str]) -> Option<PolicyEntry> {
    Some(PolicyEntry {
        generation: Some(generation),
        nsgs: nsgs.iter().map(|n| (*n).into()).collect(),
    })
}

fn request(policy: &str, requestor: &str, phase: Option<Phase>) -> Option<RequestEntry> {
    Some(RequestEntry {
        policy: policy.into(),
        requestor: Some(requestor.into()),
        phase,
        record: (phase, None, None, false),
        open: if phase == Some(Phase::Granted) {
            vec![("vm".into(), 22)]
        } else {
            Vec::new()
        },
        approvers: Vec::new(),
    })
}

fn rule(nsg: &str, owner: Option<(OwnerKind, &str)>, deny: bool) -> Option<RuleEntry> {
    Some(RuleEntry {
        nsg: nsg.into(),
        managed: owner.is_some(),
        deny,
        owner: owner.map(|(kind, name)| (kind, name.into(), format!("uid-{name}").into())),
    })
}

fn nsg(generation: i64) -> Option<NsgEntry> {
    Some(NsgEntry {
        generation: Some(generation),
    })
}

/// The address the tests' grants are aimed at, and another machine's.
const VM: &str = "198.18.0.10";
const OTHER_VM: &str = "198.18.0.11";

fn ip(address: &str) -> std::net::IpAddr {
    address.parse().unwrap()
}

/// A report on `nsg` by an agent enforcing it at `at`.
fn report_at(nsg: &str, at: &[&str], idle: &[&str]) -> Option<ReportEntry> {
    Some(ReportEntry {
        nsg: nsg.into(),
        addresses: at.iter().map(|a| ip(a)).collect(),
        idle: idle.iter().map(|r| (*r).into()).collect(),
    })
}

/// A report on `nsg` by the agent of [`VM`].
fn report(nsg: &str, idle: &[&str]) -> Option<ReportEntry> {
    report_at(nsg, &[VM], idle)
}

/// Two policies on NSG `a`, one also on `b`; a waiting and a granted request on `p1`.
fn populated() -> Index {
    let mut index = Index::default();
    index.nsg(k("a"), nsg(1));
    index.policy(k("p1"), policy(1, &["a"]));
    index.policy(k("p2"), policy(1, &["a", "b"]));
    index.request(k("waits"), request("p1", "alice", Some(Phase::Pending)));
    index.request(k("open"), request("p1", "bob", Some(Phase::Granted)));
    index.request(k("done"), request("p1", "bob", Some(Phase::Expired)));
    index
}

#[test]
fn an_nsg_status_write_wakes_only_the_nsg() {
    let mut index = populated();
    let wake = index.nsg(k("a"), nsg(1));
    assert_eq!(wake.nsgs, keys(&["a"]));
    assert!(wake.policies.is_empty() && wake.requests.is_empty());
}

#[test]
fn a_grant_reported_idle_wakes_its_request_once() {
    let mut index = populated();
    index.rule(
        k("grant-open"),
        rule("a", Some((OwnerKind::Request, "open")), false),
    );
    index.rule(k("deny"), rule("a", Some((OwnerKind::Policy, "p1")), true));
    let wake = index.report(k("a.vm-1"), report("a", &["grant-open", "deny", "unknown"]));
    assert_eq!(wake.requests, keys(&["open"]));
    assert_eq!(wake.nsgs, keys(&["a"]));
    assert!(wake.policies.is_empty());
    assert!(index.reported_idle(NS, "a", "grant-open", ip(VM)));
    assert!(!index.reported_idle(NS, "b", "grant-open", ip(VM)));
    // Reported again (the report's other fields changed): nothing new to revoke, and the
    // NSG's summary is written again.
    let wake = index.report(k("a.vm-1"), report("a", &["grant-open", "deny", "unknown"]));
    assert!(wake.requests.is_empty());
    assert_eq!(wake.nsgs, keys(&["a"]));
    assert_eq!(index.reports_on(NS, "a"), ["a.vm-1"]);
}

#[test]
fn a_grant_is_idle_only_when_every_agent_enforcing_it_says_so() {
    let mut index = populated();
    index.rule(
        k("grant-open"),
        rule("a", Some((OwnerKind::Request, "open")), false),
    );
    // The machine's own agent sees traffic; a gateway in front of it sees none (the
    // session does not cross it): not idle.
    index.report(k("a.vm-1"), report("a", &[]));
    index.report(k("a.gw"), report_at("a", &[VM, OTHER_VM], &["grant-open"]));
    assert!(!index.reported_idle(NS, "a", "grant-open", ip(VM)));
    // The machine's agent falls silent too: idle, and the request looks again.
    let wake = index.report(k("a.vm-1"), report("a", &["grant-open"]));
    assert_eq!(wake.requests, keys(&["open"]));
    assert!(index.reported_idle(NS, "a", "grant-open", ip(VM)));
    // Another machine's agent cannot call a grant to this one idle.
    index.report(k("a.vm-1"), report("a", &[]));
    index.report(k("a.gw"), None);
    index.report(k("a.vm-2"), report_at("a", &[OTHER_VM], &["grant-open"]));
    assert!(!index.reported_idle(NS, "a", "grant-open", ip(VM)));
    // Nobody enforcing there: nobody can say.
    index.report(k("a.vm-1"), None);
    assert!(!index.reported_idle(NS, "a", "grant-open", ip(VM)));
    // The one enforcer that saw traffic gone, the other's word stands: the request wakes.
    index.report(k("a.vm-1"), report("a", &[]));
    index.report(k("a.gw"), report_at("a", &[VM], &["grant-open"]));
    let wake = index.report(k("a.vm-1"), None);
    assert_eq!(wake.requests, keys(&["open"]));
    assert!(index.reported_idle(NS, "a", "grant-open", ip(VM)));
}

#[test]
fn a_report_moved_or_gone_wakes_both_nsgs_and_leaves_no_trace() {
    let mut index = populated();
    index.report(k("r"), report("a", &["grant-x"]));
    let wake = index.report(k("r"), report("b", &[]));
    assert_eq!(wake.nsgs, keys(&["a", "b"]));
    assert!(index.reports_on(NS, "a").is_empty());
    assert!(!index.reported_idle(NS, "a", "grant-x", ip(VM)));
    let wake = index.report(k("r"), None);
    assert_eq!(wake.nsgs, keys(&["b"]));
    assert!(index.reports_on(NS, "b").is_empty());
    assert!(index.reports.is_empty() && index.enforcers.0.is_empty());
}

#[test]
fn a_report_counts_only_under_its_own_name() {
    let object = |name: &str| {
        let mut nsg = crate::api::nsg::empty(NS, "web-nsg");
        nsg.metadata.uid = Some("uid".into());
        let mut report = crate::agent::report::object(
            name,
            &nsg,
            serde_json::from_value(json!({
                "agent": "vm-1", "host": "vm-1", "rulesHash": "h",
                "appliedAt": "2026-01-01T00:00:00Z",
                "idleGrants": [{"rule": "grant-1"}],
            }))
            .unwrap(),
        );
        report.metadata.namespace = Some(NS.into());
        report
    };
    let counted = ReportEntry::of(&object("web-nsg.vm-1")).unwrap();
    assert_eq!(counted.nsg.as_ref(), "web-nsg");
    assert_eq!(ReportEntry::of(&object("vm-1-forged")), None);
}

#[test]
fn an_nsg_spec_change_wakes_its_policies_and_their_waiting_requests() {
    let mut index = populated();
    let wake = index.nsg(k("a"), nsg(2));
    assert_eq!(wake.policies, keys(&["p1", "p2"]));
    // The granted and the expired request are not woken: NSG changes don't concern them.
    assert_eq!(wake.requests, keys(&["waits"]));
    // A deleted NSG wakes the same, but not itself (there is nothing to reconcile).
    let wake = index.nsg(k("a"), None);
    assert!(wake.nsgs.is_empty());
    assert_eq!(wake.policies, keys(&["p1", "p2"]));
}

#[test]
fn a_policy_moving_to_another_nsg_wakes_both_and_reindexes() {
    let mut index = populated();
    let wake = index.policy(k("p1"), policy(2, &["b"]));
    assert_eq!(wake.nsgs, keys(&["a", "b"]));
    assert_eq!(wake.requests, keys(&["waits", "open"]));
    assert_eq!(index.policies_on(NS, "a"), vec!["p2"]);
    assert_eq!(index.policies_on(NS, "b"), vec!["p1", "p2"]);
    assert_eq!(
        wake.policies,
        keys(&["p1"]),
        "a new spec is enforced at once"
    );
    // Its own status write wakes only itself, and may wait its spacing.
    let wake = index.policy(k("p1"), policy(2, &["b"]));
    assert_eq!(wake.policy_histories, keys(&["p1"]));
    assert!(wake.policies.is_empty());
    assert!(wake.nsgs.is_empty() && wake.requests.is_empty());
}

#[test]
fn a_deleted_policy_wakes_its_live_requests_and_leaves_no_index_behind() {
    let mut index = populated();
    let wake = index.policy(k("p2"), None);
    assert!(wake.policies.is_empty());
    assert_eq!(wake.nsgs, keys(&["a", "b"]));
    assert_eq!(index.policies_on(NS, "b").len(), 0);
    let wake = index.policy(k("p1"), None);
    assert_eq!(wake.requests, keys(&["waits", "open"]));
}

#[test]
fn requests_are_indexed_by_policy_and_phase() {
    let mut index = populated();
    assert_eq!(index.requests_of(NS, "p1"), vec!["done", "open", "waits"]);
    assert_eq!(index.granted(), 1);
    assert_eq!(index.granted_on(NS, "bob", "vm", 22), vec!["open"]);
    assert!(index.granted_on(NS, "bob", "vm", 3389).is_empty());
    // Granting `waits` moves it out of the waiting set and into alice's grants.
    index.request(k("waits"), request("p1", "alice", Some(Phase::Granted)));
    assert_eq!(index.granted(), 2);
    assert_eq!(index.granted_on(NS, "alice", "vm", 22), vec!["waits"]);
    assert!(index.nsg(k("a"), nsg(9)).requests.is_empty());
    // Expiry takes it out again; deletion out of the history.
    index.request(k("waits"), request("p1", "alice", Some(Phase::Expired)));
    assert_eq!(index.granted(), 1);
    assert!(index.granted_on(NS, "alice", "vm", 22).is_empty());
    index.request(k("waits"), None);
    assert_eq!(index.requests_of(NS, "p1"), vec!["done", "open"]);
}

#[test]
fn a_request_wakes_its_policy_only_when_its_record_changes() {
    let mut index = populated();
    let wake = index.request(k("open"), request("p1", "bob", Some(Phase::Granted)));
    assert_eq!(wake.requests, keys(&["open"]));
    assert!(wake.policies.is_empty() && wake.policy_histories.is_empty());
    // Only the history changes: the policy's denies do not, so it may wait its spacing.
    let wake = index.request(k("open"), request("p1", "bob", Some(Phase::Revoked)));
    assert_eq!(wake.policy_histories, keys(&["p1"]));
    assert!(wake.policies.is_empty());
    let wake = index.request(k("done"), None);
    assert_eq!(wake.policy_histories, keys(&["p1"]));
    assert!(wake.policies.is_empty());
    assert!(wake.requests.is_empty());
}

#[test]
fn a_new_grant_wakes_the_requestors_other_grants_only() {
    let mut index = populated();
    index.request(k("other"), request("p2", "carol", Some(Phase::Granted)));
    index.request(k("newer"), request("p1", "bob", None));
    let wake = index.request(k("newer"), request("p1", "bob", Some(Phase::Granted)));
    assert_eq!(wake.requests, keys(&["newer", "open"]));
    // Staying granted wakes no peer.
    let wake = index.request(k("newer"), request("p1", "bob", Some(Phase::Granted)));
    assert_eq!(wake.requests, keys(&["newer"]));
    // A grant of another port on the same machine supersedes nothing.
    let mut rdp = request("p1", "bob", Some(Phase::Granted)).unwrap();
    rdp.open = vec![("vm".into(), 3389)];
    let wake = index.request(k("rdp"), Some(rdp));
    assert_eq!(wake.requests, keys(&["rdp"]));
}

#[test]
fn rules_wake_their_nsg_and_owner_and_user_rules_the_policies() {
    let mut index = populated();
    let wake = index.rule(k("deny"), rule("a", Some((OwnerKind::Policy, "p1")), true));
    assert_eq!((wake.nsgs, wake.policies), (keys(&["a"]), keys(&["p1"])));
    let wake = index.rule(
        k("allow"),
        rule("a", Some((OwnerKind::Request, "open")), false),
    );
    assert_eq!(wake.requests, keys(&["open"]));
    assert!(wake.policies.is_empty(), "a grant concerns no policy");
    let (_, revision) = index.user_rules_on(NS, "a");
    let wake = index.rule(k("user"), rule("a", None, false));
    assert_eq!(wake.policies, keys(&["p1", "p2"]));
    let (user, newer) = index.user_rules_on(NS, "a");
    assert_eq!(user, vec!["user"]);
    assert_ne!(
        revision, newer,
        "a user rule change invalidates placement views"
    );
    assert_eq!(index.rules_on(NS, "a"), vec!["allow", "deny", "user"]);
    assert_eq!(index.rules_owned_by("uid-p1"), vec![k("deny")]);
    // An event that changes no entry (a hand edit of the rule's ports) still wakes.
    let wake = index.rule(k("deny"), rule("a", Some((OwnerKind::Policy, "p1")), true));
    assert_eq!(wake.policies, keys(&["p1"]));
    // Deletion wakes the owner to restore it, and unindexes it.
    let wake = index.rule(k("deny"), None);
    assert_eq!(wake.policies, keys(&["p1"]));
    assert!(index.rules_owned_by("uid-p1").is_empty());
    assert_eq!(index.rules_on(NS, "a"), vec!["allow", "user"]);
}

#[test]
fn a_user_rule_moving_between_nsgs_wakes_both_sides() {
    let mut index = populated();
    index.rule(k("user"), rule("b", None, false));
    let wake = index.rule(k("user"), rule("a", None, false));
    assert_eq!(wake.nsgs, keys(&["a", "b"]));
    assert!(index.user_rules_on(NS, "b").0.is_empty());
    assert_eq!(index.user_rules_on(NS, "a").0, vec!["user"]);
}

#[test]
fn entries_read_labels_and_controlling_owner() {
    let object: crate::api::SecurityRule = serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "SecurityRule",
        "metadata": {
            "name": "jit-deny-p-m-0123abcd", "namespace": NS,
            "labels": { LABEL_MANAGED_BY: MANAGED_BY, LABEL_ROLE: ROLE_DENY },
            "ownerReferences": [
                { "apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u0" },
                { "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitPolicy",
                  "name": "p", "uid": "u1", "controller": true },
            ],
        },
        "spec": {
            "networkSecurityGroupName": "a", "priority": 100, "direction": "Inbound",
            "access": "Deny", "protocol": "Tcp", "sourceAddressPrefix": "*",
            "sourcePortRange": "*", "destinationAddressPrefix": "*",
            "destinationPortRange": "22",
        },
    }))
    .unwrap();
    assert_eq!(
        RuleEntry::of(&CachedRule::of(object)),
        RuleEntry {
            nsg: "a".into(),
            managed: true,
            deny: true,
            owner: Some((OwnerKind::Policy, "p".into(), "u1".into())),
        }
    );
}

#[test]
fn a_multi_map_keeps_its_values_in_order_and_forgets_empty_keys() {
    let mut multi: Multi<&str, u32> = Multi::default();
    let all = |m: &Multi<&str, u32>| m.get(&"k").copied().collect::<Vec<_>>();
    multi.insert("k", 2);
    multi.insert("k", 2);
    assert_eq!(all(&multi), [2]);
    multi.insert("k", 1);
    multi.insert("k", 3);
    assert_eq!(all(&multi), [1, 2, 3]);
    multi.remove(&"k", &9);
    multi.remove(&"k", &2);
    multi.remove(&"k", &1);
    assert_eq!(all(&multi), [3]);
    assert!(matches!(multi.0.get("k"), Some(Bucket::One(3))));
    multi.remove(&"k", &3);
    assert!(multi.0.is_empty());
}

#[test]
fn an_approver_counted_out_wakes_the_approvals_of_the_request() {
    let mut index = Index::default();
    let waiting = |approvers: &[&str]| {
        let mut entry = request("p1", "alice", Some(Phase::Pending));
        if let Some(e) = entry.as_mut() {
            e.approvers = approvers.iter().map(|a| (*a).to_owned()).collect();
        }
        entry
    };
    index.request(k("ask"), waiting(&[]));
    index.approval(
        k("dave"),
        Some(ApprovalEntry {
            request: "ask".into(),
        }),
    );
    index.approval(
        k("carol"),
        Some(ApprovalEntry {
            request: "ask".into(),
        }),
    );
    let counted = index.request(k("ask"), waiting(&["dave"]));
    assert_eq!(counted.approvals, keys(&["carol", "dave"]));
    // The same phase and the same approvers: their statuses stand.
    assert_eq!(
        index.request(k("ask"), waiting(&["dave"])).approvals,
        keys(&[])
    );
    let dave_out = index.request(k("ask"), waiting(&["carol"]));
    assert_eq!(dave_out.approvals, keys(&["carol", "dave"]));
}

#[test]
fn names_of_objects_gone_are_not_held_for_ever() {
    let mut index = populated();
    for i in 0..8 * FEWEST_SWEPT {
        let (name, requestor) = (format!("r-{i}"), format!("u-{i}"));
        index.request(k(&name), request("p1", &requestor, Some(Phase::Granted)));
        index.request(k(&name), None);
    }
    assert!(
        index.names.held.len() <= 2 * FEWEST_SWEPT,
        "{} names held",
        index.names.held.len()
    );
    // What is still indexed keeps its names.
    assert_eq!(index.requests_of(NS, "p1"), vec!["done", "open", "waits"]);
    assert_eq!(index.granted_on(NS, "bob", "vm", 22), vec!["open"]);
    assert_eq!(index.policies_on(NS, "a"), vec!["p1", "p2"]);
}
