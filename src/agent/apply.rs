//! Puts a [`Ruleset`] into the kernel through `nft -j -f -` (the `nftables` crate's JSON
//! schema: every value travels as JSON data, never as a command line built from strings).
//!
//! Two kinds of update, both one nft transaction, so the kernel only ever sees the old or
//! the new state:
//! - a full replace: `add table; delete table; add table, sets, chain, rules, elements`.
//!   The leading `add` makes the `delete` valid whether or not the table exists; nothing
//!   else on the host is touched, and there is no instant without the table.
//! - a grant update, when only grant elements differ: elements that went away are deleted,
//!   new ones added with their timeouts. Each deletion is preceded by an `add` of the same
//!   element, which is a no-op when it exists and otherwise lets the `delete` succeed: an
//!   element the kernel already expired must not fail the transaction.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use nftables::batch::Batch;
use nftables::expr::{Elem, Expression, NamedExpression};
use nftables::schema::{Element, NfListObject, Nftables, Table};
use nftables::types::NfFamily;
use tokio::io::AsyncWriteExt;

use super::Error;
use super::render::{GrantKey, Ruleset, changed};

/// Where `ip netns add` puts the named network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// How `nft` is run: on this host, or inside a named network namespace (the child enters
/// it before it starts `nft`), which lets tests and operators enforce for a namespace from
/// an agent that stays in the host's namespace (where the API server is reachable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nft {
    netns: Option<String>,
}

impl Nft {
    /// `nft` in the agent's own network namespace.
    pub fn host() -> Self {
        Self::default()
    }

    /// `nft` inside the network namespace `name` (as listed by `ip netns list`).
    pub fn in_netns(name: &str) -> Result<Self, Error> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && name != "."
            && name != "..";
        if !valid {
            return Err(Error::Netns(name.to_owned()));
        }
        Ok(Self {
            netns: Some(name.to_owned()),
        })
    }

    /// Runs one transaction: the batch as JSON on the standard input of `nft -j -f -`.
    pub async fn run(&self, batch: &Nftables<'_>) -> Result<(), Error> {
        let json = serde_json::to_vec(batch)
            .map_err(|e| Error::Nft(format!("cannot encode the transaction: {e}")))?;
        let mut child = self
            .command("nft")
            .map_err(Error::Nft)?
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Nft(format!("cannot run `nft -j -f -`: {e}")))?;
        let mut stdin = child.stdin.take().expect("a piped standard input");
        let written = stdin.write_all(&json).await;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::Nft(format!("`nft -j -f -` did not finish: {e}")))?;
        if !out.status.success() {
            return Err(Error::Nft(format!(
                "`nft -j -f -` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        written.map_err(|e| Error::Nft(format!("cannot write to `nft -j -f -`: {e}")))
    }

    /// A command for `program` where `nft` runs. In a network namespace, the child enters
    /// it (`setns`) just before it starts `program`: one process per transaction, where
    /// `ip netns exec` added a second one and a mount namespace (a few ms on every grant).
    fn command(&self, program: &str) -> Result<tokio::process::Command, String> {
        let mut command = tokio::process::Command::new(program);
        if let Some(netns) = &self.netns {
            let path = std::path::Path::new(NETNS_DIR).join(netns);
            let namespace: OwnedFd = std::fs::File::open(&path)
                .map_err(|e| format!("cannot open network namespace {}: {e}", path.display()))?
                .into();
            // SAFETY: the closure runs in the child between fork and exec, where only
            // async-signal-safe calls are allowed; it makes one system call (setns) on a
            // descriptor it owns, and allocates nothing.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Ok(command)
    }

    /// `nft -j list set inet TABLE SET`: the set with its elements, as nft's JSON.
    pub async fn list_set(&self, table: &str, set: &str) -> Result<String, Error> {
        self.output("nft", &["-j", "list", "set", "inet", table, set])
            .await
            .map_err(Error::Nft)
    }

    /// Runs `program` with `args` where `nft` runs (this host, or the network namespace), and
    /// returns what it printed; an error names the command and what it said.
    pub async fn output(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let shown = || format!("`{program} {}`", args.join(" "));
        let out = self
            .command(program)?
            .args(args)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", shown()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                shown(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn table(name: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: name.to_owned().into(),
        handle: None,
    }
}

/// Seconds until `expires`, rounded up (a grant may outlive its `expiresAt` in the kernel by
/// less than a second, never end early), and at least one.
fn timeout(expires: Timestamp, now: Timestamp) -> u32 {
    let millis = expires.duration_since(now).as_millis().max(1);
    u32::try_from((millis + 999) / 1000).unwrap_or(u32::MAX)
}

fn element(key: &GrantKey, timeout: Option<u32>) -> Expression<'static> {
    let address = |ip: std::net::IpAddr| Expression::String(ip.to_string().into());
    let source = if key.source.prefix_len() == key.source.max_prefix_len() {
        address(key.source.addr())
    } else {
        Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
            addr: Box::new(address(key.source.network())),
            len: u32::from(key.source.prefix_len()),
        }))
    };
    let (start, end) = key.ports;
    let ports = if start == end {
        Expression::Number(u32::from(start))
    } else {
        Expression::Range(Box::new(nftables::expr::Range {
            range: [
                Expression::Number(u32::from(start)),
                Expression::Number(u32::from(end)),
            ],
        }))
    };
    let value = Expression::Named(NamedExpression::Concat(vec![
        address(key.destination),
        source,
        Expression::Number(u32::from(key.protocol)),
        ports,
    ]));
    match timeout {
        None => value,
        Some(seconds) => Expression::Named(NamedExpression::Elem(Elem {
            val: Box::new(value),
            timeout: Some(seconds),
            ..Elem::default()
        })),
    }
}

