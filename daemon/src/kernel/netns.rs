//! Opening, vetting and entering pod network namespaces. All `setns` lives here.
//!
//! A path is accepted only if it is lexically under an allowed root, opens to an nsfs file of
//! a *network* namespace, and is not the agent's own namespace (compared by device + inode).
//! Work inside a namespace runs on a dedicated, long-lived OS thread (never a tokio worker) that
//! enters it, runs, and switches back when its guard drops; if switching back fails the process
//! aborts rather than keep a thread in the wrong namespace.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use sluice_proto::deadlines;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns path {0:?} must be absolute and normalized")]
    NotNormalized(PathBuf),
    #[error("netns path {path:?} is outside the allowed roots ({roots})")]
    OutsideRoots { path: PathBuf, roots: String },
    #[error("netns {0:?} does not exist")]
    Gone(PathBuf),
    #[error("{0:?} is not a network namespace file (nsfs)")]
    NotNetns(PathBuf),
    #[error("netns {0:?} is the agent's own (host) network namespace")]
    HostNetns(PathBuf),
    #[error("opening netns {path:?}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering netns {path:?}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// A netns worker could not be started or reached (threads exhausted): transient.
    #[error("netns worker thread: {0}")]
    Thread(String),
    /// The work panicked: a bug, not a condition that passes.
    #[error("the work in the pod's namespace failed unexpectedly: {0}")]
    Panicked(&'static str),
}

impl NetnsError {
    /// The agent ran short of something that comes back (threads, file descriptors, memory):
    /// the caller should try again, as the runtime does with CNI code 11.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Thread(_) => true,
            Self::Open { source, .. } => source.raw_os_error().is_some_and(transient_errno),
            Self::Enter { source, .. } => transient_errno(*source as i32),
            _ => false,
        }
    }

    /// Whether the error is about the caller's input (the path) rather than the agent.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::NotNormalized(_)
                | Self::OutsideRoots { .. }
                | Self::NotNetns(_)
                | Self::HostNetns(_)
        )
    }
}

/// Errnos that say the agent (or the kernel) ran short of a resource that comes back.
pub fn transient_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN | libc::EINTR
    )
}

/// Identity of a namespace: (st_dev, st_ino) of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

/// Where pod namespaces may live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// Bind-mounted namespace files directly inside this directory (e.g. `/var/run/netns`).
    Dir(PathBuf),
    /// `/proc/<pid>/ns/net` of any process.
    Proc,
}

impl Root {
    /// `"/proc"` or `"/proc/<pid>/ns/net"` mean [`Root::Proc`]; anything else is a directory.
    pub fn parse(s: &str) -> Self {
        match s.trim_end_matches('/') {
            "/proc" | "/proc/<pid>/ns/net" => Root::Proc,
            dir => Root::Dir(PathBuf::from(dir)),
        }
    }

    fn admits(&self, path: &Path) -> bool {
        match self {
            Root::Dir(dir) => path.parent() == Some(dir.as_path()),
            Root::Proc => {
                let parts: Vec<_> = path.components().collect();
                matches!(parts.as_slice(),
                    [Component::RootDir, Component::Normal(p), Component::Normal(pid),
                     Component::Normal(ns), Component::Normal(net)]
                    if *p == "proc" && *ns == "ns" && *net == "net"
                        && pid.to_str().is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())))
            }
        }
    }

    pub fn defaults() -> Vec<Root> {
        vec![
            Root::Dir("/var/run/netns".into()),
            Root::Dir("/run/netns".into()),
            Root::Proc,
        ]
    }
}

impl std::fmt::Display for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Root::Dir(d) => write!(f, "{}", d.display()),
            Root::Proc => f.write_str("/proc/<pid>/ns/net"),
        }
    }
}

/// The rules for accepting a netns path, fixed at agent start.
#[derive(Debug, Clone)]
pub struct Policy {
    pub roots: Vec<Root>,
    /// The agent's own namespace, which is never programmed.
    pub host: NsId,
}

