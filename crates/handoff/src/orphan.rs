//! Failing closed: what happens to a VM no server serves.
//!
//! A VM whose page server is gone blocks on its next missing page, for
//! ever, and nothing tells anyone (Firecracker's documentation says as
//! much). Closing its userfaultfd is worse: the kernel then fills its
//! missing memory with zeros, silently. So a VM left without a server is
//! either killed or left waiting with a loud log line, as the operator
//! chose. The process to kill is the peer of the VM's connection
//! (`SO_PEERCRED`), and only while that connection has not hung up: the VMM
//! holds its end for as long as it lives, so the pid is still its own (a pid
//! is reused only after its process is gone). The signal goes through a
//! pidfd opened then. One gap remains: a VMM that passed its end of the
//! socket to a child and exited. Its descriptors are never closed while it lives, except by
//! dropping them, which leaves the VMM's own copy of the userfaultfd alive.

use std::os::fd::AsFd;

use crate::{hung_up, peer_pid, VmFds};

/// What to do with a VM no server took back in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanAction {
    /// Kill the VMM with SIGKILL through a pidfd (the default: a VM that
    /// cannot be served is better dead than silently hung).
    Kill,
    /// Leave it waiting, and say so loudly.
    Wait,
}

impl std::str::FromStr for OrphanAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(OrphanAction::Kill),
            "wait" => Ok(OrphanAction::Wait),
            _ => Err(format!("unknown orphan action {s:?} (kill or wait)")),
        }
    }
}

/// What became of an orphan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VMM had exited already.
    Gone,
    Killed(u32),
    LeftWaiting(Option<u32>),
    /// It could not be killed (why).
    KillFailed(Option<u32>, String),
}

/// Applies `action` to the VM with these descriptors; `key` and `why` are
/// for the log line.
pub fn handle(key: &str, vm: &VmFds, action: OrphanAction, why: &str) -> Outcome {
    let pid = vm.conn.as_ref().and_then(|c| peer_pid(c.as_fd()));
    // The pidfd first, then the check that the VMM still holds its end: a
    // pidfd opened while it does is its own (its pid cannot have been
    // reused while it lives).
    let pidfd = pid.and_then(|p| {
        let p = rustix::process::Pid::from_raw(p as i32)?;
        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
    });
    if vm.conn.as_ref().is_some_and(hung_up) {
        tracing::info!(vm = key, pid, "orphaned VM had exited already");
        return Outcome::Gone;
    }
    match action {
        OrphanAction::Wait => {
            tracing::error!(
                vm = key,
                pid,
                "VM has no page server ({why}): it is left waiting (--orphan-action wait) and \
                 will hang on its next missing page until a server takes it over or it is \
                 killed"
            );
            Outcome::LeftWaiting(pid)
        }
        OrphanAction::Kill => {
            let Some(pid) = pid else {
                tracing::error!(
                    vm = key,
                    "VM has no page server ({why}) and its process is unknown (no connection): \
                     it cannot be killed and will hang on its next missing page"
                );
                return Outcome::KillFailed(None, "process unknown".into());
            };
            let killed = match &pidfd {
                Some(fd) => rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL),
                None => Err(rustix::io::Errno::SRCH),
            };
            match killed {
                Ok(()) => {
                    tracing::error!(
                        vm = key,
                        pid,
                        "VM killed: no page server took it over ({why}); killed rather than \
                         left to hang on its next missing page (--orphan-action)"
                    );
                    Outcome::Killed(pid)
                }
                Err(e) => {
                    tracing::error!(
                        vm = key,
                        pid,
                        "VM has no page server ({why}) and killing it failed: {e}"
                    );
                    Outcome::KillFailed(Some(pid), e.to_string())
                }
            }
        }
    }
}
