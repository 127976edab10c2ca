//! `kubectl jit`: asking for access as easily as the portal's "Request access" button.
//!
//! A kubectl plugin (the binary `kubectl-jit`) acting as the user's own kubeconfig identity:
//! it creates and reads the same objects a user would write by hand, and for anything it
//! decides (a policy's defaults, whether a request would pass, where its rule would go) it
//! calls [`crate::access`] and [`crate::rules`], exactly what the operator calls.

mod decide;
mod inspect;
pub mod output;
mod request;
pub mod source;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use output::Format;

/// The command line: kubectl's usual flags work before or after the subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-jit",
    bin_name = "kubectl jit",
    version,
    about = "Just-in-time network access: request, follow, approve and revoke it"
)]
pub struct Cli {
    /// The namespace of the policies and requests (default: the context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Act as this user (impersonation, as `kubectl --as`).
    #[arg(long = "as", global = true)]
    pub as_user: Option<String>,
    /// Act as a member of this group (repeatable, as `kubectl --as-group`).
    #[arg(long = "as-group", global = true)]
    pub as_group: Vec<String>,
    /// Print JSON or YAML instead of text.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Format>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask for access to ports of machines under a policy.
    Request(request::RequestArgs),
    /// Requests: yours by default.
    List {
        /// Everyone's requests in the namespace.
        #[arg(long)]
        all: bool,
    },
    /// One request: phase, grants, approvals, violations.
    Status { name: String },
    /// Extend a request with a newer one for the same ports and sources (no gap).
    Extend {
        name: String,
        /// How long the newer request asks for (ISO 8601: PT1H, PT30M).
        #[arg(long)]
        duration: String,
        /// Follow the newer request until it is granted, denied or waits for approval.
        #[arg(long)]
        wait: bool,
    },
    /// End a request's access now (deletes it).
    Revoke { name: String },
    /// Approve a request (policies with an approval step).
    Approve {
        name: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a request, saying why.
    Reject {
        name: String,
        #[arg(long)]
        comment: String,
    },
    /// What a request would open, where its rule would go, until when, and every reason it
    /// would be refused. Creates nothing.
    Explain(inspect::ExplainArgs),
    /// A small web UI on 127.0.0.1 acting as you: request, follow, revoke, approve.
    Console {
        /// The local port (0: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
}

/// Why a command failed: one readable line each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig: {0}")]
    Config(String),
    /// What the API answered, with its HTTP status when it answered at all (a 403 is an
    /// RBAC or admission refusal the console passes on as such).
    #[error("{message}")]
    Api { message: String, code: Option<u16> },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Output(String),
}

impl From<kube::Error> for Error {
    /// The API's own message (an RBAC refusal names the verb and resource), not the
    /// client's wrapping of it.
    fn from(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => Error::Api {
                message: status.message,
                code: Some(status.code),
            },
            other => Error::Api {
                message: other.to_string(),
                code: None,
            },
        }
    }
}

/// How a command ended, as the process exit code says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done: created, granted, counted.
    Done = 0,
    /// Refused: denied, or a decision that does not count.
    Refused = 2,
    /// Waiting on people or time: awaiting approval, scheduled.
    Waiting = 3,
    /// Ended without access: expired or revoked.
    Ended = 4,
    /// Still pending when `--wait` gave up.
    TimedOut = 5,
}

/// The user's session: a client acting as them, and the namespace.
pub struct Session {
    pub client: Client,
    pub namespace: String,
    pub format: Option<Format>,
}

impl Session {
    /// A client from the kubeconfig (file, context, impersonation) the flags name.
    async fn open(cli: &Cli) -> Result<Self, Error> {
        let kubeconfig = match &cli.kubeconfig {
            Some(path) => Kubeconfig::read_from(path),
            None => Kubeconfig::read(),
        }
        .map_err(|e| Error::Config(e.to_string()))?;
        let options = KubeConfigOptions {
            context: cli.context.clone(),
            ..KubeConfigOptions::default()
        };
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
        if let Some(user) = &cli.as_user {
            config.auth_info.impersonate = Some(user.clone());
        }
        if !cli.as_group.is_empty() {
            config.auth_info.impersonate_groups = Some(cli.as_group.clone());
        }
        let namespace = cli
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self {
            client,
            namespace,
            format: cli.output,
        })
    }

    pub(crate) fn api<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
    {
        kube::Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Whether the user may `verb` the Portcullis `resource` (`name`, when one) in the
    /// session's namespace: a SelfSubjectAccessReview, so every authorizer decides.
    pub(crate) async fn may(
        &self,
        verb: &str,
        resource: &str,
        name: Option<&str>,
    ) -> Result<bool, Error> {
        use k8s_openapi::api::authorization::v1::{
            SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(crate::api::access_attributes(
                    &self.namespace,
                    verb,
                    resource,
                    name,
                )),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let reviewed = kube::Api::<SelfSubjectAccessReview>::all(self.client.clone())
            .create(&kube::api::PostParams::default(), &review)
            .await?;
        Ok(reviewed.status.is_some_and(|s| s.allowed))
    }

    /// Who the apiserver says the user is.
    pub(crate) async fn whoami(&self) -> Result<String, Error> {
        use k8s_openapi::api::authentication::v1::SelfSubjectReview;
        let review: SelfSubjectReview = kube::Api::all(self.client.clone())
            .create(
                &kube::api::PostParams::default(),
                &SelfSubjectReview::default(),
            )
            .await?;
        Ok(review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_default())
    }
}

/// Runs `kubectl jit` with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(outcome) => ExitCode::from(outcome as u8),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<Outcome, Error> {
    let session = Session::open(&cli).await?;
    match cli.command {
        Command::Request(args) => request::request(&session, args).await,
        Command::List { all } => inspect::list(&session, all).await,
        Command::Status { name } => inspect::status(&session, &name).await,
        Command::Extend {
            name,
            duration,
            wait,
        } => request::extend(&session, &name, &duration, wait).await,
        Command::Revoke { name } => decide::revoke(&session, &name).await,
        Command::Approve { name, comment } => {
            decide::decide(&session, &name, "Approve", comment).await
        }
        Command::Reject { name, comment } => {
            decide::decide(&session, &name, "Reject", Some(comment)).await
        }
        Command::Explain(args) => inspect::explain(&session, args).await,
        Command::Console { port } => crate::console::serve(session, port).await,
    }
}
