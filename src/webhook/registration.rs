//! The webhook configurations that make the apiserver call us, for `portcullis dev`, the
//! tests, and (kept equal by a test) `deploy/webhook/webhooks.yaml`.
//!
//! Failure policies: a `JitRequest` is never admitted unstamped or unauthorized, so its
//! CREATE fails closed (`Fail`) when the webhook is down. Everything else is defence in
//! depth behind the CRD schema's own rules, so it fails open (`Ignore`): a webhook outage
//! must not stop admins from fixing NSGs and policies, nor the operator from removing the
//! finalizer that revokes a deleted request's access.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::Error;
use crate::api::{GROUP, VERSION};

/// The apiserver's timeout for one call; our own budget ([`super::REVIEW_TIMEOUT`]) is
/// shorter.
pub const TIMEOUT_SECONDS: i32 = 5;
/// The name of both configuration objects.
pub const NAME: &str = "portcullis";

/// The mutating and validating configurations; `client_config` says how the apiserver
/// reaches the webhook for a path (`/mutate`, `/validate`).
pub fn configurations(
    client_config: impl Fn(&str) -> WebhookClientConfig,
) -> Result<(MutatingWebhookConfiguration, ValidatingWebhookConfiguration), Error> {
    let webhook = |name: &str, path: &str, resources: &[&str], ops: &[&str], policy: &str| {
        json!({
            "name": format!("{name}.{GROUP}"),
            "clientConfig": client_config(path),
            "rules": [{
                "apiGroups": [GROUP],
                "apiVersions": [VERSION],
                "resources": resources,
                "operations": ops,
                "scope": "Namespaced",
            }],
            "failurePolicy": policy,
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": TIMEOUT_SECONDS,
        })
    };
    let configuration = |kind: &str, webhooks: Vec<Value>| {
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": { "name": NAME },
            "webhooks": webhooks,
        })
    };
    let mut requestor = webhook(
        "requestor",
        "/mutate",
        &["jitrequests"],
        &["CREATE"],
        "Fail",
    );
    requestor["reinvocationPolicy"] = json!("Never");
    let mutating = configuration("MutatingWebhookConfiguration", vec![requestor]);
    let validating = configuration(
        "ValidatingWebhookConfiguration",
        vec![
            webhook(
                "jitrequests",
                "/validate",
                &["jitrequests"],
                &["CREATE"],
                "Fail",
            ),
            webhook(
                "jitrequest-updates",
                "/validate",
                &["jitrequests"],
                &["UPDATE"],
                "Ignore",
            ),
            webhook(
                "resources",
                "/validate",
                &["networksecuritygroups", "jitpolicies", "securityrules"],
                &["CREATE", "UPDATE"],
                "Ignore",
            ),
        ],
    );
    Ok((
        serde_json::from_value(mutating).map_err(Error::Configuration)?,
        serde_json::from_value(validating).map_err(Error::Configuration)?,
    ))
}

/// Reaching the webhook by URL (a local process), trusting `ca_pem`.
pub fn by_url(base: &str, ca_pem: &str) -> impl Fn(&str) -> WebhookClientConfig {
    move |path| WebhookClientConfig {
        url: Some(format!("{base}{path}")),
        ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
        service: None,
    }
}

/// Creates or updates both configurations (server-side apply).
pub async fn register(
    client: &Client,
    mutating: &MutatingWebhookConfiguration,
    validating: &ValidatingWebhookConfiguration,
) -> Result<(), Error> {
    let params = PatchParams::apply("portcullis-webhook").force();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(NAME, &params, &Patch::Apply(mutating))
        .await?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(NAME, &params, &Patch::Apply(validating))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `deploy/webhook/` registers is what the code registers, but for how the
    /// apiserver reaches the webhook (a Service there, cert-manager injecting the CA).
    #[test]
    fn deploy_manifests_match_the_code() {
        let (mutating, validating) = configurations(|_| WebhookClientConfig::default()).unwrap();
        let shipped = include_str!("../../deploy/webhook/webhooks.yaml");
        let mut docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(shipped)
            .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
            .collect();
        for doc in &mut docs {
            for webhook in doc["webhooks"].as_array_mut().unwrap() {
                webhook["clientConfig"] = json!({});
            }
        }
        let find = |kind: &str| {
            let doc = docs.iter().find(|d| d["kind"] == kind).unwrap();
            doc["webhooks"].clone()
        };
        assert_eq!(
            find("MutatingWebhookConfiguration"),
            serde_json::to_value(&mutating).unwrap()["webhooks"]
        );
        assert_eq!(
            find("ValidatingWebhookConfiguration"),
            serde_json::to_value(&validating).unwrap()["webhooks"]
        );
    }
}
