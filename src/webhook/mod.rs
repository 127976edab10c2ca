//! The admission webhook: who asked, may they, and is it valid, enforced at `kubectl apply`.
//!
//! - `/mutate` stamps `spec.requestor` on every new `JitRequest` from the authenticated
//!   caller, overwriting whatever the user wrote (see [`admit`]);
//! - `/validate` refuses, with every problem in one message, a `JitRequest` its requestor may
//!   not `initiate` or that breaks its policy, spec changes to a request, `SecurityRule`s
//!   dressed up as the operator's, and what the CRD schema cannot express;
//! - `/healthz` answers 200 while the server runs.
//!
//! The server speaks HTTPS only (the apiserver calls webhooks over TLS), HTTP/1.1 and HTTP/2,
//! and drains in-flight reviews on shutdown. Each review has a budget well under the
//! apiserver's `timeoutSeconds`, so a slow API call yields our clear refusal rather than the
//! apiserver's generic timeout. [`registration`] builds the configurations that register it.

pub mod admit;
pub mod registration;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kube::Client;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The operator's identity where it runs from `deploy/`: the only user allowed to write
/// `SecurityRule`s labelled as the operator's.
pub const DEFAULT_OPERATOR_USERNAME: &str =
    "system:serviceaccount:portcullis-system:portcullis-operator";

/// What one review may take, API calls included. The configurations give the apiserver
/// [`registration::TIMEOUT_SECONDS`]; answering well before that keeps our message (and the
/// `failurePolicy` decision) ours.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(3);

/// A TLS handshake that takes longer than this is dropped: a stalled client must not hold a
/// connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for in-flight reviews before it drops them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How the webhook decides.
#[derive(Clone, Debug)]
pub struct Config {
    /// The users the operator runs as: only they may create or change `SecurityRule`s that
    /// carry the operator's `managed-by` label.
    pub operator_usernames: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            operator_usernames: vec![DEFAULT_OPERATOR_USERNAME.to_owned()],
        }
    }
}

/// Why the webhook could not start, or could not decide one review.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Pem {
        what: &'static str,
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot read the {kind} in the review: {source}")]
    Object {
        kind: &'static str,
        source: kube::core::dynamic::ParseDynamicObjectError,
    },
    #[error("invalid webhook configuration: {0}")]
    Configuration(serde_json::Error),
    #[error("the review carries no {0}")]
    NoObject(&'static str),
    #[error("cannot build the patch: {0}")]
    Patch(#[from] kube::core::admission::SerializePatchError),
}

/// The TLS settings for a certificate chain and key in PEM (what cert-manager writes to
/// `tls.crt` and `tls.key`). HTTP/2 is offered first: the apiserver multiplexes reviews over
/// it.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, Error> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            what: "the certificate is not valid PEM",
            source,
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| Error::Pem {
        what: "the private key is not valid PEM",
        source,
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`tls_config`] from files. They are read once: cert-manager renews long before expiry and
/// a rollout (or restart) picks the new pair up.
pub fn tls_config_from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })
    };
    tls_config(&read(cert)?, &read(key)?)
}

/// A running webhook server.
pub struct Server {
    /// Where it listens (the actual port when asked for port 0).
    pub addr: SocketAddr,
    /// Ends after `shutdown` resolved and in-flight reviews drained.
    pub task: JoinHandle<()>,
}

/// Binds `addr` and serves the webhook over TLS until `shutdown` resolves. Binding happens
/// before this returns, so a caller can register the actual address at once.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<ServerConfig>,
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Server, Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let app = router(admit::Admission::new(client, config));
    let acceptor = TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(error) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        tracing::warn!(%error, "webhook: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(app.clone());
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "webhook: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(error) = watcher.watch(connection.into_owned()).await {
                    tracing::debug!(%error, "webhook: connection ended with an error");
                }
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(DRAIN_TIMEOUT) => {
                tracing::warn!("webhook: reviews still in flight after {DRAIN_TIMEOUT:?}; dropped");
            }
        }
    });
    tracing::info!(%addr, "admission webhook serving");
    Ok(Server { addr, task })
}

fn router(admission: admit::Admission) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Arc::new(admission))
}

type Review = AdmissionReview<DynamicObject>;

async fn mutate(
    State(admission): State<Arc<admit::Admission>>,
    Json(review): Json<Review>,
) -> Json<Review> {
    let Ok(request) = review.try_into() else {
        return malformed();
    };
    let decision = admission.mutate(&request);
    respond(&request, decision)
}

async fn validate(
    State(admission): State<Arc<admit::Admission>>,
    Json(review): Json<Review>,
) -> Json<Review> {
    let Ok(request) = review.try_into() else {
        return malformed();
    };
    let decision = tokio::time::timeout(REVIEW_TIMEOUT, admission.validate(&request))
        .await
        .unwrap_or_else(|_| {
            Ok(admit::Decision::Deny(format!(
                "the admission webhook could not decide within {REVIEW_TIMEOUT:?}; try again"
            )))
        });
    respond(&request, decision)
}

/// The answer to a review without a request: refused as malformed.
fn malformed() -> Json<Review> {
    Json(AdmissionResponse::invalid("the review carries no request").into_review())
}

/// The response review for `decision`. A review we could not decide is refused, never
/// silently allowed; the `failurePolicy` is for when we cannot answer at all.
fn respond(
    request: &AdmissionRequest<DynamicObject>,
    decision: Result<admit::Decision, Error>,
) -> Json<Review> {
    let response = decision.and_then(|decision| decision.respond(request));
    Json(
        response
            .unwrap_or_else(|error| {
                tracing::warn!(uid = %request.uid, %error, "webhook: review failed");
                AdmissionResponse::from(request)
                    .deny(format!("the Portcullis admission webhook failed: {error}"))
            })
            .into_review(),
    )
}
