//! The ruleset the agent enforces, kept on disk (`--state-dir`) so that a restart puts it
//! back before the agent talks to anyone.
//!
//! nftables tables do not survive a reboot, and an agent that waited for the apiserver
//! would leave every protected port open until it answered (indefinitely, if it is down).
//! So the ruleset is written *before* any change that closes something reaches the kernel (a
//! crash in between restores the newer state, never an older one that a revocation had
//! already shrunk), and just after a change that only adds a grant (an older file restores
//! less access, never more), and read back at start. Grants keep their absolute expiry: those that ended while the agent
//! was down are dropped, the others get the time they have left.
//!
//! The file is replaced atomically (written beside, synced, renamed, directory synced): a
//! crash leaves the old or the new file, never half of one. One file per table.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use jiff::Timestamp;
use nftables::schema::NfListObject;
use serde::{Deserialize, Serialize};

use super::Error;
use super::render::{GrantKey, Ruleset};

/// The default `--state-dir`.
pub const DEFAULT_DIR: &str = "/var/lib/portcullis";
/// Bumped when the file's shape changes; a file of another version is not restored.
const VERSION: u32 = 1;

/// The ruleset as stored: grant elements as a list (JSON maps need string keys).
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    table: String,
    skeleton: Vec<NfListObject<'static>>,
    /// Every grant set, also those with no element left.
    grant_sets: Vec<String>,
    grants: Vec<StoredGrant>,
}

#[derive(Serialize, Deserialize)]
struct StoredGrant {
    set: String,
    destination: IpAddr,
    source: IpNet,
    protocol: u8,
    ports: (u16, u16),
    expires: Timestamp,
}

/// Where one table's ruleset is kept.
#[derive(Clone, Debug)]
pub struct State {
    path: PathBuf,
}

impl State {
    /// The state of table `table` under `dir`.
    pub fn new(dir: &Path, table: &str) -> Self {
        Self {
            path: dir.join(format!("{table}.json")),
        }
    }

    /// The file it lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores `ruleset`, replacing what was there in one rename.
    pub fn save(&self, ruleset: &Ruleset) -> Result<(), Error> {
        let stored = Stored {
            version: VERSION,
            table: ruleset.table.clone(),
            skeleton: ruleset.skeleton.clone(),
            grant_sets: ruleset.grants.keys().cloned().collect(),
            grants: ruleset
                .grants
                .iter()
                .flat_map(|(set, elements)| {
                    elements.iter().map(move |(key, expires)| StoredGrant {
                        set: set.clone(),
                        destination: key.destination,
                        source: key.source,
                        protocol: key.protocol,
                        ports: key.ports,
                        expires: *expires,
                    })
                })
                .collect(),
        };
        let io = |what: &str, e: std::io::Error| {
            Error::State(format!("{what} {}: {e}", self.path.display()))
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
        let mut file =
            tempfile::NamedTempFile::new_in(dir).map_err(|e| io("create a file beside", e))?;
        serde_json::to_writer(&mut file, &stored)
            .map_err(|e| Error::State(format!("encode the ruleset: {e}")))?;
        file.flush().map_err(|e| io("write", e))?;
        file.as_file().sync_all().map_err(|e| io("sync", e))?;
        file.persist(&self.path)
            .map_err(|e| io("replace", e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the directory of", e))?;
        Ok(())
    }

    /// The stored ruleset with the grants that ended before `now` left out; `None` when
    /// nothing was stored (a first start).
    pub fn load(&self, now: Timestamp) -> Result<Option<Ruleset>, Error> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::State(format!("read {}: {e}", self.path.display())));
            }
        };
        let stored: Stored = serde_json::from_slice(&text)
            .map_err(|e| Error::State(format!("decode {}: {e}", self.path.display())))?;
        if stored.version != VERSION {
            return Err(Error::State(format!(
                "{} has version {}, this agent reads {VERSION}",
                self.path.display(),
                stored.version
            )));
        }
        let mut grants: BTreeMap<String, BTreeMap<GrantKey, Timestamp>> = stored
            .grant_sets
            .into_iter()
            .map(|set| (set, BTreeMap::new()))
            .collect();
        for grant in stored.grants.into_iter().filter(|g| g.expires > now) {
            grants.entry(grant.set).or_default().insert(
                GrantKey {
                    destination: grant.destination,
                    source: grant.source,
                    protocol: grant.protocol,
                    ports: grant.ports,
                },
                grant.expires,
            );
        }
        Ok(Some(Ruleset {
            table: stored.table,
            skeleton: stored.skeleton,
            grants,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_900_000_000 + seconds).unwrap()
    }

    fn key(source: &str) -> GrantKey {
        GrantKey {
            destination: "198.18.0.10".parse().unwrap(),
            source: source.parse().unwrap(),
            protocol: 6,
            ports: (22, 22),
        }
    }

    fn ruleset() -> Ruleset {
        let skeleton: Vec<NfListObject<'static>> =
            vec![NfListObject::Table(nftables::schema::Table {
                family: nftables::types::NfFamily::INet,
                name: "portcullis".into(),
                handle: None,
            })];
        Ruleset {
            table: "portcullis".into(),
            skeleton,
            grants: BTreeMap::from([
                (
                    "grants_0_v4".to_owned(),
                    BTreeMap::from([
                        (key("198.18.0.20/32"), at(60)),
                        (key("198.18.0.21/32"), at(5)),
                    ]),
                ),
                ("grants_0_v6".to_owned(), BTreeMap::new()),
            ]),
        }
    }

    #[test]
    fn a_stored_ruleset_comes_back_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path(), "portcullis");
        assert!(state.load(at(0)).unwrap().is_none(), "nothing stored yet");
        state.save(&ruleset()).unwrap();
        assert_eq!(state.load(at(0)).unwrap(), Some(ruleset()));
        // Saving again replaces the file; nothing is left beside it.
        state.save(&ruleset()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn grants_that_ended_while_stopped_are_dropped_and_their_set_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path(), "portcullis");
        state.save(&ruleset()).unwrap();
        let later = state.load(at(5)).unwrap().unwrap();
        let v4 = &later.grants["grants_0_v4"];
        assert_eq!(v4.keys().collect::<Vec<_>>(), vec![&key("198.18.0.20/32")]);
        assert_eq!(v4[&key("198.18.0.20/32")], at(60), "absolute expiry kept");
        let all_gone = state.load(at(60)).unwrap().unwrap();
        assert!(all_gone.grants.values().all(BTreeMap::is_empty));
        assert_eq!(all_gone.skeleton, ruleset().skeleton);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_ruleset() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path(), "portcullis");
        std::fs::write(state.path(), b"{\"version\": 1, \"tab").unwrap();
        assert!(state.load(at(0)).is_err());
        std::fs::write(
            state.path(),
            br#"{"version":99,"table":"t","skeleton":[],"grant_sets":[],"grants":[]}"#,
        )
        .unwrap();
        assert!(state.load(at(0)).is_err());
    }
}
