//! The Helm chart in `deploy/helm/portcullis` installs what `deploy/` installs: the same
//! objects with the same content (Helm's standard labels aside), in the release's namespace,
//! and a real apiserver accepts and enforces them.
//!
//! helm comes from `hack/helm-bin.sh` (`make helm`), which builds it once and then only
//! prints the cached path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use portcullis::testenv::{ADMIN, ControlPlane};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::support::{Ctx, Operator, TestResult, eventually};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        chart_lints,
        chart_renders_what_deploy_installs,
        chart_values_reach_the_objects,
        chart_installs_on_a_real_apiserver,
    ]
}

/// The labels the chart adds to every object and `deploy/` does not have.
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

/// What `helm template` and `helm install` say when the agent has no NSG.
const NSG_REQUIRED: &str = "agent.nsg is required when agent.enabled is true";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> String {
    repo().join("deploy/helm/portcullis").display().to_string()
}

/// helm, with its configuration, cache and data directories in a directory of its own
/// (never the user's).
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new() -> Result<Self, String> {
        let script = repo().join("hack/helm-bin.sh");
        let output = Command::new(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!("{} failed ({})", script.display(), output.status));
        }
        let bin = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if !bin.is_file() {
            return Err(format!(
                "{} printed {}, no file",
                script.display(),
                bin.display()
            ));
        }
        let home = tempfile::tempdir().map_err(|e| format!("a helm home: {e}"))?;
        Ok(Self { bin, home })
    }

    fn run(&self, args: &[&str]) -> Output {
        let dir = |name: &str| self.home.path().join(name);
        Command::new(&self.bin)
            .args(args)
            .env("HELM_CONFIG_HOME", dir("config"))
            .env("HELM_CACHE_HOME", dir("cache"))
            .env("HELM_DATA_HOME", dir("data"))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("helm runs")
    }

    /// Runs helm and returns its standard output, or fails with everything it printed.
    fn ok(&self, args: &[&str]) -> Result<String, String> {
        let output = self.run(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "helm {} failed ({}):\n{stdout}\n{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Runs helm, which must fail; returns all it printed (stdout and stderr).
    fn fails(&self, args: &[&str]) -> Result<String, String> {
        let output = self.run(args);
        let all = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if output.status.success() {
            Err(format!(
                "helm {} unexpectedly succeeded:\n{all}",
                args.join(" ")
            ))
        } else {
            Ok(all)
        }
    }

    /// `helm template portcullis <chart> -n <namespace> --include-crds <args>`.
    fn template(&self, namespace: &str, args: &[&str]) -> Result<String, String> {
        let chart = chart();
        let mut all = vec![
            "template",
            "portcullis",
            &chart,
            "--namespace",
            namespace,
            "--include-crds",
        ];
        all.extend_from_slice(args);
        self.ok(&all)
    }
}

/// (apiVersion, kind, namespace or "", name)
type Key = (String, String, String, String);

/// The objects of a multi-document YAML stream, by key, normalised (see [`normalise`]).
fn objects(yaml: &str) -> Result<BTreeMap<Key, Value>, String> {
    let mut objects = BTreeMap::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let object = Value::deserialize(document).map_err(|e| format!("bad YAML: {e}"))?;
        if object.is_null() {
            continue; // an empty document (helm's leading `---`, a template rendering nothing)
        }
        let field = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let key = (
            field("/apiVersion"),
            field("/kind"),
            field("/metadata/namespace"),
            field("/metadata/name"),
        );
        if key.1.is_empty() || key.3.is_empty() {
            return Err(format!("an object without kind or name: {object}"));
        }
        if objects.insert(key.clone(), normalise(object)).is_some() {
            return Err(format!("{key:?} twice"));
        }
    }
    Ok(objects)
}

/// Drops Helm's standard labels (and a label map they leave empty), and blank lines inside
/// multi-line strings: kustomize re-emits a folded scalar (`>`) whose next line is more
/// indented with an extra empty line, which the CEL of the admission policies ignores.
fn normalise(mut object: Value) -> Value {
    for pointer in ["/metadata", "/spec/template/metadata"] {
        if let Some(Value::Object(metadata)) = object.pointer_mut(pointer)
            && let Some(Value::Object(labels)) = metadata.get_mut("labels")
        {
            for label in HELM_LABELS {
                labels.remove(label);
            }
            if labels.is_empty() {
                metadata.remove("labels");
            }
        }
    }
    strip_blank_lines(&mut object);
    object
}

