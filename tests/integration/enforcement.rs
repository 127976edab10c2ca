//! The agent with real traffic: a "vm" network namespace running a real OpenSSH server and
//! the agent's nftables table, a "client" namespace with two source addresses, joined by a
//! veth pair, all addressed from 198.18.0.0/15. The agent runs as the real binary in the
//! host namespace (where the API server is) and applies its table inside the vm namespace
//! (`--netns`). Verdicts are observed with real connects: accepted SYNs are answered
//! (connected, or refused by a closed port), dropped ones time out.
//!
//! Needs root, network namespaces, nft and OpenSSH; where any is missing every test here
//! prints a loud SKIPPED line and passes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use kube::api::Api;
use portcullis::access::materialize::report_name;
use portcullis::agent::apply::{Enforcer, Nft};
use portcullis::agent::render::{self, Mode, Policy, Target};
use portcullis::api::jit_request::Phase;
use portcullis::api::{AgentReport, NetworkSecurityGroup};
use portcullis::rules::{
    self, Access, AddressPrefix, Direction, Origin, Packet, PortRange, Protocol, Rule, Scope,
};
use tokio::net::TcpSocket;
use tokio::process::{Child, Command};

use crate::support::{Ctx, TestResult, eventually, ssh_policy, succeeded, web_nsg};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![
        policy_closes_ssh_and_keeps_allowed_ports_open,
        a_rule_is_enforced_while_it_names_the_nsg,
        a_recreated_nsg_gets_the_agents_report,
        grant_admits_only_its_source_until_revoked,
        grant_ends_on_time_with_the_agent_killed,
        kernel_verdicts_equal_the_evaluation,
        gateway_verdicts_equal_the_evaluation,
        cleanup_removes_only_its_table,
        agent_manifests_pass_server_dry_run,
    ]
}

/// The protected machine.
pub const VM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The second port sshd listens on (the first is 22).
pub const KEEP_PORT: u16 = 2222;
/// Client source A (gets the grant) and B (does not).
pub const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
pub const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);
/// How long a SYN may go unanswered before the verdict is "dropped". On a veth pair an
/// accepted SYN is answered in microseconds; a timeout that looks like a drop where an
/// accept was expected is re-checked with [`SLOW_CONNECT`] before it counts.
pub const DROP_TIMEOUT: Duration = Duration::from_millis(300);
pub const SLOW_CONNECT: Duration = Duration::from_secs(3);

/// The NSG of the API-driven tests: the vm's /28 is the virtual network (so A and B are
/// "Internet"), HTTP is open to the Internet, everything else falls to DenyAllInBound.
pub fn nsg() -> String {
    web_nsg("198.18.0.0/28", "")
}

/// SSH to the vm may be requested from the clients' /28 for up to an hour.
pub fn policy() -> String {
    ssh_policy("198.18.0.16/28", "")
}

pub fn request(name: &str, source: IpAddr, duration: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: JitRequest
metadata:
  name: {name}
spec:
  policyName: web
  justification: testing enforcement
  virtualMachines:
  - name: web-1
    ports:
    - number: 22
      duration: {duration}
      allowedSourceAddressPrefix: {source}
"#
    )
}

/// Why these tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    for tool in [
        "/usr/sbin/nft",
        "/usr/sbin/sshd",
        "/usr/bin/ssh",
        "/usr/bin/ssh-keygen",
    ] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} is missing (apt-get install nftables openssh-server openssh-client)"
            ));
        }
    }
    let probe = format!("pcprobe{}", std::process::id());
    let added = std::process::Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !added {
        return Some("network namespaces are not permitted".into());
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &probe])
        .status();
    None
}

/// Prints the loud skip line; true when the test must stop here (and pass). The probe
/// runs once per process (tests run in parallel and would race on it).
pub fn skipped(test: &str) -> bool {
    static UNSUPPORTED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    match UNSUPPORTED.get_or_init(unsupported) {
        None => false,
        Some(why) => {
            eprintln!("\n*** SKIPPED enforcement::{test}: {why} ***\n");
            true
        }
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs `ip ARGS`, failing with its standard error.
pub fn ip(args: &[&str]) -> Result<(), Error> {
    let out = std::process::Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into())
    }
}

/// The router's addresses in a routed lab: towards the client and towards the vm.
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 33);
pub const ROUTER_VM_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 34);

/// The namespaces, the files of the SSH setup and the processes started in them, all
/// removed on drop, whatever path the test took.
pub struct Lab {
    pub vm: String,
    pub client: String,
    /// In a routed lab, the router between the two, where a gateway agent runs.
    pub router: Option<String>,
    dir: tempfile::TempDir,
    sshd: Option<Child>,
    pub agent: Option<Child>,
}

