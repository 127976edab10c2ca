//! `portcullis dev`, what `make run` runs: the whole product on a developer's machine.
//!
//! With a cluster configured (a non-empty `KUBECONFIG`, or `~/.kube/config` with a current
//! context) the operator runs against it, after saying which one. Otherwise a local control
//! plane is started and set up as a small but complete cluster: CRDs, the shipped user roles
//! bound to the harness identities (alice requests, bob views), the admission webhook served
//! with a certificate from the plane's CA and registered with its apiserver, and the operator
//! running in the foreground (refusing requests without a requestor, as it does behind the
//! webhook on a cluster). Once the operator is ready the kubeconfig to use from a second terminal
//! is printed; on SIGINT or SIGTERM the operator stops, then the control plane, and its
//! directory is removed.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use futures::FutureExt;
use futures::future::Shared;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use tracing::instrument::WithSubscriber;
use tracing::subscriber::NoSubscriber;

use crate::controller;
use crate::testenv::{self, ADMIN, ALICE, BOB, ControlPlane};
use crate::webhook::{self, registration};

/// The ClusterRoles users get on a real cluster; the dev setup binds them like an admin
/// would, so RBAC behaves as it will in production.
const USER_ROLES: &str = include_str!("../deploy/user-roles.yaml");

/// The port the operator's HTTP server prefers; any free one does when it is taken.
const PREFERRED_HTTP_PORT: u16 = 8080;

/// Why `portcullis dev` could not bring the operator up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kubeconfig: {0}")]
    Kubeconfig(#[from] KubeconfigError),
    #[error(
        "the kubeconfig names no current context (pick one with `kubectl config use-context`, \
         or unset KUBECONFIG to use a local control plane)"
    )]
    NoCurrentContext,
    #[error("cannot start the local control plane: {0}")]
    ControlPlane(#[from] testenv::Error),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot apply the user roles with kubectl ({status}): {stderr}")]
    Roles { status: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
    #[error("the operator failed: {0}")]
    Operator(#[from] controller::Error),
    #[error("the admission webhook: {0}")]
    Webhook(#[from] webhook::Error),
}

/// Runs the operator until `shutdown` resolves, on the configured cluster or a local one.
pub async fn run(shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let shutdown = shutdown.boxed().shared();
    match configured_kubeconfig()? {
        Some(kubeconfig) => run_on_cluster(kubeconfig, shutdown).await,
        None => run_on_local_plane(shutdown).await,
    }
}

/// The shutdown signal, awaited in more than one place.
type Shutdown = Shared<futures::future::BoxFuture<'static, ()>>;

/// The user's kubeconfig, if one configures a cluster (the same rule kubectl follows, minus
/// the in-cluster fallback, which a developer machine has no use for).
fn configured_kubeconfig() -> Result<Option<Kubeconfig>, Error> {
    if let Some(kubeconfig) = Kubeconfig::from_env()? {
        return Ok(Some(kubeconfig));
    }
    let Some(path) = std::env::home_dir().map(|home| home.join(".kube").join("config")) else {
        return Ok(None);
    };
    if !path.exists() {
        return Ok(None);
    }
    let kubeconfig = Kubeconfig::read_from(&path)?;
    let has_context = kubeconfig
        .current_context
        .as_deref()
        .is_some_and(|name| !name.is_empty());
    Ok(has_context.then_some(kubeconfig))
}

async fn run_on_cluster(kubeconfig: Kubeconfig, shutdown: Shutdown) -> Result<(), Error> {
    let context = kubeconfig
        .current_context
        .clone()
        .filter(|name| !name.is_empty())
        .ok_or(Error::NoCurrentContext)?;
    let server = kubeconfig
        .contexts
        .iter()
        .find(|named| named.name == context)
        .and_then(|named| named.context.as_ref())
        .and_then(|ctx| kubeconfig.clusters.iter().find(|c| c.name == ctx.cluster))
        .and_then(|named| named.cluster.as_ref())
        .and_then(|cluster| cluster.server.clone())
        .unwrap_or_else(|| "(none)".into());
    say(&format!(
        "Using cluster: context {context}, server {server}\n\
         (the operator needs the CRDs there: kubectl apply -f crds/portcullis.yaml)\n"
    ))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let http_addr = http_addr()?;
    run_operator(client, http_addr, false, shutdown, || {
        say(&format!(
            "Portcullis is running (metrics on http://{http_addr}/metrics). Ctrl-C stops it.\n"
        ))
    })
    .await
}

async fn run_on_local_plane(shutdown: Shutdown) -> Result<(), Error> {
    tracing::info!("no cluster configured; starting a local control plane");
    // While the apiserver boots, the plane's readiness probe logs every refused connection
    // and 500 at ERROR level through kube's client. That is expected noise: a real failure
    // comes back as the error, with the component's log tail.
    let start = ControlPlane::start().with_subscriber(NoSubscriber::default());
    let plane = tokio::select! {
        plane = start => plane?,
        () = shutdown.clone() => return Ok(()),
    };
    let result = serve_on(&plane, shutdown).await;
    tracing::info!(dir = %plane.dir().display(), "stopping the local control plane");
    plane.stop();
    result
}

/// Everything between starting the plane and stopping it; the caller stops it either way.
async fn serve_on(plane: &ControlPlane, shutdown: Shutdown) -> Result<(), Error> {
    let client = plane.client(ADMIN).await?;
    let version = tokio::select! {
        version = set_up(plane, &client) => version?,
        () = shutdown.clone() => return Ok(()),
    };
    let webhook = serve_webhook(plane, &client, shutdown.clone()).await?;
    let http_addr = http_addr()?;
    let admin = plane.kubeconfig(ADMIN.name);
    let alice = plane.kubeconfig(ALICE.name);
    let bob = plane.kubeconfig(BOB.name);
    run_operator(client, http_addr, true, shutdown, || {
        say(&format!(
            "Portcullis is running on a local control plane (Kubernetes {version}).
In another terminal:

export KUBECONFIG={admin}
kubectl apply -f examples/
kubectl get portcullis

Other identities: {alice} (alice, group team-web, may request access)
and {bob} (bob, group viewers, read-only).
Metrics: http://{http_addr}/metrics. Admission webhook: https://{webhook}.
Ctrl-C stops the operator and removes the control plane.
",
            admin = admin.display(),
            alice = alice.display(),
            bob = bob.display(),
            webhook = webhook.addr,
        ))
    })
    .await
}

/// Installs the CRDs and the user roles with their bindings; returns the server's version.
async fn set_up(plane: &ControlPlane, client: &Client) -> Result<String, Error> {
    testenv::crds::install(client).await?;
    apply(plane, &format!("{USER_ROLES}\n---\n{}", dev_bindings())).await?;
    Ok(client.apiserver_version().await?.git_version)
}

/// Serves the admission webhook on a free loopback port with a certificate signed by the
/// plane's CA, and registers it with the plane's apiserver (trusting that CA), so admission
/// behaves as `deploy/webhook/` makes it behave on a cluster. The operator runs as the admin
/// here, so the admin is the identity allowed to write the operator's SecurityRules.
pub async fn serve_webhook(
    plane: &ControlPlane,
    client: &Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<webhook::Server, Error> {
    let cert = plane.pki().serving_cert(&["127.0.0.1"])?;
    let tls = webhook::tls_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())?;
    let config = webhook::Config {
        operator_usernames: vec![ADMIN.name.to_owned()],
    };
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = webhook::serve(listen, tls, client.clone(), config, shutdown).await?;
    let base = format!("https://{}", server.addr);
    let (mutating, validating) =
        registration::configurations(registration::by_url(&base, &plane.pki().ca_pem))?;
    registration::register(client, &mutating, &validating).await?;
    Ok(server)
}

/// Cluster-wide bindings of the shipped roles to the harness identities. A real cluster
/// would bind per namespace; for a throwaway dev cluster one binding each is clearer.
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
            "portcullis-dev-viewers",
            "portcullis-viewer",
            &[("Group", BOB.groups[0])],
        ),
    ]
    .join("---\n")
}

