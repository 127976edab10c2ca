//! `request` and `extend`: build a JitRequest from a policy's defaults, create it as the
//! user, and with `--wait` follow it to an answer.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::PostParams;
use serde_json::json;

use super::{Error, Outcome, Session, output, source};
use crate::access::validate::policy_ports;
use crate::api::jit_policy::PolicyVirtualMachine;
use crate::api::jit_request::Phase;
use crate::api::{JitPolicy, JitRequest};

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The JitPolicy to request under.
    pub policy: String,
    /// What to open: MACHINE (all of its ports in the policy) or MACHINE:PORT, repeatable.
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// How long (ISO 8601: PT1H, PT30M); default: each port's maximum in the policy.
    #[arg(long)]
    pub duration: Option<String>,
    /// Where from: `auto` (the address the machine would see from here) or an IP or CIDR.
    #[arg(long, default_value = "auto")]
    pub source: String,
    /// Why access is needed.
    #[arg(long)]
    pub justification: Option<String>,
    /// When access should begin (RFC 3339); default: at once.
    #[arg(long)]
    pub start: Option<String>,
    /// Follow the request until it is granted, denied, or waits for approval or its start.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` follows a request still pending for other reasons.
    #[arg(long, default_value = "120s", value_parser = humantime_secs)]
    pub timeout: Duration,
}

/// `120s`, `2m`, `1h`: a short duration for the command line.
fn humantime_secs(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text}"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return Err(format!("not a duration: {text} (use s, m or h)")),
    };
    Ok(Duration::from_secs(seconds))
}

/// One requested port, resolved against the policy.
struct Asked {
    machine: String,
    address: IpAddr,
    number: u16,
    protocol: String,
    duration: String,
    source: String,
}

pub async fn request(session: &Session, args: RequestArgs) -> Result<Outcome, Error> {
    let policy = session
        .api::<JitPolicy>()
        .get_opt(&args.policy)
        .await?
        .ok_or_else(|| {
            Error::Usage(format!(
                "jitpolicy {:?} not found in namespace {}",
                args.policy, session.namespace
            ))
        })?;
    let asked = resolve(&policy, &args)?;
    let mut machines: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    for port in &asked {
        machines.entry(&port.machine).or_default().push(json!({
            "number": port.number,
            "protocol": port.protocol,
            "duration": port.duration,
            "allowedSourceAddressPrefix": port.source,
        }));
    }
    let machines: Vec<serde_json::Value> = machines
        .into_iter()
        .map(|(name, ports)| json!({"name": name, "ports": ports}))
        .collect();
    let mut spec = json!({
        "policyName": args.policy,
        "virtualMachines": machines,
    });
    if let Some(justification) = &args.justification {
        spec["justification"] = json!(justification);
    }
    if let Some(start) = &args.start {
        let start: Timestamp = start
            .parse()
            .map_err(|e| Error::Usage(format!("--start {start:?}: {e}")))?;
        spec["startTime"] = json!(start.to_string());
    }
    let name = create(session, &format!("{}-", args.policy), spec).await?;
    let summary: Vec<String> = asked
        .iter()
        .map(|p| {
            format!(
                "{}/{} on {} from {} for {}",
                p.number, p.protocol, p.machine, p.source, p.duration
            )
        })
        .collect();
    if session.format.is_none() {
        println!(
            "jitrequest/{name} created: {} (policy {})",
            summary.join(", "),
            args.policy
        );
    }
    if !args.wait {
        if let Some(format) = session.format {
            let created = session.api::<JitRequest>().get(&name).await?;
            output::print(&created, format).map_err(Error::Output)?;
        }
        return Ok(Outcome::Done);
    }
    let hints: Vec<(String, IpAddr, u16)> = asked
        .iter()
        .map(|p| (p.machine.clone(), p.address, p.number))
        .collect();
    follow(session, &name, &hints, args.timeout).await
}

/// The ports `args` asks for, with the policy's defaults filled in and the source resolved.
fn resolve(policy: &JitPolicy, args: &RequestArgs) -> Result<Vec<Asked>, Error> {
    let mut asked = Vec::new();
    for target in &args.targets {
        let (machine, port) = match target.split_once(':') {
            Some((machine, port)) => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| Error::Usage(format!("{target}: the port must be a number")))?;
                (machine, Some(port))
            }
            None => (target.as_str(), None),
        };
        let vm = machine_of(policy, machine)?;
        let address: IpAddr = vm.address.parse().map_err(|_| {
            Error::Usage(format!(
                "machine {machine}: address {:?} is not an IP",
                vm.address
            ))
        })?;
        let source = if args.source == "auto" {
            source::auto(address)
                .map_err(|e| Error::Usage(format!("--source auto: no route to {address}: {e}")))?
                .to_string()
        } else {
            args.source.clone()
        };
        let ports = policy_ports(vm);
        let chosen: Vec<_> = match port {
            Some(number) => {
                let found: Vec<_> = ports.iter().filter(|p| p.number == number).collect();
                if found.is_empty() {
                    // Asked anyway: the operator denies it with the policy's ports listed.
                    asked.push(Asked {
                        machine: machine.to_owned(),
                        address,
                        number,
                        protocol: "TCP".to_owned(),
                        duration: args.duration.clone().unwrap_or_else(|| "PT1H".to_owned()),
                        source: source.clone(),
                    });
                    continue;
                }
                found
            }
            None => ports.iter().collect(),
        };
        for port in chosen {
            let protocol = serde_json::to_value(port.protocol)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "TCP".to_owned());
            asked.push(Asked {
                machine: machine.to_owned(),
                address,
                number: port.number,
                protocol,
                duration: args
                    .duration
                    .clone()
                    .unwrap_or_else(|| port.max_duration.clone()),
                source: source.clone(),
            });
        }
    }
    Ok(asked)
}

