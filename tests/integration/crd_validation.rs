//! Bad input is refused by the API server at `kubectl apply` time, with a message that names
//! the field. One test per kind of mistake, each through kubectl as a user would type it.

use std::time::Duration;

use ipnet::IpNet;
use kube::api::Api;
use portcullis::access::validate::validate;
use portcullis::api::validation::{
    ADDRESS_SPACE_MESSAGE, DURATION_MESSAGE, PORT_RANGE_MESSAGE, PREFIX_MESSAGE, SOURCE_MESSAGE,
};
use portcullis::api::{JitPolicy, JitRequest, NetworkSecurityGroup, SecurityRule, convert};
use portcullis::rules::{self, AddressPrefix, Origin, PortRange, Protocol, duration};

use crate::support::{Ctx, TestResult, failed, ssh_policy, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        valid_manifests_are_accepted,
        nsg_priority_below_range,
        nsg_priority_above_range,
        nsg_protocol_unknown,
        nsg_prefix_not_an_address,
        nsg_prefix_in_list_not_an_address,
        nsg_port_range_reversed,
        nsg_port_over_65535,
        nsg_port_range_garbage,
        nsg_singular_and_plural_both_set,
        nsg_duplicate_priority_per_direction,
        nsg_direction_unknown,
        rule_object_access_unknown,
        rule_object_expiry_clients_cannot_read,
        policy_port_over_65535,
        policy_port_zero,
        policy_protocol_in_nsg_spelling,
        policy_duration_over_24_hours,
        policy_duration_zero,
        policy_port_session_fields,
        policy_duration_not_iso8601,
        policy_address_not_an_ip,
        policy_duplicate_machine_names,
        request_duration_calendar_units,
        request_source_is_a_tag,
        request_without_source,
        request_spec_is_immutable,
        workflow_fields_are_bounded,
        schema_accepted_edge_cases_convert_with_the_same_meaning,
        nsg_address_space_refuses_star_and_tags,
        cidrs_with_host_bits_are_refused,
        addresses_cel_refuses_are_refused_by_the_code_too,
    ]
}

/// An NSG whose one inline rule has `field: value` on top of a valid rule.
fn nsg_with(field: &str, value: &str) -> String {
    web_nsg("198.18.0.0/24", &format!("    {field}: {value}\n"))
}

/// A policy whose one port has `field: value` on top of a valid port.
fn policy_port_with(field: &str, value: &str) -> String {
    ssh_policy("198.19.0.0/16", &format!("      {field}: {value}\n"))
}

/// A request whose one port has `field: value` on top of a valid port.
fn request_port_with(field: &str, value: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: ask
spec:
  policyName: web
  justification: maintenance
  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: PT10M
      allowedSourceAddressPrefix: 198.19.0.10
      {field}: {value}
"#
    )
}

/// Applies `yaml` and requires a refusal whose message contains every `needle`.
fn expect_rejected(ctx: &Ctx, yaml: &str, needles: &[&str]) -> TestResult {
    let stderr = failed(&ctx.apply(yaml))?;
    for needle in needles {
        if !stderr.contains(needle) {
            return Err(format!("the refusal does not mention {needle:?}:\n{stderr}").into());
        }
    }
    Ok(())
}

async fn valid_manifests_are_accepted(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(&nsg_with("description", "web traffic")))?;
    succeeded(
        &ctx.apply(
            &nsg_with("destinationAddressPrefix", "\"2001:db8::/32\"")
                .replace("    destinationAddressPrefix: \"*\"\n", ""),
        ),
    )?;
    for duration in ["PT20S", "PT1H30M", "P1D", "PT24H"] {
        succeeded(
            &ctx.apply(
                &policy_port_with("protocol", "UDP")
                    .replace("PT1H", duration)
                    .replace("      protocol: TCP\n", ""),
            ),
        )?;
    }
    succeeded(&ctx.apply(&request_port_with("protocol", "TCP")))?;
    Ok(())
}

async fn nsg_priority_below_range(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace("priority: 300", "priority: 50");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].priority",
            "greater than or equal to 100",
        ],
    )
}

