//! Command-line entry points. Each subcommand is a thin shell over a module that does the
//! work, so the same code runs from tests.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

use crate::{agent, controller};

/// The log filter when `RUST_LOG` is unset: our own progress, but only kube's warnings
/// (its request-level logs drown everything else at `info`).
const DEFAULT_LOG_FILTER: &str = "info,kube=warn";

/// Just-in-time network access for machines, on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// How log lines are written (always to standard error; `RUST_LOG` filters them).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crds,
    /// Run the operator until SIGINT or SIGTERM.
    ///
    /// It connects like kubectl does (`KUBECONFIG`, `~/.kube/config`), or with the pod's
    /// service account inside a cluster.
    Controller(ControllerArgs),
    /// Enforce one NSG on this machine with nftables, until SIGINT or SIGTERM.
    ///
    /// Needs NET_ADMIN. It connects like kubectl does, or with the pod's service account.
    Agent(AgentArgs),
    /// Run the operator for development (what `make run` runs).
    ///
    /// On the configured cluster if there is one; otherwise on a local control plane that it
    /// starts, sets up (CRDs, roles, admission policies) and removes again on Ctrl-C.
    Dev,
}

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags of `portcullis controller`; they map one to one onto [`controller::Config`].
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Reconciles in flight per controller.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Act only while holding a Lease, so several replicas can run with one acting.
    #[arg(long)]
    pub leader_elect: bool,
    /// The namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis-system")]
    pub lease_namespace: String,
    /// The name of the Lease.
    #[arg(long, default_value = "portcullis-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the pod name, else host name and
    /// process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Post a CloudEvent for every step of a request's life (pending, approved, granted,
    /// denied, expired, revoked) to this http or https URL (comma-separated or repeated; a
    /// comma inside a URL is written %2C). Each sink has its own queue, with retries: a
    /// slow or dead one never delays a grant or an expiry.
    #[arg(
        long = "notify-url",
        value_name = "URL",
        env = "PORTCULLIS_NOTIFY_URL",
        value_delimiter = ','
    )]
    pub notify_urls: Vec<controller::notify::Sink>,
}

impl From<&ControllerArgs> for controller::Config {
    fn from(args: &ControllerArgs) -> Self {
        Self {
            http_addr: args.http_addr,
            concurrency: args.concurrency,
            election: args.leader_elect.then(|| controller::leader::Election {
                namespace: args.lease_namespace.clone(),
                lease: args.lease_name.clone(),
                identity: args
                    .identity
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", agent::hostname(), std::process::id())),
            }),
            notify: args.notify_urls.clone(),
        }
    }
}

/// Flags of `portcullis agent`; they map onto [`agent::Config`].
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The NSG to enforce, as NAMESPACE/NAME.
    #[arg(long, env = "PORTCULLIS_NSG", required_unless_present = "cleanup")]
    pub nsg: Option<String>,
    /// The machine's addresses the NSG protects (comma-separated or repeated). Default:
    /// every address of the machine, IPv4 and IPv6, read again every 5 s. With
    /// `--gateway`: machine addresses protected in addition to those of the NSG's policies.
    #[arg(long, env = "PORTCULLIS_ADDRESS", value_delimiter = ',')]
    pub address: Vec<std::net::IpAddr>,
    /// Enforce on traffic this router or firewall forwards to the machines (hook
    /// `forward`) instead of traffic to this machine: every machine address the NSG's JIT
    /// rules name is protected, so machines that cannot run an agent are protected by the
    /// box in front of them.
    #[arg(long, env = "PORTCULLIS_GATEWAY")]
    pub gateway: bool,
    /// Where the applied ruleset is kept, to be restored at start before the apiserver is
    /// reached (a reboot or an apiserver outage must open nothing).
    #[arg(long, env = "PORTCULLIS_STATE_DIR", default_value = agent::state::DEFAULT_DIR)]
    pub state_dir: std::path::PathBuf,
    /// Remove the agent's nftables table (and nothing else), then exit.
    #[arg(long)]
    pub cleanup: bool,
    /// The nftables table (family inet) the agent owns.
    #[arg(long, default_value = agent::DEFAULT_TABLE)]
    pub table: String,
    /// The agent's name in the NSG status (unique per machine; default: the host name).
    #[arg(long)]
    pub agent_name: Option<String>,
    /// Run nft inside this network namespace (as named by `ip netns add`) while the agent itself stays
    /// in its own: for tests and for enforcing inside a namespace from the host.
    #[arg(long, hide = true)]
    pub netns: Option<String>,
}