pub(super) fn machine_of<'a>(
    policy: &'a JitPolicy,
    machine: &str,
) -> Result<&'a PolicyVirtualMachine, Error> {
    policy
        .spec
        .virtual_machines
        .iter()
        .find(|m| m.name == machine)
        .ok_or_else(|| {
            let known: Vec<&str> = policy
                .spec
                .virtual_machines
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            Error::Usage(format!(
                "machine {machine:?} is not in policy {} (machines: {})",
                policy.metadata.name.as_deref().unwrap_or_default(),
                known.join(", ")
            ))
        })
}

/// Creates a JitRequest with `spec` and a generated name starting with `prefix`; returns
/// the name.
async fn create(session: &Session, prefix: &str, spec: serde_json::Value) -> Result<String, Error> {
    let request: JitRequest = serde_json::from_value(json!({
        "apiVersion": "jit.portcullis.dev/v1alpha1",
        "kind": "JitRequest",
        "metadata": {"generateName": prefix},
        "spec": spec,
    }))
    .map_err(|e| Error::Usage(format!("request: {e}")))?;
    let created = session
        .api::<JitRequest>()
        .create(&PostParams::default(), &request)
        .await?;
    Ok(created.metadata.name.unwrap_or_default())
}

/// `extend NAME`: the same ports and sources for `duration` more, as a newer request, which
/// supersedes the older one once granted (no gap).
pub async fn extend(
    session: &Session,
    name: &str,
    duration: &str,
    wait: bool,
) -> Result<Outcome, Error> {
    let older = session.api::<JitRequest>().get(name).await?;
    let mut spec = serde_json::to_value(&older.spec).map_err(|e| Error::Output(e.to_string()))?;
    if let Some(spec) = spec.as_object_mut() {
        spec.remove("requestor");
        spec.remove("startTime");
    }
    for machine in spec["virtualMachines"].as_array_mut().into_iter().flatten() {
        for port in machine["ports"].as_array_mut().into_iter().flatten() {
            port["duration"] = json!(duration);
        }
    }
    let justification = older
        .spec
        .justification
        .as_deref()
        .unwrap_or("no justification");
    spec["justification"] = json!(format!("extends {name}: {justification}"));
    let newer = create(session, &format!("{name}-"), spec).await?;
    println!("jitrequest/{newer} created: extends jitrequest/{name} by {duration}");
    if wait {
        follow(session, &newer, &[], Duration::from_secs(120)).await
    } else {
        Ok(Outcome::Done)
    }
}

/// Follows request `name` until it is granted, denied, waits on people or time, ends, or
/// `timeout` passes; a progress line on a terminal, one line per change when piped.
pub async fn follow(
    session: &Session,
    name: &str,
    hints: &[(String, IpAddr, u16)],
    timeout: Duration,
) -> Result<Outcome, Error> {
    let requests = session.api::<JitRequest>();
    let terminal = std::io::stderr().is_terminal();
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let request = requests.get(name).await?;
        let status = request.status.clone().unwrap_or_default();
        let reason = status.reason.clone().unwrap_or_default();
        let state = match status.phase {
            Some(phase) => format!("{phase:?} ({reason})"),
            None => "submitted".to_owned(),
        };
        if state != last {
            if terminal {
                eprint!("\r\x1b[2Kjitrequest/{name}: {state}");
                let _ = std::io::stderr().flush();
            } else if session.format.is_none() {
                println!("jitrequest/{name}: {state}");
            }
            last = state;
        }
        let outcome = match (status.phase, reason.as_str()) {
            (Some(Phase::Granted), _) => Some(Outcome::Done),
            (Some(Phase::Denied), _) => Some(Outcome::Refused),
            (Some(Phase::Pending), "AwaitingApproval" | "Scheduled") => Some(Outcome::Waiting),
            (Some(Phase::Expired | Phase::Revoked), _) => Some(Outcome::Ended),
            _ => None,
        };
        let outcome = match outcome {
            Some(outcome) => outcome,
            None if Instant::now() > deadline => Outcome::TimedOut,
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if terminal {
            eprintln!();
        }
        match session.format {
            Some(format) => output::print(&request, format).map_err(Error::Output)?,
            None => report(&request, outcome, hints),
        }
        return Ok(outcome);
    }
}

/// What the user reads once the request has an answer.
fn report(request: &JitRequest, outcome: Outcome, hints: &[(String, IpAddr, u16)]) {
    let status = request.status.clone().unwrap_or_default();
    match outcome {
        Outcome::Done => {
            let until = status
                .expires_at
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            println!("granted until {until}");
            for (machine, address, port) in hints {
                match port {
                    22 => println!("  {machine}: ssh {address}"),
                    3389 => println!("  {machine}: mstsc /v:{address}"),
                    _ => println!("  {machine}: {address} port {port}"),
                }
            }
        }
        Outcome::Refused => {
            println!("denied:");
            for violation in &status.violations {
                println!("  - {violation}");
            }
        }
        Outcome::Waiting => {
            let message = status
                .conditions
                .first()
                .map(|c| c.message.clone())
                .unwrap_or_default();
            println!("waiting: {message}");
        }
        Outcome::Ended => println!(
            "ended: {:?} ({})",
            status.phase,
            status.reason.unwrap_or_default()
        ),
        Outcome::TimedOut => println!(
            "still pending ({}); follow it with: kubectl jit status {}",
            status.reason.unwrap_or_default(),
            request.metadata.name.as_deref().unwrap_or_default()
        ),
    }
}
