//! Installs Portcullis into a local control plane the way `kubectl apply -k deploy/` installs
//! it into a cluster: the CRDs, the operator's namespace, service account and least-privilege
//! role, the user roles, and the admission policies. The files are the ones in `deploy/`,
//! compiled in, so the tests, the benchmarks and `make run` exercise exactly what ships.
//!
//! On top of that the harness identities get the shipped roles (alice requests, bob views),
//! as an administrator would bind them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, PostParams};
use kube::core::DynamicObject;
use kube::discovery::ApiResource;

use super::{ADMIN, ALICE, APPROVERS, BOB, ControlPlane, Error};
use crate::api::{JitApproval, JitRequest, SecurityRule};

/// What `deploy/` installs besides the CRDs and the operator's Deployment, in apply order.
pub const MANIFESTS: [(&str, &str); 8] = [
    ("namespace", include_str!("../../deploy/namespace.yaml")),
    (
        "operator RBAC",
        include_str!("../../deploy/operator-rbac.yaml"),
    ),
    ("user roles", include_str!("../../deploy/user-roles.yaml")),
    (
        "requestor stamping",
        include_str!("../../deploy/admission/requestor.yaml"),
    ),
    (
        "approver stamping",
        include_str!("../../deploy/admission/approvals.yaml"),
    ),
    (
        "JitRequest authorization",
        include_str!("../../deploy/admission/jitrequests.yaml"),
    ),
    (
        "SecurityRule protection",
        include_str!("../../deploy/admission/securityrules.yaml"),
    ),
    (
        "AgentReport authorization",
        include_str!("../../deploy/admission/agentreports.yaml"),
    ),
];

/// How long the apiserver may take to start enforcing freshly created admission policies
/// (it loads them through its own informers, asynchronously).
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(60);

/// Installs the product (everything but the operator process) and waits until the admission
/// policies are enforced, so that the first request after this returns is already checked.
pub async fn product(plane: &ControlPlane) -> Result<(), Error> {
    let client = plane.client(ADMIN).await?;
    super::crds::install(&client).await?;
    let manifests: Vec<&str> = MANIFESTS.iter().map(|(_, yaml)| *yaml).collect();
    plane
        .apply(&format!(
            "{}\n---\n{}",
            manifests.join("\n---\n"),
            dev_bindings()
        ))
        .await?;
    wait_for_admission(&client).await
}

/// Cluster-wide bindings of the shipped roles to the harness identities. A real cluster
/// would bind per namespace; for a throwaway cluster one binding each is clearer.
fn dev_bindings() -> String {
    let binding = |name: &str, role: &str, subjects: &[(&str, &str)]| {
        let subjects: String = subjects
            .iter()
            .map(|(kind, name)| {
                format!("- kind: {kind}\n  apiGroup: rbac.authorization.k8s.io\n  name: {name}\n")
            })
            .collect();
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {name}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {role}
subjects:
{subjects}"
        )
    };
    [
        binding(
            "portcullis-dev-requesters",
            "portcullis-requester",
            &[("User", ALICE.name), ("Group", ALICE.groups[0])],
        ),
        binding(
            "portcullis-dev-approvers",
            "portcullis-approver",
            &[("Group", APPROVERS)],
        ),
        binding(
            "portcullis-dev-viewers",
            "portcullis-viewer",
            &[("Group", BOB.groups[0])],
        ),
    ]
    .join("---\n")
}

