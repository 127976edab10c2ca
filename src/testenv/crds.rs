//! Installs the CRDs into a cluster and waits until they are served, so that the first
//! request after it never races the apiserver's discovery.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use super::Error;

/// The field manager that owns the CRDs it installs.
const MANAGER: &str = "portcullis-crds";
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Server-side applies every CRD of [`crate::api::crds`] and waits for `Established`.
pub async fn install(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(MANAGER).force();
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        let deadline = Instant::now() + ESTABLISH_TIMEOUT;
        loop {
            let current = api.get(&name).await?;
            let established = current
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Crds(format!(
                    "{name} not established after {ESTABLISH_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
