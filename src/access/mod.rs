//! The access layer: the one answer to "may this `JitRequest` be granted under this
//! `JitPolicy`, and what exactly does granting it open?".
//!
//! The controller (when it grants, and again when a policy changes) and the request-side tools
//! must never disagree about that answer, so it lives here once, as pure functions over the
//! [`crate::api`] specs and the [`crate::rules`] model: no client, no async runtime, no
//! clock, no I/O. That also makes every rule of the decision cheap to
//! test exhaustively.
//!
//! - [`validate`] checks a request against its policy and either lists every [`Violation`]
//!   (so a denied user fixes everything in one go) or returns the [`PortGrant`]s to open.
//! - [`materialize`] turns a policy's machines and a request's grants into the deterministic
//!   `SecurityRule` objects the operator owns: the same input always yields the same names,
//!   labels and specs, so reconciling is idempotent and a restart never duplicates a rule.

pub mod approve;
pub mod materialize;
pub mod validate;

pub use materialize::{
    Materialized, Owner, allow_rule, allow_rule_name, deny_rule, deny_rule_name, label_value,
};
pub use validate::{AllowedPort, PortGrant, Violation, model_protocol, policy_ports, validate};
