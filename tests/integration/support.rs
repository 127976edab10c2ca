//! What every integration test gets: the shared control plane, an admin client, a fresh
//! namespace of its own, and kubectl driven exactly as a user drives it.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, PostParams};
use portcullis::api::jit_request::Phase;
use portcullis::api::{JitPolicy, JitRequest, SecurityRule};
use portcullis::testenv::{ADMIN, ControlPlane, OPERATOR, User};

/// The result type of a test body: any error fails the test with its message.
pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How long a test waits for a condition before it fails: generous for a loaded
/// two-core machine, and a wait ends as soon as the condition holds.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// One test's view of the cluster.
pub struct Ctx {
    pub plane: Arc<ControlPlane>,
    /// The in-process operator's HTTP address (`/metrics`, `/readyz`).
    pub operator: SocketAddr,
    pub client: Client,
    pub ns: String,
}

impl Ctx {
    /// Creates a namespace named after the test so tests never see each other's objects.
    pub async fn new(
        plane: Arc<ControlPlane>,
        operator: SocketAddr,
        test: &str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let client = plane.client(ADMIN).await?;
        let mut ns: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        ns.truncate(50);
        let ns = ns.trim_matches('-').to_owned();
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": ns }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(Self {
            plane,
            operator,
            client,
            ns,
        })
    }

    /// Runs kubectl as the admin in the test's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(ADMIN, args, None)
    }

    /// Runs kubectl as `user` in the test's namespace, with optional standard input.
    pub fn kubectl_as(&self, user: User, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(self.plane.kubectl())
            .arg("--kubeconfig")
            .arg(self.plane.kubeconfig(user.name))
            .args(["--namespace", &self.ns])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl starts");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(input.as_bytes())
                .expect("write kubectl stdin");
        }
        child.wait_with_output().expect("kubectl finishes")
    }

    /// The API of kind `K` in the test's namespace, as the admin.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The request `name` once it is in phase `wanted`.
    pub async fn phase_of(&self, name: &str, wanted: Phase) -> Result<JitRequest, String> {
        let requests: Api<JitRequest> = self.api();
        eventually(&format!("jitr/{name} to be {wanted:?}"), || async {
            let request = requests.get_opt(name).await.ok().flatten()?;
            (request.status.as_ref()?.phase? == wanted).then_some(request)
        })
        .await
    }

    /// The policy `name` once it exists.
    pub async fn policy_named(&self, name: &str) -> Result<JitPolicy, String> {
        let policies: Api<JitPolicy> = self.api();
        eventually(&format!("jitp/{name} to exist"), || async {
            policies.get_opt(name).await.ok().flatten()
        })
        .await
    }

    /// The SecurityRule `name` once it exists.
    pub async fn rule_named(&self, name: &str) -> Result<SecurityRule, String> {
        let rules: Api<SecurityRule> = self.api();
        eventually(&format!("nsgrule/{name} to exist"), || async {
            rules.get_opt(name).await.ok().flatten()
        })
        .await
    }

    /// Returns once the SecurityRule `name` is gone.
    pub async fn rule_gone(&self, name: &str) -> Result<(), String> {
        let rules: Api<SecurityRule> = self.api();
        eventually(&format!("nsgrule/{name} to be deleted"), || async {
            matches!(rules.get_opt(name).await, Ok(None)).then_some(())
        })
        .await
    }

    /// `kubectl apply -f -` of a YAML document as the admin.
    pub fn apply(&self, yaml: &str) -> Output {
        self.kubectl_as(ADMIN, &["apply", "-f", "-"], Some(yaml))
    }

    /// kubectl run by the admin impersonating `user` in `groups` (`--as`, `--as-group`): how
    /// a test acts as any requester, approver or attacker with exactly the RBAC it bound.
    pub fn kubectl_impersonating(
        &self,
        user: &str,
        groups: &[&str],
        args: &[&str],
        stdin: Option<&str>,
    ) -> Output {
        let mut all = vec![format!("--as={user}")];
        all.extend(groups.iter().map(|g| format!("--as-group={g}")));
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.kubectl_as(ADMIN, &all, stdin)
    }

    /// `kubectl apply -f -` of a YAML document as `user` in `groups`, by impersonation.
    pub fn apply_as(&self, user: &str, groups: &[&str], yaml: &str) -> Output {
        self.kubectl_impersonating(user, groups, &["apply", "-f", "-"], Some(yaml))
    }
}

