//! Node install: copy `sluice-cni` into the host's CNI bin dir and chain it into the node's
//! primary CNI config, keep it chained when the primary CNI rewrites its file, and undo it all.
//!
//! The primary config is the one the runtime would load: the first file of the conf dir in
//! lexical order with a `.conf`, `.conflist` or `.json` extension (libcni's own rule), skipping
//! sluice's own copy. Every write is a temp file + rename in the same directory, so the runtime
//! never reads a half-written file and a crash leaves either the old or the new one.
//!
//! Uninstall leaves the primary config byte-identical: before the first change to a file
//! sluice saves its original bytes beside it as `<file>.sluice-orig` (an extension libcni
//! ignores). Uninstall restores those bytes when the file still says what it said plus our entry;
//! if the primary CNI has since rewritten it, only our entry is removed.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The plugin's binary name and its `type` in CNI configs.
pub const PLUGIN: &str = "sluice-cni";
/// sluice's own config in `OwnCopy` mode; sorts before any name starting with a digit or
/// letter, so the runtime picks it first.
pub const OWN_COPY: &str = "00-sluice.conflist";
const BACKUP_EXT: &str = "sluice-orig";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid CNI JSON ({reason}); the file was left untouched")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("no CNI network config (.conf, .conflist, .json) in {0} yet")]
    NoPrimary(PathBuf),
    #[error("the primary config {0} sorts before {OWN_COPY}; use --chain-mode insert")]
    OwnCopyWouldNotSortFirst(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How sluice joins the node's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ChainMode {
    /// Append our entry to the primary config's plugin list (as Istio CNI and Linkerd CNI do).
    #[default]
    Insert,
    /// Leave the primary untouched and write `00-sluice.conflist`: a copy of it with our entry.
    OwnCopy,
}

#[derive(Debug, Clone)]
pub struct Installer {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The `sluice-cni` binary to install.
    pub plugin_source: PathBuf,
    pub mode: ChainMode,
    /// Our entry's `agentSocket` and `timeoutMs`.
    pub socket: PathBuf,
    pub timeout_ms: u64,
}

/// What an install pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub binary: bool,
    /// The config file written, if any.
    pub config: Option<PathBuf>,
}