fn elements(table: &str, set: &str, items: Vec<Expression<'static>>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::INet,
        table: table.to_owned().into(),
        name: set.to_owned().into(),
        elem: items.into(),
    })
}

/// The transaction that replaces the table with `ruleset`, timeouts counted from `now`.
pub fn full(ruleset: &Ruleset, now: Timestamp) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table(&ruleset.table)));
    batch.delete(NfListObject::Table(table(&ruleset.table)));
    batch.add(NfListObject::Table(table(&ruleset.table)));
    for object in &ruleset.skeleton {
        batch.add(object.clone());
    }
    for (set, grants) in &ruleset.grants {
        let live: Vec<Expression<'static>> = grants
            .iter()
            .filter(|(_, expires)| **expires > now)
            .map(|(key, expires)| element(key, Some(timeout(*expires, now))))
            .collect();
        if !live.is_empty() {
            batch.add(elements(&ruleset.table, set, live));
        }
    }
    batch.to_nftables()
}

/// The element-only transaction from `applied` to `desired`, or `None` when more than
/// grants differ (then only [`full`] is correct). An empty transaction means no change.
pub fn grant_update(
    applied: &Ruleset,
    desired: &Ruleset,
    now: Timestamp,
) -> Option<Nftables<'static>> {
    if applied.table != desired.table
        || applied.skeleton != desired.skeleton
        || applied.grants.keys().ne(desired.grants.keys())
    {
        return None;
    }
    let empty = BTreeMap::new();
    let mut batch = Batch::new();
    let mut additions = Vec::new();
    for (set, old) in &applied.grants {
        let new = desired.grants.get(set).unwrap_or(&empty);
        let (gone, added) = changed(old, new);
        if !gone.is_empty() {
            let items = || {
                gone.iter()
                    .map(|key| element(key, None))
                    .collect::<Vec<_>>()
            };
            batch.add(elements(&desired.table, set, items()));
            batch.delete(elements(&desired.table, set, items()));
        }
        let added: Vec<Expression<'static>> = added
            .into_iter()
            .filter(|(_, expires)| **expires > now)
            .map(|(key, expires)| element(key, Some(timeout(*expires, now))))
            .collect();
        if !added.is_empty() {
            additions.push(elements(&desired.table, set, added));
        }
    }
    // Deletions first: an element replaced by one with another expiry has the same key.
    for addition in additions {
        batch.add(addition);
    }
    Some(batch.to_nftables())
}