async fn nsg_priority_above_range(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace("priority: 300", "priority: 4097");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].priority",
            "less than or equal to 4096",
        ],
    )
}

async fn nsg_protocol_unknown(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace("protocol: Tcp", "protocol: TCP");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].protocol",
            "Unsupported value: \"TCP\"",
        ],
    )
}

async fn nsg_prefix_not_an_address(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace(
        "sourceAddressPrefix: Internet",
        "sourceAddressPrefix: 300.1.2.3",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &["spec.securityRules[0].sourceAddressPrefix", PREFIX_MESSAGE],
    )
}

async fn nsg_prefix_in_list_not_an_address(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace(
        "sourceAddressPrefix: Internet",
        "sourceAddressPrefixes: [\"198.19.0.0/16\", \"Intranet\"]",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].sourceAddressPrefixes",
            PREFIX_MESSAGE,
        ],
    )
}

async fn nsg_port_range_reversed(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace(
        "destinationPortRange: \"80\"",
        "destinationPortRange: \"2000-1000\"",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].destinationPortRange",
            PORT_RANGE_MESSAGE,
        ],
    )
}

async fn nsg_port_over_65535(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace(
        "destinationPortRange: \"80\"",
        "destinationPortRange: \"70000\"",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].destinationPortRange",
            PORT_RANGE_MESSAGE,
        ],
    )
}

async fn nsg_port_range_garbage(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace(
        "destinationPortRange: \"80\"",
        "destinationPortRanges: [\"22\", \"ssh\"]",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].destinationPortRanges",
            PORT_RANGE_MESSAGE,
        ],
    )
}

async fn nsg_singular_and_plural_both_set(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("sourceAddressPrefixes", "[\"198.19.0.1\"]");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0]",
            "exactly one of sourceAddressPrefix or sourceAddressPrefixes",
        ],
    )
}

async fn nsg_duplicate_priority_per_direction(ctx: Ctx) -> TestResult {
    let mut yaml = nsg_with("description", "x");
    yaml.push_str(
        r#"  - name: allow-https
    priority: 300
    direction: Inbound
    access: Allow
    protocol: Tcp
    sourceAddressPrefix: Internet
    sourcePortRange: "*"
    destinationAddressPrefix: "*"
    destinationPortRange: "443"
"#,
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules",
            "priority must be unique per direction",
        ],
    )?;
    // The same priority in the other direction is fine.
    succeeded(&ctx.apply(&yaml.replacen("direction: Inbound\n    access: Allow\n    protocol: Tcp\n    sourceAddressPrefix: Internet\n    sourcePortRange: \"*\"\n    destinationAddressPrefix: \"*\"\n    destinationPortRange: \"443\"", "direction: Outbound\n    access: Allow\n    protocol: Tcp\n    sourceAddressPrefix: Internet\n    sourcePortRange: \"*\"\n    destinationAddressPrefix: \"*\"\n    destinationPortRange: \"443\"", 1)))?;
    Ok(())
}

async fn nsg_direction_unknown(ctx: Ctx) -> TestResult {
    let yaml = nsg_with("description", "x").replace("direction: Inbound", "direction: Ingress");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].direction",
            "Unsupported value: \"Ingress\"",
        ],
    )
}

async fn rule_object_access_unknown(ctx: Ctx) -> TestResult {
    let yaml = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: allow-ssh
spec:
  networkSecurityGroupName: nsg
  priority: 200
  direction: Inbound
  access: Permit
  protocol: Tcp
  sourceAddressPrefix: 198.19.0.10
  sourcePortRange: "*"
  destinationAddressPrefix: 198.18.0.10
  destinationPortRange: "22"
"#;
    expect_rejected(
        &ctx,
        yaml,
        &["spec.access", "Unsupported value: \"Permit\""],
    )
}

