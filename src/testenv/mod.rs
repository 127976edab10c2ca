//! A real local control plane (etcd, kube-apiserver, and a kube-controller-manager running
//! only the garbage-collector, namespace and admission-policy status controllers) for the integration tests, the
//! benchmarks and `make run`.
//!
//! Binaries come from `hack/control-plane-bins.sh`, which follows the envtest convention
//! (`KUBEBUILDER_ASSETS`, else built once from the upstream Go modules and cached). Every
//! process is tied to its owner (see [`process`]) and everything lives in one temporary
//! directory that [`ControlPlane::stop`] removes; a directory left by an owner that was
//! killed outright is swept by the next start.

pub mod crds;
pub mod install;
pub mod pki;
pub mod process;

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use process::Component;

/// How long the apiserver may take to report ready on a loaded two-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The prefix of every control plane's temporary directory (followed by the owner's pid).
const DIR_PREFIX: &str = "portcullis-cp-";

/// An identity the local apiserver authenticates by bearer token.
#[derive(Clone, Copy, Debug)]
pub struct User {
    pub name: &'static str,
    pub groups: &'static [&'static str],
}

/// The cluster administrator (`system:masters`): what the tests' setup uses.
pub const ADMIN: User = User {
    name: "admin",
    groups: &["system:masters"],
};
/// A requester in team `team-web`, for RBAC tests.
pub const ALICE: User = User {
    name: "alice",
    groups: &["team-web"],
};
/// The group bound to `portcullis-approver` everywhere on the local control plane: impersonate
/// any user in it (`--as=carol --as-group=portcullis-approvers`) to approve.
pub const APPROVERS: &str = "portcullis-approvers";
/// A read-only user, for RBAC tests.
pub const BOB: User = User {
    name: "bob",
    groups: &["viewers"],
};
/// The operator's service account as `deploy/` installs it: the operator runs as this
/// identity, bound to `deploy/operator-rbac.yaml`, so the admission policies that reserve the
/// operator's objects to it hold exactly as on a cluster.
pub const OPERATOR: User = User {
    name: "system:serviceaccount:portcullis-system:portcullis-operator",
    groups: &[
        "system:serviceaccounts",
        "system:serviceaccounts:portcullis-system",
    ],
};
/// Every identity the control plane serves.
pub const USERS: [User; 4] = [ADMIN, ALICE, BOB, OPERATOR];

/// Why the control plane could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("cannot find the control-plane binaries: {0}")]
    Binaries(String),
    #[error("{component} exited ({status}); last log lines:\n{log_tail}")]
    Exited {
        component: &'static str,
        status: String,
        log_tail: String,
    },
    #[error("kube-apiserver not ready after {0:?}")]
    NotReady(Duration),
    #[error("certificate generation failed: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Crds(String),
    #[error("cannot install Portcullis: {0}")]
    Install(String),
}

impl Error {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A running control plane. Dropping it (or calling [`ControlPlane::stop`]) ends every
/// process and removes its directory.
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    server: String,
    components: Mutex<Vec<Component>>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager on free loopback ports and
    /// waits until the apiserver is ready.
    pub async fn start() -> Result<Self, Error> {
        let bin_dir = binaries()?;
        let dir = make_dir()?;
        let plane = Self::start_in(dir.clone(), bin_dir).await;
        if plane.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        plane
    }