/// Fails unless kubectl succeeded, showing what it printed.
pub fn succeeded(output: &Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "kubectl failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Fails unless kubectl failed; returns its standard error.
pub fn failed(output: &Output) -> Result<String, String> {
    if output.status.success() {
        Err(format!(
            "kubectl unexpectedly succeeded:\n{}",
            String::from_utf8_lossy(&output.stdout)
        ))
    } else {
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {DEADLINE:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operator as a separate process, as its own service account, so that it can be
/// killed outright; its log (JSON lines) is kept in the plane's directory.
pub struct Operator(Child, std::path::PathBuf);

impl Operator {
    /// Starts `portcullis controller` with `args` added.
    pub fn start(plane: &ControlPlane, args: &[&str]) -> Result<Self, std::io::Error> {
        Self::start_as(plane, &plane.kubeconfig(OPERATOR.name), args)
    }

    /// [`Operator::start`] authenticated by `kubeconfig` instead of the harness's operator
    /// identity.
    pub fn start_as(
        plane: &ControlPlane,
        kubeconfig: &std::path::Path,
        args: &[&str],
    ) -> Result<Self, std::io::Error> {
        let port = portcullis::testenv::free_port().map_err(std::io::Error::other)?;
        let log = plane.dir().join(format!("operator-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "controller",
                "--log-format=json",
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                "debug,hyper=info,tower=info,rustls=info,h2=info",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Self(child, log))
    }

    /// The last `lines` lines of this process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.1).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The decision records (`portcullis::audit` lines) this process has logged so far.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.1)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == portcullis::controller::request::AUDIT_TARGET)
            .collect()
    }

    /// Kills the process (SIGKILL) and returns the decision records it logged.
    pub fn kill_keeping_log(self) -> Vec<serde_json::Value> {
        let mut this = self;
        let _ = this.0.kill();
        let _ = this.0.wait();
        this.audit_records()
    }

    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A control plane of the test's own, with the product installed, and an admin client.
pub async fn own_plane() -> Result<(ControlPlane, Client), Box<dyn std::error::Error + Send + Sync>>
{
    let plane = ControlPlane::start().await?;
    portcullis::testenv::install::product(&plane).await?;
    let client = plane.client(ADMIN).await?;
    Ok((plane, client))
}

/// The operator's allow rules (grants) among `rules`.
pub fn allow_rules(rules: &[SecurityRule]) -> Vec<&SecurityRule> {
    rules
        .iter()
        .filter(|r| {
            r.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("jit-allow-"))
        })
        .collect()
}

/// The NSG `nsg` most tests use: `vnet` is its virtual network, and its inline rule
/// `allow-http` (priority 300) opens TCP 80 to the Internet; `more` follows that rule, so it
/// may add fields to it (indented four spaces) or further rules ([`inline_allow`]).
pub fn web_nsg(vnet: &str, more: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: NetworkSecurityGroup
metadata:
  name: nsg
spec:
  virtualNetworkPrefixes: ["{vnet}"]
  securityRules:
  - name: allow-http
    priority: 300
    direction: Inbound
    access: Allow
    protocol: Tcp
    sourceAddressPrefix: Internet
    sourcePortRange: "*"
    destinationAddressPrefix: "*"
    destinationPortRange: "80"
{more}"#
    )
}

/// An inline rule (a `securityRules` item) allowing TCP `port` from `source`.
pub fn inline_allow(name: &str, priority: u32, source: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    priority: {priority}
    direction: Inbound
    access: Allow
    protocol: Tcp
    sourceAddressPrefix: "{source}"
    sourcePortRange: "*"
    destinationAddressPrefix: "*"
    destinationPortRange: "{port}"
"#
    )
}

/// A RoleBinding `{user}-approves` of `portcullis-approver` to `user` in the namespace it
/// is applied to: they may then approve others' requests (their own is refused on its
/// merits, not by RBAC). Deleting the binding withdraws the role.
pub fn approver_binding(user: &str) -> String {
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {user}-approves
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: portcullis-approver}}
subjects:
- {{kind: User, apiGroup: rbac.authorization.k8s.io, name: {user}}}
"#
    )
}

/// A RoleBinding `{user}-admin` of `portcullis-policy-admin` to `user` in the namespace it is
/// applied to: NSGs, policies and rules to write, and requests to revoke.
pub fn policy_admin_binding(user: &str) -> String {
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {user}-admin
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: portcullis-policy-admin}}
subjects:
- {{kind: User, apiGroup: rbac.authorization.k8s.io, name: {user}}}
"#
    )
}

/// Policy `web` protecting SSH on web-1 (198.18.0.10, behind `nsg`) from `source` for up
/// to an hour; `more` follows that port, so it may add fields to it (indented six spaces).
pub fn ssh_policy(source: &str, more: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitPolicy
metadata:
  name: web
spec:
  virtualMachines:
  - name: web-1
    address: 198.18.0.10
    networkSecurityGroupName: nsg
    ports:
    - number: 22
      protocol: TCP
      allowedSourceAddressPrefix: {source}
      maxRequestAccessDuration: PT1H
{more}"#
    )
}
