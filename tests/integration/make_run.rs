//! `make run` as a developer meets it: with no cluster configured, `portcullis dev` brings up
//! its own control plane, prints a kubeconfig a second terminal can use, and on Ctrl-C
//! leaves nothing behind: no directory, no process.
//!
//! The body drives processes with blocking std calls; that is fine here because each test
//! runs on a thread of its own, not on a runtime worker.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::support::{Ctx, TestResult, succeeded};

pub fn tests() -> Vec<(&'static str, crate::TestFn)> {
    crate::tests![dev_runs_a_local_control_plane_and_removes_it_on_ctrl_c]
}

/// Starting a control plane on a loaded two-core machine, then the operator.
const STARTUP_DEADLINE: Duration = Duration::from_secs(120);
/// Stopping the operator and three components, each of which gets a grace period.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);
/// What the banner line starts with.
const EXPORT: &str = "export KUBECONFIG=";

async fn dev_runs_a_local_control_plane_and_removes_it_on_ctrl_c(ctx: Ctx) -> TestResult {
    // A HOME of its own: no ~/.kube/config, so no cluster is configured.
    let home = tempfile::tempdir()?;
    let mut dev = Dev::start(&ctx, home.path())?;
    let checks = exercise(&ctx, &mut dev);
    let stopped = dev.interrupt();
    let kubeconfig = checks.map_err(|e| format!("{e}\n{}", dev.transcript()))?;
    let status = stopped.map_err(|e| format!("{e}\n{}", dev.transcript()))?;
    if !status.success() {
        return Err(format!("portcullis dev exited with {status}\n{}", dev.transcript()).into());
    }
    let exports = dev.stdout.iter().filter(|l| l.starts_with(EXPORT)).count();
    if exports != 1 {
        return Err(format!("expected one `{EXPORT}` line, got {exports}").into());
    }
    let dir = kubeconfig
        .parent()
        .ok_or("the kubeconfig has no directory")?;
    if dir.exists() {
        return Err(format!("{} outlived portcullis dev", dir.display()).into());
    }
    let leftovers = processes_mentioning(dir);
    if !leftovers.is_empty() {
        return Err(format!("processes outlived portcullis dev: {leftovers:?}").into());
    }
    Ok(())
}

/// What a second terminal does with the printed kubeconfig (the README's first steps);
/// returns that kubeconfig.
fn exercise(ctx: &Ctx, dev: &mut Dev) -> Result<PathBuf, String> {
    let line = dev.line_starting_with(EXPORT)?;
    let kubeconfig = PathBuf::from(&line[EXPORT.len()..]);
    let kubectl = |kubeconfig: &Path, args: &[&str]| -> Output {
        Command::new(ctx.plane.kubectl())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl runs")
    };
    succeeded(&kubectl(&kubeconfig, &["get", "portcullis"]))?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    succeeded(&kubectl(
        &kubeconfig,
        &["apply", "-f", &examples.display().to_string()],
    ))?;
    // The operator in the dev process reconciles: the README's walkthrough ends granted.
    succeeded(&kubectl(
        &kubeconfig,
        &[
            "wait",
            "--for=jsonpath={.status.phase}=Granted",
            "jitr/ssh-web-1",
            "--timeout=60s",
        ],
    ))?;
    // The shipped user roles are bound: alice may request access, bob may only look.
    let dir = kubeconfig
        .parent()
        .ok_or("the kubeconfig has no directory")?;
    for (user, verb, resource, expected) in [
        ("alice", "create", "jitrequests", "yes"),
        ("alice", "initiate", "jitpolicies", "yes"),
        ("bob", "list", "jitpolicies", "yes"),
        ("bob", "create", "jitrequests", "no"),
    ] {
        let out = kubectl(
            &dir.join(format!("{user}.kubeconfig")),
            &[
                "auth",
                "can-i",
                verb,
                &format!("{resource}.jit.portcullis.dev"),
            ],
        );
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if answer != expected {
            return Err(format!(
                "`kubectl auth can-i {verb} {resource}` as {user}: {answer:?}, expected {expected}"
            ));
        }
    }
    Ok(kubeconfig)
}

/// The running `portcullis dev` and everything it printed so far.
struct Dev {
    child: Child,
    lines: Receiver<String>,
    stdout: Vec<String>,
    log: PathBuf,
}

impl Dev {
    /// Starts `portcullis dev` from the repository root (where `make run` runs it), its
    /// standard output read line by line on a thread and its logs written to a file.
    fn start(ctx: &Ctx, home: &Path) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let log = home.join("dev.log");
        // The control-plane binaries are cached under HOME by default: point the fresh HOME
        // at the cache the shared control plane already uses, so nothing is rebuilt.
        let cache = ctx
            .plane
            .bin_dir()
            .parent()
            .ok_or("the control-plane binaries have no parent directory")?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        command
            .arg("dev")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("KUBECONFIG")
            .env("HOME", home)
            .env("PORTCULLIS_CACHE_DIR", cache)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?);
        // SAFETY: prctl is async-signal-safe and nothing else runs between fork and exec.
        // If this test process dies outright, dev gets SIGTERM and still cleans up.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or("stdout is piped")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            stdout: Vec::new(),
            log,
        })
    }

    /// Reads standard output until a line starts with `prefix`, within [`STARTUP_DEADLINE`].
    fn line_starting_with(&mut self, prefix: &str) -> Result<String, String> {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no `{prefix}` line within {STARTUP_DEADLINE:?}"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "portcullis dev closed its output before printing `{prefix}`"
                    ));
                }
            }
        }
    }

    /// Ctrl-C: SIGINT, then waits for the exit within [`EXIT_DEADLINE`] (SIGKILL after it)
    /// and collects the rest of the output.
    fn interrupt(&mut self) -> Result<ExitStatus, String> {
        // SAFETY: kill(2) on our own child, which is not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + EXIT_DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "portcullis dev still running {EXIT_DEADLINE:?} after SIGINT"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader thread ends at EOF, which the exit brings.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout.push(line);
        }
        Ok(status)
    }

    /// Standard output and the log, for failure messages.
    fn transcript(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!(
            "--- portcullis dev stdout ---\n{}\n--- portcullis dev log ---\n{log}",
            self.stdout.join("\n")
        )
    }
}

/// Live processes whose command line mentions `dir` (a zombie's command line is empty).
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then(|| format!("{}: {cmdline}", entry.file_name().to_string_lossy()))
        })
        .collect()
}
