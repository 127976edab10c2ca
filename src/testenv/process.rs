//! Child processes of the local control plane: started so they cannot outlive the process
//! that owns them, and stopped politely, then firmly.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Error;

/// How long a component gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// One running component (etcd, kube-apiserver, ...), its output captured in a log file.
pub struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Component {
    /// Starts `program` with `args`, its stdout and stderr appended to `log`.
    ///
    /// The child gets `PR_SET_PDEATHSIG = SIGKILL`: if the owner dies without tearing down
    /// (SIGKILL, a panic across FFI, a killed test binary) the kernel ends the component too,
    /// so no etcd or apiserver is ever left running. The signal is tied to the *thread* that
    /// spawned the child, so callers spawn from threads that live as long as the control plane
    /// (the main thread or a runtime worker).
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, Error> {
        let out =
            File::create(&log).map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(format!("clone {}", log.display()), e))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and
        // exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The owner may have died between fork and prctl.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("start {name} ({})", program.display()), e))?;
        Ok(Self { name, child, log })
    }

    /// The component's name, which is also its program's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The component's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of the log if the component has already exited.
    pub fn ensure_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                component: self.name,
                status: status.to_string(),
                log_tail: self.log_tail(),
            }),
            Err(e) => Err(Error::io(format!("wait for {}", self.name), e)),
        }
    }

    /// The last lines of the component's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after [`GRACE`]; always reaps the child.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