impl Lab {
    /// Namespaces with loopback up and nothing else; removed on drop from here on.
    fn namespaces(routed: bool) -> Result<Self, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut lab = Lab {
            vm: format!("pcvm{id}"),
            client: format!("pccl{id}"),
            router: None,
            dir: tempfile::tempdir()?,
            sshd: None,
            agent: None,
        };
        ip(&["netns", "add", &lab.vm])?;
        ip(&["netns", "add", &lab.client])?;
        if routed {
            let router = format!("pcrt{id}");
            ip(&["netns", "add", &router])?;
            lab.router = Some(router);
        }
        for ns in lab.all() {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn all(&self) -> impl Iterator<Item = &str> {
        [Some(&self.vm), Some(&self.client), self.router.as_ref()]
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Where the agent's table goes: the router in a routed lab, else the vm.
    pub fn enforcing(&self) -> &str {
        self.router.as_deref().unwrap_or(&self.vm)
    }

    /// Two namespaces joined by a veth pair: the vm has [`VM`], the client `sources`.
    pub fn new(sources: &[Ipv4Addr]) -> Result<Self, Error> {
        let lab = Self::namespaces(false)?;
        let (vm, client) = (lab.vm.as_str(), lab.client.as_str());
        ip(&[
            "-n", vm, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            client,
        ])?;
        for ns in [vm, client] {
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        ip(&["-n", vm, "addr", "add", &format!("{VM}/32"), "dev", "eth0"])?;
        ip(&["-n", vm, "route", "add", "198.18.0.0/15", "dev", "eth0"])?;
        lab.add_sources(sources, &VM.to_string())?;
        Ok(lab)
    }

    /// Three namespaces: client `sources` -- router -- vm [`VM`], the router forwarding
    /// between its two links (`eth0` to the client, `eth1` to the vm) and nothing on the
    /// vm but its server: the place of a gateway agent in front of a machine.
    pub fn routed(sources: &[Ipv4Addr]) -> Result<Self, Error> {
        let lab = Self::namespaces(true)?;
        let (vm, client) = (lab.vm.as_str(), lab.client.as_str());
        let router = lab.router.as_deref().expect("a routed lab has a router");
        ip(&[
            "-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            router,
        ])?;
        ip(&[
            "-n", vm, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", "netns",
            router,
        ])?;
        for (ns, link) in [
            (vm, "eth0"),
            (client, "eth0"),
            (router, "eth0"),
            (router, "eth1"),
        ] {
            ip(&["-n", ns, "link", "set", link, "up"])?;
        }
        let (to_client, to_vm) = (ROUTER_CLIENT_SIDE.to_string(), ROUTER_VM_SIDE.to_string());
        ip(&[
            "-n",
            router,
            "addr",
            "add",
            &format!("{to_client}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            router,
            "addr",
            "add",
            &format!("{to_vm}/32"),
            "dev",
            "eth1",
        ])?;
        ip(&[
            "-n",
            router,
            "route",
            "add",
            &format!("{VM}/32"),
            "dev",
            "eth1",
        ])?;
        ip(&["-n", router, "route", "add", "198.18.0.0/15", "dev", "eth0"])?;
        for forwarding in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            let set = std::process::Command::new("ip")
                .args(["netns", "exec", router, "sysctl", "-qw", forwarding])
                .status()?;
            if !set.success() {
                return Err(format!("cannot set {forwarding} in the router namespace").into());
            }
        }
        ip(&["-n", vm, "addr", "add", &format!("{VM}/32"), "dev", "eth0"])?;
        ip(&[
            "-n",
            vm,
            "route",
            "add",
            &format!("{to_vm}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", vm, "route", "add", "198.18.0.0/15", "via", &to_vm])?;
        ip(&[
            "-n",
            client,
            "route",
            "add",
            &format!("{to_client}/32"),
            "dev",
            "eth0",
        ])?;
        lab.add_sources(sources, &to_client)?;
        Ok(lab)
    }

    /// The client's source addresses, and its route to the vm through `next_hop` (the vm
    /// itself when they share the link).
    fn add_sources(&self, sources: &[Ipv4Addr], next_hop: &str) -> Result<(), Error> {
        let client = self.client.as_str();
        for source in sources {
            ip(&[
                "-n",
                client,
                "addr",
                "add",
                &format!("{source}/32"),
                "dev",
                "eth0",
            ])?;
        }
        let route = format!("{VM}/32");
        if next_hop == VM.to_string() {
            ip(&["-n", client, "route", "add", &route, "dev", "eth0"])?;
        } else {
            ip(&["-n", client, "route", "add", &route, "via", next_hop])?;
        }
        Ok(())
    }

    /// IPv6: `vm` on the vm, `clients` on the client, all in 2001:2::/48 (no duplicate
    /// address detection, so they are usable at once), over the link or the router.
    pub fn add_ipv6(&self, vm: Ipv6Addr, clients: &[Ipv6Addr]) -> Result<(), Error> {
        if let Some(router) = &self.router {
            return self.add_routed_ipv6(router, vm, clients);
        }
        let (vm_ns, client_ns) = (self.vm.as_str(), self.client.as_str());
        ip(&[
            "-n",
            vm_ns,
            "addr",
            "add",
            &format!("{vm}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        for address in clients {
            let address = format!("{address}/128");
            ip(&[
                "-n", client_ns, "addr", "add", &address, "dev", "eth0", "nodad",
            ])?;
        }
        for ns in [vm_ns, client_ns] {
            ip(&["-n", ns, "-6", "route", "add", "2001:2::/48", "dev", "eth0"])?;
        }
        Ok(())
    }

    /// [`Lab::add_ipv6`] through the router, which gets 2001:2::33 towards the client and
    /// 2001:2::34 towards the vm.
    fn add_routed_ipv6(
        &self,
        router: &str,
        vm: Ipv6Addr,
        clients: &[Ipv6Addr],
    ) -> Result<(), Error> {
        let (vm_ns, client_ns) = (self.vm.as_str(), self.client.as_str());
        let (to_client, to_vm) = ("2001:2::33", "2001:2::34");
        let add = |ns: &str, address: &str, link: &str| {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/128"),
                "dev",
                link,
                "nodad",
            ])
        };
        add(router, to_client, "eth0")?;
        add(router, to_vm, "eth1")?;
        add(vm_ns, &vm.to_string(), "eth0")?;
        for client in clients {
            add(client_ns, &client.to_string(), "eth0")?;
        }
        let route = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns, "-6", "route", "add"];
            all.extend_from_slice(args);
            ip(&all)
        };
        let vm_host = format!("{vm}/128");
        route(router, &[&vm_host, "dev", "eth1"])?;
        route(router, &["2001:2::/48", "dev", "eth0"])?;
        route(vm_ns, &[&format!("{to_vm}/128"), "dev", "eth0"])?;
        route(vm_ns, &["2001:2::/48", "via", to_vm])?;
        route(client_ns, &[&format!("{to_client}/128"), "dev", "eth0"])?;
        route(client_ns, &[&vm_host, "via", to_client])?;
        Ok(())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A real sshd on the vm's port 22, accepting the generated client key for root.
    pub async fn start_sshd(&mut self) -> Result<(), Error> {
        std::fs::create_dir_all("/run/sshd")?;
        for key in ["host_key", "client_key"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(self.path(key))
                .output()
                .await?;
            if !out.status.success() {
                return Err(format!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr)).into());
            }
        }
        std::fs::copy(self.path("client_key.pub"), self.path("authorized_keys"))?;
        let config = format!(
            "Port 22\nPort {KEEP_PORT}\nListenAddress {VM}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nLogLevel ERROR\n",
            self.path("host_key").display(),
            self.path("authorized_keys").display(),
        );
        std::fs::write(self.path("sshd_config"), config)?;
        let sshd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.vm,
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
            ])
            .arg(self.path("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(self.path("sshd.log"))?))
            .kill_on_drop(true)
            .spawn()?;
        self.sshd = Some(sshd);
        // Ready once port 22 answers (no firewall yet).
        eventually("sshd to listen", || async {
            matches!(self.connect(A, 22, DROP_TIMEOUT).await, Verdict::Connected).then_some(())
        })
        .await?;
        Ok(())
    }

    /// The agent binary for `ctx`'s NSG `nsg`, protecting [`VM`], its log and its state in
    /// the lab directory.
    pub fn start_agent(&mut self, ctx: &Ctx, name: &str) -> Result<(), Error> {
        let kubeconfig = ctx.plane.kubeconfig("admin");
        self.start_agent_with(ctx, name, &["--address", &VM.to_string()], &kubeconfig)
    }

    /// The agent with `args` (on top of the NSG, its name, the namespace and the state
    /// directory), reaching the apiserver through `kubeconfig`.
    pub fn start_agent_with(
        &mut self,
        ctx: &Ctx,
        name: &str,
        args: &[&str],
        kubeconfig: &Path,
    ) -> Result<(), Error> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("agent.log"))?;
        let agent = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["agent", "--nsg", &format!("{}/nsg", ctx.ns)])
            .args(["--agent-name", name])
            .args(args)
            .args(["--netns", self.enforcing()])
            .arg("--state-dir")
            .arg(self.path("state"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        self.agent = Some(agent);
        Ok(())
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// A TCP connect from `source` in the client namespace to the vm's `port`.
    async fn connect(&self, source: Ipv4Addr, port: u16, timeout: Duration) -> Verdict {
        self.connect_to(source.into(), VM.into(), port, timeout)
            .await
    }

    /// A TCP connect from `source` in the client namespace to `destination`'s `port`.
    pub async fn connect_to(
        &self,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Verdict {
        match client_sockets(&self.client, &[source]) {
            Ok(mut sockets) => {
                let (socket, _) = sockets.remove(0);
                connect(socket, SocketAddr::new(destination, port), timeout).await
            }
            Err(error) => Verdict::Error(error.to_string()),
        }
    }

    /// Waits until connects from `source` to the vm's `port` get `wanted` (passes or drops).
    pub async fn until(&self, source: Ipv4Addr, port: u16, passes: bool) -> Result<(), Error> {
        self.until_to(source.into(), VM.into(), port, passes).await
    }

    /// Waits until connects from `source` to `destination`'s `port` pass, or are dropped.
    pub async fn until_to(
        &self,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
        passes: bool,
    ) -> Result<(), Error> {
        let what = format!(
            "{destination} port {port} to be {} from {source}",
            if passes { "reachable" } else { "dropped" }
        );
        eventually(&what, || async {
            let verdict = self
                .connect_to(source, destination, port, DROP_TIMEOUT)
                .await;
            (verdict.passed() == passes).then_some(())
        })
        .await
        .map_err(|e| format!("{e}\nagent log:\n{}", self.agent_log()))?;
        Ok(())
    }

    /// `ssh` from `source` to root@vm running `command`, key authentication only.
    fn ssh(&self, source: Ipv4Addr, command: &str) -> Command {
        self.ssh_to(source, 22, command)
    }

    /// `ssh` from `source` to root@vm's `port` running `command`.
    pub fn ssh_to(&self, source: Ipv4Addr, port: u16, command: &str) -> Command {
        let mut ssh = Command::new("ip");
        ssh.args(["netns", "exec", &self.client, "ssh", "-i"])
            .arg(self.path("client_key"))
            .args([
                "-p",
                &port.to_string(),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=2",
                "-o",
                "LogLevel=ERROR",
                "-b",
                &source.to_string(),
                &format!("root@{VM}"),
                command,
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        ssh
    }

    /// Whether `ssh` from `source` logs in and runs a command.
    pub async fn ssh_logs_in(&self, source: Ipv4Addr) -> Result<bool, Error> {
        let out = self.ssh(source, "echo logged-in").output().await?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("logged-in"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in [self.agent.take(), self.sshd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.start_kill();
            if let Some(pid) = child.id() {
                // Reap it now: a namespace is only gone once nothing runs in it.
                // SAFETY: waitpid on our own child's pid, with a valid status pointer.
                unsafe {
                    let mut status = 0;
                    libc::waitpid(pid as libc::pid_t, &mut status, 0);
                }
            }
        }
        for ns in self.all() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What a connect attempt saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The handshake completed.
    Connected,
    /// A RST came back: the SYN passed the firewall, nothing listens.
    Refused,
    /// No answer in time: dropped.
    TimedOut,
    Error(String),
}

impl Verdict {
    pub fn passed(&self) -> bool {
        matches!(self, Verdict::Connected | Verdict::Refused)
    }
}

/// Sockets created inside network namespace `netns` and bound to `sources` (with their
/// ephemeral source ports). A socket belongs to the namespace it was created in, so only
/// the creating thread has to enter it; the sockets are then used from anywhere.
fn client_sockets(netns: &str, sources: &[IpAddr]) -> Result<Vec<(TcpSocket, u16)>, Error> {
    let path = format!("/var/run/netns/{netns}");
    let sources = sources.to_vec();
    std::thread::spawn(move || -> Result<Vec<(TcpSocket, u16)>, Error> {
        let file = std::fs::File::open(&path)?;
        // SAFETY: setns on a valid namespace fd; it changes only this (short-lived) thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        sources
            .iter()
            .map(|source| {
                let socket = if source.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(*source, 0))?;
                let port = socket.local_addr()?.port();
                Ok((socket, port))
            })
            .collect()
    })
    .join()
    .map_err(|_| "socket thread panicked")?
}

async fn connect(socket: TcpSocket, destination: SocketAddr, timeout: Duration) -> Verdict {
    match tokio::time::timeout(timeout, socket.connect(destination)).await {
        Err(_) => Verdict::TimedOut,
        Ok(Ok(_)) => Verdict::Connected,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Verdict::Refused,
        Ok(Err(e)) => Verdict::Error(e.to_string()),
    }
}

/// A listener on the vm's `port`, accepting and dropping connections until aborted.
fn listen(lab: &Lab, port: u16) -> Result<tokio::task::JoinHandle<()>, Error> {
    let path = format!("/var/run/netns/{}", lab.vm);
    let listener = std::thread::spawn(move || -> Result<std::net::TcpListener, Error> {
        let file = std::fs::File::open(&path)?;
        // SAFETY: as in `client_sockets`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let listener = std::net::TcpListener::bind(SocketAddr::from((VM, port)))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| "listener thread panicked")??;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        while listener.accept().await.is_ok() {}
    }))
}

/// Sets up the NSG and waits for the agent's report of it (its `AgentReport`, owned by the
/// NSG as it is now).
pub async fn enforced(ctx: &Ctx, lab: &Lab, agent: &str) -> Result<(), Error> {
    succeeded(&ctx.apply(&nsg()))?;
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    eventually(&format!("agent {agent} to report"), || async {
        let uid = nsgs.get_opt("nsg").await.ok().flatten()?.metadata.uid;
        let report = agent_report(ctx, agent).await?;
        let owned = report
            .metadata
            .owner_references?
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref());
        let report = report.spec.report;
        (owned && report.error.is_none() && report.rules_hash != "none").then_some(())
    })
    .await
    .map_err(|e| format!("{e}\nagent log:\n{}", lab.agent_log()))?;
    Ok(())
}

/// Agent `agent`'s report on the NSG `nsg`, if there is one.
pub async fn agent_report(ctx: &Ctx, agent: &str) -> Option<AgentReport> {
    let reports: Api<AgentReport> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    reports
        .get_opt(&report_name("nsg", agent))
        .await
        .ok()
        .flatten()
}

/// The expiry of `name`'s first grant.
pub async fn expiry(ctx: &Ctx, name: &str) -> Result<Timestamp, Error> {
    let requests: Api<portcullis::api::JitRequest> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    requests
        .get(name)
        .await?
        .status
        .and_then(|s| s.grants.first().map(|g| g.end_time.0))
        .ok_or_else(|| format!("{name} has no grant").into())
}

pub async fn granted(ctx: &Ctx, name: &str) -> Result<(), Error> {
    let requests: Api<portcullis::api::JitRequest> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    eventually(&format!("jitr/{name} to be granted"), || async {
        let request = requests.get_opt(name).await.ok().flatten()?;
        (request.status?.phase? == Phase::Granted).then_some(())
    })
    .await?;
    Ok(())
}

async fn policy_closes_ssh_and_keeps_allowed_ports_open(ctx: Ctx) -> TestResult {
    if skipped("policy_closes_ssh_and_keeps_allowed_ports_open") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    let _http = listen(&lab, 80)?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    for source in [A, B] {
        lab.until(source, 22, false).await?;
        if lab.ssh_logs_in(source).await? {
            return Err(format!("ssh from {source} logged in through DenyAllInBound").into());
        }
        if lab.connect(source, 80, SLOW_CONNECT).await != Verdict::Connected {
            return Err(format!("port 80 is not reachable from {source}").into());
        }
    }
    // The agent applies and reports the new generation; the operator copies its report
    // into the NSG's status and says every agent is in sync.
    succeeded(&ctx.apply(&nsg().replace("priority: 300", "priority: 310")))?;
    let nsgs: Api<NetworkSecurityGroup> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    eventually(
        "the agent to report generation 2 beside the operator's status",
        || async {
            let status = nsgs.get_opt("nsg").await.ok().flatten()?.status?;
            let mine = status.enforcement.iter().find(|r| r.agent == "vm-1")?;
            (mine.observed_generation == Some(2)
                && status.observed_generation == Some(2)
                && mine.addresses == [VM.to_string()])
            .then_some(())
        },
    )
    .await?;
    // As a user waits for an edit to reach every machine.
    succeeded(&ctx.kubectl(&[
        "wait",
        "--for=condition=Enforced",
        "nsg/nsg",
        "--timeout=60s",
    ]))?;
    let listed = succeeded(&ctx.kubectl(&["get", "nsg", "nsg"]))?;
    assert!(
        listed.contains("AGENTS") && listed.contains("ENFORCED"),
        "{listed}"
    );
    let enforced = nsgs
        .get("nsg")
        .await?
        .status
        .into_iter()
        .flat_map(|s| s.conditions)
        .find(|c| c.type_ == "Enforced")
        .ok_or("no Enforced condition")?;
    assert_eq!(enforced.reason, "AgentsInSync", "{enforced:?}");
    assert_eq!(enforced.message, "1 agent enforces generation 2");
    Ok(())
}

/// A user's SecurityRule of this namespace, denying port 80 to `source`, in NSG `nsg`.
fn user_deny(source: Ipv4Addr, nsg: &str) -> String {
    format!(
        r#"apiVersion: jit.portcullis.dev/v1alpha1
kind: SecurityRule
metadata:
  name: no-http-for-b
spec:
  networkSecurityGroupName: {nsg}
  priority: 200
  direction: Inbound
  access: Deny
  protocol: Tcp
  sourceAddressPrefix: "{source}"
  sourcePortRange: "*"
  destinationAddressPrefix: "*"
  destinationPortRange: "80"
"#
    )
}

/// The agent watches only its NSG's rules (selected on the server by
/// `spec.networkSecurityGroupName`): a rule of another NSG is not enforced, and one moved
/// into the NSG and out again is enforced exactly while it is there (leaving the selection
/// reaches the agent as a delete).
async fn a_rule_is_enforced_while_it_names_the_nsg(ctx: Ctx) -> TestResult {
    if skipped("a_rule_is_enforced_while_it_names_the_nsg") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    let _http = listen(&lab, 80)?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.apply(&user_deny(B, "other")))?;
    lab.until(B, 80, true).await?;
    succeeded(&ctx.apply(&user_deny(B, "nsg")))?;
    lab.until(B, 80, false).await?;
    lab.until(A, 80, true).await?;
    succeeded(&ctx.apply(&user_deny(B, "other")))?;
    lab.until(B, 80, true).await?;
    // The server selects by the field, as the agent asks it to.
    let rules: Api<portcullis::api::SecurityRule> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let selected = rules
        .list(&kube::api::ListParams::default().fields(&format!(
            "{}=other",
            portcullis::api::security_rule::NSG_FIELD
        )))
        .await?;
    if selected.items.len() != 1 {
        return Err(format!("{} rules selected for NSG other", selected.items.len()).into());
    }
    Ok(())
}

/// An NSG deleted and created again with the same spec is a new object (its reports went
/// with the old one), and a report deleted by hand is gone: either way the agent reports
/// again, though nothing it enforces changed.
async fn a_recreated_nsg_gets_the_agents_report(ctx: Ctx) -> TestResult {
    if skipped("a_recreated_nsg_gets_the_agents_report") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.kubectl(&["delete", "nsg", "nsg", "--wait=true"]))?;
    enforced(&ctx, &lab, "vm-1").await?;
    lab.until(B, 22, false).await?;
    succeeded(&ctx.kubectl(&[
        "delete",
        "agentreport",
        &report_name("nsg", "vm-1"),
        "--wait=true",
    ]))?;
    enforced(&ctx, &lab, "vm-1").await?;
    Ok(())
}

async fn grant_admits_only_its_source_until_revoked(ctx: Ctx) -> TestResult {
    if skipped("grant_admits_only_its_source_until_revoked") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.apply(&policy()))?;
    lab.until(A, 22, false).await?;
    succeeded(&ctx.apply_as("alice", &["team-web"], &request("ssh-a", A.into(), "PT10M")))?;
    granted(&ctx, "ssh-a").await?;
    lab.until(A, 22, true).await?;
    if !lab.ssh_logs_in(A).await? {
        return Err(format!("ssh from A did not log in:\n{}", lab.agent_log()).into());
    }
    if lab.ssh_logs_in(B).await? {
        return Err("ssh from B logged in with A's grant".into());
    }
    if lab.connect(B, 22, DROP_TIMEOUT).await.passed() {
        return Err("B's SYN to 22 passed".into());
    }
    succeeded(&ctx.kubectl(&["delete", "jitrequest", "ssh-a", "--wait=false"]))?;
    lab.until(A, 22, false).await?;
    if lab.ssh_logs_in(A).await? {
        return Err("ssh from A logged in after the revoke".into());
    }
    if !lab.agent_log().contains("how=Grants") {
        return Err(format!(
            "grants were not applied as element updates:\n{}",
            lab.agent_log()
        )
        .into());
    }
    Ok(())
}