/// Caps glibc's malloc arenas at two, before any thread starts. By default each thread may
/// get its own (up to eight per core), and the operator's memory is a cache of long-lived
/// objects built by whichever worker thread decoded them: spread over many arenas it
/// fragments, and the resident size grows well past what the cache holds.
fn few_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Runs `portcullis agent`.
async fn run_agent(
    args: AgentArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let nft = match &args.netns {
        Some(name) => agent::apply::Nft::in_netns(name),
        None => Ok(agent::apply::Nft::host()),
    }
    .map_err(|e| e.to_string())?;
    if args.cleanup {
        return agent::cleanup(nft, &args.table)
            .await
            .map_err(|e| e.to_string());
    }
    let nsg = args.nsg.as_deref().unwrap_or_default();
    let (namespace, name) = agent::Config::nsg_ref(nsg).map_err(|e| e.to_string())?;
    let host = agent::hostname();
    let config = agent::Config {
        namespace,
        nsg: name,
        addresses: args.address,
        mode: if args.gateway {
            agent::render::Mode::Gateway
        } else {
            agent::render::Mode::Host
        },
        state_dir: args.state_dir,
        table: args.table,
        agent: args.agent_name.unwrap_or_else(|| host.clone()),
        host,
        nft,
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot connect to a cluster: {e}"))?;
    agent::run(client, config, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Runs a parsed command line and maps the outcome to an exit code. Async commands get a
/// multi-threaded tokio runtime built here, so `main` stays a one-liner.
pub fn run(cli: Cli) -> ExitCode {
    few_malloc_arenas();
    init_logging(cli.log_format);
    match cli.command {
        Command::Crds => match crate::api::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => fail("cannot render the CRDs", &error),
        },
        Command::Controller(args) => block_on(async move {
            let shutdown = shutdown_signal()?;
            let client = kube::Client::try_default()
                .await
                .map_err(|e| format!("cannot connect to a cluster: {e}"))?;
            controller::run(client, (&args).into(), shutdown)
                .await
                .map_err(|e| e.to_string())
        }),
        Command::Agent(args) => block_on(async move {
            let shutdown = shutdown_signal()?;
            run_agent(args, shutdown).await
        }),
        Command::Dev => block_on(async {
            let shutdown = shutdown_signal()?;
            crate::dev::run(shutdown).await.map_err(|e| e.to_string())
        }),
    }
}

/// Runs an async command on a fresh runtime. The future runs on the calling (main) thread:
/// the local control plane ties its processes' lifetime to the thread that spawns them.
fn block_on(command: impl Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail("cannot start the async runtime", &error),
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("portcullis: {message}");
            ExitCode::FAILURE
        }
    }
}

fn fail(what: &str, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("portcullis: {what}: {error}");
    ExitCode::FAILURE
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed before this returns,
/// so a signal that arrives during a slow startup is not lost (nor fatal: the caller gets to
/// clean up).
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, String> {
    let install = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
    let mut interrupt = install(SignalKind::interrupt())?;
    let mut terminate = install(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!("{name} received; shutting down");
    })
}

/// Logs go to standard error so that standard output carries only what a command prints on
/// purpose (the CRDs, the `export KUBECONFIG=` line).
fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
