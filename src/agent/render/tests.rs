use super::*;
use crate::rules::effective;

fn now() -> Timestamp {
    "2030-01-01T00:00:00Z".parse().unwrap()
}

fn at(seconds: i64) -> Timestamp {
    now() + jiff::SignedDuration::from_secs(seconds)
}

fn rule(name: &str, priority: u32, access: Access, source: &str, port: &str) -> Rule {
    Rule {
        name: name.into(),
        priority,
        direction: Direction::Inbound,
        access,
        protocol: Protocol::Tcp,
        source_prefixes: vec![source.parse().unwrap()],
        source_ports: vec![PortRange::Any],
        destination_prefixes: vec![AddressPrefix::Any],
        destination_ports: vec![port.parse().unwrap()],
        origin: Origin::Inline,
        jit: false,
    }
}

fn grant(name: &str, priority: u32, source: &str, port: &str) -> Rule {
    Rule {
        origin: Origin::SecurityRule { name: name.into() },
        jit: true,
        ..rule(name, priority, Access::Allow, source, port)
    }
}

fn target() -> Target {
    Target {
        table: "portcullis".into(),
        addresses: vec!["198.18.0.10".parse().unwrap()],
        mode: Mode::Host,
    }
}

fn policy(rules: Vec<Rule>, expiries: &[(&str, i64)]) -> Policy {
    Policy {
        rules: effective(rules),
        scope: Scope {
            virtual_network: vec!["198.18.0.0/28".parse().unwrap()],
            load_balancer: vec![],
        },
        expiries: expiries
            .iter()
            .map(|(name, seconds)| ((*name).to_owned(), at(*seconds)))
            .collect(),
        closing: BTreeSet::new(),
        idle: BTreeMap::new(),
    }
}