async fn grant_ends_on_time_with_the_agent_killed(ctx: Ctx) -> TestResult {
    if skipped("grant_ends_on_time_with_the_agent_killed") {
        return Ok(());
    }
    let mut lab = Lab::new(&[A, B])?;
    lab.start_sshd().await?;
    lab.start_agent(&ctx, "vm-1")?;
    enforced(&ctx, &lab, "vm-1").await?;
    succeeded(&ctx.apply(&policy()))?;
    succeeded(&ctx.apply_as(
        "alice",
        &["team-web"],
        &request("doomed", A.into(), "PT10S"),
    ))?;
    granted(&ctx, "doomed").await?;
    lab.until(A, 22, true).await?;
    let requests: Api<portcullis::api::JitRequest> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let request = requests.get("doomed").await?;
    let expires: Timestamp = request
        .status
        .as_ref()
        .and_then(|s| s.grants.first())
        .map(|g| g.end_time.0)
        .ok_or("the granted request has no end time")?;
    let mut agent = lab.agent.take().ok_or("no agent")?;
    agent.kill().await?;
    // Nothing but the kernel is left to close the port: the element's timeout, rounded up
    // to the second, plus the apply delay.
    lab.until(A, 22, false).await?;
    let closed = Timestamp::now();
    let late = closed.duration_since(expires);
    if late.as_secs_f64() > 2.5 {
        return Err(format!("the grant ended {late:#} after its expiry").into());
    }
    if late.as_secs_f64() < -0.5 {
        return Err(format!("the grant ended {late:#} before its expiry").into());
    }
    Ok(())
}