/// Timestamps the apiserver's `date-time` check lets through but no client parses: one such
/// rule would stop every cache that lists SecurityRules (the operator's, the agents').
async fn rule_object_expiry_clients_cannot_read(ctx: Ctx) -> TestResult {
    let rule = |expires: &str| {
        format!(
            r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: expiring
spec:
  networkSecurityGroupName: nsg
  priority: 200
  direction: Inbound
  access: Allow
  protocol: Tcp
  sourceAddressPrefix: 198.19.0.10
  sourcePortRange: "*"
  destinationAddressPrefix: 198.18.0.10
  destinationPortRange: "22"
  expiresAt: "{expires}"
"#
        )
    };
    for bad in ["2030-01-01T00:00:00x5Z", "2030-01-01T00:00:00.1234567891Z"] {
        expect_rejected(&ctx, &rule(bad), &["spec.expiresAt", "should match"])?;
    }
    succeeded(&ctx.apply(&rule("2030-01-01T00:00:00.123456789+02:00")))?;
    let stored =
        kube::Api::<portcullis::api::SecurityRule>::namespaced(ctx.client.clone(), &ctx.ns)
            .get("expiring")
            .await?;
    assert_eq!(
        stored.spec.expires_at.map(|t| t.0.to_string()),
        Some("2029-12-31T22:00:00.123456789Z".to_owned())
    );
    Ok(())
}

async fn policy_port_over_65535(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("protocol", "TCP")
        .replace("number: 22", "number: 70000")
        .replace("      protocol: TCP\n", "");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].number",
            "less than or equal to 65535",
        ],
    )
}

async fn policy_port_zero(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("protocol", "TCP")
        .replace("number: 22", "number: 0")
        .replace("      protocol: TCP\n", "");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].number",
            "greater than or equal to 1",
        ],
    )
}

async fn policy_protocol_in_nsg_spelling(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("description", "x")
        .replace("protocol: TCP", "protocol: Tcp")
        .replace("      description: x\n", "");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].protocol",
            "Unsupported value: \"Tcp\"",
        ],
    )
}

async fn policy_duration_over_24_hours(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("protocol", "TCP")
        .replace("PT1H", "PT25H")
        .replacen("      protocol: TCP\n", "", 1);
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].maxRequestAccessDuration",
            DURATION_MESSAGE,
        ],
    )
}

async fn policy_duration_zero(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("protocol", "TCP")
        .replace("PT1H", "PT0S")
        .replacen("      protocol: TCP\n", "", 1);
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].maxRequestAccessDuration",
            DURATION_MESSAGE,
        ],
    )
}

/// `establishedConnections` is Keep or Close; `idleTimeout` a duration as bounded as
/// `maxRequestAccessDuration`.
async fn policy_port_session_fields(ctx: Ctx) -> TestResult {
    expect_rejected(
        &ctx,
        &policy_port_with("establishedConnections", "Drop"),
        &[
            "spec.virtualMachines[0].ports[0].establishedConnections",
            "Unsupported value: \"Drop\"",
        ],
    )?;
    expect_rejected(
        &ctx,
        &policy_port_with("idleTimeout", "PT25H"),
        &[
            "spec.virtualMachines[0].ports[0].idleTimeout",
            DURATION_MESSAGE,
        ],
    )?;
    expect_rejected(
        &ctx,
        &policy_port_with("idleTimeout", "5m"),
        &[
            "spec.virtualMachines[0].ports[0].idleTimeout",
            "should match",
        ],
    )?;
    let valid = policy_port_with("idleTimeout", "PT5M").replace(
        "      idleTimeout",
        "      establishedConnections: Close\n      idleTimeout",
    );
    succeeded(&ctx.apply(&valid))?;
    Ok(())
}

async fn policy_duration_not_iso8601(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("protocol", "TCP")
        .replace("PT1H", "3h")
        .replacen("      protocol: TCP\n", "", 1);
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].maxRequestAccessDuration",
            "should match",
        ],
    )
}

async fn policy_address_not_an_ip(ctx: Ctx) -> TestResult {
    let yaml = policy_port_with("protocol", "TCP")
        .replace("address: 198.18.0.10", "address: web-1.internal")
        .replacen("      protocol: TCP\n", "", 1);
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].address",
            "must be an IPv4 or IPv6 address",
        ],
    )
}