fn is_cni_config(name: &str) -> bool {
    [".conf", ".conflist", ".json"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Writes `bytes` to `path` atomically (temp file in the same dir, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A leading dot and no CNI extension: neither the runtime nor a shell glob picks it up.
    let tmp = dir.join(format!(".{name}.sluice-tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{BACKUP_EXT}"));
    PathBuf::from(s)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// A config's plugin list as a conflist (a `.conf` is a single plugin).
fn as_conflist(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>, InstallError> {
    let invalid = |reason: String| InstallError::InvalidConfig {
        path: path.to_owned(),
        reason,
    };
    let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(invalid("not a JSON object".into()));
    };
    if let Some(plugins) = obj.get("plugins") {
        if !plugins.is_array() {
            return Err(invalid("\"plugins\" is not a list".into()));
        }
        return Ok(obj);
    }
    if !obj.contains_key("type") {
        return Err(invalid("neither \"plugins\" nor \"type\"".into()));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = obj.remove(key) {
            list.insert(key.to_owned(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(obj)]));
    Ok(list)
}

fn plugins(list: &Map<String, Value>) -> &[Value] {
    list.get("plugins")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn plugins_mut(list: &mut Map<String, Value>) -> &mut Vec<Value> {
    if !matches!(list.get("plugins"), Some(Value::Array(_))) {
        list.insert("plugins".into(), Value::Array(Vec::new()));
    }
    match list.get_mut("plugins") {
        Some(Value::Array(v)) => v,
        _ => unreachable!("just ensured plugins is a list"),
    }
}

fn pretty(list: &Map<String, Value>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(list).unwrap_or_default();
    out.push(b'\n');
    out
}

impl Installer {
    fn entry(&self) -> Value {
        serde_json::json!({
            "type": PLUGIN,
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "agentSocket": self.socket,
            "timeoutMs": self.timeout_ms,
        })
    }

    /// The config the runtime would load, ignoring our own copy.
    pub fn primary(&self) -> Result<PathBuf, InstallError> {
        let mut names: Vec<String> = std::fs::read_dir(&self.conf_dir)
            .map_err(io(&self.conf_dir))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_cni_config(n) && n != OWN_COPY && !n.starts_with('.'))
            .collect();
        names.sort();
        names
            .into_iter()
            .next()
            .map(|n| self.conf_dir.join(n))
            .ok_or_else(|| InstallError::NoPrimary(self.conf_dir.clone()))
    }

    /// One install pass: binary, then chain. Running it again changes nothing.
    pub fn install(&self) -> Result<Changes, InstallError> {
        Ok(Changes {
            binary: self.install_binary()?,
            config: self.chain()?,
        })
    }

    /// Copies the plugin into the bin dir (mode 0755) unless an identical copy is there.
    pub fn install_binary(&self) -> Result<bool, InstallError> {
        let bytes = std::fs::read(&self.plugin_source).map_err(io(&self.plugin_source))?;
        let dest = self.bin_dir.join(PLUGIN);
        if std::fs::read(&dest).is_ok_and(|old| old == bytes) {
            return Ok(false);
        }
        std::fs::create_dir_all(&self.bin_dir).map_err(io(&self.bin_dir))?;
        write_atomic(&dest, &bytes, 0o755)?;
        Ok(true)
    }

    /// Makes sure the runtime's chosen config chains us exactly once. Returns the file written,
    /// `None` when it already did.
    pub fn chain(&self) -> Result<Option<PathBuf>, InstallError> {
        // The start-up pass and the watch's passes may run at once: one read-modify-write of
        // the conf dir at a time.
        let _one = CONF_DIR_WRITER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let primary = self.primary()?;
        let bytes = std::fs::read(&primary).map_err(io(&primary))?;
        let mut list = as_conflist(&primary, &bytes)?;
        match self.mode {
            ChainMode::Insert => {
                if plugins(&list).iter().any(is_ours) {
                    return Ok(None);
                }
                plugins_mut(&mut list).push(self.entry());
                // Save the original before the first change (and again after the primary CNI
                // rewrote the file, which dropped our entry: that rewrite is the new original).
                write_atomic(&backup_path(&primary), &bytes, 0o600)?;
                let target = if primary.extension().is_some_and(|e| e == "conflist") {
                    primary.clone()
                } else {
                    primary.with_extension("conflist")
                };
                write_atomic(&target, &pretty(&list), 0o644)?;
                if target != primary {
                    // A .conf became a .conflist: the runtime must not load both.
                    std::fs::remove_file(&primary).map_err(io(&primary))?;
                    std::fs::rename(backup_path(&primary), backup_path(&target))
                        .map_err(io(&target))?;
                }
                tracing::info!(config = %target.display(), "chained sluice-cni into the primary CNI config");
                Ok(Some(target))
            }
            ChainMode::OwnCopy => {
                let own = self.conf_dir.join(OWN_COPY);
                if primary.file_name().and_then(|n| n.to_str()) < Some(OWN_COPY) {
                    return Err(InstallError::OwnCopyWouldNotSortFirst(primary));
                }
                plugins_mut(&mut list).retain(|p| !is_ours(p));
                plugins_mut(&mut list).push(self.entry());
                let want = pretty(&list);
                if std::fs::read(&own).is_ok_and(|b| b == want) {
                    return Ok(None);
                }
                write_atomic(&own, &want, 0o644)?;
                tracing::info!(config = %own.display(), primary = %primary.display(), "wrote sluice's own chained copy");
                Ok(Some(own))
            }
        }
    }

    /// Removes our entry (restoring the original bytes where they still apply), our own copy,
    /// the backups and the binary.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let own = self.conf_dir.join(OWN_COPY);
        if own.exists() {
            std::fs::remove_file(&own).map_err(io(&own))?;
        }
        let entries: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(io(&self.conf_dir))?
            .flatten()
            .map(|e| e.path())
            .collect();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !is_cni_config(name) || name.starts_with('.') {
                continue;
            }
            self.unchain(&path)?;
        }
        let bin = self.bin_dir.join(PLUGIN);
        if bin.exists() {
            std::fs::remove_file(&bin).map_err(io(&bin))?;
        }
        tracing::info!(bin_dir = %self.bin_dir.display(), conf_dir = %self.conf_dir.display(), "uninstalled sluice-cni");
        Ok(())
    }

    fn unchain(&self, path: &Path) -> Result<(), InstallError> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let Ok(mut list) = as_conflist(path, &bytes) else {
            return Ok(()); // not ours to fix
        };
        let backup = backup_path(path);
        if !plugins(&list).iter().any(is_ours) {
            let _ = std::fs::remove_file(&backup);
            return Ok(());
        }
        plugins_mut(&mut list).retain(|p| !is_ours(p));
        let original = std::fs::read(&backup).ok();
        // A converted .conf reads as a one-plugin list too, so the two compare directly.
        let original_list = original.as_deref().and_then(|b| as_conflist(path, b).ok());
        match (original, original_list) {
            (Some(orig), Some(orig_list)) if orig_list == list => {
                let was_conf = serde_json::from_slice::<Value>(&orig)
                    .is_ok_and(|v| v.get("plugins").is_none());
                if was_conf {
                    write_atomic(&path.with_extension("conf"), &orig, 0o644)?;
                    std::fs::remove_file(path).map_err(io(path))?;
                } else {
                    write_atomic(path, &orig, 0o644)?;
                }
            }
            // The primary CNI changed its config since we chained: keep its version, minus us.
            _ => write_atomic(path, &pretty(&list), 0o644)?,
        }
        let _ = std::fs::remove_file(&backup);
        Ok(())
    }

    /// Re-chains whenever the conf dir changes (the primary CNI rewriting its file on restart),
    /// until the returned watcher is dropped. `on_change` sees the result of every pass. Only
    /// changes count (a file created, written, renamed or removed): a pass reads the dir, and
    /// counting reads (inotify's access events) would make every pass start the next one.
    pub fn watch(
        self,
        on_change: impl Fn(Result<Option<PathBuf>, InstallError>) + Send + 'static,
    ) -> Result<notify::RecommendedWatcher, InstallError> {
        use notify::Watcher;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| changes(&e.kind)) {
                    let _ = tx.send(());
                }
            })
            .map_err(|e| InstallError::Io {
                path: self.conf_dir.clone(),
                source: std::io::Error::other(e),
            })?;
        watcher
            .watch(&self.conf_dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| InstallError::Io {
                path: self.conf_dir.clone(),
                source: std::io::Error::other(e),
            })?;
        std::thread::Builder::new()
            .name("sluice-install-watch".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Coalesce a burst (our own writes, a CNI writing several files).
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    while rx.try_recv().is_ok() {}
                    on_change(self.chain());
                }
            })
            .map_err(io(Path::new("watch thread")))?;
        Ok(watcher)
    }
}

/// Serialises the writers of the conf dir within the agent (see [`Installer::chain`]).
static CONF_DIR_WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether a conf dir event is a change a pass must look at (not a mere read).
fn changes(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        // A file opened for writing and closed: written.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}