async fn cleanup_removes_only_its_table(_ctx: Ctx) -> TestResult {
    if skipped("cleanup_removes_only_its_table") {
        return Ok(());
    }
    let lab = Lab::new(&[A])?;
    let nft = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.vm, "nft"])
            .args(args)
            .output()
    };
    let mut enforcer = Enforcer::new(Nft::in_netns(&lab.vm)?);
    let policy = Policy {
        rules: rules::effective([]),
        ..Policy::default()
    };
    let target = Target {
        table: "portcullis".into(),
        addresses: vec![IpAddr::V4(VM)],
        mode: Mode::Host,
    };
    enforcer
        .apply(
            render::render(&policy, &target, Timestamp::now()),
            Timestamp::now(),
        )
        .await?;
    if !nft(&["add", "table", "inet", "other"])?.status.success() {
        return Err("cannot add the other table".into());
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["agent", "--cleanup", "--netns", &lab.vm])
        .output()?;
    if !out.status.success() {
        return Err(format!("cleanup failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let tables = String::from_utf8(nft(&["list", "tables"])?.stdout)?;
    if tables.contains("portcullis") || !tables.contains("table inet other") {
        return Err(format!("after cleanup: {tables}").into());
    }
    // Idempotent: no table is fine too.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["agent", "--cleanup", "--netns", &lab.vm])
        .status()?;
    if !again.success() {
        return Err("a second cleanup failed".into());
    }
    Ok(())
}

/// A small deterministic generator (SplitMix64): the seed printed reproduces a run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The vm's IPv6 address in the IPv6 labs.
pub const VM_6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10);

/// The IPv6 client addresses of the differential test, in and out of the prefixes its NSGs
/// name.
const SOURCES_6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x20),
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x21),
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x9),
    Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x5),
];