    async fn start_in(dir: PathBuf, bin_dir: PathBuf) -> Result<Self, Error> {
        let pki = pki::DevPki::new()?;
        let serving = pki.serving_cert(&["localhost", "127.0.0.1"])?;
        write(&dir.join("ca.crt"), &pki.ca_pem)?;
        write(&dir.join("apiserver.crt"), &serving.cert_pem)?;
        write(&dir.join("apiserver.key"), &serving.key_pem)?;
        let (sa_private, sa_public) = pki::service_account_keys()?;
        write(&dir.join("sa.key"), &sa_private)?;
        write(&dir.join("sa.pub"), &sa_public)?;
        let tokens: Vec<(User, String)> = USERS
            .iter()
            .map(|u| Ok((*u, token()?)))
            .collect::<Result<_, Error>>()?;
        let token_file: String = tokens
            .iter()
            .map(|(u, t)| {
                format!(
                    "{t},{name},{name},\"{}\"\n",
                    u.groups.join(","),
                    name = u.name
                )
            })
            .collect();
        write(&dir.join("tokens.csv"), &token_file)?;

        let [etcd_port, peer_port, api_port] = [free_port()?, free_port()?, free_port()?];
        let server = format!("https://127.0.0.1:{api_port}");
        let plane = Self {
            dir: dir.clone(),
            bin_dir: bin_dir.clone(),
            server: server.clone(),
            components: Mutex::new(Vec::new()),
        };
        for (user, token) in &tokens {
            write(
                &plane.kubeconfig(user.name),
                &kubeconfig(&server, &dir.join("ca.crt"), user.name, token),
            )?;
        }

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        plane.spawn(
            "etcd",
            &[
                "--name=portcullis".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=portcullis={peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        let path = |name: &str| dir.join(name).display().to_string();
        plane.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // No kubernetes Service endpoints: a loopback address may not be advertised.
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", path("certs")),
                format!("--tls-cert-file={}", path("apiserver.crt")),
                format!("--tls-private-key-file={}", path("apiserver.key")),
                format!("--token-auth-file={}", path("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", path("sa.pub")),
                format!("--service-account-signing-key-file={}", path("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/24".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
            ],
        )?;
        plane.wait_ready().await?;
        plane.spawn(
            "kube-controller-manager",
            &[
                format!("--kubeconfig={}", plane.kubeconfig(ADMIN.name).display()),
                "--controllers=garbagecollector,namespace,validatingadmissionpolicy-status-controller"
                    .into(),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--use-service-account-credentials=false".into(),
            ],
        )?;
        Ok(plane)
    }

    fn spawn(&self, name: &'static str, args: &[String]) -> Result<(), Error> {
        let log = self.dir.join(format!("{name}.log"));
        let component = Component::spawn(name, &self.bin_dir.join(name), args, log)?;
        self.components
            .lock()
            .expect("components lock")
            .push(component);
        Ok(())
    }

    async fn wait_ready(&self) -> Result<(), Error> {
        let client = self.client(ADMIN).await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            for component in self.components.lock().expect("components lock").iter_mut() {
                component.ensure_running()?;
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request");
            if let Ok(body) = client.request_text(request).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::NotReady(READY_TIMEOUT))
    }

    /// The apiserver's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The directory holding every file of this control plane.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the control-plane binaries (kubectl among them).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A kubectl that matches the server's version.
    pub fn kubectl(&self) -> PathBuf {
        self.bin_dir.join("kubectl")
    }

    /// The kubeconfig file that authenticates as `user` (the name of one of [`USERS`]),
    /// named after the last `:`-separated part of it (`portcullis-operator.kubeconfig`).
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        let short = user.rsplit(':').next().unwrap_or(user);
        self.dir.join(format!("{short}.kubeconfig"))
    }

    /// Writes a kubeconfig that authenticates with the bearer `token` (one the apiserver
    /// issued, such as a service account's from `kubectl create token`), named `name`;
    /// returns its path.
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf, Error> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        write(
            &path,
            &kubeconfig(&self.server, &self.dir.join("ca.crt"), name, token),
        )?;
        Ok(path)
    }

    /// A client authenticated as `user`.
    pub async fn client(&self, user: User) -> Result<Client, Error> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig(user.name))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// A client of the admin's that acts as `user` in `groups` (impersonation), for load
    /// generators that need many identities without a token each.
    pub async fn impersonating(&self, user: &str, groups: &[&str]) -> Result<Client, Error> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig(ADMIN.name))?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            Some(groups.iter().map(|g| (*g).to_owned()).collect());
        Ok(Client::try_from(config)?)
    }

    /// The process ids of the running components (tests check none outlives the plane).
    pub fn pids(&self) -> Vec<u32> {
        self.components
            .lock()
            .expect("components lock")
            .iter()
            .map(Component::pid)
            .collect()
    }

    /// The process id of component `name` (`etcd`, `kube-apiserver`, ...), for benchmarks
    /// that report what the control plane itself needs.
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.components
            .lock()
            .expect("components lock")
            .iter()
            .find(|c| c.name() == name)
            .map(Component::pid)
    }

    /// Stops every component (last started first) and removes the directory. Idempotent.
    pub fn stop(&self) {
        let mut components = self.components.lock().expect("components lock");
        while let Some(mut component) = components.pop() {
            component.stop();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asks `hack/control-plane-bins.sh` for the binaries' directory (cheap once cached).
fn binaries() -> Result<PathBuf, Error> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/control-plane-bins.sh");
    let output = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::io(format!("run {}", script.display()), e))?;
    if !output.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed ({})",
            script.display(),
            output.status
        )));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    for name in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
    ] {
        if !dir.join(name).is_file() {
            return Err(Error::Binaries(format!("{} has no {name}", dir.display())));
        }
    }
    Ok(dir)
}

/// Creates this plane's directory (on tmpfs when there is one: etcd is much faster there)
/// after sweeping directories whose owner process no longer exists.
fn make_dir() -> Result<PathBuf, Error> {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    sweep_stale(&base);
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir_in(&base)
        .map_err(|e| Error::io(format!("create a directory in {}", base.display()), e))?
        .keep();
    Ok(dir)
}

/// Removes control-plane directories left behind by owners that were killed outright.
fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A free loopback port for a process about to listen on it, outside the kernel's
/// ephemeral range. A port from that range (`bind` to port 0, then released for the
/// process) can meanwhile become the local end of an outgoing connection, such as the
/// apiserver's own to etcd while it starts, and the process then cannot listen ("address
/// already in use"). Ports are handed out in turn from a random start, so one process
/// never hands out the same port twice.
pub fn free_port() -> Result<u16, Error> {
    static START: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = ephemeral_range();
    let (first, last) = if low > 12_000 {
        (10_000, low - 1)
    } else {
        (high + 1, 65_535)
    };
    let span = last.saturating_sub(first) + 1;
    let start = match START.get() {
        Some(start) => *start,
        None => {
            let random = token()?;
            let random = u32::from_str_radix(&random[..8], 16).unwrap_or_default();
            *START.get_or_init(|| random)
        }
    };
    for _ in 0..span {
        let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(first + offset).unwrap_or(u16::MAX);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::io(
        "find a free port",
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "every port below the ephemeral range is taken",
        ),
    ))
}

/// The kernel's ephemeral port range (`ip_local_port_range`), Linux's default if unreadable.
fn ephemeral_range() -> (u32, u32) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| {
            let mut bounds = range.split_whitespace().map(str::parse::<u32>);
            Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

fn token() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    fs::write(path, contents).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn kubeconfig(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: portcullis-local
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: portcullis-local
  context:
    cluster: portcullis-local
    user: {user}
    namespace: default
current-context: portcullis-local
",
        ca = ca.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        for port in &ports {
            let port = u32::from(*port);
            assert!(port < low || port > high, "{port} in {low}-{high}");
        }
        let distinct: std::collections::BTreeSet<&u16> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