/// The transaction that removes the agent's table, and only it (`--cleanup`); it succeeds
/// whether or not the table exists.
pub fn cleanup(table_name: &str) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table(table_name)));
    batch.delete(NfListObject::Table(table(table_name)));
    batch.to_nftables()
}

/// What [`Enforcer::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The kernel already held the desired state.
    Unchanged,
    /// Grant elements were added or removed.
    Grants,
    /// The table was replaced.
    Full,
}

/// Keeps the last ruleset the kernel accepted, to choose between a grant update and a
/// full replace. When the API server is gone nothing calls it, and the kernel keeps the
/// last state (grants still expire there).
#[derive(Debug)]
pub struct Enforcer {
    nft: Nft,
    applied: Option<Ruleset>,
}

impl Enforcer {
    /// An enforcer that has applied nothing yet: its first apply replaces the table, which
    /// is how a restarted agent converges without ever removing the old table first.
    pub fn new(nft: Nft) -> Self {
        Self { nft, applied: None }
    }

    /// The ruleset in force, if this enforcer applied one.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Brings the kernel to `desired`: a grant update when only grants changed (falling
    /// back to a full replace should it fail), a full replace otherwise.
    pub async fn apply(&mut self, desired: Ruleset, now: Timestamp) -> Result<Applied, Error> {
        let update = self
            .applied
            .as_ref()
            .and_then(|applied| grant_update(applied, &desired, now).map(|u| (applied, u)));
        let applied = match update {
            // Nothing to change in the kernel (at most grants already expired, which
            // the kernel dropped by itself).
            Some((_, update)) if update.objects.is_empty() => Applied::Unchanged,
            Some((_, update)) => match self.nft.run(&update).await {
                Ok(()) => Applied::Grants,
                Err(error) => {
                    tracing::warn!(%error, "grant update refused; replacing the table");
                    self.nft.run(&full(&desired, now)).await?;
                    Applied::Full
                }
            },
            None => {
                self.nft.run(&full(&desired, now)).await?;
                Applied::Full
            }
        };
        self.applied = Some(desired);
        Ok(applied)
    }

    /// Makes the next [`Enforcer::apply`] a full replace, whatever it was going to be: the
    /// agent re-asserts its table now and then, so an out-of-band `nft flush ruleset` or a
    /// hand edit does not outlive the next resync.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    /// Removes the table (`--cleanup`).
    pub async fn cleanup(&mut self, table_name: &str) -> Result<(), Error> {
        self.nft.run(&cleanup(table_name)).await?;
        self.applied = None;
        Ok(())
    }

