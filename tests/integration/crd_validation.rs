//! Bad input is refused by the API server at `kubectl apply` time, with a message that names
//! the field. One test per kind of mistake, each through kubectl as a user would type it.

use portcullis::api::validation::{
    DURATION_MESSAGE, PORT_RANGE_MESSAGE, PREFIX_MESSAGE, SOURCE_MESSAGE,
};

use crate::support::{Ctx, TestResult, failed, succeeded};

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
        policy_port_over_65535,
        policy_port_zero,
        policy_protocol_in_nsg_spelling,
        policy_duration_over_24_hours,
        policy_duration_zero,
        policy_duration_not_iso8601,
        policy_address_not_an_ip,
        policy_duplicate_machine_names,
        request_duration_calendar_units,
        request_source_is_a_tag,
        request_without_source,
        request_spec_is_immutable,
    ]
}

/// An NSG whose one inline rule has `field: value` on top of a valid rule.
fn nsg_with(field: &str, value: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: NetworkSecurityGroup
metadata:
  name: nsg
spec:
  virtualNetworkPrefixes: ["198.18.0.0/24"]
  securityRules:
  - name: allow-http
    priority: 300
    direction: Inbound
    access: Allow
    protocol: Tcp
    sourceAddressPrefix: Internet
    sourcePortRange: "*"
    destinationAddressPrefix: "*"
    destinationPortRange: "80"
    {field}: {value}
"#
    )
}

/// A policy whose one port has `field: value` on top of a valid port.
fn policy_port_with(field: &str, value: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: web
spec:
  virtualMachines:
  - name: web-1
    address: 198.18.0.10
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      allowedSourceAddressPrefix: 198.19.0.0/16
      maxRequestAccessDuration: PT1H
      {field}: {value}
"#
    )
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
