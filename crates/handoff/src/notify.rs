//! systemd's notification protocol, both ways: telling the keeper (systemd
//! or pagewire's supervisor) what to keep, and taking back what it kept.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;

use crate::{HandoffError, Named};

/// Set by pagewire's supervisor for its child: the child cannot know its
/// own pid before `exec`, so instead of `LISTEN_PID` it is told to take the
/// descriptors as its own.
pub const LISTEN_PID_SELF: &str = "PAGEWIRE_LISTEN_PID_SELF";

/// The keeper of descriptors this process reports to (`NOTIFY_SOCKET`).
#[derive(Debug, Clone)]
pub struct Notifier {
    keeps: bool,
}

impl Notifier {
    /// The service manager named by `NOTIFY_SOCKET`, if any, and whether it
    /// keeps descriptors. systemd 254 and later say so in `$FDSTORE` (the unit's
    /// `FileDescriptorStoreMax=`; 0 or absent there: it drops them). Without
    /// `$FDSTORE` (an older systemd) it is taken to keep them, and a line
    /// says what to check.
    pub fn from_env() -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let keeps = match std::env::var("FDSTORE")
            .ok()
            .map(|v| v.trim().parse::<u64>())
        {
            Some(Ok(0)) | Some(Err(_)) => {
                tracing::warn!(
                    "NOTIFY_SOCKET is set but $FDSTORE says its manager keeps no descriptors: \
                     a restart of this server would lose its VMs (set FileDescriptorStoreMax= \
                     in the unit)"
                );
                false
            }
            Some(Ok(_)) => true,
            None => {
                tracing::warn!(
                    "NOTIFY_SOCKET is set without $FDSTORE (systemd older than 254?): VMs are \
                     handed to it on the assumption that the unit sets FileDescriptorStoreMax="
                );
                true
            }
        };
        Some(Notifier { keeps })
    }

    /// Whether the manager keeps descriptors (see [`from_env`](Self::from_env)).
    pub fn keeps_descriptors(&self) -> bool {
        self.keeps
    }

    /// This notifier if its manager keeps descriptors.
    pub fn keeper(&self) -> Option<&Notifier> {
        self.keeps.then_some(self)
    }

    /// Asks the keeper to keep `fd` under `name`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), HandoffError> {
        self.store_all(name, &[fd])
    }

    /// Asks the keeper to keep all of `fds` under `name`, in this order, in
    /// one message: it keeps them all or none.
    pub fn store_all(&self, name: &str, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
        sd_notify::notify_with_fds(
            false,
            &[NotifyState::FdStore, NotifyState::FdName(name)],
            fds,
        )
        .map_err(HandoffError::io(format!("storing {name} with the keeper")))
    }

    /// Asks the keeper to close what it keeps under `name`.
    pub fn remove(&self, name: &str) -> Result<(), HandoffError> {
        sd_notify::notify(
            false,
            &[NotifyState::FdStoreRemove, NotifyState::FdName(name)],
        )
        .map_err(HandoffError::io(format!("removing {name} from the keeper")))
    }

    /// Start-up is complete (the keeper's restart is done).
    pub fn ready(&self, status: &str) -> Result<(), HandoffError> {
        sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)])
            .map_err(HandoffError::io("telling the keeper we are ready"))
    }

    /// A line for `systemctl status`.
    pub fn status(&self, status: &str) -> Result<(), HandoffError> {
        sd_notify::notify(false, &[NotifyState::Status(status)])
            .map_err(HandoffError::io("sending status to the keeper"))
    }
}

/// Descriptors handed to this process by systemd (socket activation and the
/// fd store) or by pagewire's supervisor, with their names; close-on-exec,
/// and the variables are removed so that children do not see them.
pub fn inherited() -> Result<Vec<Named>, HandoffError> {
    if std::env::var_os(LISTEN_PID_SELF).is_some() {
        // Before any thread exists (called first thing in `serve`): the
        // environment is not read concurrently.
        std::env::set_var("LISTEN_PID", std::process::id().to_string());
        std::env::remove_var(LISTEN_PID_SELF);
    }
    let fds = sd_notify::listen_fds_with_names(true)
        .map_err(HandoffError::io("reading LISTEN_FDS/LISTEN_FDNAMES"))?;
    let mut out = Vec::new();
    for (raw, name) in fds {
        // SAFETY: systemd's protocol hands this process descriptors
        // 3..3+LISTEN_FDS, ours to own, each taken once here (the variables
        // are unset, so no later call sees them again).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        out.push(Named { name, fd });
    }
    Ok(out)
}
