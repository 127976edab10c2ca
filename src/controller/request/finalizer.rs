//! The request's revoke finalizer: which step a request's metadata calls for, and the
//! patches that add or remove the finalizer.
//!
//! kube-runtime has a helper for this, but it speaks its own `Action`, which does not tell
//! when to run again: a grant's expiry would have had to be carried around it. The steps
//! are few, so they are kept here as plain data with tests, and the patches are the
//! helper's: JSON patches that first test the finalizers they change, so a reconcile that
//! read a stale copy fails (and looks again) instead of overwriting a newer list.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

/// What a request calls for, by its finalizers and deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not being deleted and the finalizer is on: reconcile the request.
    Apply,
    /// Not being deleted and the finalizer is missing: add it before anything is granted
    /// (admission normally adds it; the patch's watch event wakes the request again).
    Add,
    /// Being deleted with the finalizer at `index`: revoke, then remove it.
    Cleanup { index: usize },
    /// Being deleted and the finalizer is gone: nothing left to do.
    Nothing,
}

/// The step `meta` calls for, `finalizer` being ours.
pub fn step(meta: &ObjectMeta, finalizer: &str) -> Step {
    let index = meta
        .finalizers
        .iter()
        .flatten()
        .position(|f| f == finalizer);
    match (index, meta.deletion_timestamp.is_some()) {
        (Some(_), false) => Step::Apply,
        (None, false) => Step::Add,
        (Some(index), true) => Step::Cleanup { index },
        (None, true) => Step::Nothing,
    }
}

/// The JSON patch adding `finalizer` to the finalizers `meta` holds, if they are still
/// exactly those.
pub fn add(meta: &ObjectMeta, finalizer: &str) -> Value {
    match meta.finalizers.as_deref() {
        None | Some([]) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ]),
        Some(current) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer},
        ]),
    }
}

/// The JSON patch removing `finalizer` from position `index`, if it is still there.
pub fn remove(index: usize, finalizer: &str) -> Value {
    let path = format!("/metadata/finalizers/{index}");
    json!([
        {"op": "test", "path": path, "value": finalizer},
        {"op": "remove", "path": path},
    ])
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    const OURS: &str = "jit.portcullis.dev/revoke";

    fn meta(finalizers: Option<&[&str]>, deleting: bool) -> ObjectMeta {
        ObjectMeta {
            finalizers: finalizers.map(|f| f.iter().map(|s| (*s).to_owned()).collect()),
            deletion_timestamp: deleting.then_some(Time(jiff::Timestamp::UNIX_EPOCH)),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn each_state_calls_for_its_step() {
        let theirs_and_ours: &[&str] = &["example.com/keep", OURS];
        assert_eq!(step(&meta(Some(&[OURS]), false), OURS), Step::Apply);
        assert_eq!(step(&meta(None, false), OURS), Step::Add);
        assert_eq!(
            step(&meta(Some(&["example.com/keep"]), false), OURS),
            Step::Add
        );
        assert_eq!(
            step(&meta(Some(theirs_and_ours), true), OURS),
            Step::Cleanup { index: 1 }
        );
        assert_eq!(
            step(&meta(Some(&["example.com/keep"]), true), OURS),
            Step::Nothing
        );
        assert_eq!(step(&meta(None, true), OURS), Step::Nothing);
    }

    #[test]
    fn patches_test_what_they_change() {
        assert_eq!(
            add(&meta(None, false), OURS),
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [OURS]},
            ])
        );
        assert_eq!(
            add(&meta(Some(&["example.com/keep"]), false), OURS),
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/keep"]},
                {"op": "add", "path": "/metadata/finalizers/-", "value": OURS},
            ])
        );
        assert_eq!(
            remove(1, OURS),
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": OURS},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
    }
}
