//! pagewire's own keeper of descriptors, for hosts without systemd (and
//! under systemd, to fail closed: see below).
//!
//! The supervisor is the parent of the server. It speaks systemd's side of
//! the notification protocol to its child: a datagram socket named by
//! `NOTIFY_SOCKET` receives `FDSTORE=1`/`FDNAME=` (with descriptors),
//! `FDSTOREREMOVE=1` and `READY=1`; a restarted child gets everything kept
//! as `LISTEN_FDS`/`LISTEN_FDNAMES`. So the server has one code path for
//! systemd and for this.
//!
//! - The child dies (crash, SIGKILL): it is started again at once (backing
//!   off up to 5 s if it keeps dying), with every descriptor kept.
//! - `SIGUSR2`: upgrade. The child is asked to stop (SIGTERM: a server that
//!   has a keeper exits leaving its VMs to it) and started again from the
//!   executable's path, which may hold a new binary by now.
//! - `SIGHUP`, `SIGUSR1`: passed to the child (reload, end recordings).
//! - `SIGTERM`, `SIGINT`: the child is stopped and the supervisor exits.
//! - **Fail closed**: VMs kept while no child has said `READY=1` for the
//!   orphan timeout (or left behind when the supervisor stops) are handled
//!   as the operator chose ([`OrphanAction`]): killed through a pidfd by
//!   default, never silently left hanging, their descriptors never closed
//!   while they may live.
//!
//! Under systemd, run the supervisor as the service (`Type=notify`): it
//! forwards `READY=1` and its store to systemd, so that even a restart of
//! the supervisor keeps every VM.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::orphan::{self, OrphanAction};
use crate::{msg, HandoffError, Inherited, Named, Notifier};

/// How the supervisor runs its server.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's executable and arguments.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// How long VMs may be without a ready server before `orphan_action`.
    pub orphan_timeout: Duration,
    pub orphan_action: OrphanAction,
    /// Directory for the notification socket (made private to the owner).
    pub runtime_dir: PathBuf,
}

/// What the supervisor keeps, in the order it was stored.
#[derive(Default)]
struct Store {
    fds: Vec<Named>,
    ready: bool,
}

impl Store {
    /// Keeps `fd` under `name` beside what the name holds already (a VM's
    /// three), unless it holds that very file already (a server stores its
    /// sources again at each start).
    fn put(&mut self, name: String, fd: OwnedFd) {
        let id = |f: &OwnedFd| rustix::fs::fstat(f).ok().map(|s| (s.st_dev, s.st_ino));
        let new = id(&fd);
        if new.is_some() && self.fds.iter().any(|n| n.name == name && id(&n.fd) == new) {
            return;
        }
        self.fds.push(Named { name, fd });
    }
    fn remove(&mut self, name: &str) {
        self.fds.retain(|n| n.name != name);
    }
}

enum Event {
    Signal(i32),
}