/// The client addresses of the differential test, spread over 198.18.0.0/15 so that
/// prefixes and tags cut between them.
const SOURCES: [Ipv4Addr; 12] = [
    Ipv4Addr::new(198, 18, 0, 5),
    Ipv4Addr::new(198, 18, 0, 20),
    Ipv4Addr::new(198, 18, 0, 21),
    Ipv4Addr::new(198, 18, 0, 77),
    Ipv4Addr::new(198, 18, 1, 5),
    Ipv4Addr::new(198, 18, 3, 9),
    Ipv4Addr::new(198, 18, 128, 1),
    Ipv4Addr::new(198, 19, 0, 10),
    Ipv4Addr::new(198, 19, 0, 200),
    Ipv4Addr::new(198, 19, 5, 5),
    Ipv4Addr::new(198, 19, 200, 1),
    Ipv4Addr::new(198, 19, 255, 254),
];
const PORTS: [u16; 12] = [
    22, 80, 443, 1000, 1500, 2000, 2001, 3389, 5985, 8080, 9000, 60000,
];

fn random_nsg(random: &mut Random, now: Timestamp) -> Policy {
    let prefix = |s: &str| s.parse::<AddressPrefix>().expect("valid prefix");
    let vnets = [
        "198.18.0.0/24",
        "198.18.0.0/16",
        "198.19.0.0/24",
        "198.18.1.0/24",
        "198.18.0.0/28",
        "2001:2::/48",
    ];
    let sources = [
        "*",
        "VirtualNetwork",
        "Internet",
        "AzureLoadBalancer",
        "198.18.0.0/24",
        "198.18.0.20",
        "198.18.0.16/30",
        "198.19.0.0/16",
        "198.19.0.0/24",
        "198.18.0.0/15",
        "198.18.0.64/26",
        "203.0.113.0/24",
        "2001:2:0:1::/64",
        "2001:2::/64",
        "2001:2::20",
    ];
    let destinations = [
        "*",
        "198.18.0.10",
        "VirtualNetwork",
        "Internet",
        "198.18.0.0/24",
        "198.19.0.0/16",
        "2001:2::10",
    ];
    let destination_ports = [
        "*",
        "22",
        "80",
        "443",
        "1000-2000",
        "1500-1600",
        "2000-2001",
        "3389",
        "8080",
        "0-1023",
        "5985-9000",
        "60000",
    ];
    let source_ports = ["*", "*", "*", "*", "1024-65535", "0-1023", "32768-40000"];
    let protocols = [
        Protocol::Tcp,
        Protocol::Tcp,
        Protocol::Any,
        Protocol::Any,
        Protocol::Udp,
        Protocol::Icmp,
    ];
    let scope = Scope {
        virtual_network: (0..1 + random.below(2))
            .map(|_| random.pick(&vnets).parse().expect("valid net"))
            .collect(),
        load_balancer: if random.chance(50) {
            vec!["198.19.0.200/32".parse().expect("valid net")]
        } else {
            Vec::new()
        },
    };
    let mut priorities: Vec<u32> = Vec::new();
    let mut model = Vec::new();
    let mut expiries = BTreeMap::new();
    for index in 0..1 + random.below(14) {
        let mut priority = 100 + random.below(400) as u32;
        while priorities.contains(&priority) {
            priority += 1;
        }
        priorities.push(priority);
        let jit = random.chance(25);
        let name = format!("r{index}");
        let several = |random: &mut Random, pool: &[&str], max: usize| -> Vec<String> {
            (0..1 + random.below(max))
                .map(|_| (*random.pick(pool)).to_owned())
                .collect()
        };
        let (access, protocol, source_prefixes, source_ports_of, origin) = if jit {
            // A grant as the operator writes it: one source, one port, an expiry.
            expiries.insert(name.clone(), now + jiff::SignedDuration::from_secs(3600));
            (
                Access::Allow,
                *random.pick(&[Protocol::Tcp, Protocol::Any]),
                vec![(*random.pick(&sources[4..])).to_owned()],
                vec!["*".to_owned()],
                Origin::SecurityRule { name: name.clone() },
            )
        } else {
            (
                *random.pick(&[Access::Allow, Access::Deny]),
                *random.pick(&protocols),
                several(random, &sources, 3),
                several(random, &source_ports, 2),
                Origin::Inline,
            )
        };
        model.push(Rule {
            name,
            priority,
            direction: Direction::Inbound,
            access,
            protocol,
            source_prefixes: source_prefixes.iter().map(|s| prefix(s)).collect(),
            source_ports: source_ports_of
                .iter()
                .map(|p| p.parse::<PortRange>().expect("valid ports"))
                .collect(),
            destination_prefixes: several(random, &destinations, 2)
                .iter()
                .map(|s| prefix(s))
                .collect(),
            destination_ports: several(random, &destination_ports, 3)
                .iter()
                .map(|p| p.parse::<PortRange>().expect("valid ports"))
                .collect(),
            origin,
            jit,
        });
    }
    Policy {
        rules: rules::effective(model),
        scope,
        expiries,
        closing: Default::default(),
        idle: Default::default(),
    }
}