async fn policy_duplicate_machine_names(ctx: Ctx) -> TestResult {
    let mut yaml = policy_port_with("protocol", "TCP").replacen("      protocol: TCP\n", "", 1);
    yaml.push_str("  - name: web-1\n    address: 198.18.0.11\n    networkSecurityGroupName: nsg\n");
    expect_rejected(&ctx, &yaml, &["spec.virtualMachines[1]", "Duplicate value"])
}

async fn request_duration_calendar_units(ctx: Ctx) -> TestResult {
    let yaml = request_port_with("protocol", "TCP").replace("PT10M", "P1M");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].duration",
            DURATION_MESSAGE,
        ],
    )
}

async fn request_source_is_a_tag(ctx: Ctx) -> TestResult {
    let yaml = request_port_with("protocol", "TCP").replace(
        "allowedSourceAddressPrefix: 198.19.0.10",
        "allowedSourceAddressPrefix: Internet",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].allowedSourceAddressPrefix",
            SOURCE_MESSAGE,
        ],
    )
}

async fn request_without_source(ctx: Ctx) -> TestResult {
    let yaml = request_port_with("protocol", "TCP")
        .replace("      allowedSourceAddressPrefix: 198.19.0.10\n", "");
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0]",
            "exactly one of allowedSourceAddressPrefix or allowedSourceAddressPrefixes",
        ],
    )
}

async fn request_spec_is_immutable(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(&request_port_with("protocol", "TCP")))?;
    let changed = request_port_with("protocol", "TCP").replace("PT10M", "PT20M");
    expect_rejected(&ctx, &changed, &["spec", "spec is immutable"])
}

/// The workflow's fields: 1 to 5 approvals, a pending timeout of at most a week, a start
/// time clients can read, decisions spelled Approve or Reject, approvals immutable.
async fn workflow_fields_are_bounded(ctx: Ctx) -> TestResult {
    let policy = |extra: &str| {
        ssh_policy("198.19.0.0/16", "").replacen("spec:\n", &format!("spec:\n{extra}"), 1)
    };
    for (extra, needle) in [
        (
            "  approval:\n    approvalsRequired: 0\n",
            "approvalsRequired",
        ),
        (
            "  approval:\n    approvalsRequired: 6\n",
            "approvalsRequired",
        ),
        ("  pendingTimeout: P8D\n", "from 1 second to 7 days"),
        ("  pendingTimeout: 1h\n", "pendingTimeout"),
    ] {
        expect_rejected(&ctx, &policy(extra), &[needle])?;
    }
    succeeded(&ctx.apply(&policy(
        "  pendingTimeout: P7D\n  approval:\n    approvalsRequired: 5\n",
    )))?;
    let request = request_port_with("protocol", "TCP").replace(
        "  policyName: web\n",
        "  policyName: web\n  startTime: \"tomorrow\"\n",
    );
    expect_rejected(&ctx, &request, &["startTime"])?;
    let approval = |decision: &str, comment: &str| {
        format!(
            "apiVersion: jit.portcullis.dev/v1alpha1\nkind: JitApproval\nmetadata:\n  name: yes-please\n\
             spec:\n  requestName: ask\n  decision: {decision}\n  comment: {comment}\n"
        )
    };
    expect_rejected(
        &ctx,
        &approval("Maybe", "hmm"),
        &["decision", "Unsupported value"],
    )?;
    succeeded(&ctx.apply(&approval("Approve", "ok")))?;
    expect_rejected(&ctx, &approval("Reject", "ok"), &["spec is immutable"])?;
    Ok(())
}

/// Edge cases of every field the schema checks with CEL or a pattern: the spellings a user
/// may legitimately write (IPv6 hex in capitals or with leading zeros, IPv4-compatible IPv6,
/// `0.0.0.0/0`, port `0` and zero-padded ports, zero components and seconds-only durations,
/// padded numbers). Every one must pass `kubectl apply`, and the objects the API server
/// stored must then convert, through the functions the controllers use, to what they mean:
/// a value the schema accepts and the code refuses would leave an NSG `Ready=False` and
/// its agents without rules.
const EDGE_CASES: &str = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: NetworkSecurityGroup
metadata:
  name: edges