/// Runs the server under supervision until SIGTERM/SIGINT; returns the
/// exit status to use.
pub fn run(opts: &Options, signals: mpsc::Receiver<i32>) -> Result<i32, HandoffError> {
    let manager = Notifier::from_env();
    // systemd above, if it keeps descriptors: the store is forwarded to it.
    let upstream = manager.as_ref().and_then(|n| n.keeper()).cloned();
    raise_fd_limit();
    // Descriptors a previous supervisor kept with systemd come back here.
    let mut initial = crate::inherited()?;
    std::fs::create_dir_all(&opts.runtime_dir).map_err(HandoffError::io(format!(
        "creating {}",
        opts.runtime_dir.display()
    )))?;
    remove_stale_dirs(&opts.runtime_dir);
    let dir = opts
        .runtime_dir
        .join(format!("pagewire-supervisor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(HandoffError::io(format!("creating {}", dir.display())))?;
    let _ = rustix::fs::chmod(&dir, rustix::fs::Mode::from_raw_mode(0o700));
    let sock_path = dir.join("notify");
    let sock = UnixDatagram::bind(&sock_path)
        .map_err(HandoffError::io(format!("binding {}", sock_path.display())))?;
    let sock = Arc::new(sock);
    let store = Arc::new(Mutex::new(Store::default()));
    {
        let mut s = lock(&store);
        for n in initial.drain(..) {
            s.put(n.name, n.fd);
        }
        if !s.fds.is_empty() {
            tracing::info!(
                fds = s.fds.len(),
                "supervisor: descriptors kept by systemd are back"
            );
        }
    }
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let notify = Notify {
        sock: sock.clone(),
        store: store.clone(),
        upstream: upstream.clone(),
        manager: manager.clone(),
        ready: ready_tx,
        applying: Arc::default(),
    };
    {
        let notify = notify.clone();
        std::thread::Builder::new()
            .name("pagewire-supervisor-notify".into())
            .spawn(move || notify.receive())
            .map_err(HandoffError::io("spawning the notify thread"))?;
    }
    let _ = signals_events(&signals);
    let mut backoff = Duration::from_millis(100);
    // VMs handed back by systemd have no server until the first is ready.
    let mut orphaned_since: Option<Instant> = (vm_count(&store) > 0).then(Instant::now);
    let mut stopping = false;
    let mut fast_deaths = 0u32;
    let mut child = spawn(opts, &sock_path, &notify)?;
    let mut started = Instant::now();
    loop {
        // Events: readiness, signals; and the child's exit.
        while ready_rx.try_recv().is_ok() {
            if orphaned_since.take().is_some() {
                tracing::info!("supervisor: the server is back and serves every kept VM");
            }
            backoff = Duration::from_millis(100);
        }
        for Event::Signal(sig) in signals_events(&signals) {
            use signal_hook::consts::*;
            match sig {
                SIGTERM | SIGINT => {
                    tracing::info!(signal = sig, "supervisor: stopping the server and exiting");
                    stopping = true;
                    send_signal(&child, rustix::process::Signal::TERM);
                }
                SIGUSR2 => {
                    tracing::info!("supervisor: SIGUSR2: restarting the server (upgrade)");
                    send_signal(&child, rustix::process::Signal::TERM);
                }
                SIGHUP => send_signal(&child, rustix::process::Signal::HUP),
                SIGUSR1 => send_signal(&child, rustix::process::Signal::USR1),
                _ => {}
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                lock(&store).ready = false;
                if stopping && upstream.is_some() {
                    // systemd keeps every VM (forwarded) for the next
                    // supervisor: `systemctl restart` loses none, and after
                    // `systemctl stop` the next start serves them on or
                    // handles them after its orphan timeout (the unit keeps
                    // its store while stopped: FileDescriptorStorePreserve=yes).
                    tracing::warn!(
                        vms = vm_count(&store),
                        "supervisor: stopping; systemd keeps the VMs, which wait for the next \
                         start of the service (its orphan timeout then applies)"
                    );
                    let _ = std::fs::remove_dir_all(&dir);
                    return Ok(status.code().unwrap_or(0));
                }
                if stopping {
                    let n = orphan_all(
                        &store,
                        upstream.as_ref(),
                        opts.orphan_action,
                        "the supervisor was stopped",
                    );
                    if n > 0 {
                        tracing::warn!(vms = n, "supervisor: VMs left without a server at exit");
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    return Ok(status.code().unwrap_or(0));
                }
                tracing::warn!(
                    %status,
                    vms = vm_count(&store),
                    "supervisor: the server exited; starting it again with every kept descriptor"
                );
                orphaned_since.get_or_insert_with(Instant::now);
                // At once the first time: every VM waits meanwhile. A
                // server that keeps dying right after its start backs off.
                if started.elapsed() < Duration::from_secs(1) {
                    if fast_deaths > 0 {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    fast_deaths += 1;
                } else {
                    fast_deaths = 0;
                }
                match spawn(opts, &sock_path, &notify) {
                    Ok(c) => {
                        child = c;
                        started = Instant::now();
                    }
                    Err(e) => {
                        tracing::error!("supervisor: cannot start the server: {e}");
                        std::thread::sleep(backoff);
                        continue;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("supervisor: waiting for the server: {e}"),
        }
        if let Some(since) = orphaned_since {
            if since.elapsed() >= opts.orphan_timeout {
                let n = orphan_all(
                    &store,
                    upstream.as_ref(),
                    opts.orphan_action,
                    &format!(
                        "no server was ready within the orphan timeout of {:?}",
                        opts.orphan_timeout
                    ),
                );
                if n > 0 {
                    tracing::error!(vms = n, "supervisor: orphaned VMs handled");
                }
                orphaned_since = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lock(s: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn signals_events(rx: &mpsc::Receiver<i32>) -> Vec<Event> {
    rx.try_iter().map(Event::Signal).collect()
}

fn send_signal(child: &Child, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

fn vm_count(store: &Mutex<Store>) -> usize {
    Inherited::count_vms(lock(store).fds.iter().map(|n| n.name.as_str()))
}

/// Applies the orphan action to every kept VM and forgets them (their
/// descriptors are dropped: the VMM keeps its own userfaultfd). Returns how
/// many there were.
fn orphan_all(
    store: &Mutex<Store>,
    upstream: Option<&Notifier>,
    action: OrphanAction,
    why: &str,
) -> usize {
    let mut s = lock(store);
    let fds = std::mem::take(&mut s.fds);
    let sorted = Inherited::sort(fds);
    let n = sorted.vms.len();
    for (key, vm) in &sorted.vms {
        orphan::handle(key, vm, action, why);
    }
    for key in sorted.vms.keys().chain(&sorted.incomplete) {
        if let Some(up) = upstream {
            let _ = up.remove(&crate::Name::Vm(key.clone()).render());
        }
    }
    for key in &sorted.incomplete {
        tracing::error!(vm = key, "a kept VM lacks some of its descriptors: dropped");
    }
    // Listeners and sources stay for the next server.
    for (name, fd) in sorted.listeners {
        s.put(format!("listen.{name}"), fd);
    }
    for (name, fd) in sorted.sources {
        s.put(format!("source.{name}"), fd);
    }
    for o in sorted.other {
        s.put(o.name, o.fd);
    }
    if action == OrphanAction::Wait {
        // Left waiting: a server that comes back later may still take them;
        // they were dropped from the store, so say so.
        tracing::error!(
            vms = n,
            "orphaned VMs left waiting were dropped from the store: restart them by hand"
        );
    }
    n
}

/// Starts the server with every kept descriptor as fds 3.. and
/// `LISTEN_FDS`/`LISTEN_FDNAMES`.
fn spawn(
    opts: &Options,
    sock_path: &std::path::Path,
    notify: &Notify,
) -> Result<Child, HandoffError> {
    // Whatever the dead server sent is queued already: take it all before
    // handing the store on, or a VM stored just before a crash is missed.
    notify.drain();
    let s = lock(&notify.store);
    let n = s.fds.len();
    // Duplicates above the target range, close-on-exec, so that moving them
    // to 3.. in the child cannot overwrite one not yet moved.
    let floor = 3 + n as i32 + 16;
    let mut high: Vec<OwnedFd> = Vec::with_capacity(n);
    for named in &s.fds {
        let d = rustix::io::fcntl_dupfd_cloexec(&named.fd, floor)
            .map_err(HandoffError::errno("duplicating a kept descriptor"))?;
        high.push(d);
    }
    let names: Vec<&str> = s.fds.iter().map(|n| n.name.as_str()).collect();
    let mut cmd = Command::new(&opts.program);
    cmd.args(&opts.args)
        .env("NOTIFY_SOCKET", sock_path)
        // As systemd 254+ tells a service that it has an fd store.
        .env("FDSTORE", "1048576")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES");
    if n > 0 {
        cmd.env("LISTEN_FDS", n.to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env(crate::notify::LISTEN_PID_SELF, "1");
    }
    let raws: Vec<i32> = high.iter().map(|f| f.as_raw_fd()).collect();
    let supervisor = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes system calls that are async-signal-safe (prctl, dup2); it
    // allocates nothing (`raws` was built before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            // The server dies with its supervisor: whoever restarts the
            // supervisor (systemd, with the store it was forwarded) starts a
            // new server, and two must never serve one VM.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The supervisor may have died before that took effect.
            if rustix::process::getppid() != Some(supervisor) {
                return Err(std::io::Error::other("the supervisor is gone"));
            }
            for (i, &fd) in raws.iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(HandoffError::io(format!(
        "starting {}",
        opts.program.display()
    )))?;
    drop(high);
    tracing::info!(pid = child.id(), fds = n, "supervisor: server started");
    Ok(child)
}

/// The notification socket and what it feeds.
#[derive(Clone)]
struct Notify {
    sock: Arc<UnixDatagram>,
    store: Arc<Mutex<Store>>,
    upstream: Option<Notifier>,
    /// systemd above, for READY=1 and status lines.
    manager: Option<Notifier>,
    ready: mpsc::Sender<()>,
    /// Held from taking a message off the socket until it is applied, by
    /// whichever thread does: messages apply in order, and `drain` sees
    /// every one sent before it.
    applying: Arc<Mutex<()>>,
}

impl Notify {
    /// Receives the child's notifications, for ever.
    fn receive(&self) {
        use rustix::event::{poll, PollFd, PollFlags};
        loop {
            let mut fds = [PollFd::new(&*self.sock, PollFlags::IN)];
            if poll(&mut fds, None).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            self.drain();
        }
    }

    /// Applies every notification queued now, without waiting.
    fn drain(&self) {
        let _applying = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match msg::try_recv(self.sock.as_fd()) {
                Ok(Some((text, fds))) => self.apply(&text, fds),
                Ok(None) => return,
                Err(e) => tracing::warn!("supervisor: a notification could not be read: {e}"),
            }
        }
    }

    /// Keeps what the child stores, forwards to systemd when there is one.
    fn apply(&self, text: &[u8], mut fds: Vec<OwnedFd>) {
        let store = &self.store;
        let upstream = self.upstream.as_ref();
        let text = String::from_utf8_lossy(text).into_owned();
        let mut kv: BTreeMap<&str, &str> = BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                kv.insert(k, v);
            }
        }
        let name = kv.get("FDNAME").copied().unwrap_or("stored");
        if kv.get("FDSTORE") == Some(&"1") {
            if let Some(up) = upstream {
                // As it came: a VM's three in one message.
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                if let Err(e) = up.store_all(name, &borrowed) {
                    tracing::warn!("supervisor: forwarding {name} to systemd: {e}");
                }
            }
            for fd in fds.drain(..) {
                lock(store).put(name.to_string(), fd);
            }
        }
        if kv.get("FDSTOREREMOVE") == Some(&"1") {
            lock(store).remove(name);
            if let Some(up) = upstream {
                let _ = up.remove(name);
            }
        }
        let manager = self.manager.as_ref();
        if kv.get("READY") == Some(&"1") {
            lock(store).ready = true;
            let _ = self.ready.send(());
            if let Some(m) = manager {
                let _ = m.ready(kv.get("STATUS").copied().unwrap_or("serving"));
            }
        } else if let (Some(st), Some(m)) = (kv.get("STATUS"), manager) {
            let _ = m.status(st);
        }
        // Descriptors sent without FDSTORE=1 are not kept.
        drop(fds);
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the supervisor holds
/// three descriptors per VM, and duplicates them all for a moment when it
/// starts a server.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        if let Err(e) = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                maximum: l.maximum,
            },
        ) {
            tracing::warn!("supervisor: cannot raise the file descriptor limit: {e}");
        }
    }
}

/// Removes the notification directories of supervisors that are gone
/// (killed before they could clean up).
fn remove_stale_dirs(runtime_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pagewire-supervisor-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