async fn kernel_verdicts_equal_the_evaluation(_ctx: Ctx) -> TestResult {
    if skipped("kernel_verdicts_equal_the_evaluation") {
        return Ok(());
    }
    differential("kernel_verdicts_equal_the_evaluation", Mode::Host).await
}

/// The same through a router whose table is on the forward hook: a gateway in front of
/// the vm.
async fn gateway_verdicts_equal_the_evaluation(_ctx: Ctx) -> TestResult {
    if skipped("gateway_verdicts_equal_the_evaluation") {
        return Ok(());
    }
    differential("gateway_verdicts_equal_the_evaluation", Mode::Gateway).await
}

/// Random NSGs enforced at `mode`'s place, real connects, and for each the verdict of
/// [`rules::evaluate`]: they must agree on every packet.
async fn differential(test: &str, mode: Mode) -> TestResult {
    let seed = std::env::var("PORTCULLIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Timestamp::now().as_nanosecond() as u64);
    eprintln!("enforcement::{test}: seed {seed} (PORTCULLIS_SEED={seed} reproduces it)");
    let mut random = Random(seed);
    let lab = match mode {
        Mode::Host => Lab::new(&SOURCES)?,
        Mode::Gateway => Lab::routed(&SOURCES)?,
    };
    lab.add_ipv6(VM_6, &SOURCES_6)?;
    let mut enforcer = Enforcer::new(Nft::in_netns(lab.enforcing())?);
    let target = Target {
        table: "portcullis".into(),
        addresses: vec![IpAddr::V4(VM), IpAddr::V6(VM_6)],
        mode,
    };
    const NSGS: usize = 10;
    const PACKETS: usize = 60;
    let mut mismatches = Vec::new();
    let mut checked = 0;
    for round in 0..NSGS {
        let now = Timestamp::now();
        let policy = random_nsg(&mut random, now);
        let ruleset = render::render(&policy, &target, now);
        // The oracle sees the rules as they apply there: on the machine, JIT rules aimed at
        // one of its addresses cover all of them.
        let enforced = render::as_enforced(&policy, &target);
        enforcer.apply(ruleset, now).await?;
        // One packet in three over IPv6, to the vm's IPv6 address.
        let picks: Vec<(IpAddr, u16)> = (0..PACKETS)
            .map(|_| {
                let source = if random.chance(33) {
                    IpAddr::V6(*random.pick(&SOURCES_6))
                } else {
                    IpAddr::V4(*random.pick(&SOURCES))
                };
                (source, *random.pick(&PORTS))
            })
            .collect();
        let sources: Vec<IpAddr> = picks.iter().map(|(s, _)| *s).collect();
        let sockets = client_sockets(&lab.client, &sources)?;
        let attempts = sockets
            .into_iter()
            .zip(&picks)
            .map(|((socket, sport), (source, port))| {
                let destination = match source {
                    IpAddr::V4(_) => IpAddr::V4(VM),
                    IpAddr::V6(_) => IpAddr::V6(VM_6),
                };
                let packet = Packet {
                    direction: Direction::Inbound,
                    protocol: Protocol::Tcp,
                    source: *source,
                    source_port: sport,
                    destination,
                    destination_port: *port,
                };
                async move {
                    (
                        packet,
                        connect(
                            socket,
                            SocketAddr::new(destination, packet.destination_port),
                            DROP_TIMEOUT,
                        )
                        .await,
                    )
                }
            });
        let results = futures::future::join_all(attempts).await;
        for (packet, seen) in results {
            checked += 1;
            let want = rules::evaluate(&enforced, &packet, &policy.scope);
            let mut passed = seen.passed();
            if let Verdict::Error(error) = &seen {
                return Err(format!("connect failed: {error}").into());
            }
            if !passed && want.access == Access::Allow {
                // Maybe only slow (a loaded machine): ask again, patiently, from the same
                // source (the source port differs, which the rules may care about).
                let mut again = client_sockets(&lab.client, &[packet.source])?;
                let (socket, sport) = again.remove(0);
                let retry = Packet {
                    source_port: sport,
                    ..packet
                };
                if rules::evaluate(&enforced, &retry, &policy.scope).access == Access::Allow {
                    passed = connect(
                        socket,
                        SocketAddr::new(packet.destination, packet.destination_port),
                        SLOW_CONNECT,
                    )
                    .await
                    .passed();
                }
            }
            if passed != (want.access == Access::Allow) {
                mismatches.push(format!(
                    "round {round}: {}:{} -> {}:{} expected {:?} by {:?}, kernel {}",
                    packet.source,
                    packet.source_port,
                    packet.destination,
                    packet.destination_port,
                    want.access,
                    want.rule,
                    if passed { "passed it" } else { "dropped it" },
                ));
            }
        }
        if !mismatches.is_empty() {
            let table = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    lab.enforcing(),
                    "nft",
                    "list",
                    "table",
                    "inet",
                    "portcullis",
                ])
                .output()?;
            return Err(format!(
                "seed {seed}: {} mismatches:\n{}\nrules: {:#?}\nscope: {:?}\nkernel:\n{}",
                mismatches.len(),
                mismatches.join("\n"),
                enforced,
                policy.scope,
                String::from_utf8_lossy(&table.stdout)
            )
            .into());
        }
    }
    eprintln!("enforcement::{test}: {checked} packets, 0 mismatches (seed {seed})");
    Ok(())
}