spec:
  virtualNetworkPrefixes: ["198.18.0.0/24", "2001:DB8:0:1::/64", "2001:0db8:0000:0002::/64", "198.18.1.7"]
  loadBalancerPrefixes: ["198.18.2.0/28", "2001:db8::FFFF"]
  securityRules:
  - name: edge-lists
    priority: 100
    direction: Inbound
    access: Allow
    protocol: Tcp
    sourceAddressPrefixes: ["198.19.0.0/16", "2001:DB8:AB::/48", "::198.19.0.1", "0.0.0.0/0", "::/0", "198.19.0.1/32", "Internet"]
    sourcePortRanges: ["0", "00000-65535"]
    destinationAddressPrefixes: ["2001:db8:0:1::A", "VirtualNetwork", "*"]
    destinationPortRanges: ["00022", "0-65535", "00080-00443", "65535", "0"]
---
apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: edge-singular
spec:
  networkSecurityGroupName: edges
  priority: 4096
  direction: Outbound
  access: Deny
  protocol: "*"
  sourceAddressPrefix: "2001:DB8::1"
  sourcePortRange: "*"
  destinationAddressPrefix: "AzureLoadBalancer"
  destinationPortRange: "03389-03390"
---
apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: edges
spec:
  virtualMachines:
  - name: vm-6
    address: "2001:DB8:0:1::A"
    networkSecurityGroupName: edges
    ports:
    - number: 22
      protocol: TCP
      allowedSourceAddressPrefixes: ["198.19.0.0/16", "2001:DB8:AB::/48"]
      maxRequestAccessDuration: PT86400S
    - number: 3389
      protocol: UDP
      allowedSourceAddressPrefix: "198.19.0.7"
      maxRequestAccessDuration: P0DT0H0M1S
    - number: 5985
      allowedSourceAddressPrefix: "*"
      maxRequestAccessDuration: PT0H1440M
    - number: 65535
      protocol: TCP
      maxRequestAccessDuration: PT00000000000000000000000000001S
    - number: 8080
      protocol: TCP
      maxRequestAccessDuration: P1D
---
apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: edges
spec:
  policyName: edges
  virtualMachines:
  - name: vm-6
    ports:
    - number: 22
      duration: PT00000000000000000000000000001S
      allowedSourceAddressPrefixes: ["2001:db8:ab:1::/64", "198.19.255.255"]
    - number: 3389
      duration: P0DT0H0M1S
      allowedSourceAddressPrefix: "198.19.0.7/32"
    - number: 5985
      duration: PT00001S
      allowedSourceAddressPrefix: "*"
    - number: 8080
      duration: PT86400S
      allowedSourceAddressPrefix: "::198.19.0.1"
"#;

fn net(s: &str) -> IpNet {
    s.parse().expect("test network")
}

fn prefixes(values: &[&str]) -> Vec<AddressPrefix> {
    values
        .iter()
        .map(|v| match *v {
            "*" | "Internet" | "VirtualNetwork" | "AzureLoadBalancer" => v.parse().expect("a tag"),
            cidr => AddressPrefix::Net(net(cidr)),
        })
        .collect()
}

fn ports(ranges: &[(u16, u16)]) -> Vec<PortRange> {
    ranges
        .iter()
        .map(|&(start, end)| PortRange::Range { start, end })
        .collect()
}

