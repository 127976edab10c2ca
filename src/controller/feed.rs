//! One watch per kind. Each event goes, in this order, into the kind's cache, into the
//! [`Index`](super::index::Index), and only then out as wake-ups to the controllers, so a
//! woken reconcile never reads a cache or an index that has not seen what woke it.
//!
//! No reconcile is woken before every kind has its first full list: the last kind to sync
//! opens the gate and wakes every object once, so no reconcile acts on a partial view (a
//! missing policy, a rule not seen yet) and none has to poll for readiness.

use std::collections::{BTreeSet, HashSet};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::channel::mpsc::UnboundedSender;
use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::reflector::{Lookup, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};

use super::cached::Keep;
use super::index::{Key, Wake};
use super::runner::Pace;
use crate::api::{JitApproval, JitPolicy, JitRequest, NetworkSecurityGroup};

/// One object's change as the index takes it.
pub enum Change<K> {
    /// Created or changed: the object as now cached.
    Applied(Arc<K>),
    /// Gone; with its last state when the watch delivered one (a re-list does not).
    Deleted(Key, Option<Arc<K>>),
}

impl<K: Lookup> Change<K> {
    /// The object's key and, unless it was deleted, what `entry` makes of it.
    pub fn entry<E>(&self, entry: impl Fn(&K) -> E) -> (Key, Option<E>) {
        match self {
            Change::Applied(object) => (key_of(object.as_ref()), Some(entry(object.as_ref()))),
            Change::Deleted(key, _) => (key.clone(), None),
        }
    }
}

/// Sends each of `keys` to `to` at `pace` (a closed channel: the operator is stopping).
fn send<K: Lookup<DynamicType = ()>>(to: &Wakes<K>, keys: BTreeSet<Key>, pace: Pace) {
    for (namespace, name) in keys {
        let _ = to.unbounded_send((ObjectRef::new(&name).within(&namespace), pace));
    }
}

fn key_of<K: Lookup>(object: &K) -> Key {
    (
        object.namespace().unwrap_or_default().into_owned(),
        object.name().unwrap_or_default().into_owned(),
    )
}

/// Where wake-ups go, with their [`Pace`].
type Wakes<K> = UnboundedSender<(ObjectRef<K>, Pace)>;

/// Where wake-ups go: one channel per controller, closed until every kind has synced.
pub struct Triggers {
    pub nsgs: Wakes<NetworkSecurityGroup>,
    pub policies: Wakes<JitPolicy>,
    pub requests: Wakes<JitRequest>,
    pub approvals: Wakes<JitApproval>,
    open: AtomicBool,
    unsynced: AtomicUsize,
}

/// How many kinds must list before the gate opens.
const KINDS: usize = 6;

impl Triggers {
    pub fn new(
        nsgs: Wakes<NetworkSecurityGroup>,
        policies: Wakes<JitPolicy>,
        requests: Wakes<JitRequest>,
        approvals: Wakes<JitApproval>,
    ) -> Self {
        Self {
            nsgs,
            policies,
            requests,
            approvals,
            open: AtomicBool::new(false),
            unsynced: AtomicUsize::new(KINDS),
        }
    }

    /// Sends `wake` to the controllers, if the gate is open. Before it opens nothing is
    /// lost: opening wakes every object. An NSG's reconcile only writes its summary, so its
    /// wakes may all wait for its spacing.
    pub fn wake(&self, wake: Wake) {
        if !self.open.load(Ordering::SeqCst) {
            return;
        }
        send(&self.nsgs, wake.nsgs, Pace::Spaced);
        send(&self.policies, wake.policies, Pace::Prompt);
        send(&self.policies, wake.policy_histories, Pace::Spaced);
        send(&self.requests, wake.requests, Pace::Prompt);
        send(&self.approvals, wake.approvals, Pace::Prompt);
    }

    /// Counts one kind's first full list; true for the last, which must then call
    /// [`Triggers::open`].
    fn synced(&self) -> bool {
        self.unsynced.fetch_sub(1, Ordering::SeqCst) == 1
    }

    /// Opens the gate, then wakes every object in `stores`. An event applied to a cache
    /// before the gate opened is in these caches; one after it is sent by [`Triggers::wake`].
    pub fn open(
        &self,
        nsgs: &Store<NetworkSecurityGroup>,
        policies: &Store<JitPolicy>,
        requests: &Store<JitRequest>,
        approvals: &Store<JitApproval>,
    ) {
        self.open.store(true, Ordering::SeqCst);
        for nsg in nsgs.state() {
            let _ = self
                .nsgs
                .unbounded_send((ObjectRef::from_obj(nsg.as_ref()), Pace::Prompt));
        }
        for policy in policies.state() {
            let _ = self
                .policies
                .unbounded_send((ObjectRef::from_obj(policy.as_ref()), Pace::Prompt));
        }
        for request in requests.state() {
            let _ = self
                .requests
                .unbounded_send((ObjectRef::from_obj(request.as_ref()), Pace::Prompt));
        }
        for approval in approvals.state() {
            let _ = self
                .approvals
                .unbounded_send((ObjectRef::from_obj(approval.as_ref()), Pace::Prompt));
        }
    }
}

