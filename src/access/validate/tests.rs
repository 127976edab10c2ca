use serde_json::{Value, json};

use super::*;

fn policy(value: Value) -> JitPolicySpec {
    serde_json::from_value(value).unwrap()
}

/// A policy exercising every port shape: singular and plural sources, `*`, UDP, and a
/// machine on the defaults.
fn fixture() -> JitPolicySpec {
    policy(json!({
        "requireJustification": true,
        "virtualMachines": [
            {
                "name": "web",
                "address": "10.0.0.4",
                "networkSecurityGroupName": "nsg-a",
                "ports": [
                    {"number": 22, "protocol": "TCP",
                     "allowedSourceAddressPrefix": "203.0.113.0/24",
                     "maxRequestAccessDuration": "PT3H", "establishedConnections": "Close",
                     "idleTimeout": "PT15M"},
                    {"number": 3389, "protocol": "TCP",
                     "allowedSourceAddressPrefixes": ["198.51.100.0/24", "2001:db8::/32"],
                     "maxRequestAccessDuration": "PT1H"},
                    {"number": 53, "protocol": "*"},
                    {"number": 161, "protocol": "UDP", "maxRequestAccessDuration": "PT30M"}
                ]
            },
            {"name": "db", "address": "fd00::10", "networkSecurityGroupName": "nsg-b"}
        ]
    }))
}

fn request(justification: Option<&str>, machines: Value) -> JitRequestSpec {
    serde_json::from_value(json!({
        "policyName": "p",
        "justification": justification,
        "virtualMachines": machines,
    }))
    .unwrap()
}

/// One machine, one port: the shape of most cases.
fn one(machine: &str, port: Value) -> JitRequestSpec {
    request(
        Some("ticket 42"),
        json!([{"name": machine, "ports": [port]}]),
    )
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn s(v: &str) -> String {
    v.to_owned()
}

/// The machine and port a violation is about, to check its message names them.
fn subject(v: &Violation) -> (Option<&str>, Option<u16>) {
    use Violation::*;
    match v {
        UnknownMachine { machine } | DuplicateMachine { machine } => (Some(machine), None),
        InvalidPolicy { machine, .. } => (Some(machine), None),
        PortNotInPolicy { machine, port, .. }
        | ProtocolMismatch { machine, port, .. }
        | DurationTooLong { machine, port, .. }
        | InvalidDuration { machine, port, .. }
        | SourceNotAllowed { machine, port, .. }
        | InvalidSource { machine, port, .. }
        | SourceMissing { machine, port }
        | DuplicatePort { machine, port } => (Some(machine), Some(*port)),
        JustificationRequired
        | RequestorMissing
        | NotAuthorized { .. }
        | StartTooFarAhead { .. }
        | Rejected { .. } => (None, None),
    }
}

/// A table row: name, policy, request, the exact violations, words the messages contain.
type Case = (
    &'static str,
    JitPolicySpec,
    JitRequestSpec,
    Vec<Violation>,
    &'static [&'static str],
);