fn strip_blank_lines(value: &mut Value) {
    match value {
        Value::String(s) if s.contains("\n\n") => {
            let trailing = s.ends_with('\n');
            let mut kept: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
            if trailing {
                kept.push("");
            }
            *s = kept.join("\n");
        }
        Value::Array(items) => items.iter_mut().for_each(strip_blank_lines),
        Value::Object(map) => map.values_mut().for_each(strip_blank_lines),
        _ => {}
    }
}

/// The first place where `a` (the chart's) and `b` (deploy/'s) differ, as a JSON pointer
/// with both values.
fn difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                difference(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{at}/{k}"),
                )
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| difference(p, q, &format!("{at}/{i}"))),
        // kustomize writes the CRDs' `maximum: 65535.0` as 65535: the same number.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(format!("at {at}: the chart has {a}, deploy/ has {b}")),
    }
}

/// Fails unless the chart's objects are exactly the expected ones, content included.
fn same_objects(
    chart: &BTreeMap<Key, Value>,
    expected: &BTreeMap<Key, Value>,
) -> Result<(), String> {
    let only_chart: Vec<&Key> = chart.keys().filter(|k| !expected.contains_key(k)).collect();
    let only_expected: Vec<&Key> = expected.keys().filter(|k| !chart.contains_key(k)).collect();
    if !only_chart.is_empty() || !only_expected.is_empty() {
        return Err(format!(
            "different objects: only the chart renders {only_chart:?}; only deploy/ has \
             {only_expected:?}"
        ));
    }
    let differences: Vec<String> = chart
        .iter()
        .filter_map(|(key, object)| {
            difference(object, &expected[key], "").map(|d| format!("{key:?} {d}"))
        })
        .collect();
    if differences.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the chart's objects differ from deploy/'s:\n{}",
            differences.join("\n")
        ))
    }
}