/// Probes, with dry runs that store nothing, until each policy acts: a request without a
/// requestor and an approval without approver are stamped with the caller, a forged requestor is refused, and a managed rule
/// written by someone other than the operator is refused.
async fn wait_for_admission(client: &Client) -> Result<(), Error> {
    let deadline = Instant::now() + ADMISSION_TIMEOUT;
    let probe = Probe::new(client)?;
    loop {
        let Err(seen) = probe.run().await else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(Error::Install(format!(
                "the admission policies were not enforced after {ADMISSION_TIMEOUT:?}: {seen}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The objects [`wait_for_admission`] tries to create.
struct Probe {
    requests: Api<DynamicObject>,
    approvals: Api<DynamicObject>,
    approval: DynamicObject,
    rules: Api<DynamicObject>,
    honest: DynamicObject,
    forged: DynamicObject,
    managed: DynamicObject,
}

impl Probe {
    fn new(client: &Client) -> Result<Self, Error> {
        let object = |value: serde_json::Value| {
            serde_json::from_value::<DynamicObject>(value)
                .map_err(|e| Error::Install(format!("admission probe: {e}")))
        };
        let request = |requestor: Option<serde_json::Value>| {
            let mut request = serde_json::json!({
                "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitRequest",
                "metadata": { "name": "portcullis-admission-probe" },
                "spec": {
                    "policyName": "probe",
                    "virtualMachines": [{ "name": "probe", "ports": [{
                        "number": 22, "duration": "PT1M", "allowedSourceAddressPrefix": "198.18.0.1"
                    }] }],
                },
            });
            if let Some(requestor) = requestor {
                request["spec"]["requestor"] = requestor;
            }
            object(request)
        };
        let api =
            |resource: ApiResource| Api::namespaced_with(client.clone(), "default", &resource);
        Ok(Self {
            requests: api(ApiResource::erase::<JitRequest>(&())),
            approvals: api(ApiResource::erase::<JitApproval>(&())),
            approval: object(serde_json::json!({
                "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "JitApproval",
                "metadata": { "name": "portcullis-admission-probe" },
                "spec": { "requestName": "probe", "decision": "Approve" },
            }))?,
            rules: api(ApiResource::erase::<SecurityRule>(&())),
            honest: request(None)?,
            forged: request(Some(serde_json::json!({ "username": "forged" })))?,
            managed: object(serde_json::json!({
                "apiVersion": "jit.portcullis.dev/v1alpha1", "kind": "SecurityRule",
                "metadata": {
                    "name": "portcullis-admission-probe",
                    "labels": { "app.kubernetes.io/managed-by": "portcullis" },
                },
                "spec": {
                    "networkSecurityGroupName": "probe", "priority": 100,
                    "direction": "Inbound", "access": "Allow", "protocol": "Tcp",
                    "sourceAddressPrefix": "*", "sourcePortRange": "*",
                    "destinationAddressPrefix": "*", "destinationPortRange": "22",
                },
            }))?,
        })
    }

    /// One round of the three checks; the first that does not hold yet, described.
    async fn run(&self) -> Result<(), String> {
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let stamped = self
            .requests
            .create(&dry_run, &self.honest)
            .await
            .map_err(|e| format!("a request without requestor was refused: {e}"))?;
        if stamped.data["spec"]["requestor"]["username"] != ADMIN.name {
            return Err("a request without requestor was not stamped".into());
        }
        let approved = self
            .approvals
            .create(&dry_run, &self.approval)
            .await
            .map_err(|e| format!("an approval without approver was refused: {e}"))?;
        if approved.data["spec"]["approver"]["username"] != ADMIN.name {
            return Err("an approval without approver was not stamped".into());
        }
        match self.requests.create(&dry_run, &self.forged).await {
            Err(kube::Error::Api(refusal)) if refusal.message.contains("must be the caller") => {}
            other => return Err(format!("a forged requestor: {other:?}")),
        }
        match self.rules.create(&dry_run, &self.managed).await {
            Err(kube::Error::Api(refusal))
                if refusal.message.contains("only by the Portcullis") =>
            {
                Ok(())
            }
            other => Err(format!("a managed rule written by the admin: {other:?}")),
        }
    }
}

impl ControlPlane {
    /// `kubectl apply --server-side -f -` of `yaml` as the admin, with the plane's own kubectl.
    pub async fn apply(&self, yaml: &str) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(self.kubectl())
            .arg("--kubeconfig")
            .arg(self.kubeconfig(ADMIN.name))
            .args(["apply", "--server-side", "--force-conflicts", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io("run kubectl", e))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(yaml.as_bytes())
            .await
            .map_err(|e| Error::io("write to kubectl", e))?;
        drop(stdin);
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| Error::io("run kubectl", e))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(Error::Install(format!(
                "kubectl apply failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }
}