/// Watches `api` for as long as the stream lasts (it retries with backoff, never ends on
/// its own): each batch of changes goes to `changed` after the cache `writer` holds what
/// it keeps of them (see [`Keep`]); the first full list calls `all_synced` if it was the
/// last of the kinds to list.
pub async fn watch<K>(
    api: Api<K>,
    mut writer: Writer<K::Kept>,
    triggers: Arc<Triggers>,
    mut changed: impl FnMut(Vec<Change<K::Kept>>),
    all_synced: Arc<dyn Fn() + Send + Sync>,
) where
    K: Keep,
{
    let reader = writer.as_reader();
    let mut events = pin!(
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map_ok(kept::<K>)
    );
    let mut first_list = true;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                if missing_crd(&error) {
                    // Nothing is reconciled until every kind lists: name the fix.
                    tracing::error!(
                        kind = %K::kind(&()),
                        %error,
                        "the CRD is not installed: apply crds/portcullis.yaml from this release"
                    );
                } else {
                    tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying");
                }
                continue;
            }
        };
        let changes = match &event {
            watcher::Event::Apply(object) => {
                writer.apply_watcher_event(&event);
                vec![Change::Applied(cached(&reader, object))]
            }
            watcher::Event::Delete(object) => {
                writer.apply_watcher_event(&event);
                vec![Change::Deleted(
                    key_of(object),
                    Some(Arc::new(object.clone())),
                )]
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => {
                writer.apply_watcher_event(&event);
                continue;
            }
            watcher::Event::InitDone => {
                let before = reader.state();
                writer.apply_watcher_event(&event);
                relisted(before, reader.state())
            }
        };
        changed(changes);
        if first_list && matches!(event, watcher::Event::InitDone) {
            first_list = false;
            if triggers.synced() {
                all_synced();
            }
        }
    }
}

/// Whether the watch failed because the apiserver does not serve the kind (a CRD of this
/// release not installed, as after a `helm upgrade`, which never upgrades CRDs).
fn missing_crd(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status))
            if status.code == 404
    )
}

/// The event as the cache keeps it.
fn kept<K: Keep>(event: watcher::Event<K>) -> watcher::Event<K::Kept> {
    use watcher::Event;
    match event {
        Event::Apply(object) => Event::Apply(object.keep()),
        Event::Delete(object) => Event::Delete(object.keep()),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(object.keep()),
        Event::InitDone => Event::InitDone,
    }
}

/// The changes a (re-)list makes: it replaces the cache at once, so every listed object is
/// applied, and what it no longer holds was deleted while the watch was down and must wake
/// what depended on it.
fn relisted<K: Lookup>(before: Vec<Arc<K>>, after: Vec<Arc<K>>) -> Vec<Change<K>> {
    let listed: HashSet<Key> = after.iter().map(|o| key_of(o.as_ref())).collect();
    let mut changes: Vec<Change<K>> = after.into_iter().map(Change::Applied).collect();
    changes.extend(
        before
            .into_iter()
            .filter(|o| !listed.contains(&key_of(o.as_ref())))
            .map(|o| Change::Deleted(key_of(o.as_ref()), Some(o))),
    );
    changes
}

/// The cached copy of an object just applied (shared, not cloned again).
fn cached<K>(reader: &Store<K>, object: &K) -> Arc<K>
where
    K: Lookup<DynamicType = ()> + Clone,
{
    reader
        .get(&object.to_object_ref(()))
        .unwrap_or_else(|| Arc::new(object.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nsg(namespace: &str, name: &str) -> Arc<NetworkSecurityGroup> {
        Arc::new(crate::api::nsg::empty(namespace, name))
    }

    #[test]
    fn a_relist_applies_what_it_lists_and_deletes_what_it_lost() {
        let before = vec![nsg("a", "kept"), nsg("a", "gone"), nsg("b", "kept")];
        let after = vec![nsg("a", "kept"), nsg("b", "kept"), nsg("a", "new")];
        let changes = relisted(before, after);
        let applied: Vec<Key> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Applied(o) => Some(key_of(o.as_ref())),
                Change::Deleted(..) => None,
            })
            .collect();
        let deleted: Vec<(Key, bool)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Deleted(key, last) => Some((key.clone(), last.is_some())),
                Change::Applied(_) => None,
            })
            .collect();
        let key = |ns: &str, name: &str| (ns.to_owned(), name.to_owned());
        assert_eq!(
            applied,
            [key("a", "kept"), key("b", "kept"), key("a", "new")]
        );
        // The same name in another namespace is another object; the lost one keeps its
        // last state for whoever needs it (a deleted request's history record).
        assert_eq!(deleted, [(key("a", "gone"), true)]);
    }
}