/// `kubectl apply -f` as the admin, with the plane's own kubectl. The manifest is written
/// into the plane's directory, so it goes away with the plane.
async fn apply(plane: &ControlPlane, yaml: &str) -> Result<(), Error> {
    let manifest = plane.dir().join("dev-rbac.yaml");
    std::fs::write(&manifest, yaml).map_err(|source| Error::Io {
        context: "cannot write the RBAC manifest",
        source,
    })?;
    let output = tokio::process::Command::new(plane.kubectl())
        .arg("--kubeconfig")
        .arg(plane.kubeconfig(ADMIN.name))
        .arg("apply")
        .arg("-f")
        .arg(&manifest)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Error::Io {
            context: "cannot run kubectl",
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Roles {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs the operator until `shutdown`, calling `announce` once it reports ready (so that
/// whatever is announced is true by then). Returns early if the operator fails.
/// `require_requestor` where the webhook stamps requestors (see [`controller::Config`]).
async fn run_operator(
    client: Client,
    http_addr: SocketAddr,
    require_requestor: bool,
    shutdown: Shutdown,
    announce: impl FnOnce() -> Result<(), Error>,
) -> Result<(), Error> {
    let config = controller::Config {
        http_addr,
        require_requestor,
        ..controller::Config::default()
    };
    let operator = controller::run(client, config, shutdown);
    tokio::pin!(operator);
    tokio::select! {
        result = &mut operator => return Ok(result?),
        () = wait_ready(http_addr) => announce()?,
    }
    Ok(operator.await?)
}

/// Loopback port 8080 when it is free, so the metrics URL is predictable; else any free port.
fn http_addr() -> Result<SocketAddr, Error> {
    let preferred = SocketAddr::from((Ipv4Addr::LOCALHOST, PREFERRED_HTTP_PORT));
    let listener = TcpListener::bind(preferred)
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|source| Error::Io {
            context: "cannot find a free port for the operator's HTTP server",
            source,
        })?;
    listener.local_addr().map_err(|source| Error::Io {
        context: "cannot find a free port for the operator's HTTP server",
        source,
    })
}

/// Polls the operator's `/readyz` until it answers 200 (its caches are synced).
async fn wait_ready(addr: SocketAddr) {
    while !is_ready(addr).await {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One `GET /readyz`, on a blocking thread (a few lines of std I/O beat an HTTP client
/// dependency). HTTP/1.0, so the server closes the connection after its response and
/// reading to the end is the whole exchange.
async fn is_ready(addr: SocketAddr) -> bool {
    let probe = move || -> std::io::Result<bool> {
        let timeout = Duration::from_secs(2);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.split_whitespace().nth(1) == Some("200"))
    };
    matches!(tokio::task::spawn_blocking(probe).await, Ok(Ok(true)))
}

/// Prints to standard output and flushes, so a reader on a pipe sees it at once.
fn say(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io {
            context: "cannot write to standard output",
            source,
        })
}