async fn schema_accepted_edge_cases_convert_with_the_same_meaning(ctx: Ctx) -> TestResult {
    succeeded(&ctx.apply(EDGE_CASES))?;
    let nsg = Api::<NetworkSecurityGroup>::namespaced(ctx.client.clone(), &ctx.ns)
        .get("edges")
        .await?;
    let rule_object = Api::<SecurityRule>::namespaced(ctx.client.clone(), &ctx.ns)
        .get("edge-singular")
        .await?;
    let policy = Api::<JitPolicy>::namespaced(ctx.client.clone(), &ctx.ns)
        .get("edges")
        .await?;
    let request = Api::<JitRequest>::namespaced(ctx.client.clone(), &ctx.ns)
        .get("edges")
        .await?;

    // The NSG's address space, in the canonical spelling of the same networks.
    let scope = convert::scope(&nsg.spec)?;
    assert_eq!(
        scope,
        rules::Scope {
            virtual_network: vec![
                net("198.18.0.0/24"),
                net("2001:db8:0:1::/64"),
                net("2001:db8:0:2::/64"),
                net("198.18.1.7/32"),
            ],
            load_balancer: vec![net("198.18.2.0/28"), net("2001:db8::ffff/128")],
        }
    );

    // The inline rule: every list entry converts to the network or range it spells.
    let inline = &nsg.spec.security_rules[0];
    let converted = convert::rule(&inline.name, &inline.fields, Origin::Inline, false)?;
    assert_eq!(
        converted.source_prefixes,
        prefixes(&[
            "198.19.0.0/16",
            "2001:db8:ab::/48",
            "::c613:1/128",
            "0.0.0.0/0",
            "::/0",
            "198.19.0.1/32",
            "Internet",
        ])
    );
    assert_eq!(converted.source_ports, ports(&[(0, 0), (0, 65535)]));
    assert_eq!(
        converted.destination_prefixes,
        prefixes(&["2001:db8:0:1::a/128", "VirtualNetwork", "*"])
    );
    assert_eq!(
        converted.destination_ports,
        ports(&[(22, 22), (0, 65535), (80, 443), (65535, 65535), (0, 0)])
    );

    // The SecurityRule object, singular fields.
    let name = rule_object.metadata.name.clone().unwrap_or_default();
    let converted = convert::rule(
        &name,
        &rule_object.spec.fields,
        Origin::SecurityRule { name: name.clone() },
        false,
    )?;
    assert_eq!(converted.protocol, Protocol::Any);
    assert_eq!(converted.source_prefixes, prefixes(&["2001:db8::1/128"]));
    assert_eq!(converted.source_ports, vec![PortRange::Any]);
    assert_eq!(
        converted.destination_prefixes,
        prefixes(&["AzureLoadBalancer"])
    );
    assert_eq!(converted.destination_ports, ports(&[(3389, 3390)]));

    // Every policy maximum reads as the seconds the schema's CEL total gave it.
    let maxima: Vec<Result<Duration, _>> = policy.spec.virtual_machines[0]
        .ports
        .iter()
        .flatten()
        .map(|p| duration::parse_policy_max(&p.max_request_access_duration))
        .collect();
    let day = Duration::from_secs(86_400);
    let second = Duration::from_secs(1);
    assert_eq!(
        maxima,
        vec![Ok(day), Ok(second), Ok(day), Ok(second), Ok(day)]
    );

    // The request is valid under the policy, and grants exactly what it spells.
    let grants = validate(&policy.spec, &request.spec)
        .map_err(|v| format!("the edge-case request is refused: {v:?}"))?;
    let address: std::net::IpAddr = "2001:db8:0:1::a".parse()?;
    let got: Vec<(u16, Protocol, Vec<IpNet>, Duration)> = grants
        .iter()
        .inspect(|g| assert_eq!(g.address, address))
        .map(|g| (g.number, g.protocol, g.sources.clone(), g.duration))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                22,
                Protocol::Tcp,
                vec![net("2001:db8:ab:1::/64"), net("198.19.255.255/32")],
                second
            ),
            (3389, Protocol::Udp, vec![net("198.19.0.7/32")], second),
            (
                5985,
                Protocol::Any,
                vec![net("0.0.0.0/0"), net("::/0")],
                second
            ),
            (8080, Protocol::Tcp, vec![net("::c613:1/128")], day),
        ]
    );
    Ok(())
}

