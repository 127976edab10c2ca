//! Leader election, so the operator can run as several replicas with one acting.
//!
//! A `coordination.k8s.io` Lease held through `kube-lease-manager` (server-side apply, so
//! two replicas cannot both take it). Standbys do not watch: a replica starts its watches
//! and controllers only once it leads, which keeps standbys cheap and means a new leader
//! always starts from a fresh list. A leader that loses the lease stops at once and exits
//! (its pod restarts as a standby); one that shuts down releases the lease, so the next
//! takes over without waiting for it to expire.
//!
//! Two leaders for a moment (a partition on the old one) are tolerated by design: every
//! write the operator makes is idempotent and refuses to take over another owner's rule.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a lease lasts without renewal: a killed leader is replaced about this long
/// after its last renewal (Kubernetes' own controllers use 15 s).
pub const LEASE_SECONDS: u64 = 10;
/// How long before expiry the leader renews.
pub const RENEW_BEFORE_SECONDS: u64 = 3;

/// Where the lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// Unique per replica: the pod name in a cluster.
    pub identity: String,
}

/// A running campaign for the lease.
pub struct Campaign {
    leading: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Campaign {
    /// Starts campaigning for `election`'s lease (created if missing).
    pub async fn start(client: Client, election: &Election) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, &election.lease)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(RENEW_BEFORE_SECONDS)
            .build()
            .await?;
        let (leading, task) = manager.watch().await;
        Ok(Self { leading, task })
    }

    /// Resolves once this replica leads.
    pub async fn won(&mut self) {
        let _ = self.leading.wait_for(|leading| *leading).await;
    }

    /// Resolves once this replica no longer leads (or the campaign ended).
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|leading| !*leading).await;
    }

    /// Ends the campaign and gives the lease up if held.
    pub async fn resign(self) {
        drop(self.leading);
        match self.task.await {
            Ok(Ok(_)) => tracing::info!("lease released"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot release the lease"),
            Err(error) => tracing::warn!(%error, "lease task failed"),
        }
    }
}