impl Policy {
    /// Reads the calling thread's current namespace as the host one.
    pub fn new(roots: Vec<Root>) -> std::io::Result<Self> {
        let meta = std::fs::metadata("/proc/thread-self/ns/net")?;
        Ok(Self {
            roots,
            host: NsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// Opens and vets a pod netns path.
    pub fn open(&self, path: &str) -> Result<PodNetns, NetnsError> {
        let path = PathBuf::from(path);
        // Components drop "." and repeated slashes, so comparing the rebuilt path with the
        // given one catches those, and the component check catches "..".
        let normalized = path.is_absolute()
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && path.components().collect::<PathBuf>().as_os_str() == path.as_os_str()
            && path.to_str().is_some();
        if !normalized {
            return Err(NetnsError::NotNormalized(path));
        }
        let root = self.roots.iter().find(|r| r.admits(&path)).ok_or_else(|| {
            NetnsError::OutsideRoots {
                path: path.clone(),
                roots: self
                    .roots
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        let mut options = File::options();
        options.read(true);
        if matches!(root, Root::Dir(_)) {
            // Namespace files under a root dir are bind mounts, never symlinks. (/proc/<pid>/ns/net
            // is a magic link and must be followed.)
            options.custom_flags(libc::O_NOFOLLOW);
        }
        let file = options.open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => NetnsError::Gone(path.clone()),
            _ if source.raw_os_error() == Some(libc::ELOOP) => NetnsError::NotNetns(path.clone()),
            _ => NetnsError::Open {
                path: path.clone(),
                source,
            },
        })?;
        let fd: OwnedFd = file.into();
        if !fstatfs(&fd).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC) {
            return Err(NetnsError::NotNetns(path));
        }
        // nsfs holds every namespace type. Which one this is gets checked on entry: setns with
        // CLONE_NEWNET refuses any other type (EINVAL), before anything runs inside.
        let meta = File::from(fd.try_clone().map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?)
        .metadata()
        .map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let id = NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if id == self.host {
            return Err(NetnsError::HostNetns(path));
        }
        Ok(PodNetns { fd, path, id })
    }
}

/// An opened, vetted pod namespace. Holding the fd keeps the namespace alive while we work.
#[derive(Debug)]
pub struct PodNetns {
    fd: OwnedFd,
    pub path: PathBuf,
    pub id: NsId,
}

thread_local! {
    /// When the call a netns worker is working for must be answered; `None` for work without
    /// a caller's deadline (the start-up probe).
    static DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The bound on the calling thread's next kernel step (one netlink answer): the time left of
/// its job's deadline less a margin, never more than [`deadlines::KERNEL_STEP`], so a step
/// that gets no answer is reported, naming the step, before the call's deadline passes.
pub fn step_timeout() -> Duration {
    match DEADLINE.with(std::cell::Cell::get) {
        Some(d) => deadlines::kernel_step(d.saturating_duration_since(Instant::now())),
        None => deadlines::KERNEL_STEP,
    }
}

/// Sets the thread's deadline for the duration of a job.
struct Until(Option<Instant>);

impl Until {
    fn set(deadline: Option<Instant>) -> Self {
        Until(DEADLINE.with(|d| d.replace(deadline)))
    }
}

impl Drop for Until {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.0));
    }
}

impl PodNetns {
    /// Runs `f` on a netns worker thread inside this namespace and returns its result. Every
    /// kernel step `f` takes is bounded by [`step_timeout`] against `deadline`.
    pub async fn run<T, F>(self, deadline: Instant, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        workers().submit(Box::new(move |home: &OwnedFd| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _guard = Entered::enter(&self, home)?;
                let _until = Until::set(Some(deadline));
                Ok(f())
            }))
            .unwrap_or_else(|_| Err(NetnsError::Panicked("it panicked")));
            let _ = tx.send(result);
        }))?;
        rx.await
            .map_err(|_| NetnsError::Thread("worker thread ended without a result".into()))?
    }

    /// Enters the namespace on the *current* thread, runs `f`, and switches back. Only for
    /// threads that exist for this purpose (tests; the agent uses [`PodNetns::run`]).
    pub fn run_here<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let home = own_netns()?;
        let _guard = Entered::enter(self, &home)?;
        Ok(f())
    }
}

/// One piece of work for a netns worker, given the worker's own (host) namespace to return to.
type Job = Box<dyn FnOnce(&OwnedFd) + Send>;

/// The most netns worker threads; more jobs than that wait in the queue. The agent admits as
/// much kernel work at once (`agent::work`), each job holding one thread and one netlink
/// connection.
pub const MAX_WORKERS: usize = 8;

/// Long-lived OS threads that run work inside pod namespaces. Each starts in the agent's own
/// namespace, opens a handle to it once, and returns to it after every job (see [`Entered`]);
/// it keeps its rtnetlink runtime between jobs. Starting a thread per attach cost a
/// `clone3`, a stack and the runtime (~60 µs) on every pod. Threads are started on demand, up
/// to [`MAX_WORKERS`], and then kept.
struct Workers {
    jobs: std::sync::mpsc::Sender<Job>,
    queue: std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<Job>>>,
    /// (threads started, threads waiting for a job)
    counts: std::sync::Arc<std::sync::Mutex<(usize, usize)>>,
}