#[test]
fn every_violation_is_reported_precisely() {
    let p = fixture();
    let cases: Vec<Case> = vec![
        (
            "unknown machine",
            p.clone(),
            one(
                "mail",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
            ),
            vec![Violation::UnknownMachine { machine: s("mail") }],
            &["not in the policy"],
        ),
        (
            "port not in policy",
            p.clone(),
            one(
                "web",
                json!({"number": 8080, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
            ),
            vec![Violation::PortNotInPolicy {
                machine: s("web"),
                port: 8080,
                allowed: vec![22, 53, 161, 3389],
            }],
            &["JIT ports: 22, 53, 161, 3389"],
        ),
        (
            "protocol mismatch",
            p.clone(),
            one(
                "web",
                json!({"number": 22, "protocol": "UDP", "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
            ),
            vec![Violation::ProtocolMismatch {
                machine: s("web"),
                port: 22,
                requested: PolicyProtocol::Udp,
                allowed: vec![PolicyProtocol::Tcp],
            }],
            &["over UDP", "allows TCP"],
        ),
        (
            "a requested * protocol needs a policy *",
            p.clone(),
            one(
                "web",
                json!({"number": 22, "protocol": "*", "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
            ),
            vec![Violation::ProtocolMismatch {
                machine: s("web"),
                port: 22,
                requested: PolicyProtocol::Any,
                allowed: vec![PolicyProtocol::Tcp],
            }],
            &["over *"],
        ),
        (
            "duration too long",
            p.clone(),
            one(
                "web",
                json!({"number": 3389, "duration": "PT2H", "allowedSourceAddressPrefix": "198.51.100.7"}),
            ),
            vec![Violation::DurationTooLong {
                machine: s("web"),
                port: 3389,
                requested: s("PT2H"),
                max: s("PT1H"),
            }],
            &["PT2H", "maximum PT1H"],
        ),
        (
            "invalid duration",
            p.clone(),
            one(
                "web",
                json!({"number": 22, "duration": "P1M", "allowedSourceAddressPrefix": "203.0.113.5"}),
            ),
            vec![Violation::InvalidDuration {
                machine: s("web"),
                port: 22,
                value: s("P1M"),
                reason: DurationError::CalendarUnits { value: s("P1M") },
            }],
            &["\"P1M\""],
        ),
        (
            "source outside the allowed prefix",
            p.clone(),
            one(
                "web",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "198.51.100.7"}),
            ),
            vec![Violation::SourceNotAllowed {
                machine: s("web"),
                port: 22,
                value: s("198.51.100.7"),
                allowed: vec![s("203.0.113.0/24")],
            }],
            &["198.51.100.7", "203.0.113.0/24"],
        ),
        (
            "source only partly inside the allowed prefix",
            p.clone(),
            one(
                "web",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.112.0/23"}),
            ),
            vec![Violation::SourceNotAllowed {
                machine: s("web"),
                port: 22,
                value: s("203.0.112.0/23"),
                allowed: vec![s("203.0.113.0/24")],
            }],
            &["203.0.112.0/23"],
        ),
        (
            "source * where the policy does not allow *",
            p.clone(),
            one(
                "web",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}),
            ),
            vec![Violation::SourceNotAllowed {
                machine: s("web"),
                port: 22,
                value: s("*"),
                allowed: vec![s("203.0.113.0/24")],
            }],
            &["source *"],
        ),
        (
            "source that is a service tag",
            p.clone(),
            one(
                "web",
                json!({"number": 53, "duration": "PT1H", "allowedSourceAddressPrefix": "Internet"}),
            ),
            vec![Violation::InvalidSource {
                machine: s("web"),
                port: 53,
                value: s("Internet"),
            }],
            &["\"Internet\""],
        ),
        (
            "source that is garbage",
            p.clone(),
            one(
                "web",
                json!({"number": 53, "duration": "PT1H", "allowedSourceAddressPrefixes": ["10.0.0.300"]}),
            ),
            vec![Violation::InvalidSource {
                machine: s("web"),
                port: 53,
                value: s("10.0.0.300"),
            }],
            &["\"10.0.0.300\""],
        ),
        (
            "no source",
            p.clone(),
            one("web", json!({"number": 53, "duration": "PT1H"})),
            vec![Violation::SourceMissing {
                machine: s("web"),
                port: 53,
            }],
            &["no source"],
        ),
        (
            "same port twice",
            p.clone(),
            request(
                Some("x"),
                json!([{"name": "web", "ports": [
                    {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"},
                    {"number": 22, "protocol": "TCP", "duration": "PT2H", "allowedSourceAddressPrefix": "203.0.113.6"}
                ]}]),
            ),
            vec![Violation::DuplicatePort {
                machine: s("web"),
                port: 22,
            }],
            &["more than once"],
        ),
        (
            "same port with overlapping protocols",
            p.clone(),
            request(
                Some("x"),
                json!([{"name": "web", "ports": [
                    {"number": 53, "protocol": "UDP", "duration": "PT1H", "allowedSourceAddressPrefix": "*"},
                    {"number": 53, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}
                ]}]),
            ),
            vec![Violation::DuplicatePort {
                machine: s("web"),
                port: 53,
            }],
            &["more than once"],
        ),
        (
            "same machine twice",
            p.clone(),
            request(
                Some("x"),
                json!([
                    {"name": "db", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]},
                    {"name": "db", "ports": [{"number": 3389, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]}
                ]),
            ),
            vec![Violation::DuplicateMachine { machine: s("db") }],
            &["more than once"],
        ),
        (
            "blank justification",
            p.clone(),
            request(
                Some(" \t\n"),
                json!([{"name": "db", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]}]),
            ),
            vec![Violation::JustificationRequired],
            &["justification"],
        ),
        (
            "missing justification",
            p.clone(),
            request(
                None,
                json!([{"name": "db", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]}]),
            ),
            vec![Violation::JustificationRequired],
            &["justification"],
        ),
        (
            "policy address that is not an IP",
            policy(
                json!({"virtualMachines": [{"name": "m", "address": "m.example", "networkSecurityGroupName": "n"}]}),
            ),
            one(
                "m",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}),
            ),
            vec![Violation::InvalidPolicy {
                machine: s("m"),
                reason: s("address \"m.example\" is not an IP address"),
            }],
            &["m.example"],
        ),
        (
            "policy maximum that is not a duration",
            policy(
                json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n",
                "ports": [{"number": 22, "protocol": "TCP", "maxRequestAccessDuration": "PT48H"}]}]}),
            ),
            one(
                "m",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}),
            ),
            vec![Violation::InvalidPolicy {
                machine: s("m"),
                reason: s(
                    "port 22: maxRequestAccessDuration: duration \"PT48H\" exceeds the maximum PT24H",
                ),
            }],
            &["PT48H"],
        ),
        (
            "policy source that is a tag (would cover everything without a scope)",
            policy(
                json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n",
                "ports": [{"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": "Internet"}]}]}),
            ),
            one(
                "m",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"}),
            ),
            vec![
                Violation::InvalidPolicy {
                    machine: s("m"),
                    reason: s(
                        "port 22: allowed source \"Internet\" is not \"*\", an IP address or a CIDR",
                    ),
                },
                Violation::SourceNotAllowed {
                    machine: s("m"),
                    port: 22,
                    value: s("203.0.113.5"),
                    allowed: vec![s("Internet")],
                },
            ],
            &["Internet"],
        ),
    ];
    for (name, policy, request, want, mentions) in cases {
        let got = validate(&policy, &request).expect_err(name);
        assert_eq!(got, want, "{name}");
        for v in &got {
            let message = v.to_string();
            let (machine, port) = subject(v);
            if let Some(machine) = machine {
                assert!(
                    message.contains(&format!("{machine:?}")),
                    "{name}: {message}"
                );
            }
            if let Some(port) = port {
                assert!(
                    message.contains(&format!("port {port}")),
                    "{name}: {message}"
                );
            }
        }
        let all: Vec<String> = got.iter().map(ToString::to_string).collect();
        for m in mentions {
            assert!(
                all.iter().any(|a| a.contains(m)),
                "{name}: {m:?} not in {all:?}"
            );
        }
    }
}