/// `kubectl kustomize <dir>` with the control plane's kubectl, parsed.
fn kustomize(ctx: &Ctx, dir: &str) -> Result<BTreeMap<Key, Value>, String> {
    let output = Command::new(ctx.plane.kubectl())
        .args(["kustomize", &repo().join(dir).display().to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run kubectl: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "kubectl kustomize {dir} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    objects(&String::from_utf8_lossy(&output.stdout))
}

async fn chart_lints(_ctx: Ctx) -> TestResult {
    let helm = Helm::new()?;
    let chart = chart();
    helm.ok(&["lint", "--strict", &chart])?;
    helm.ok(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.nsg=default/web-nsg",
    ])?;
    // Without the agent's NSG: lint fails, and so does rendering, naming the missing value.
    let lint = helm.fails(&["lint", &chart, "--set", "agent.enabled=true"])?;
    let template = helm.fails(&[
        "template",
        "portcullis",
        &chart,
        "--set",
        "agent.enabled=true",
    ])?;
    for (what, out) in [("lint", &lint), ("template", &template)] {
        if !out.contains(NSG_REQUIRED) {
            return Err(format!("helm {what} without agent.nsg does not say so:\n{out}").into());
        }
    }
    let malformed = helm.fails(&[
        "template",
        "portcullis",
        &chart,
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.nsg=web-nsg",
    ])?;
    if !malformed.contains("agent.nsg must be NAMESPACE/NAME") {
        return Err(format!("agent.nsg=web-nsg was not refused as malformed:\n{malformed}").into());
    }
    let format = helm.fails(&[
        "template",
        "portcullis",
        &chart,
        "--set",
        "operator.logFormat=xml",
    ])?;
    if !format.contains("must be json or text") {
        return Err(format!("operator.logFormat=xml was not refused:\n{format}").into());
    }
    // The agent's namespace: a namespace name, and not the release namespace for the chart
    // to create (that one exists, and is the operator's).
    let bad_namespace = helm.fails(&[
        "template",
        "portcullis",
        &chart,
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.nsg=default/web-nsg",
        "--set",
        "agent.namespace=Agents",
    ])?;
    if !bad_namespace.contains("agent.namespace must be a namespace name") {
        return Err(format!("agent.namespace=Agents was not refused:\n{bad_namespace}").into());
    }
    let agent_in_release = [
        "template",
        "portcullis",
        &chart,
        "--namespace",
        "portcullis-agent",
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.nsg=default/web-nsg",
    ];
    let release = helm.fails(&agent_in_release)?;
    if !release.contains("agent.namespace is the release namespace") {
        return Err(format!(
            "the agent's namespace to be created as the release namespace was not refused:\n\
             {release}"
        )
        .into());
    }
    let mut provided = agent_in_release.to_vec();
    provided.extend(["--set", "agent.createNamespace=false"]);
    helm.ok(&provided)?;
    Ok(())
}

async fn chart_renders_what_deploy_installs(ctx: Ctx) -> TestResult {
    let helm = Helm::new()?;

    // The CRDs the chart ships are the repository's, byte for byte.
    let crds = std::fs::read(repo().join("crds/portcullis.yaml"))?;
    let chart_crds = std::fs::read(repo().join("deploy/helm/portcullis/crds/portcullis.yaml"))?;
    if crds != chart_crds {
        return Err(
            "deploy/helm/portcullis/crds/portcullis.yaml differs from crds/portcullis.yaml: \
                    cp crds/portcullis.yaml deploy/helm/portcullis/crds/"
                .into(),
        );
    }

    // Defaults into portcullis-system: deploy/ less its Namespace (Helm creates that).
    let mut expected = kustomize(&ctx, "deploy")?;
    let namespaces: Vec<Key> = expected
        .keys()
        .filter(|k| k.1 == "Namespace")
        .cloned()
        .collect();
    if namespaces.len() != 1 || namespaces[0].3 != "portcullis-system" {
        return Err(format!(
            "deploy/ should hold one Namespace, portcullis-system: {namespaces:?}"
        )
        .into());
    }
    expected.remove(&namespaces[0]);
    let defaults = helm.template("portcullis-system", &[])?;
    same_objects(&objects(&defaults)?, &expected)?;
    // Helm's standard labels are on every object (the comparison above ignored them), and
    // the chart deploys the crate's version.
    let chart_yaml: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(
        Path::new(&chart()).join("Chart.yaml"),
    )?)?;
    if chart_yaml["appVersion"] != env!("CARGO_PKG_VERSION") {
        return Err(format!(
            "Chart.yaml's appVersion is {}, Cargo.toml's version {}",
            chart_yaml["appVersion"],
            env!("CARGO_PKG_VERSION")
        )
        .into());
    }
    let standard = json!({
        "helm.sh/chart": format!("portcullis-{}", chart_yaml["version"].as_str().unwrap_or_default()),
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/instance": "portcullis",
        "app.kubernetes.io/version": env!("CARGO_PKG_VERSION"),
    });
    for document in serde_yaml_ng::Deserializer::from_str(&defaults) {
        let object = Value::deserialize(document)?;
        if object.is_null() || object["kind"] == "CustomResourceDefinition" {
            continue; // the CRDs are crds/portcullis.yaml as it is
        }
        let labels = &object["metadata"]["labels"];
        for (label, value) in standard.as_object().into_iter().flatten() {
            if labels[label] != *value {
                return Err(format!(
                    "{} {}: label {label} is {}, expected {value}",
                    object["kind"], object["metadata"]["name"], labels[label]
                )
                .into());
            }
        }
    }

    // With the agent: deploy/agent/ for the NSG given, whose namespace holds the agent's Role.
    let mut agent = kustomize(&ctx, "deploy/agent")?;
    agent = agent
        .into_iter()
        .map(|(key, mut object)| {
            let key = match key.1.as_str() {
                "Role" | "RoleBinding" => {
                    object["metadata"]["namespace"] = json!("prod");
                    if let Some(rules) = object["rules"].as_array_mut() {
                        for rule in rules
                            .iter_mut()
                            .filter(|r| r.get("resourceNames").is_some())
                        {
                            rule["resourceNames"] = json!(["db-nsg"]);
                        }
                    }
                    (key.0, key.1, "prod".to_owned(), key.3)
                }
                _ => key,
            };
            if key.1 == "DaemonSet" {
                for var in object["spec"]["template"]["spec"]["containers"][0]["env"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["name"] == "NSG")
                {
                    var["value"] = json!("prod/db-nsg");
                }
            }
            (key, object)
        })
        .collect();
    expected.append(&mut agent);
    let rendered = objects(&helm.template(
        "portcullis-system",
        &[
            "--set",
            "agent.enabled=true",
            "--set",
            "agent.nsg=prod/db-nsg",
        ],
    )?)?;
    same_objects(&rendered, &expected)?;

    // The agent runs in a namespace of its own, privileged (deploy/agent/namespace.yaml),
    // which agent.createNamespace=false leaves to the user: the same objects, less that one.
    let agent_namespaces: Vec<Key> = expected
        .keys()
        .filter(|k| k.1 == "Namespace")
        .cloned()
        .collect();
    if agent_namespaces.len() != 1 || agent_namespaces[0].3 != "portcullis-agent" {
        return Err(format!(
            "deploy/agent/ should hold one Namespace, portcullis-agent: {agent_namespaces:?}"
        )
        .into());
    }
    expected.remove(&agent_namespaces[0]);
    let rendered = objects(&helm.template(
        "portcullis-system",
        &[
            "--set",
            "agent.enabled=true",
            "--set",
            "agent.nsg=prod/db-nsg",
            "--set",
            "agent.createNamespace=false",
        ],
    )?)?;
    same_objects(&rendered, &expected)?;
    Ok(())
}

