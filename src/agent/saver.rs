//! The [`State`] writes, off the enforcement loop.
//!
//! A store is a synced write, a rename and a directory sync: 5 to 10 ms on a busy machine.
//! Done in the loop, every grant that arrived meanwhile waited for the disk. A change that
//! only adds grants need not wait (an older file restores less access, never more), so its
//! store goes to a task of its own; a change that closes anything still waits for its store
//! before it reaches the kernel ([`Saver::save_now`]).
//!
//! Stores happen in order and the newest wins: a store still waiting when a newer one is
//! asked for is dropped, since the newer one is what the file must hold.

use std::sync::Arc;

use tokio::sync::watch;

use super::render::Ruleset;
use super::state::State;

/// A store asked for: its sequence number and the ruleset.
type Wanted = Option<(u64, Arc<Ruleset>)>;

/// Stores rulesets in a task of its own; see the module doc.
pub struct Saver {
    wanted: watch::Sender<Wanted>,
    /// The sequence number of the last store done.
    done: watch::Receiver<u64>,
    /// Why the last store done failed, if it did.
    failure: watch::Receiver<Option<String>>,
    /// The sequence number of the last store asked for.
    asked: u64,
}

impl Saver {
    /// Starts the task that stores into `state`; it ends when the saver is dropped.
    pub fn new(state: State) -> Self {
        let (wanted, mut next) = watch::channel::<Wanted>(None);
        let (done_tx, done) = watch::channel(0);
        let (failure_tx, failure) = watch::channel(None);
        tokio::spawn(async move {
            while next.changed().await.is_ok() {
                let Some((seq, ruleset)) = next.borrow_and_update().clone() else {
                    continue;
                };
                let state = state.clone();
                let failed = match tokio::task::spawn_blocking(move || state.save(&ruleset)).await {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(error.to_string()),
                    Err(error) => Some(format!("the store did not finish: {error}")),
                };
                if let Some(error) = &failed {
                    tracing::warn!(%error, "ruleset enforced but not stored; a restart would not restore it");
                }
                // The failure first: whoever sees `done` reads the failure of that store.
                failure_tx.send_if_modified(|last| {
                    let changed = *last != failed;
                    *last = failed;
                    changed
                });
                if done_tx.send(seq).is_err() {
                    break;
                }
            }
        });
        Self {
            wanted,
            done,
            failure,
            asked: 0,
        }
    }

    /// Asks for `ruleset` to be stored, and returns at once.
    pub fn save_later(&mut self, ruleset: Ruleset) {
        self.asked += 1;
        self.wanted
            .send_replace(Some((self.asked, Arc::new(ruleset))));
    }

    /// Stores `ruleset` and waits until it (or a newer one) is stored; its error if the
    /// store failed.
    pub async fn save_now(&mut self, ruleset: Ruleset) -> Result<(), String> {
        self.save_later(ruleset);
        self.settled().await
    }

    /// Waits until the last store asked for is done; its error if it failed.
    pub async fn settled(&mut self) -> Result<(), String> {
        let asked = self.asked;
        if self.done.wait_for(|seq| *seq >= asked).await.is_err() {
            return Err("the store task is gone".to_owned());
        }
        self.failure().map_or(Ok(()), Err)
    }

    /// Why the last store done failed: the ruleset in force may not be on disk.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Resolves when [`Saver::failure`] changes (a store failed, or one succeeded after a
    /// failure), so that the report says so without waiting for another change.
    pub async fn failure_changed(&mut self) {
        if self.failure.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use jiff::Timestamp;

    use super::*;
    use crate::agent::render::GrantKey;

    fn ruleset(sources: &[&str]) -> Ruleset {
        let expires = Timestamp::from_second(4_000_000_000).unwrap();
        Ruleset {
            table: "portcullis".into(),
            skeleton: Vec::new(),
            grants: BTreeMap::from([(
                "jit_host_allow_v4".to_owned(),
                sources
                    .iter()
                    .map(|source| {
                        let key = GrantKey {
                            destination: "198.18.0.10".parse().unwrap(),
                            source: source.parse().unwrap(),
                            protocol: 6,
                            ports: (22, 22),
                        };
                        (key, expires)
                    })
                    .collect(),
            )]),
        }
    }

    #[tokio::test]
    async fn the_newest_ruleset_asked_for_is_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path(), "portcullis");
        let mut saver = Saver::new(state.clone());
        saver.save_later(ruleset(&["198.18.1.1/32"]));
        saver.save_later(ruleset(&["198.18.1.1/32", "198.18.1.2/32"]));
        saver.settled().await.unwrap();
        let now = Timestamp::from_second(1_900_000_000).unwrap();
        assert_eq!(
            state.load(now).unwrap(),
            Some(ruleset(&["198.18.1.1/32", "198.18.1.2/32"]))
        );
        // A store that must land before the kernel changes is on disk when it returns.
        saver.save_now(ruleset(&[])).await.unwrap();
        assert_eq!(state.load(now).unwrap(), Some(ruleset(&[])));
        assert_eq!(saver.failure(), None);
    }

    #[tokio::test]
    async fn a_failed_store_is_reported_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        // The state directory cannot be made: a file stands where it would be.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let mut saver = Saver::new(State::new(&blocked, "portcullis"));
        let error = saver.save_now(ruleset(&[])).await.unwrap_err();
        assert!(error.contains("blocked"), "{error}");
        assert_eq!(saver.failure(), Some(error.clone()));
        // The loop hears of the failure, then of its end.
        saver.failure_changed().await;
        assert!(saver.save_now(ruleset(&[])).await.is_err());
        std::fs::remove_file(&blocked).unwrap();
        saver.save_now(ruleset(&[])).await.unwrap();
        assert_eq!(saver.failure(), None);
        tokio::time::timeout(std::time::Duration::from_secs(5), saver.failure_changed())
            .await
            .expect("the end of the failure is heard");
    }
}