#[test]
fn requestor_missing_reads_well() {
    assert_eq!(
        Violation::RequestorMissing.to_string(),
        "no authenticated requestor is recorded on the request"
    );
}

#[test]
fn reports_all_violations_at_once_in_request_order() {
    let got = validate(
        &fixture(),
        &request(
            Some(""),
            json!([
                {"name": "mail", "ports": [{"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "*"}]},
                {"name": "web", "ports": [
                    {"number": 23, "duration": "PT1H", "allowedSourceAddressPrefix": "*"},
                    {"number": 22, "duration": "PT4H", "allowedSourceAddressPrefixes": ["203.0.113.5", "192.0.2.1", "nope"]}
                ]}
            ]),
        ),
    )
    .unwrap_err();
    assert_eq!(
        got,
        vec![
            Violation::JustificationRequired,
            Violation::UnknownMachine { machine: s("mail") },
            Violation::PortNotInPolicy {
                machine: s("web"),
                port: 23,
                allowed: vec![22, 53, 161, 3389]
            },
            Violation::DurationTooLong {
                machine: s("web"),
                port: 22,
                requested: s("PT4H"),
                max: s("PT3H")
            },
            Violation::SourceNotAllowed {
                machine: s("web"),
                port: 22,
                value: s("192.0.2.1"),
                allowed: vec![s("203.0.113.0/24")]
            },
            Violation::InvalidSource {
                machine: s("web"),
                port: 22,
                value: s("nope")
            },
        ]
    );
}

#[test]
fn omitted_ports_mean_the_defaults() {
    let p = fixture();
    let db = &p.virtual_machines[1];
    let want: Vec<AllowedPort> = [22, 3389, 5985, 5986]
        .into_iter()
        .map(|number| AllowedPort {
            number,
            protocol: PolicyProtocol::Tcp,
            allowed_sources: vec![s("*")],
            max_duration: s("PT3H"),
            established_connections: EstablishedConnections::Keep,
            idle_timeout: None,
        })
        .collect();
    assert_eq!(policy_ports(db), want);

    let ok = |port: Value| validate(&p, &one("db", port));
    assert!(
        ok(json!({"number": 5986, "duration": "PT3H", "allowedSourceAddressPrefix": "192.0.2.1"}))
            .is_ok()
    );
    assert_eq!(
        ok(
            json!({"number": 5985, "duration": "PT3H1S", "allowedSourceAddressPrefix": "192.0.2.1"})
        ),
        Err(vec![Violation::DurationTooLong {
            machine: s("db"),
            port: 5985,
            requested: s("PT3H1S"),
            max: s("PT3H")
        }])
    );
    assert_eq!(
        ok(
            json!({"number": 22, "protocol": "UDP", "duration": "PT1H", "allowedSourceAddressPrefix": "192.0.2.1"})
        ),
        Err(vec![Violation::ProtocolMismatch {
            machine: s("db"),
            port: 22,
            requested: PolicyProtocol::Udp,
            allowed: vec![PolicyProtocol::Tcp]
        }])
    );
}

#[test]
fn listed_ports_default_to_any_protocol_and_source() {
    let p = fixture();
    let ports = policy_ports(&p.virtual_machines[0]);
    assert_eq!(
        ports[2],
        AllowedPort {
            number: 53,
            protocol: PolicyProtocol::Any,
            allowed_sources: vec![s("*")],
            max_duration: s("PT3H"),
            established_connections: EstablishedConnections::Keep,
            idle_timeout: None,
        }
    );
    assert_eq!(
        ports[1].allowed_sources,
        vec![s("198.51.100.0/24"), s("2001:db8::/32")]
    );
}

#[test]
fn star_source_needs_a_policy_star_and_opens_both_families() {
    let open = |policy_source: &str, requested: &str| {
        let p = policy(
            json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n",
            "ports": [{"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": policy_source}]}]}),
        );
        validate(
            &p,
            &one(
                "m",
                json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": requested}),
            ),
        )
        .map(|g| g[0].sources.clone())
    };
    assert_eq!(open("*", "*"), Ok(vec![net("0.0.0.0/0"), net("::/0")]));
    assert!(
        open("0.0.0.0/0", "*").is_err(),
        "0.0.0.0/0 does not allow IPv6 too"
    );
    assert_eq!(open("0.0.0.0/0", "0.0.0.0/0"), Ok(vec![net("0.0.0.0/0")]));
    assert_eq!(open("*", "2001:db8::7"), Ok(vec![net("2001:db8::7/128")]));
}