fn workers() -> &'static Workers {
    static WORKERS: std::sync::OnceLock<Workers> = std::sync::OnceLock::new();
    WORKERS.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel();
        Workers {
            jobs,
            queue: std::sync::Arc::new(std::sync::Mutex::new(queue)),
            counts: std::sync::Arc::default(),
        }
    })
}

impl Workers {
    /// Hands `job` to a waiting worker, or to a new one while fewer than [`MAX_WORKERS`] run;
    /// past that it waits in the queue for the first worker to become free.
    fn submit(&self, job: Job) -> Result<(), NetnsError> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let (started, idle) = &mut *counts;
        if *idle == 0 && *started < MAX_WORKERS {
            self.start(job)?;
            *started += 1;
            return Ok(());
        }
        // A waiting worker is spoken for by this job (once all are started the count is only
        // approximate, and no longer decides anything).
        *idle = idle.saturating_sub(1);
        self.jobs
            .send(job)
            .map_err(|_| NetnsError::Thread("the netns workers are gone".into()))
    }

    fn start(&self, first: Job) -> Result<(), NetnsError> {
        let home = own_netns()?;
        let (queue, counts) = (self.queue.clone(), self.counts.clone());
        std::thread::Builder::new()
            .name("sluice-netns".into())
            .spawn(move || {
                first(&home);
                loop {
                    counts.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(&home),
                        Err(_) => return,
                    }
                }
            })
            .map(drop)
            .map_err(|e| NetnsError::Thread(e.to_string()))
    }
}

/// A handle to the calling thread's network namespace.
fn own_netns() -> Result<OwnedFd, NetnsError> {
    File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|source| NetnsError::Open {
            path: "/proc/thread-self/ns/net".into(),
            source,
        })
}

/// Runs `f` on a fresh OS thread inside a new, empty network namespace of its own (unshared
/// from the agent's, so it starts with only a down `lo`). The namespace dies with the thread,
/// so nothing `f` does there outlives it; the thread never returns to the host namespace.
/// Used to probe what the kernel can do without touching any pod or the host.
pub fn run_in_scratch<T, F>(f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    std::thread::Builder::new()
        .name("sluice-probe".into())
        .spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: "a new network namespace".into(),
                source,
            })?;
            Ok(f())
        })
        .map_err(|e| NetnsError::Thread(e.to_string()))?
        .join()
        .map_err(|_| NetnsError::Panicked("the probe panicked"))?
}

/// Switches the thread back to its own namespace on drop.
struct Entered<'a> {
    home: &'a OwnedFd,
}

impl<'a> Entered<'a> {
    fn enter(ns: &PodNetns, home: &'a OwnedFd) -> Result<Self, NetnsError> {
        setns(ns.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| match source {
            nix::Error::EINVAL => NetnsError::NotNetns(ns.path.clone()),
            source => NetnsError::Enter {
                path: ns.path.clone(),
                source,
            },
        })?;
        Ok(Self { home })
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot switch a thread back to its network namespace; aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_admit_direct_children_and_proc_pid_only() {
        let dir = Root::parse("/var/run/netns/");
        assert!(dir.admits(Path::new("/var/run/netns/cni-1234")));
        assert!(!dir.admits(Path::new("/var/run/netns/a/b")));
        assert!(!dir.admits(Path::new("/var/run/netnsx")));
        let proc = Root::parse("/proc");
        assert!(proc.admits(Path::new("/proc/42/ns/net")));
        assert!(!proc.admits(Path::new("/proc/self/ns/net")));
        assert!(!proc.admits(Path::new("/proc/42/ns/mnt")));
        assert!(!proc.admits(Path::new("/proc/42/task/42/ns/net")));
    }

    #[test]
    fn unnormalized_paths_are_refused_before_any_io() {
        let policy = Policy {
            roots: Root::defaults(),
            host: NsId { dev: 0, ino: 0 },
        };
        for p in [
            "relative/ns",
            "/var/run/netns/../../etc/passwd",
            "/var/run/netns/./x",
            "/var/run//netns/x",
        ] {
            assert!(
                matches!(policy.open(p), Err(NetnsError::NotNormalized(_))),
                "{p} should be refused as not normalized"
            );
        }
    }
}