/// The chain's rules as nft JSON strings, for readable assertions.
fn chain(ruleset: &Ruleset) -> Vec<String> {
    ruleset
        .skeleton
        .iter()
        .filter_map(|o| match o {
            NfListObject::Rule(r) => Some(serde_json::to_string(&r.expr).unwrap()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_first_grant_at_the_top_changes_only_elements() {
    let user = rule("http", 300, Access::Allow, "Internet", "80");
    let without = render(&policy(vec![user.clone()], &[]), &target(), now());
    let with = render(
        &policy(
            vec![user, grant("g", 100, "198.18.0.20", "22")],
            &[("g", 60)],
        ),
        &target(),
        now(),
    );
    assert_eq!(without.skeleton, with.skeleton);
    assert_eq!(without.grant_count(), 0);
    // One address to one port: the hash set.
    let elements = &with.grants["jit_host_allow_v4"];
    let key = GrantKey {
        destination: "198.18.0.10".parse().unwrap(),
        source: "198.18.0.20/32".parse().unwrap(),
        protocol: 6,
        ports: (22, 22),
    };
    assert_eq!(elements.get(&key), Some(&at(60)));
    assert_ne!(without.hash(), with.hash());
}

#[test]
fn the_same_policy_always_hashes_the_same() {
    // The grant sets carry two flags (interval, timeout), held by nftables in a HashSet:
    // renders of one policy must still agree on the hash, or agents could not be compared
    // and each would rewrite its report on every round.
    let policy = policy(
        vec![
            rule("http", 300, Access::Allow, "Internet", "80"),
            grant("g", 100, "198.18.0.0/24", "22"),
        ],
        &[("g", 60)],
    );
    let first = render(&policy, &target(), now()).hash();
    for _ in 0..32 {
        assert_eq!(render(&policy, &target(), now()).hash(), first);
    }
    // Any element field changes it: the expiry, the port, the source.
    for changed in [
        self::policy(
            vec![
                rule("http", 300, Access::Allow, "Internet", "80"),
                grant("g", 100, "198.18.0.0/24", "22"),
            ],
            &[("g", 61)],
        ),
        self::policy(
            vec![
                rule("http", 300, Access::Allow, "Internet", "80"),
                grant("g", 100, "198.18.0.0/24", "23"),
            ],
            &[("g", 60)],
        ),
        self::policy(
            vec![
                rule("http", 300, Access::Allow, "Internet", "80"),
                grant("g", 100, "198.18.0.0/25", "22"),
            ],
            &[("g", 60)],
        ),
    ] {
        assert_ne!(render(&changed, &target(), now()).hash(), first);
    }
}

#[test]
fn a_grant_below_a_user_rule_keeps_its_place() {
    let deny = rule("deny-ssh", 100, Access::Deny, "*", "22");
    let ruleset = render(
        &policy(
            vec![deny.clone(), grant("g", 200, "198.18.0.20", "22")],
            &[("g", 60)],
        ),
        &target(),
        now(),
    );
    let rules = chain(&ruleset);
    let deny_at = rules
        .iter()
        .position(|r| r.contains("\"drop\"") && r.contains("dport"))
        .unwrap();
    let grant_at = rules
        .iter()
        .position(|r| r.contains("@jit_allow_v4") && !r.contains("established"))
        .unwrap();
    assert!(deny_at < grant_at, "{rules:#?}");
    let empty = render(&policy(vec![deny], &[]), &target(), now());
    assert_ne!(empty.skeleton, ruleset.skeleton);
}

#[test]
fn an_expired_or_foreign_grant_is_an_ordinary_rule_or_nothing() {
    // No expiry known: an allow like any other.
    let plain = render(
        &policy(vec![grant("g", 100, "198.18.0.20", "22")], &[]),
        &target(),
        now(),
    );
    assert_eq!(plain.grant_count(), 0);
    assert!(chain(&plain).iter().any(|r| r.contains("198.18.0.20")));
    // Expiry already passed: no element.
    let expired = render(
        &policy(vec![grant("g", 100, "198.18.0.20", "22")], &[("g", -1)]),
        &target(),
        now(),
    );
    assert_eq!(expired.grant_count(), 0);
}

#[test]
fn preamble_accepts_established_then_leaves_other_addresses_alone() {
    let ruleset = render(&policy(vec![], &[]), &target(), now());
    let rules = chain(&ruleset);
    assert!(rules[0].contains("established") && rules[0].contains("accept"));
    assert!(
        rules[0].contains("mark"),
        "only unmarked flows: {}",
        rules[0]
    );
    // Then the checks of marked flows (see `close_grants_mark_their_flows_and_cut_them`).
    let lo = rules.iter().position(|r| r.contains("\"lo\"")).unwrap();
    assert!(rules[1..lo].iter().all(|r| r.contains("ct")), "{rules:#?}");
    let other = &rules[lo + 1];
    assert!(other.contains("daddr") && other.contains("!=") && other.contains("return"));
    // No IPv6 address: every IPv6 packet returns, and no ND rule is needed.
    assert!(rules[lo + 2].contains("ipv6") && rules[lo + 2].contains("return"));
    assert!(!rules.iter().any(|r| r.contains("icmpv6")));
    assert_eq!(rules.last().unwrap(), "[{\"drop\":null}]");
}

#[test]
fn internet_is_the_negated_virtual_network_set() {
    let ruleset = render(
        &policy(
            vec![rule("http", 300, Access::Allow, "Internet", "80")],
            &[],
        ),
        &target(),
        now(),
    );
    let http = chain(&ruleset)
        .into_iter()
        .find(|r| r.contains("@vnet_v4"))
        .unwrap();
    assert!(http.contains("\"op\":\"!=\""), "{http}");
    assert!(http.contains("\"dport\"") && http.contains("80"), "{http}");
    let vnet = ruleset.skeleton.iter().find_map(|o| match o {
        NfListObject::Element(e) if e.name == "vnet_v4" => Some(serde_json::to_string(e).unwrap()),
        _ => None,
    });
    assert!(vnet.unwrap().contains("198.18.0.0"));
}

#[test]
fn a_rule_without_family_specific_matches_is_pinned_to_its_family() {
    let mut target = target();
    target.addresses.push("2001:2::10".parse().unwrap());
    let ruleset = render(
        &policy(vec![rule("any-80", 300, Access::Allow, "*", "80")], &[]),
        &target,
        now(),
    );
    let rules: Vec<String> = chain(&ruleset)
        .into_iter()
        .filter(|r| r.contains("accept") && r.contains("80"))
        .collect();
    assert_eq!(rules.len(), 2, "{rules:#?}");
    assert!(
        rules[0].contains("ipv4") && rules[1].contains("ipv6"),
        "{rules:#?}"
    );
    assert!(chain(&ruleset).iter().any(|r| r.contains("icmpv6")));
}

#[test]
fn destinations_reduce_to_the_agents_addresses() {
    let mut target = target();
    target.addresses.push("198.18.0.11".parse().unwrap());
    let mut only_one = rule("one", 300, Access::Allow, "*", "80");
    only_one.destination_prefixes = vec!["198.18.0.11".parse().unwrap()];
    let mut elsewhere = rule("elsewhere", 310, Access::Allow, "*", "81");
    elsewhere.destination_prefixes = vec!["203.0.113.0/24".parse().unwrap()];
    let rules = chain(&render(
        &policy(vec![only_one, elsewhere], &[]),
        &target,
        now(),
    ));
    let one: Vec<&String> = rules.iter().filter(|r| r.contains("198.18.0.11")).collect();
    assert!(
        one.iter()
            .any(|r| r.contains("\"daddr\"") && r.contains("accept"))
    );
    assert!(!rules.iter().any(|r| r.contains("81")), "{rules:#?}");
}

#[test]
fn icmp_ignores_ports_and_any_protocol_covers_it() {
    let mut any = rule("any-22", 300, Access::Deny, "*", "22");
    any.protocol = Protocol::Any;
    let rules = chain(&render(&policy(vec![any], &[]), &target(), now()));
    let denies: Vec<&String> = rules
        .iter()
        .filter(|r| r.contains("drop") && r.contains("l4proto"))
        .collect();
    assert_eq!(denies.len(), 2, "{denies:#?}");
    assert!(denies[0].contains("[6,17]") && denies[0].contains("dport"));
    assert!(
        denies[1].contains("\"right\":1,") && !denies[1].contains("dport"),
        "{denies:#?}"
    );
}

#[test]
fn overlapping_lists_are_merged() {
    assert_eq!(
        merged_ports(&[
            "1000-2000".parse().unwrap(),
            "1500-1600".parse().unwrap(),
            "2001".parse().unwrap(),
            "22".parse().unwrap(),
        ]),
        Some(vec![(22, 22), (1000, 2001)])
    );
    assert_eq!(merged_ports(&[PortRange::single(22), PortRange::Any]), None);
    let nets = merged_nets(
        [
            "198.18.0.0/24".parse().unwrap(),
            "198.18.0.16/28".parse().unwrap(),
            "2001:2::/32".parse().unwrap(),
        ],
        Family::V4,
    );
    assert_eq!(nets, vec!["198.18.0.0/24".parse::<IpNet>().unwrap()]);
}

#[test]
fn nested_grants_become_disjoint_with_the_latest_expiry() {
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    // A longer grant for one address inside a shorter one for its /29.
    let items = [
        (net("198.18.0.16/29"), (22, 22), at(60)),
        (net("198.18.0.20/32"), (22, 22), at(600)),
    ];
    let out = disjoint(&items, Family::V4);
    let find = |ip: &str| {
        out.iter()
            .filter(|(n, _, _)| n.contains(&ip.parse::<IpAddr>().unwrap()))
            .map(|(_, _, e)| *e)
            .collect::<Vec<_>>()
    };
    assert_eq!(find("198.18.0.20"), vec![at(600)]);
    assert_eq!(find("198.18.0.16"), vec![at(60)]);
    assert_eq!(find("198.18.0.23"), vec![at(60)]);
    assert!(find("198.18.0.24").is_empty());
    for (i, a) in out.iter().enumerate() {
        for b in &out[i + 1..] {
            assert!(!a.0.contains(&b.0) && !b.0.contains(&a.0), "{out:?}");
        }
    }
    // The inner grant expiring first is absorbed.
    let absorbed = disjoint(
        &[
            (net("198.18.0.16/29"), (22, 22), at(600)),
            (net("198.18.0.20/32"), (22, 22), at(60)),
        ],
        Family::V4,
    );
    assert_eq!(absorbed, vec![(net("198.18.0.16/29"), (22, 22), at(600))]);
    // Overlapping port ranges are cut at their boundaries.
    let ports = disjoint(
        &[
            (net("198.18.0.20/32"), (20, 30), at(60)),
            (net("198.18.0.20/32"), (22, 22), at(600)),
        ],
        Family::V4,
    );
    let spans: Vec<((u16, u16), Timestamp)> = ports.iter().map(|(_, p, e)| (*p, *e)).collect();
    assert_eq!(
        spans,
        vec![((20, 21), at(60)), ((22, 22), at(600)), ((23, 30), at(60))]
    );
}

#[test]
fn any_protocol_grants_cover_tcp_udp_and_icmp() {
    let mut g = grant("g", 100, "198.18.0.20", "22");
    g.protocol = Protocol::Any;
    let ruleset = render(&policy(vec![g], &[("g", 60)]), &target(), now());
    let protocols = |set: &str| -> Vec<(u8, (u16, u16))> {
        ruleset.grants[set]
            .keys()
            .map(|k| (k.protocol, k.ports))
            .collect()
    };
    // TCP and UDP to one port are exact keys; ICMP, all "ports", an interval.
    assert_eq!(
        protocols("jit_host_allow_v4"),
        vec![(6, (22, 22)), (17, (22, 22))]
    );
    assert_eq!(protocols("jit_allow_v4"), vec![(1, (0, 65535))]);
}

#[test]
fn a_jit_rule_aimed_at_the_machine_covers_all_its_addresses() {
    let target = Target {
        table: "portcullis".into(),
        addresses: ["198.18.0.10", "198.18.0.11", "2001:2::10"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
        mode: Mode::Host,
    };
    let aimed = |rule: Rule| Rule {
        destination_prefixes: vec!["198.18.0.10".parse().unwrap()],
        ..rule
    };
    let deny = aimed(Rule {
        jit: true,
        origin: Origin::SecurityRule {
            name: "jit-deny".into(),
        },
        ..rule("jit-deny", 150, Access::Deny, "*", "22")
    });
    let user = aimed(rule("user-https", 200, Access::Allow, "Internet", "443"));
    let v6_grant = aimed(grant("g6", 100, "2001:2::20", "22"));
    let ruleset = render(
        &policy(vec![deny, user, v6_grant], &[("g6", 60)]),
        &target,
        now(),
    );
    let rules = chain(&ruleset);
    // The deny covers every address of each family: its destination match, reduced to
    // the agent's own addresses, disappears (packets to other addresses returned earlier).
    let drops: Vec<&String> = rules.iter().filter(|r| r.contains("drop")).collect();
    for (family, addresses) in [
        ("ipv4", &["198.18.0.10", "198.18.0.11"][..]),
        ("ipv6", &["2001:2::10"][..]),
    ] {
        assert!(
            drops.iter().any(|r| r.contains(family)
                && r.contains("\"right\":22")
                && (!r.contains("daddr") || addresses.iter().all(|a| r.contains(a)))),
            "the JIT deny does not close port 22 on every {family} address: {drops:#?}"
        );
    }
    // The user's rule stays aimed where the user aimed it.
    let https: Vec<&String> = rules.iter().filter(|r| r.contains("443")).collect();
    assert!(
        https
            .iter()
            .all(|r| !r.contains("198.18.0.11") && !r.contains("2001:2::10"))
    );
    // The IPv6 grant opens the machine's IPv6 address only.
    let opened: Vec<(String, IpAddr)> = ruleset
        .grants
        .iter()
        .flat_map(|(set, elements)| elements.keys().map(|k| (set.clone(), k.destination)))
        .collect();
    assert_eq!(
        opened,
        vec![(
            "jit_host_allow_v6".to_owned(),
            "2001:2::10".parse().unwrap()
        )]
    );
}

#[test]
fn only_an_added_grant_counts_as_only_adding() {
    let user = rule("http", 300, Access::Allow, "Internet", "80");
    let one = |expiry: i64| {
        render(
            &policy(
                vec![user.clone(), grant("g", 100, "198.18.0.20", "22")],
                &[("g", expiry)],
            ),
            &target(),
            now(),
        )
    };
    let none = render(&policy(vec![user.clone()], &[]), &target(), now());
    let two = render(
        &policy(
            vec![
                user.clone(),
                grant("g", 100, "198.18.0.20", "22"),
                grant("h", 100, "198.18.0.21", "22"),
            ],
            &[("g", 60), ("h", 60)],
        ),
        &target(),
        now(),
    );
    assert!(only_adds_grants(&none, &one(60)));
    assert!(only_adds_grants(&one(60), &two));
    assert!(only_adds_grants(&two, &two));
    // A revoke, an extension and a new user rule all take something away or change it.
    assert!(!only_adds_grants(&two, &one(60)));
    assert!(!only_adds_grants(&one(60), &one(90)));
    let more = render(
        &policy(
            vec![user, rule("deny-ssh", 200, Access::Deny, "*", "22")],
            &[],
        ),
        &target(),
        now(),
    );
    assert!(!only_adds_grants(&none, &more));
}

#[test]
fn close_grants_mark_their_flows_and_cut_them() {
    let grants = || {
        vec![
            grant("keep", 100, "198.18.0.20", "22"),
            grant("cut", 101, "198.18.0.24/30", "22"),
        ]
    };
    let mut closing = policy(grants(), &[("keep", 60), ("cut", 30)]);
    closing.closing.insert("cut".into());
    let ruleset = render(&closing, &target(), now());
    let key = |source: &str| GrantKey {
        destination: "198.18.0.10".parse().unwrap(),
        source: source.parse().unwrap(),
        protocol: 6,
        ports: (22, 22),
    };
    // One address: the hash set; a prefix: the interval set; each of its kind.
    assert_eq!(
        ruleset.grants["jit_host_allow_v4"]
            .keys()
            .collect::<Vec<_>>(),
        [&key("198.18.0.20/32")]
    );
    assert_eq!(
        ruleset.grants["jit_close_v4"][&key("198.18.0.24/30")],
        at(30)
    );
    assert!(ruleset.grants["jit_allow_v4"].is_empty());
    assert!(ruleset.grants["jit_host_close_v4"].is_empty());
    let rules = chain(&ruleset);
    // Every grant marks its flows and records them as seen; a Close grant marks them
    // for closing too.
    let marking: Vec<&String> = rules.iter().filter(|r| r.contains("mangle")).collect();
    assert_eq!(marking.len(), 4, "{rules:#?}");
    let sets = [
        ("@jit_allow_v4", GRANT_MARK),
        ("@jit_host_allow_v4", GRANT_MARK),
        ("@jit_close_v4", GRANT_MARK | CLOSE_MARK),
        ("@jit_host_close_v4", GRANT_MARK | CLOSE_MARK),
    ];
    for (set, mark) in sets {
        assert!(
            marking.iter().any(|r| r.contains(&format!("\"{set}\""))
                && r.contains(&format!("{mark}]"))
                && r.contains("@jit_seen_v4")),
            "{set}: {marking:#?}"
        );
    }
    // A marked flow's established packets pass while a set of any kind holds them,
    // else TCP is reset and the rest dropped, all before anything else decides.
    let lo = rules.iter().position(|r| r.contains("\"lo\"")).unwrap();
    let checks = &rules[1..lo];
    assert!(checks[0].contains("related") && checks[0].contains("accept"));
    assert!(checks[1].contains("update") && checks[1].contains("@jit_seen_v4"));
    assert!(checks[2].contains(&format!("{CLOSE_MARK}]")) && checks[2].contains("accept"));
    // Only ever for a flow's later packets: a new connection is decided by the rules.
    assert!(
        checks
            .iter()
            .all(|r| r.contains("established") || r.contains("related"))
    );
    for (set, _) in sets {
        assert!(
            checks.iter().any(|r| r.contains(&format!("\"{set}\""))
                && r.contains("original")
                && r.contains("accept")),
            "{set}: {checks:#?}"
        );
    }
    assert!(!checks.iter().any(|r| r.contains("reply")), "{checks:#?}");
    assert!(checks[checks.len() - 2].contains("tcp reset"));
    assert!(checks[checks.len() - 1].contains("drop"));
    // Keep and Close grants are elements of sets that always exist: switching the kind
    // of a grant is an element update.
    let kept = render(
        &policy(grants(), &[("keep", 60), ("cut", 30)]),
        &target(),
        now(),
    );
    assert_eq!(kept.skeleton, ruleset.skeleton);
    assert!(kept.grants["jit_close_v4"].is_empty());
    assert_eq!(kept.grants["jit_allow_v4"][&key("198.18.0.24/30")], at(30));
}

#[test]
fn a_grant_of_one_address_and_one_port_is_an_exact_key_at_its_latest_expiry() {
    let ruleset = render(
        &policy(
            vec![
                grant("old", 100, "198.18.0.20", "22"),
                grant("new", 101, "198.18.0.20", "22"),
                grant("range", 102, "198.18.0.20", "2000-2001"),
            ],
            &[("old", 30), ("new", 90), ("range", 60)],
        ),
        &target(),
        now(),
    );
    let host: Vec<((u16, u16), Timestamp)> = ruleset.grants["jit_host_allow_v4"]
        .iter()
        .map(|(k, at)| (k.ports, *at))
        .collect();
    assert_eq!(host, [((22, 22), at(90))]);
    let ranged: Vec<(u16, u16)> = ruleset.grants["jit_allow_v4"]
        .keys()
        .map(|k| k.ports)
        .collect();
    assert_eq!(ranged, [(2000, 2001)]);
}

#[test]
fn a_gateway_guards_forwarded_traffic_to_each_machine_as_written() {
    let deny = |name: &str, address: &str| Rule {
        origin: Origin::SecurityRule { name: name.into() },
        jit: true,
        destination_prefixes: vec![address.parse().unwrap()],
        ..rule(name, 1000, Access::Deny, "*", "22")
    };
    let to = |rule: Rule, address: &str| Rule {
        destination_prefixes: vec![address.parse().unwrap()],
        ..rule
    };
    let model = policy(
        vec![
            deny("deny-a", "198.18.1.10"),
            deny("deny-b", "2001:2::10"),
            to(grant("g", 100, "198.18.0.20", "22"), "198.18.1.10"),
            rule("http", 300, Access::Allow, "Internet", "80"),
        ],
        &[("g", 60)],
    );
    let machines = machine_addresses(&model);
    assert_eq!(
        machines,
        [
            "198.18.1.10".parse::<IpAddr>().unwrap(),
            "2001:2::10".parse().unwrap()
        ]
    );
    let gateway = Target {
        table: "portcullis".into(),
        addresses: machines,
        mode: Mode::Gateway,
    };
    let ruleset = render(&model, &gateway, now());
    let NfListObject::Chain(chain_object) = &ruleset.skeleton[0] else {
        panic!("the chain comes first");
    };
    assert_eq!(chain_object.name, "forward");
    assert_eq!(chain_object.hook, Some(NfHook::Forward));
    let rules = chain(&ruleset);
    assert!(
        rules
            .iter()
            .all(|r| !r.contains("\"lo\"") && !r.contains("icmpv6"))
    );
    // Replies are forwarded too: a marked flow's replies are checked with the key turned.
    assert!(
        rules
            .iter()
            .any(|r| r.contains("reply") && r.contains("sport"))
    );
    // The grant opens one machine only; machine b's deny stays aimed at b alone.
    let grants: Vec<&GrantKey> = ruleset.grants.values().flat_map(|g| g.keys()).collect();
    assert_eq!(grants.len(), 1);
    assert_eq!(
        grants[0].destination,
        "198.18.1.10".parse::<IpAddr>().unwrap()
    );
    let enforced = as_enforced(&model, &gateway);
    assert_eq!(enforced, model.rules, "a gateway enforces rules as written");
}

#[test]
fn the_walk_finds_what_a_lookup_of_each_grant_finds() {
    let key = |i: u32| GrantKey {
        destination: "198.18.0.10".parse().unwrap(),
        source: std::net::IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + i)).into(),
        protocol: 6,
        ports: (22, 22),
    };
    // Every mix of gone, kept, added and re-timed grants over 32 keys, from a seed.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200 {
        let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
        for i in 0..32 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let at = |s: i64| now() + jiff::SignedDuration::from_secs(s);
            match seed >> 61 {
                0 | 1 => {}
                2 => drop(old.insert(key(i), at(30))),
                3 => drop(new.insert(key(i), at(30))),
                4 | 5 => {
                    old.insert(key(i), at(30));
                    new.insert(key(i), at(30));
                }
                _ => {
                    old.insert(key(i), at(30));
                    new.insert(key(i), at(60));
                }
            }
        }
        let gone: Vec<&GrantKey> = old
            .iter()
            .filter(|(k, e)| new.get(*k) != Some(*e))
            .map(|(k, _)| k)
            .collect();
        let added: Vec<(&GrantKey, &Timestamp)> = new
            .iter()
            .filter(|(k, e)| old.get(*k) != Some(*e))
            .collect();
        assert_eq!(changed(&old, &new), (gone, added), "seed {seed:#x}");
    }
}

/// Every grant of an NSG reaches every agent on it, but one for another machine changes
/// nothing this machine's agent applies: no `nft` run, the same hash, so no report write.
#[test]
fn a_grant_for_another_machine_changes_nothing_here() {
    let aimed = |rule: Rule, at: &str| Rule {
        destination_prefixes: vec![at.parse().unwrap()],
        ..rule
    };
    let deny = |machine: &str| {
        aimed(
            Rule {
                jit: true,
                origin: Origin::SecurityRule {
                    name: format!("deny-{machine}"),
                },
                ..rule("deny", 150, Access::Deny, "*", "22")
            },
            machine,
        )
    };
    let mine = aimed(grant("mine", 100, "198.19.0.1", "22"), "198.18.0.10");
    let base = vec![deny("198.18.0.10"), deny("198.18.0.11"), mine];
    let other = aimed(grant("other", 101, "198.19.0.2", "22"), "198.18.0.11");
    let before = render(&policy(base.clone(), &[("mine", 60)]), &target(), now());
    let after = render(
        &policy([base, vec![other]].concat(), &[("mine", 60), ("other", 60)]),
        &target(),
        now(),
    );
    assert!(
        before == after,
        "a grant for 198.18.0.11 changed 198.18.0.10's ruleset"
    );
    assert_eq!(before.hash(), after.hash());
}