/// Non-default values land where they should, and the names stay consistent: the
/// SecurityRule policy trusts the release's own service account, the Deployment runs as it.
async fn chart_values_reach_the_objects(_ctx: Ctx) -> TestResult {
    let helm = Helm::new()?;
    let rendered = objects(&helm.template(
        "team-a",
        &[
            "--set",
            "fullnameOverride=jit",
            "--set",
            "operator.replicas=1",
            "--set",
            "operator.leaderElection=false",
            "--set",
            "operator.logFormat=text",
            "--set",
            "operator.extraArgs={--concurrency=4}",
            "--set",
            "operator.image.repository=registry.example/portcullis",
            "--set",
            "operator.image.tag=1.2.3",
            "--set",
            "operator.nodeSelector.role=infra",
            "--set",
            "userRoles.create=false",
            "--set",
            "agent.enabled=true",
            "--set",
            "agent.nsg=prod/db-nsg",
            "--set",
            "agent.extraArgs={--gateway}",
            "--set",
            "agent.stateDir=/var/lib/jit",
            "--set",
            "agent.namespace=team-a-agent",
            "--set",
            "imagePullSecrets[0].name=registry",
        ],
    )?)?;
    let get = |kind: &str, namespace: &str, name: &str| {
        rendered
            .iter()
            .find(|(k, _)| k.1 == kind && k.2 == namespace && k.3 == name)
            .map(|(_, object)| object.clone())
            .ok_or_else(|| format!("no {kind} {namespace}/{name} rendered"))
    };
    let mut problems = Vec::new();
    let mut expect = |what: &str, actual: &Value, wanted: Value| {
        if *actual != wanted {
            problems.push(format!("{what}: {actual}, expected {wanted}"));
        }
    };

    let deployment = get("Deployment", "team-a", "jit-operator")?;
    let pod = &deployment["spec"]["template"]["spec"];
    expect("replicas", &deployment["spec"]["replicas"], json!(1));
    expect(
        "operator service account",
        &pod["serviceAccountName"],
        json!("jit-operator"),
    );
    expect(
        "operator args",
        &pod["containers"][0]["args"],
        json!(["controller", "--log-format=text", "--concurrency=4"]),
    );
    expect(
        "operator image",
        &pod["containers"][0]["image"],
        json!("registry.example/portcullis:1.2.3"),
    );
    expect(
        "nodeSelector",
        &pod["nodeSelector"],
        json!({"role": "infra"}),
    );
    expect(
        "imagePullSecrets",
        &pod["imagePullSecrets"],
        json!([{"name": "registry"}]),
    );

    let policy = get("ValidatingAdmissionPolicy", "", "jit-managed-securityrules")?;
    let is_operator = policy["spec"]["variables"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "isOperator")
        .map(|v| {
            v["expression"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_owned()
        });
    expect(
        "the operator the SecurityRule policy trusts",
        &json!(is_operator),
        json!(r#"request.userInfo.username == "system:serviceaccount:team-a:jit-operator""#),
    );
    let binding = get("ClusterRoleBinding", "", "jit-operator")?;
    expect(
        "the operator's ClusterRoleBinding subject",
        &binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "jit-operator", "namespace": "team-a"}]),
    );
    // The Lease keeps the operator's default name: only the Role's name follows the release.
    let lease = get("Role", "team-a", "jit-operator-lease")?;
    expect(
        "the Lease the operator may write",
        &lease["rules"][1]["resourceNames"],
        json!(["portcullis-operator"]),
    );
    let create = get("ValidatingAdmissionPolicy", "", "jit-jitrequest-create")?;
    let named = create["spec"]["validations"][2]["messageExpression"]
        .as_str()
        .is_some_and(|m| m.contains("(see ClusterRole jit-requester)"));
    expect(
        "the requester role named in the refusal",
        &json!(named),
        json!(true),
    );
    let user_roles = rendered.keys().filter(|k| k.1 == "ClusterRole").count();
    expect(
        "ClusterRoles without userRoles",
        &json!(user_roles),
        json!(1),
    );

    let namespace = get("Namespace", "", "team-a-agent")?;
    expect(
        "the agent's namespace's labels",
        &namespace["metadata"]["labels"],
        json!({
            "app.kubernetes.io/name": "portcullis",
            "pod-security.kubernetes.io/enforce": "privileged",
        }),
    );
    get("ServiceAccount", "team-a-agent", "jit-agent")?;
    let daemonset = get("DaemonSet", "team-a-agent", "jit-agent")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    let args = pod["containers"][0]["args"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    expect("agent's last arg", &json!(args.last()), json!("--gateway"));
    expect(
        "agent's state dir arg",
        &json!(args.iter().any(|a| a == "--state-dir=/var/lib/jit")),
        json!(true),
    );
    expect(
        "agent's state mount",
        &pod["containers"][0]["volumeMounts"][0]["mountPath"],
        json!("/var/lib/jit"),
    );
    expect(
        "agent's state hostPath",
        &pod["volumes"][0]["hostPath"]["path"],
        json!("/var/lib/jit"),
    );
    expect(
        "agent service account",
        &pod["serviceAccountName"],
        json!("jit-agent"),
    );
    let role = get("Role", "prod", "jit-agent")?;
    expect(
        "agent Role's NSG",
        &role["rules"][0]["resourceNames"],
        json!(["db-nsg"]),
    );
    let role_binding = get("RoleBinding", "prod", "jit-agent")?;
    expect(
        "agent RoleBinding subject",
        &role_binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "jit-agent", "namespace": "team-a-agent"}]),
    );

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n").into())
    }
}