/// An NSG with `field: [valid, value]`.
fn address_space(field: &str, value: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: NetworkSecurityGroup
metadata:
  name: nsg
spec:
  {field}: ["198.18.0.0/24", "{value}"]
"#
    )
}

/// The address space defines what the tags stand for: a tag or `*` in it used to pass the
/// schema and then fail the conversion, leaving the NSG unenforced.
async fn nsg_address_space_refuses_star_and_tags(ctx: Ctx) -> TestResult {
    for field in ["virtualNetworkPrefixes", "loadBalancerPrefixes"] {
        for value in ["*", "VirtualNetwork", "Internet", "AzureLoadBalancer"] {
            let path = format!("spec.{field}");
            expect_rejected(
                &ctx,
                &address_space(field, value),
                &[&path, ADDRESS_SPACE_MESSAGE],
            )
            .map_err(|e| format!("{field}: {value}: {e}"))?;
        }
    }
    Ok(())
}

/// `198.19.0.1/16` may mean the host or the /16: refused wherever a prefix is written,
/// though CEL's `isCIDR` alone takes it.
async fn cidrs_with_host_bits_are_refused(ctx: Ctx) -> TestResult {
    expect_rejected(
        &ctx,
        &address_space("virtualNetworkPrefixes", "198.18.1.1/24"),
        &["spec.virtualNetworkPrefixes", ADDRESS_SPACE_MESSAGE],
    )?;
    expect_rejected(
        &ctx,
        &address_space("loadBalancerPrefixes", "2001:db8::1/64"),
        &["spec.loadBalancerPrefixes", ADDRESS_SPACE_MESSAGE],
    )?;
    let yaml = nsg_with("description", "x").replace(
        "sourceAddressPrefix: Internet",
        "sourceAddressPrefix: 198.19.0.1/16",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &["spec.securityRules[0].sourceAddressPrefix", PREFIX_MESSAGE],
    )?;
    let yaml = nsg_with("description", "x").replace(
        "destinationAddressPrefix: \"*\"",
        "destinationAddressPrefixes: [\"198.18.0.10\", \"2001:db8::1/64\"]",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.securityRules[0].destinationAddressPrefixes",
            PREFIX_MESSAGE,
        ],
    )?;
    let yaml = policy_port_with("protocol", "TCP")
        .replace("198.19.0.0/16", "198.19.0.1/16")
        .replacen("      protocol: TCP\n", "", 1);
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].allowedSourceAddressPrefix",
            SOURCE_MESSAGE,
        ],
    )?;
    let yaml = request_port_with("protocol", "TCP").replace(
        "allowedSourceAddressPrefix: 198.19.0.10",
        "allowedSourceAddressPrefixes: [\"198.19.0.10/24\"]",
    );
    expect_rejected(
        &ctx,
        &yaml,
        &[
            "spec.virtualMachines[0].ports[0].allowedSourceAddressPrefixes",
            SOURCE_MESSAGE,
        ],
    )
}

/// Spellings whose meaning is in doubt (octal-looking octets, IPv4-mapped IPv6, zones,
/// a zero-padded prefix length): Kubernetes' CEL refuses them, and so does the code, so an
/// object that skipped validation is reported rather than read one way or another.
async fn addresses_cel_refuses_are_refused_by_the_code_too(ctx: Ctx) -> TestResult {
    for value in [
        "198.019.0.0/16",
        "198.19.0.01",
        "198.19.0.0/016",
        "::ffff:198.19.0.1",
        "::ffff:198.19.0.0/112",
        "fe80::1%eth0",
    ] {
        let yaml = nsg_with("description", "x").replace(
            "sourceAddressPrefix: Internet",
            &format!("sourceAddressPrefix: \"{value}\""),
        );
        expect_rejected(
            &ctx,
            &yaml,
            &["spec.securityRules[0].sourceAddressPrefix", PREFIX_MESSAGE],
        )
        .map_err(|e| format!("{value}: {e}"))?;
        if value.parse::<AddressPrefix>().is_ok() {
            return Err(format!("the code reads {value:?}, which the schema refuses").into());
        }
    }
    Ok(())
}
