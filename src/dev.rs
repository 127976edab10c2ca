//! `portcullis dev`, what `make run` runs: the whole product on a developer's machine.
//!
//! With a cluster configured (a non-empty `KUBECONFIG`, or `~/.kube/config` with a current
//! context) the operator runs against it, after saying which one. Otherwise a local control
//! plane is started and set up exactly as `kubectl apply -k deploy/` sets up a cluster (see
//! [`testenv::install`]: CRDs, the operator's least-privilege role, the user roles, the
//! admission policies), with the shipped roles bound to the harness identities (alice
//! requests, bob views), and the operator runs in the foreground as its own service account.
//! Once the operator is ready the kubeconfig to use from a second terminal is printed; on
//! SIGINT or SIGTERM the operator stops, then the control plane, and its directory is
//! removed.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use futures::FutureExt;
use futures::future::Shared;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use tracing::instrument::WithSubscriber;
use tracing::subscriber::NoSubscriber;

use crate::controller;
use crate::testenv::{self, ADMIN, ALICE, BOB, ControlPlane, OPERATOR};

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
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
    #[error("the operator failed: {0}")]
    Operator(#[from] controller::Error),
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
    run_operator(client, http_addr, shutdown, || {
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
    let version = tokio::select! {
        version = set_up(plane) => version?,
        () = shutdown.clone() => return Ok(()),
    };
    let client = plane.client(OPERATOR).await?;
    let http_addr = http_addr()?;
    let admin = plane.kubeconfig(ADMIN.name);
    let alice = plane.kubeconfig(ALICE.name);
    let bob = plane.kubeconfig(BOB.name);
    run_operator(client, http_addr, shutdown, || {
        say(&format!(
            "Portcullis is running on a local control plane (Kubernetes {version}).
In another terminal:

export KUBECONFIG={admin}
kubectl apply -f examples/
kubectl get portcullis

Other identities: {alice} (alice, group team-web, may request access)
and {bob} (bob, group viewers, read-only); as the admin, any user in group
portcullis-approvers approves: kubectl --as=carol --as-group=portcullis-approvers ...
Metrics: http://{http_addr}/metrics. Admission: the policies in deploy/admission/.
Ctrl-C stops the operator and removes the control plane.
",
            admin = admin.display(),
            alice = alice.display(),
            bob = bob.display(),
        ))
    })
    .await
}

/// Installs what `deploy/` installs (the operator aside) and returns the server's version.
async fn set_up(plane: &ControlPlane) -> Result<String, Error> {
    testenv::install::product(plane).await?;
    let client = plane.client(ADMIN).await?;
    Ok(client.apiserver_version().await?.git_version)
}

/// Runs the operator until `shutdown`, calling `announce` once it reports ready (so that
/// whatever is announced is true by then). Returns early if the operator fails.
async fn run_operator(
    client: Client,
    http_addr: SocketAddr,
    shutdown: Shutdown,
    announce: impl FnOnce() -> Result<(), Error>,
) -> Result<(), Error> {
    let config = controller::Config {
        http_addr,
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