/// kubectl as the admin of `plane`.
fn kubectl(plane: &ControlPlane, args: &[&str]) -> Output {
    Command::new(plane.kubectl())
        .arg("--kubeconfig")
        .arg(plane.kubeconfig(ADMIN.name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kubectl runs")
}

/// `kubectl ARGS` as the admin of `plane`, with `yaml` on its standard input.
fn kubectl_stdin(plane: &ControlPlane, args: &[&str], yaml: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(plane.kubectl())
        .arg("--kubeconfig")
        .arg(plane.kubeconfig(ADMIN.name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl starts");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(yaml.as_bytes())
        .expect("write kubectl stdin");
    child.wait_with_output().expect("kubectl finishes")
}

/// `kubectl create --dry-run=server -f -` of `yaml` as the admin of `plane`, with `extra`
/// arguments (such as `--as`).
fn dry_run_create(plane: &ControlPlane, namespace: &str, yaml: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "create",
        "--dry-run=server",
        "-o",
        "json",
        "-n",
        namespace,
        "-f",
        "-",
    ];
    args.extend_from_slice(extra);
    kubectl_stdin(plane, &args, yaml)
}

const MANAGED_RULE: &str = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: helm-probe
  labels:
    app.kubernetes.io/managed-by: portcullis
spec:
  networkSecurityGroupName: nsg
  priority: 100
  direction: Inbound
  access: Allow
  protocol: Tcp
  sourceAddressPrefix: "*"
  sourcePortRange: "*"
  destinationAddressPrefix: "*"
  destinationPortRange: "22"
"#;

const REQUEST: &str = r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: helm-probe
spec:
  policyName: web
  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: PT5M
      allowedSourceAddressPrefix: 198.19.0.10
"#;

/// The operator, run locally with the arguments of the release's Deployment and the token
/// of the release's service account (there is no kubelet here to run the pods), grants a
/// request on what the chart installed: the chart's RBAC lets it watch and write what it
/// must, and the chart's admission policy lets it write the rules.
async fn granted_by_the_release_operator(
    plane: &ControlPlane,
    ns: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let token = kubectl(
        plane,
        &[
            "create",
            "token",
            "portcullis-operator",
            "-n",
            ns,
            "--duration=1h",
        ],
    );
    if !token.status.success() {
        return Err(format!(
            "no token for the release's service account: {}",
            String::from_utf8_lossy(&token.stderr)
        )
        .into());
    }
    let kubeconfig =
        plane.token_kubeconfig("release-operator", String::from_utf8(token.stdout)?.trim())?;
    let deployment: Value = serde_json::from_slice(
        &kubectl(
            plane,
            &[
                "get",
                "deployment",
                "portcullis-operator",
                "-n",
                ns,
                "-o",
                "json",
            ],
        )
        .stdout,
    )?;
    // The Deployment's arguments, but JSON logs (kept for the failure message) and the
    // Lease where the pod's namespace would put it.
    let mut args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .ok_or("the operator's Deployment has no args")?
        .iter()
        .filter_map(Value::as_str)
        .filter(|a| *a != "controller" && !a.starts_with("--log-format"))
        .map(str::to_owned)
        .collect();
    args.extend([
        format!("--lease-namespace={ns}"),
        "--identity=helm-test".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = Operator::start_as(plane, &kubeconfig, &args)?;

    let setup = format!(
        "{}---\n{}---\n{}",
        crate::support::web_nsg("198.19.0.0/28", ""),
        crate::support::ssh_policy("198.19.0.0/16", ""),
        REQUEST.replace("name: helm-probe", "name: granted-by-the-release"),
    );
    let applied = kubectl_stdin(plane, &["apply", "-n", ns, "-f", "-"], &setup);
    if !applied.status.success() {
        return Err(format!("apply: {}", String::from_utf8_lossy(&applied.stderr)).into());
    }
    let granted = eventually("the release's operator to grant the request", || async {
        let output = kubectl(
            plane,
            &[
                "get",
                "jitr",
                "granted-by-the-release",
                "-n",
                ns,
                "-o",
                "jsonpath={.status.phase}",
            ],
        );
        (String::from_utf8_lossy(&output.stdout) == "Granted").then_some(())
    })
    .await;
    if let Err(why) = granted {
        return Err(format!("{why}; the operator's log ends:\n{}", operator.log_tail(40)).into());
    }
    let rules = kubectl(plane, &["get", "securityrules", "-n", ns, "-o", "name"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    if !rules.contains("securityrule.jit.portcullis.dev/jit-allow-") {
        return Err(format!("granted, but no allow rule in {ns}: {rules}").into());
    }
    operator.kill();
    Ok(())
}

/// `helm install` on a control plane of the test's own, into a namespace other than
/// portcullis-system, then `helm uninstall`. Its own plane, because the chart's admission
/// policies are cluster-wide: on the shared plane a second SecurityRule policy, trusting
/// this release's operator only, would refuse the shared operator's writes in every test.
/// The CRDs come from the chart's `crds/` (the plane starts without them).
async fn chart_installs_on_a_real_apiserver(ctx: Ctx) -> TestResult {
    let helm = Helm::new()?;
    let plane = ControlPlane::start().await?;
    let ns = ctx.ns.as_str();
    let kubeconfig = plane.kubeconfig(ADMIN.name).display().to_string();
    let chart = chart();
    helm.ok(&[
        "install",
        "portcullis",
        &chart,
        "--namespace",
        ns,
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
    ])?;

    let operator = format!("system:serviceaccount:{ns}:portcullis-operator");
    let installed = [
        ("crd", "jitrequests.jit.portcullis.dev", ""),
        ("deployment", "portcullis-operator", ns),
        ("serviceaccount", "portcullis-operator", ns),
        ("role", "portcullis-operator-lease", ns),
        ("rolebinding", "portcullis-operator-lease", ns),
        ("clusterrole", "portcullis-operator", ""),
        ("clusterrolebinding", "portcullis-operator", ""),
        ("clusterrole", "portcullis-policy-admin", ""),
        ("clusterrole", "portcullis-requester", ""),
        ("clusterrole", "portcullis-viewer", ""),
        ("clusterrole", "portcullis-approver", ""),
        ("mutatingadmissionpolicy", "portcullis-requestor", ""),
        ("mutatingadmissionpolicy", "portcullis-approver", ""),
        (
            "validatingadmissionpolicy",
            "portcullis-jitapproval-create",
            "",
        ),
        ("mutatingadmissionpolicybinding", "portcullis-requestor", ""),
        (
            "validatingadmissionpolicy",
            "portcullis-jitrequest-create",
            "",
        ),
        (
            "validatingadmissionpolicybinding",
            "portcullis-jitrequest-create",
            "",
        ),
        (
            "validatingadmissionpolicy",
            "portcullis-jitrequest-delete",
            "",
        ),
        (
            "validatingadmissionpolicybinding",
            "portcullis-jitrequest-delete",
            "",
        ),
        (
            "validatingadmissionpolicy",
            "portcullis-managed-securityrules",
            "",
        ),
        (
            "validatingadmissionpolicybinding",
            "portcullis-managed-securityrules",
            "",
        ),
    ];
    let get = |kind: &str, name: &str, namespace: &str| {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        kubectl(&plane, &args)
    };
    for (kind, name, namespace) in installed {
        let output = get(kind, name, namespace);
        if !output.status.success() {
            return Err(format!(
                "{kind} {name} was not installed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
    }
    let deployment: Value =
        serde_json::from_slice(&get("deployment", "portcullis-operator", ns).stdout)?;
    let pod = &deployment["spec"]["template"]["spec"];
    if deployment["spec"]["replicas"] != 2 || pod["serviceAccountName"] != "portcullis-operator" {
        return Err(format!("the operator's Deployment is not as deploy/'s: {deployment}").into());
    }
    let policy: Value = serde_json::from_slice(
        &get(
            "validatingadmissionpolicy",
            "portcullis-managed-securityrules",
            "",
        )
        .stdout,
    )?;
    let trusted = policy["spec"]["variables"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| {
            v["name"] == "isOperator"
                && v["expression"]
                    .as_str()
                    .is_some_and(|e| e.contains(&format!("\"{operator}\"")))
        });
    if !trusted {
        return Err(format!("the SecurityRule policy does not trust {operator}: {policy}").into());
    }

    // The policies act (the apiserver loads them asynchronously): a managed rule from the
    // admin is refused, the same rule from the release's operator accepted, and a request
    // gets the caller as its requestor.
    eventually("the SecurityRule policy to refuse the admin", || async {
        let output = dry_run_create(&plane, ns, MANAGED_RULE, &[]);
        String::from_utf8_lossy(&output.stderr)
            .contains("admin may not write SecurityRule helm-probe")
            .then_some(())
    })
    .await?;
    let as_operator = dry_run_create(&plane, ns, MANAGED_RULE, &[&format!("--as={operator}")]);
    if !as_operator.status.success() {
        return Err(format!(
            "the release's operator may not write a managed rule: {}",
            String::from_utf8_lossy(&as_operator.stderr)
        )
        .into());
    }
    let requestor = eventually("requests to be stamped with their requestor", || async {
        let output = dry_run_create(&plane, ns, REQUEST, &[]);
        let request: Value = serde_json::from_slice(&output.stdout).ok()?;
        request["spec"]["requestor"]["username"]
            .as_str()
            .map(str::to_owned)
    })
    .await?;
    if requestor != "admin" {
        return Err(format!("the request's requestor is {requestor}, not admin").into());
    }
    granted_by_the_release_operator(&plane, ns).await?;
    // The Lease Role is the release namespace's.
    for (namespace, wanted) in [(ns, "yes"), ("default", "no")] {
        let output = kubectl(
            &plane,
            &[
                "auth",
                "can-i",
                "patch",
                "leases.coordination.k8s.io/portcullis-operator",
                "-n",
                namespace,
                &format!("--as={operator}"),
            ],
        );
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if answer != wanted {
            return Err(format!(
                "the operator may patch its Lease in {namespace}: {answer}, expected {wanted}"
            )
            .into());
        }
    }

    helm.ok(&[
        "uninstall",
        "portcullis",
        "--namespace",
        ns,
        "--kubeconfig",
        &kubeconfig,
    ])?;
    for (kind, name, namespace) in installed.iter().filter(|(kind, ..)| *kind != "crd") {
        eventually(&format!("{kind} {name} to be uninstalled"), || async {
            let output = get(kind, name, namespace);
            let stderr = String::from_utf8_lossy(&output.stderr);
            (!output.status.success() && stderr.contains("NotFound")).then_some(())
        })
        .await?;
    }
    // Helm leaves the CRDs of crds/ in place (deleting them would delete every object).
    let crd = get("crd", "jitrequests.jit.portcullis.dev", "");
    if !crd.status.success() {
        return Err("helm uninstall deleted the CRDs".into());
    }
    Ok(())
}
