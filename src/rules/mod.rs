//! Pure NSG rule semantics: parsing of rule fields, rule matching, the
//! effective rule view, the evaluation oracle, JIT rule placement and the
//! user rules that expose a JIT port despite its deny.
//!
//! This module deliberately knows nothing about Kubernetes, async runtimes or
//! nftables: the controllers translate CRDs into these types and the agent is
//! differentially tested against [`evaluate::evaluate`], so keeping it pure
//! keeps the oracle small, fast to test and obviously correct.

pub mod duration;
pub mod evaluate;
pub mod exposure;
pub mod model;
pub mod placement;
pub mod ports;
pub mod prefix;

pub use duration::DurationError;
pub use evaluate::{Conflict, Verdict, conflicts, default_rules, effective, evaluate};
pub use exposure::{Exposure, ProtectedPort, exposures};
pub use model::{Access, Direction, ModelError, Origin, Packet, Protocol, Rule};
pub use placement::{MAX_PRIORITY, MIN_PRIORITY, Placement, PlacementError, place};
pub use ports::{PortRange, PortRangeError};
pub use prefix::{AddressPrefix, AddressPrefixError, Scope, any_covers};