    /// Applies `desired` and says how long it took: what the benchmarks measure (render +
    /// apply of N rules, one grant on top of N active grants).
    pub async fn timed_apply(
        &mut self,
        desired: Ruleset,
        now: Timestamp,
    ) -> Result<(Applied, Duration), Error> {
        let started = Instant::now();
        let applied = self.apply(desired, now).await?;
        Ok((applied, started.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::render::{Mode, Policy, Target, render};
    use crate::rules::{
        Access, AddressPrefix, Direction, Origin, PortRange, Protocol, Rule, Scope, effective,
    };

    fn now() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    #[tokio::test]
    async fn a_missing_network_namespace_fails_before_anything_runs() {
        // Not found as a namespace: nothing is started (neither in the agent's own
        // namespace, which would apply the table to the wrong machine).
        let nft = Nft::in_netns("pc-no-such-namespace").unwrap();
        let error = nft.run(&cleanup("portcullis")).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains("cannot open network namespace /run/netns/pc-no-such-namespace"),
            "{error}"
        );
        let error = nft.output("nft", &["list", "tables"]).await.unwrap_err();
        assert!(error.contains("pc-no-such-namespace"), "{error}");
    }

    fn ruleset(grants: &[(&str, &str, i64)]) -> Ruleset {
        let rules = grants
            .iter()
            .map(|(name, source, _)| Rule {
                name: (*name).into(),
                priority: 100,
                direction: Direction::Inbound,
                access: Access::Allow,
                protocol: Protocol::Tcp,
                source_prefixes: vec![source.parse().unwrap()],
                source_ports: vec![PortRange::Any],
                destination_prefixes: vec![AddressPrefix::Any],
                destination_ports: vec![PortRange::single(22)],
                origin: Origin::SecurityRule {
                    name: (*name).into(),
                },
                jit: true,
            })
            .collect::<Vec<_>>();
        let policy = Policy {
            rules: effective(rules),
            scope: Scope::default(),
            expiries: grants
                .iter()
                .map(|(name, _, s)| {
                    (
                        (*name).to_owned(),
                        now() + jiff::SignedDuration::from_secs(*s),
                    )
                })
                .collect(),
            closing: Default::default(),
            idle: Default::default(),
        };
        let target = Target {
            table: "portcullis".into(),
            addresses: vec!["198.18.0.10".parse().unwrap()],
            mode: Mode::Host,
        };
        render(&policy, &target, now())
    }

    fn commands(batch: &Nftables) -> Vec<String> {
        serde_json::to_value(batch).unwrap()["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let (verb, object) = c.as_object().unwrap().iter().next().unwrap();
                let kind = object.as_object().unwrap().keys().next().unwrap();
                format!("{verb} {kind}")
            })
            .collect()
    }

    #[test]
    fn timeouts_round_up_to_the_second() {
        let ms = |n| now() + jiff::SignedDuration::from_millis(n);
        assert_eq!(timeout(ms(1), now()), 1);
        assert_eq!(timeout(ms(1000), now()), 1);
        assert_eq!(timeout(ms(1001), now()), 2);
        assert_eq!(timeout(ms(-5), now()), 1);
    }

    #[test]
    fn a_full_replace_swaps_the_table_in_one_transaction() {
        let batch = full(&ruleset(&[("a", "198.18.0.20", 30)]), now());
        let commands = commands(&batch);
        assert_eq!(commands[..3], ["add table", "delete table", "add table"]);
        assert_eq!(commands.last().unwrap(), "add element");
        let json = serde_json::to_string(&batch).unwrap();
        assert!(json.contains("\"timeout\":30"), "{json}");
    }

    #[test]
    fn grant_changes_are_element_updates_with_safe_deletes() {
        let before = ruleset(&[("a", "198.18.0.20", 30), ("b", "198.18.0.21", 30)]);
        let after = ruleset(&[("a", "198.18.0.20", 30), ("c", "198.18.0.22", 60)]);
        let update = grant_update(&before, &after, now()).expect("only grants changed");
        assert_eq!(
            commands(&update),
            ["add element", "delete element", "add element"]
        );
        let json = serde_json::to_string(&update).unwrap();
        assert!(json.contains("198.18.0.21") && json.contains("198.18.0.22"));
        assert!(!json.contains("198.18.0.20"), "{json}");
        let same = grant_update(&after, &after, now()).unwrap();
        assert!(commands(&same).is_empty());
    }

    #[test]
    fn cleanup_touches_only_the_named_table() {
        let json = serde_json::to_value(cleanup("portcullis")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"nftables": [
                {"add": {"table": {"family": "inet", "name": "portcullis"}}},
                {"delete": {"table": {"family": "inet", "name": "portcullis"}}},
            ]})
        );
    }

    #[test]
    fn netns_names_are_checked() {
        assert!(Nft::in_netns("pcvm123x0").is_ok());
        for bad in ["", "..", "a/b", "a b", "-"] {
            let ok = Nft::in_netns(bad).is_ok();
            assert_eq!(ok, bad == "-", "{bad:?}");
        }
    }
}