#[test]
fn ipv6_sources_are_checked_by_containment() {
    let p = fixture();
    let ok = |sources: Value| {
        validate(
            &p,
            &one(
                "web",
                json!({"number": 3389, "duration": "PT1H", "allowedSourceAddressPrefixes": sources}),
            ),
        )
    };
    assert_eq!(
        ok(json!(["2001:db8:1::/48", "2001:db8::1"])).unwrap()[0].sources,
        vec![net("2001:db8:1::/48"), net("2001:db8::1/128")]
    );
    assert_eq!(
        ok(json!(["2001:db9::1"])),
        Err(vec![Violation::SourceNotAllowed {
            machine: s("web"),
            port: 3389,
            value: s("2001:db9::1"),
            allowed: vec![s("198.51.100.0/24"), s("2001:db8::/32")],
        }])
    );
    assert!(
        ok(json!(["2001:db8::/31"])).is_err(),
        "wider than the allowed /32"
    );
}

#[test]
fn omitted_protocol_picks_star_then_tcp_whatever_the_order() {
    let grant_protocol = |protocols: &[&str], requested: Option<&str>| {
        let ports: Vec<Value> = protocols
            .iter()
            .map(|p| json!({"number": 22, "protocol": p, "maxRequestAccessDuration": if *p == "UDP" { "PT10M" } else { "PT3H" }}))
            .collect();
        let p = policy(
            json!({"virtualMachines": [{"name": "m", "address": "10.0.0.1", "networkSecurityGroupName": "n", "ports": ports}]}),
        );
        let mut port =
            json!({"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "192.0.2.1"});
        if let Some(r) = requested {
            port["protocol"] = json!(r);
        }
        validate(&p, &one("m", port)).map(|g| g[0].protocol)
    };
    assert_eq!(
        grant_protocol(&["UDP", "TCP", "*"], None),
        Ok(Protocol::Any)
    );
    assert_eq!(grant_protocol(&["UDP", "TCP"], None), Ok(Protocol::Tcp));
    assert_eq!(grant_protocol(&["TCP", "UDP"], None), Ok(Protocol::Tcp));
    assert_eq!(
        grant_protocol(&["UDP"], None),
        Err(vec![Violation::DurationTooLong {
            machine: s("m"),
            port: 22,
            requested: s("PT1H"),
            max: s("PT10M"),
        }])
    );
    assert_eq!(grant_protocol(&["*"], Some("UDP")), Ok(Protocol::Udp));
    assert!(
        grant_protocol(&["TCP", "UDP"], Some("UDP")).is_err(),
        "the UDP entry's PT10M applies"
    );
    assert_eq!(
        grant_protocol(&["UDP", "*"], Some("TCP")),
        Ok(Protocol::Tcp)
    );
}

#[test]
fn grants_exactly_what_was_asked_in_request_order() {
    let got = validate(
        &fixture(),
        &request(
            Some("incident 7"),
            json!([
                {"name": "web", "ports": [
                    {"number": 22, "duration": "PT1H", "allowedSourceAddressPrefix": "203.0.113.5"},
                    {"number": 3389, "protocol": "TCP", "duration": "PT30M",
                     "allowedSourceAddressPrefixes": ["198.51.100.0/25", "2001:db8:1::/48", "198.51.100.9/25"]},
                    {"number": 53, "protocol": "UDP", "duration": "PT20S", "allowedSourceAddressPrefix": "*"},
                    {"number": 161, "duration": "PT30M", "allowedSourceAddressPrefix": "192.0.2.0/24"}
                ]},
                {"name": "db", "ports": [
                    {"number": 5985, "duration": "P0DT3H", "allowedSourceAddressPrefix": "*"}
                ]}
            ]),
        ),
    )
    .unwrap();
    let web = |number, protocol, sources: &[&str], secs| PortGrant {
        machine: s("web"),
        address: "10.0.0.4".parse().unwrap(),
        network_security_group: s("nsg-a"),
        number,
        protocol,
        sources: sources.iter().map(|x| net(x)).collect(),
        duration: Duration::from_secs(secs),
        established_connections: EstablishedConnections::Keep,
        idle_timeout: None,
    };
    assert_eq!(
        got,
        vec![
            PortGrant {
                established_connections: EstablishedConnections::Close,
                idle_timeout: Some(Duration::from_secs(900)),
                ..web(22, Protocol::Tcp, &["203.0.113.5/32"], 3600)
            },
            web(
                3389,
                Protocol::Tcp,
                &["198.51.100.0/25", "2001:db8:1::/48"],
                1800
            ),
            web(53, Protocol::Udp, &["0.0.0.0/0", "::/0"], 20),
            web(161, Protocol::Udp, &["192.0.2.0/24"], 1800),
            PortGrant {
                machine: s("db"),
                address: "fd00::10".parse().unwrap(),
                network_security_group: s("nsg-b"),
                number: 5985,
                protocol: Protocol::Tcp,
                sources: vec![net("0.0.0.0/0"), net("::/0")],
                duration: Duration::from_secs(3 * 3600),
                established_connections: EstablishedConnections::Keep,
                idle_timeout: None,
            },
        ]
    );
}