/// `deploy/agent/` as a user applies it, checked by the API server, Pod Security admission
/// included. The agent needs hostNetwork, a hostPath, root and NET_ADMIN/NET_RAW: only a
/// namespace at Pod Security level `privileged` admits its pods, and the operator's
/// portcullis-system is `restricted`. A server dry run of the DaemonSet is never refused
/// for that (admission refuses pods, which this plane never creates), but Pod Security
/// admission warns on it: `would violate PodSecurity`. So the objects go into a namespace of
/// the test's own, created with the labels of the namespace the shipped DaemonSet names
/// (which `deploy/agent/` or `deploy/` must create), the NSG's Role there too, and kubectl
/// must print no such warning. The same DaemonSet into portcullis-system must draw it, or
/// the check proves nothing.
async fn agent_manifests_pass_server_dry_run(ctx: Ctx) -> TestResult {
    use serde::Deserialize;
    use serde_json::Value;

    const VIOLATION: &str = "would violate PodSecurity";

    /// Replaces every `namespace` field (metadata, RoleBinding subjects) naming one of `from`.
    fn move_namespaces(value: &mut Value, from: &[&str], to: &str) {
        match value {
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    if key == "namespace" && item.as_str().is_some_and(|ns| from.contains(&ns)) {
                        *item = Value::from(to);
                    } else {
                        move_namespaces(item, from, to);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| move_namespaces(v, from, to)),
            _ => {}
        }
    }
    let stream = |objects: &[Value]| -> String {
        objects
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let kustomize = |dir: &str| -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let rendered = succeeded(&ctx.kubectl(&["kustomize", &dir.display().to_string()]))?;
        let mut objects = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(&rendered) {
            let object = Value::deserialize(document)?;
            if !object.is_null() {
                objects.push(object);
            }
        }
        Ok(objects)
    };
    let agent = kustomize("deploy/agent")?;
    let operator = kustomize("deploy")?;

    let daemonset = agent
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .ok_or("deploy/agent/ has no DaemonSet")?;
    let agent_ns = daemonset["metadata"]["namespace"]
        .as_str()
        .ok_or("the agent's DaemonSet names no namespace")?;
    let nsg_ns = daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|var| var["name"] == "NSG")
        .and_then(|var| var["value"].as_str()?.split_once('/'))
        .map(|(namespace, _)| namespace)
        .ok_or("the agent's DaemonSet has no NSG env as NAMESPACE/NAME")?;
    let mut namespace = agent
        .iter()
        .chain(&operator)
        .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == agent_ns)
        .cloned()
        .ok_or_else(|| {
            format!(
                "the agent's namespace {agent_ns} is created by neither deploy/agent/ nor deploy/"
            )
        })?;

    // The test's stand-in for the agent's namespace, labelled as shipped from its creation
    // (Pod Security admission reads labels from an informer; a namespace it has not seen
    // yet it reads from the apiserver, so a fresh one is never judged by stale labels).
    let stand_in = format!("{}-agent", ctx.ns);
    namespace["metadata"]["name"] = Value::from(stand_in.as_str());
    succeeded(&ctx.kubectl_as(
        portcullis::testenv::ADMIN,
        &["create", "-f", "-"],
        Some(&namespace.to_string()),
    ))?;
    let mut moved = agent.clone();
    moved
        .iter_mut()
        .for_each(|o| move_namespaces(o, &[agent_ns, nsg_ns], &stand_in));
    let output = ctx.kubectl_as(
        portcullis::testenv::ADMIN,
        &[
            "apply",
            "--dry-run=server",
            &format!("--namespace={stand_in}"),
            "-f",
            "-",
        ],
        Some(&stream(&moved)),
    );
    let _ = ctx.kubectl(&["delete", "namespace", &stand_in, "--wait=false"]);
    let out = succeeded(&output)?;
    let warnings = String::from_utf8_lossy(&output.stderr);
    if warnings.contains(VIOLATION) {
        return Err(format!(
            "the agent's pods would be refused in its namespace {agent_ns} \
             (labels {}):\n{warnings}",
            namespace["metadata"]["labels"]
        )
        .into());
    }
    for expected in [
        "namespace/portcullis-agent",
        "serviceaccount/portcullis-agent",
        "role.rbac.authorization.k8s.io/portcullis-agent",
        "rolebinding.rbac.authorization.k8s.io/portcullis-agent",
        "daemonset.apps/portcullis-agent",
    ] {
        if !out.contains(expected) {
            return Err(format!("dry run output lacks {expected}:\n{out}").into());
        }
    }

    // The control: the operator's restricted namespace (deploy/namespace.yaml, which the
    // harness installed) is warned about, so the absence above means something.
    let mut control = daemonset.clone();
    move_namespaces(&mut control, &[agent_ns], "portcullis-system");
    let output = ctx.kubectl_as(
        portcullis::testenv::ADMIN,
        &[
            "apply",
            "--dry-run=server",
            "--namespace=portcullis-system",
            "-f",
            "-",
        ],
        Some(&control.to_string()),
    );
    succeeded(&output)?;
    let warnings = String::from_utf8_lossy(&output.stderr);
    if !warnings.contains(VIOLATION) {
        return Err(format!(
            "the agent's DaemonSet in the restricted portcullis-system drew no \
             PodSecurity warning, so this test cannot see one:\n{warnings}"
        )
        .into());
    }
    Ok(())
}
