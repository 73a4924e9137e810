//! kubelet's part of running a manifest, for tests: takes the install as a real tool rendered
//! it (see `render`: Helm's engine, Debian's kustomize), and translates a
//! DaemonSet's pod template into the CRI requests kubelet would send for it on a node —
//! sandbox, container config, volumes, kubelet's own mounts, env expansion, QoS, probes.
//!
//! The translation is strict: every field of the pod template (and of the objects around it)
//! must be one it knows what kubelet does with, or it fails naming the field. So a manifest
//! change is either run as kubelet would run it, or stops the test until this file learns it.
//! Each field read is recorded with what was made of it ([`Pod::honoured`]).
//!
//! What it does not emulate, by design: the API server's defaulting beyond what is written here,
//! admission, scheduling (fields that only steer scheduling are accepted and recorded as such),
//! cgroup parents, image pulls (images must already be in the runtime).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use sluice_proto::cri::{
    Capability, ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PortMapping, Protocol, SecurityProfile,
    security_profile::ProfileType,
};

/// The objects `kubectl apply -k DIR` would create, namespace applied.
#[derive(Debug)]
pub struct Install {
    pub namespace: String,
    pub objects: Vec<Value>,
}

/// kubelet's defaults for a container whose `procMount` is `Default` (k8s.io/kubernetes
/// pkg/securitycontext): masked and read-only paths it sends in every unprivileged container's
/// CRI config.
pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The install a real tool rendered (`kustomize build`, Helm's engine): its objects as they
/// are, in the namespace they name.
pub fn from_render(text: &str) -> Result<Install, String> {
    let objects = crate::render::documents(text)?;
    let namespace = objects
        .iter()
        .find_map(|o| o["metadata"]["namespace"].as_str())
        .unwrap_or("default")
        .to_owned();
    Ok(Install { namespace, objects })
}

impl Install {
    pub fn get(&self, kind: &str, name: &str) -> Result<&Value, String> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .ok_or_else(|| format!("the install has no {kind} {name}"))
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }
}

/// The node a pod lands on, as the test sets it up.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// The node's InternalIP: `status.hostIP`, and a hostNetwork pod's IP (where kubelet
    /// probes it).
    pub ip: IpAddr,
    /// Node allocatable memory (QoS arithmetic).
    pub memory_bytes: u64,
    /// hostPath remaps: a manifest path → where this node keeps it. Paths not listed are used
    /// as they are.
    pub host_paths: BTreeMap<String, PathBuf>,
    /// kubelet's pods directory (`/var/lib/kubelet/pods` on a node).
    pub pods_dir: PathBuf,
    /// kubelet's pod log directory (`/var/log/pods`).
    pub log_dir: PathBuf,
}

/// A gRPC probe as kubelet runs it.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `startupProbe`, `readinessProbe` or `livenessProbe`.
    pub kind: String,
    pub port: u16,
    pub service: String,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

#[derive(Debug)]
pub struct Container {
    pub name: String,
    pub config: ContainerConfig,
    pub probes: Vec<Probe>,
    /// The container's CRI log file (under the sandbox's log directory).
    pub log: PathBuf,
}

/// A pod ready to be run through CRI.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub sandbox: PodSandboxConfig,
    pub containers: Vec<Container>,
    /// `terminationGracePeriodSeconds`: StopContainer's timeout.
    pub grace: i64,
    /// Each manifest field read, with what was made of it.
    pub honoured: Vec<(String, String)>,
    /// hostPath directories `DirectoryOrCreate` created (0755, as kubelet does).
    pub created: Vec<PathBuf>,
}

/// A list entry's path (`...env[0]`) and its fields.
type Entry<'v> = (String, &'v Map<String, Value>);

struct Tx<'a> {
    install: &'a Install,
    node: &'a Node,
    honoured: Vec<(String, String)>,
    created: Vec<PathBuf>,
}

fn unknown(path: &str) -> String {
    format!(
        "{path}: the translation does not understand this field; teach tests/src/kube.rs what kubelet does with it"
    )
}

impl Tx<'_> {
    /// The entries of list `key` of `map`, each checked as [`Self::fields`] does, with its path.
    fn list<'v>(
        &mut self,
        map: &'v Map<String, Value>,
        path: &str,
        key: &str,
        known: &[(&str, &str)],
    ) -> Result<Vec<Entry<'v>>, String> {
        let mut out = Vec::new();
        for (i, item) in items(map, key) {
            let at = format!("{path}.{key}[{i}]");
            let fields = self.fields(item, &at, known)?;
            out.push((at, fields));
        }
        Ok(out)
    }

    /// The map at `path`, after checking each key is known; records the known ones present
    /// with what is done with them.
    fn fields<'v>(
        &mut self,
        v: &'v Value,
        path: &str,
        known: &[(&str, &str)],
    ) -> Result<&'v Map<String, Value>, String> {
        let map = v.as_object().ok_or_else(|| format!("{path}: not a map"))?;
        for key in map.keys() {
            match known.iter().find(|(k, _)| k == key) {
                Some((_, how)) if !how.is_empty() => self
                    .honoured
                    .push((format!("{path}.{key}"), (*how).to_owned())),
                Some(_) => {}
                None => return Err(unknown(&format!("{path}.{key}"))),
            }
        }
        Ok(map)
    }
}

fn str_of<'v>(map: &'v Map<String, Value>, key: &str) -> Option<&'v str> {
    map.get(key).and_then(Value::as_str)
}

/// The entries of a list field (none if absent), numbered.
fn items<'v>(map: &'v Map<String, Value>, key: &str) -> impl Iterator<Item = (usize, &'v Value)> {
    map.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
}

/// A map of strings (labels, annotations); empty if absent.
fn string_map(map: &Map<String, Value>, key: &str) -> BTreeMap<String, String> {
    map.get(key)
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn int_of(map: &Map<String, Value>, key: &str, default: i64) -> i64 {
    map.get(key).and_then(Value::as_i64).unwrap_or(default)
}

fn bool_of(map: &Map<String, Value>, key: &str) -> Option<bool> {
    map.get(key).and_then(Value::as_bool)
}

/// A Kubernetes quantity in its base unit (CPU: millicores when `milli`, else bytes).
pub fn quantity(q: &Value, milli: bool) -> Result<i64, String> {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => return Err(format!("quantity {other}: not a string or number")),
    };
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0f64.powi(4)),
        ("Pi", 1024.0f64.powi(5)),
        ("Ei", 1024.0f64.powi(6)),
        ("m", 0.001),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, mult) = suffixes
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((s.as_str(), 1.0));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("quantity {s:?} is not understood"))?;
    let base = n * mult * if milli { 1000.0 } else { 1.0 };
    Ok(base.ceil() as i64)
}

/// kubelet's `$(VAR)` expansion (`$$` escapes; an undefined name is left as written).
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(end) if env.contains_key(&tail[..end]) => {
                    out.push_str(&env[&tail[..end]]);
                    rest = &tail[end + 1..];
                }
                Some(end) => {
                    out.push_str(&rest[i..i + 2 + end + 1]);
                    rest = &tail[end + 1..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The node's resolver config, what kubelet gives a hostNetwork pod when no cluster DNS is
/// configured (`ClusterFirstWithHostNet` then falls back to the node's, as `Default` does).
fn node_dns() -> DnsConfig {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut dns = DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.servers.extend(words.map(str::to_owned)),
            Some("search") => dns.searches = words.map(str::to_owned).collect(),
            Some("options") => dns.options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    dns
}

/// A pod uid as the API server makes them (random v4 UUID shape).
fn uid() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// kubelet's atomic-writer layout of a configMap volume: the files live in a timestamped
/// directory, `..data` points at it, and each key is a symlink through `..data`.
fn write_configmap(dir: &Path, data: &Map<String, Value>, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let e = |e: std::io::Error| format!("configMap volume {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(e)?;
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let ts = dir.join(&stamp);
    std::fs::create_dir_all(&ts).map_err(e)?;
    for (key, value) in data {
        let text = value
            .as_str()
            .ok_or(format!("configMap key {key}: not a string"))?;
        let file = ts.join(key);
        std::fs::write(&file, text).map_err(e)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).map_err(e)?;
    }
    std::os::unix::fs::symlink(&stamp, dir.join("..data")).map_err(e)?;
    for key in data.keys() {
        std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).map_err(e)?;
    }
    Ok(())
}

/// Translates DaemonSet `name` of the install into the pod kubelet would run on `node`.
pub fn daemonset_pod(install: &Install, name: &str, node: &Node) -> Result<Pod, String> {
    let ds = install.get("DaemonSet", name)?;
    let mut tx = Tx {
        install,
        node,
        honoured: Vec::new(),
        created: Vec::new(),
    };
    let top = tx.fields(
        ds,
        "DaemonSet",
        &[
            ("apiVersion", ""),
            ("kind", ""),
            ("metadata", ""),
            ("spec", ""),
        ],
    )?;
    if str_of(top, "apiVersion") != Some("apps/v1") {
        return Err("DaemonSet.apiVersion: only apps/v1 is understood".into());
    }
    let meta = tx.fields(
        &top["metadata"],
        "DaemonSet.metadata",
        &[
            (
                "name",
                "the pod's name is <name>-<5 letters>, as the controller makes it",
            ),
            ("namespace", "the pod's namespace"),
            ("labels", "the DaemonSet's own; not on the pod"),
            ("annotations", "the DaemonSet's own; not on the pod"),
        ],
    )?;
    let namespace = str_of(meta, "namespace").unwrap_or("default").to_owned();
    let spec = tx.fields(
        &top["spec"],
        "DaemonSet.spec",
        &[
            (
                "selector",
                "checked to match the template's labels (the API server requires it)",
            ),
            (
                "updateStrategy",
                "controller behaviour: one pod per node is what runs here",
            ),
            ("minReadySeconds", "controller behaviour"),
            ("revisionHistoryLimit", "controller behaviour"),
            ("template", ""),
        ],
    )?;
    let template = tx.fields(
        &spec["template"],
        "DaemonSet.spec.template",
        &[("metadata", ""), ("spec", "")],
    )?;
    let tmeta = tx.fields(
        &template["metadata"],
        "DaemonSet.spec.template.metadata",
        &[
            (
                "labels",
                "sandbox labels (plus kubelet's io.kubernetes.pod.*)",
            ),
            ("annotations", "sandbox annotations (what CNI plugins see)"),
        ],
    )?;
    let labels = string_map(tmeta, "labels");
    if let Some(want) = spec
        .get("selector")
        .and_then(|s| s.get("matchLabels"))
        .and_then(Value::as_object)
    {
        for (k, v) in want {
            if labels.get(k).map(String::as_str) != v.as_str() {
                return Err(format!(
                    "DaemonSet.spec.selector.matchLabels.{k} does not match the template"
                ));
            }
        }
    }
    let annotations = string_map(tmeta, "annotations");
    let suffix: String = uid()
        .chars()
        .filter(char::is_ascii_alphabetic)
        .take(5)
        .collect();
    let pod_name = format!("{}-{suffix:a<5}", str_of(meta, "name").unwrap_or(name));
    tx.pod(
        &template["spec"],
        &pod_name,
        &namespace,
        labels,
        annotations,
    )
}

impl Tx<'_> {
    fn pod(
        &mut self,
        spec: &Value,
        name: &str,
        namespace: &str,
        mut labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    ) -> Result<Pod, String> {
        let p = "DaemonSet.spec.template.spec";
        let spec = self.fields(
            spec,
            p,
            &[
                ("serviceAccountName", "identity for the API server only: the agent gets no token (see automountServiceAccountToken)"),
                ("automountServiceAccountToken", "false: no token volume is mounted (true is refused: not emulated)"),
                ("hostNetwork", "sandbox and containers in the node's network namespace (NamespaceMode NODE); the pod IP is the node IP"),
                ("hostPID", "false only"),
                ("hostIPC", "false only"),
                ("dnsPolicy", "DNS config of the sandbox: the node's resolv.conf (no cluster DNS on this node)"),
                ("priorityClassName", "system-node-critical: oom_score_adj -997 as kubelet gives critical pods"),
                ("tolerations", "scheduling only: the pod runs on this node"),
                ("nodeSelector", "scheduling only"),
                ("affinity", "scheduling only"),
                ("terminationGracePeriodSeconds", "StopContainer's timeout (SIGTERM, then SIGKILL)"),
                ("containers", ""),
                ("volumes", ""),
            ],
        )?;
        if bool_of(spec, "automountServiceAccountToken") != Some(false) {
            return Err(format!(
                "{p}.automountServiceAccountToken: only false is run here (a projected token needs an API server)"
            ));
        }
        for key in ["hostPID", "hostIPC"] {
            if bool_of(spec, key) == Some(true) {
                return Err(format!("{p}.{key}: true is not emulated"));
            }
        }
        let host_network = bool_of(spec, "hostNetwork") == Some(true);
        let dns_policy = str_of(spec, "dnsPolicy").unwrap_or("ClusterFirst");
        if !["ClusterFirst", "ClusterFirstWithHostNet", "Default"].contains(&dns_policy) {
            return Err(format!("{p}.dnsPolicy: {dns_policy} is not emulated"));
        }
        let critical = str_of(spec, "priorityClassName") == Some("system-node-critical");
        let grace = int_of(spec, "terminationGracePeriodSeconds", 30);
        let uid = uid();
        labels.insert("io.kubernetes.pod.name".into(), name.into());
        labels.insert("io.kubernetes.pod.namespace".into(), namespace.into());
        labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
        let pod_dir = self.node.pods_dir.join(&uid);
        let log_dir = self.node.log_dir.join(format!("{namespace}_{name}_{uid}"));
        for d in [&pod_dir, &log_dir] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }

        // Volumes: name → (host path, forced read-only).
        let mut volumes: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
        for (i, v) in items(spec, "volumes") {
            let vp = format!("{p}.volumes[{i}]");
            let (vname, host, ro) = self.volume(v, &vp, &pod_dir)?;
            volumes.insert(vname, (host, ro));
        }

        let namespaces = NamespaceOption {
            network: if host_network {
                NamespaceMode::Node
            } else {
                NamespaceMode::Pod
            } as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let mut sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: if host_network {
                String::new()
            } else {
                name.into()
            },
            log_directory: log_dir.display().to_string(),
            dns_config: Some(node_dns()),
            labels: labels.into_iter().collect(),
            annotations: annotations.into_iter().collect(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };

        let mut containers = Vec::new();
        let list = spec
            .get("containers")
            .and_then(Value::as_array)
            .ok_or(format!("{p}.containers: none"))?;
        for (i, c) in list.iter().enumerate() {
            let cp = format!("{p}.containers[{i}]");
            let (container, ports) = self.container(
                c,
                &cp,
                name,
                namespace,
                &uid,
                &pod_dir,
                &volumes,
                namespaces.clone(),
                host_network,
                critical,
            )?;
            sandbox.port_mappings.extend(ports);
            containers.push(container);
        }
        Ok(Pod {
            name: name.into(),
            sandbox,
            containers,
            grace,
            honoured: std::mem::take(&mut self.honoured),
            created: std::mem::take(&mut self.created),
        })
    }

    fn volume(
        &mut self,
        v: &Value,
        vp: &str,
        pod_dir: &Path,
    ) -> Result<(String, PathBuf, bool), String> {
        let map = self.fields(v, vp, &[("name", ""), ("hostPath", ""), ("configMap", "")])?;
        let vname = str_of(map, "name")
            .ok_or(format!("{vp}.name missing"))?
            .to_owned();
        if let Some(hp) = map.get("hostPath") {
            let hp = self.fields(
                hp,
                &format!("{vp}.hostPath"),
                &[
                    ("path", "bind-mounted from the node (see the test's remaps)"),
                    (
                        "type",
                        "checked or created as kubelet does (DirectoryOrCreate: mkdir 0755)",
                    ),
                ],
            )?;
            let path = str_of(hp, "path").ok_or(format!("{vp}.hostPath.path missing"))?;
            let host = self
                .node
                .host_paths
                .get(path)
                .cloned()
                .unwrap_or_else(|| PathBuf::from(path));
            let kind = str_of(hp, "type").unwrap_or("");
            let meta = std::fs::metadata(&host);
            use std::os::unix::fs::FileTypeExt;
            let ok = match kind {
                "" => true,
                "DirectoryOrCreate" => {
                    if meta.is_err() {
                        use std::os::unix::fs::DirBuilderExt;
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o755)
                            .create(&host)
                            .map_err(|e| format!("{vp}: creating {}: {e}", host.display()))?;
                        self.created.push(host.clone());
                    }
                    std::fs::metadata(&host).is_ok_and(|m| m.is_dir())
                }
                "Directory" => meta.is_ok_and(|m| m.is_dir()),
                "Socket" => meta.is_ok_and(|m| m.file_type().is_socket()),
                "File" => meta.is_ok_and(|m| m.is_file()),
                other => return Err(format!("{vp}.hostPath.type: {other} is not emulated")),
            };
            if !ok {
                // kubelet: the pod stays ContainerCreating with this event.
                return Err(format!(
                    "{vp}: hostPath type check failed: {} is not a {kind}",
                    host.display()
                ));
            }
            return Ok((vname, host, false));
        }
        if let Some(cm) = map.get("configMap") {
            let cm = self.fields(
                cm,
                &format!("{vp}.configMap"),
                &[
                    ("name", "the ConfigMap of the install, its keys as files (kubelet's ..data symlink layout), mounted read-only"),
                    ("defaultMode", "the files' mode"),
                ],
            )?;
            let cm_name = str_of(cm, "name").ok_or(format!("{vp}.configMap.name missing"))?;
            let mode = int_of(cm, "defaultMode", 0o644) as u32;
            let object = self.install.get("ConfigMap", cm_name)?;
            let data = object
                .get("data")
                .and_then(Value::as_object)
                .ok_or(format!("ConfigMap {cm_name} has no data"))?;
            let dir = pod_dir.join("volumes/kubernetes.io~configmap").join(&vname);
            write_configmap(&dir, data, mode)?;
            return Ok((vname, dir, true));
        }
        Err(format!(
            "{vp}: no volume source the translation understands"
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn container(
        &mut self,
        c: &Value,
        cp: &str,
        pod: &str,
        namespace: &str,
        pod_uid: &str,
        pod_dir: &Path,
        volumes: &BTreeMap<String, (PathBuf, bool)>,
        namespaces: NamespaceOption,
        host_network: bool,
        critical: bool,
    ) -> Result<(Container, Vec<PortMapping>), String> {
        let c = self.fields(
            c,
            cp,
            &[
                ("name", "container metadata"),
                (
                    "image",
                    "the image, which must already be in the runtime (imported)",
                ),
                (
                    "imagePullPolicy",
                    "IfNotPresent/Never: no pull (the image is imported first)",
                ),
                (
                    "command",
                    "CRI command (replaces the image's entrypoint), $(VAR) expanded",
                ),
                ("args", "CRI args, $(VAR) expanded"),
                ("env", ""),
                (
                    "ports",
                    "sandbox port mappings (hostNetwork: host port = container port)",
                ),
                ("securityContext", ""),
                ("startupProbe", ""),
                ("readinessProbe", ""),
                ("livenessProbe", ""),
                ("resources", ""),
                ("volumeMounts", ""),
                (
                    "terminationMessagePath",
                    "where kubelet mounts the termination-log file",
                ),
                ("workingDir", "CRI working dir"),
            ],
        )?;
        let name = str_of(c, "name")
            .ok_or(format!("{cp}.name missing"))?
            .to_owned();
        let image = str_of(c, "image").ok_or(format!("{cp}.image missing"))?;
        if str_of(c, "imagePullPolicy") == Some("Always") {
            return Err(format!("{cp}.imagePullPolicy: Always needs a registry"));
        }

        // Env, in order, each expanded against those before it (kubelet's rule).
        let mut env = BTreeMap::new();
        let mut envs = Vec::new();
        for (ep, e) in self.list(
            c,
            cp,
            "env",
            &[
                ("name", ""),
                ("value", "container env, $(VAR) expanded"),
                ("valueFrom", ""),
            ],
        )? {
            let key = str_of(e, "name")
                .ok_or(format!("{ep}.name missing"))?
                .to_owned();
            let value = if let Some(from) = e.get("valueFrom") {
                let from = self.fields(from, &format!("{ep}.valueFrom"), &[("fieldRef", "")])?;
                let f = self.fields(
                    &from["fieldRef"],
                    &format!("{ep}.valueFrom.fieldRef"),
                    &[
                        ("fieldPath", "downward API, resolved by the test's kubelet"),
                        ("apiVersion", ""),
                    ],
                )?;
                match str_of(f, "fieldPath") {
                    Some("status.hostIP") => self.node.ip.to_string(),
                    Some("status.podIP") if host_network => self.node.ip.to_string(),
                    Some("spec.nodeName") => self.node.name.clone(),
                    Some("metadata.name") => pod.to_owned(),
                    Some("metadata.namespace") => namespace.to_owned(),
                    Some("metadata.uid") => pod_uid.to_owned(),
                    other => {
                        return Err(format!(
                            "{ep}.valueFrom.fieldRef.fieldPath: {other:?} is not emulated"
                        ));
                    }
                }
            } else {
                expand(str_of(e, "value").unwrap_or(""), &env)
            };
            env.insert(key.clone(), value.clone());
            envs.push(KeyValue { key, value });
        }
        let strings = |key: &str| -> Vec<String> {
            c.get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|a| expand(a.as_str().unwrap_or_default(), &env))
                .collect()
        };
        let command = strings("command");
        let args = strings("args");

        // Ports → sandbox port mappings.
        let mut ports = Vec::new();
        for (pp, port) in self.list(
            c,
            cp,
            "ports",
            &[
                ("name", ""),
                ("containerPort", ""),
                ("protocol", ""),
                ("hostPort", ""),
            ],
        )? {
            let number = int_of(port, "containerPort", 0) as i32;
            let protocol = match str_of(port, "protocol").unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                other => return Err(format!("{pp}.protocol: {other}")),
            };
            let host_port = int_of(
                port,
                "hostPort",
                if host_network { i64::from(number) } else { 0 },
            ) as i32;
            if host_network && host_port != number {
                return Err(format!(
                    "{pp}.hostPort must equal containerPort with hostNetwork (API validation)"
                ));
            }
            ports.push(PortMapping {
                protocol: protocol as i32,
                container_port: number,
                host_port,
                host_ip: String::new(),
            });
        }

        let security = self.security(
            c.get("securityContext"),
            &format!("{cp}.securityContext"),
            namespaces,
        )?;
        let resources = self.resources(c.get("resources"), &format!("{cp}.resources"), critical)?;

        // Mounts: the container's volumeMounts, then kubelet's own (/etc/hosts for a
        // hostNetwork pod, the termination-log file).
        let mut mounts = Vec::new();
        for (mp, m) in self.list(c, cp, "volumeMounts", &[
                ("name", ""),
                ("mountPath", "CRI mount container_path"),
                ("readOnly", "CRI mount readonly"),
                ("mountPropagation", "CRI mount propagation (HostToContainer: rslave, needs a shared or slave source as on a systemd node)"),
            ])? {
            let vname = str_of(m, "name").ok_or(format!("{mp}.name missing"))?;
            let (host, forced_ro) = volumes
                .get(vname)
                .ok_or(format!("{mp}.name: no volume {vname}"))?;
            let propagation = match str_of(m, "mountPropagation").unwrap_or("None") {
                "None" => MountPropagation::PropagationPrivate,
                "HostToContainer" => MountPropagation::PropagationHostToContainer,
                "Bidirectional" if security.privileged => {
                    MountPropagation::PropagationBidirectional
                }
                other => {
                    return Err(format!(
                        "{mp}.mountPropagation: {other} (Bidirectional needs a privileged container: API validation)"
                    ));
                }
            };
            mounts.push(Mount {
                container_path: str_of(m, "mountPath")
                    .ok_or(format!("{mp}.mountPath missing"))?
                    .to_owned(),
                host_path: host.display().to_string(),
                readonly: *forced_ro || bool_of(m, "readOnly") == Some(true),
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        if host_network {
            let hosts = pod_dir.join("etc-hosts");
            let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            std::fs::write(
                &hosts,
                format!("# Kubernetes-managed hosts file (host network).\n{node_hosts}"),
            )
            .map_err(|e| format!("etc-hosts: {e}"))?;
            mounts.push(Mount {
                container_path: "/etc/hosts".into(),
                host_path: hosts.display().to_string(),
                ..Default::default()
            });
        }
        let term_dir = pod_dir.join("containers").join(&name);
        std::fs::create_dir_all(&term_dir).map_err(|e| format!("{e}"))?;
        let term = term_dir.join("0");
        std::fs::write(&term, "").map_err(|e| format!("{e}"))?;
        mounts.push(Mount {
            container_path: str_of(c, "terminationMessagePath")
                .unwrap_or("/dev/termination-log")
                .into(),
            host_path: term.display().to_string(),
            ..Default::default()
        });

        let mut probes = Vec::new();
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            if let Some(probe) = c.get(kind) {
                probes.push(self.probe(probe, &format!("{cp}.{kind}"), kind)?);
            }
        }

        let log_path = format!("{name}/0.log");
        let mut labels = BTreeMap::new();
        labels.insert("io.kubernetes.container.name".to_owned(), name.clone());
        labels.insert("io.kubernetes.pod.name".to_owned(), pod.to_owned());
        labels.insert(
            "io.kubernetes.pod.namespace".to_owned(),
            namespace.to_owned(),
        );
        labels.insert("io.kubernetes.pod.uid".to_owned(), pod_uid.to_owned());
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            command,
            args,
            working_dir: str_of(c, "workingDir").unwrap_or("").to_owned(),
            envs,
            mounts,
            labels: labels.into_iter().collect(),
            log_path: log_path.clone(),
            linux: Some(LinuxContainerConfig {
                resources: Some(resources),
                security_context: Some(security),
            }),
            ..Default::default()
        };
        let log = self
            .node
            .log_dir
            .join(format!("{namespace}_{pod}_{pod_uid}"))
            .join(log_path);
        Ok((
            Container {
                name,
                config,
                probes,
                log,
            },
            ports,
        ))
    }

    fn security(
        &mut self,
        sc: Option<&Value>,
        sp: &str,
        namespaces: NamespaceOption,
    ) -> Result<LinuxContainerSecurityContext, String> {
        let mut out = LinuxContainerSecurityContext {
            namespace_options: Some(namespaces),
            ..Default::default()
        };
        let Some(sc) = sc else {
            out.masked_paths = DEFAULT_MASKED_PATHS.map(str::to_owned).to_vec();
            out.readonly_paths = DEFAULT_READONLY_PATHS.map(str::to_owned).to_vec();
            return Ok(out);
        };
        let sc = self.fields(
            sc,
            sp,
            &[
                ("privileged", "CRI privileged (false: masked and read-only /proc paths as kubelet sends them)"),
                ("runAsUser", "CRI run_as_user"),
                ("runAsGroup", "CRI run_as_group"),
                ("runAsNonRoot", "kubelet refuses to start a container that would run as uid 0"),
                ("readOnlyRootFilesystem", "CRI readonly_rootfs"),
                ("allowPrivilegeEscalation", "CRI no_new_privs when false (refused with privileged or SYS_ADMIN, as the API server does)"),
                ("capabilities", "CRI add/drop capabilities, names as written (the runtime adds CAP_)"),
                ("seccompProfile", "CRI seccomp profile (RuntimeDefault: the runtime's default filter)"),
                ("appArmorProfile", "CRI apparmor profile"),
                ("procMount", "Default only: kubelet's masked and read-only /proc paths"),
            ],
        )?;
        out.privileged = bool_of(sc, "privileged") == Some(true);
        if let Some(u) = sc.get("runAsUser").and_then(Value::as_i64) {
            out.run_as_user = Some(Int64Value { value: u });
        }
        if let Some(g) = sc.get("runAsGroup").and_then(Value::as_i64) {
            out.run_as_group = Some(Int64Value { value: g });
        }
        if bool_of(sc, "runAsNonRoot") == Some(true)
            && out.run_as_user.as_ref().is_none_or(|u| u.value == 0)
        {
            return Err(format!(
                "{sp}: runAsNonRoot with uid 0 (or the image's user): kubelet refuses the container"
            ));
        }
        out.readonly_rootfs = bool_of(sc, "readOnlyRootFilesystem") == Some(true);
        if let Some(caps) = sc.get("capabilities") {
            let caps = self.fields(
                caps,
                &format!("{sp}.capabilities"),
                &[("add", ""), ("drop", "")],
            )?;
            let names = |k: &str| -> Vec<String> {
                caps.get(k)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            };
            out.capabilities = Some(Capability {
                add_capabilities: names("add"),
                drop_capabilities: names("drop"),
                add_ambient_capabilities: Vec::new(),
            });
        }
        let sys_admin = out.capabilities.as_ref().is_some_and(|c| {
            c.add_capabilities
                .iter()
                .any(|n| n == "SYS_ADMIN" || n == "CAP_SYS_ADMIN")
        });
        if bool_of(sc, "allowPrivilegeEscalation") == Some(false) {
            if out.privileged || sys_admin {
                return Err(format!(
                    "{sp}.allowPrivilegeEscalation: cannot be false with privileged or capabilities.add SYS_ADMIN (the API server refuses it)"
                ));
            }
            out.no_new_privs = true;
        }
        if let Some(profile) = sc.get("seccompProfile") {
            out.seccomp = Some(self.profile(profile, &format!("{sp}.seccompProfile"))?);
        }
        if let Some(profile) = sc.get("appArmorProfile") {
            out.apparmor = Some(self.profile(profile, &format!("{sp}.appArmorProfile"))?);
        }
        if str_of(sc, "procMount").is_some_and(|m| m != "Default") {
            return Err(format!("{sp}.procMount: only Default is emulated"));
        }
        if !out.privileged {
            out.masked_paths = DEFAULT_MASKED_PATHS.map(str::to_owned).to_vec();
            out.readonly_paths = DEFAULT_READONLY_PATHS.map(str::to_owned).to_vec();
        }
        Ok(out)
    }

    fn profile(&mut self, v: &Value, pp: &str) -> Result<SecurityProfile, String> {
        let v = self.fields(v, pp, &[("type", ""), ("localhostProfile", "")])?;
        let (profile_type, localhost_ref) = match str_of(v, "type") {
            Some("RuntimeDefault") => (ProfileType::RuntimeDefault, String::new()),
            Some("Unconfined") => (ProfileType::Unconfined, String::new()),
            Some("Localhost") => (
                ProfileType::Localhost,
                str_of(v, "localhostProfile").unwrap_or_default().to_owned(),
            ),
            other => return Err(format!("{pp}.type: {other:?}")),
        };
        Ok(SecurityProfile {
            profile_type: profile_type as i32,
            localhost_ref,
        })
    }

    fn resources(
        &mut self,
        r: Option<&Value>,
        rp: &str,
        critical: bool,
    ) -> Result<LinuxContainerResources, String> {
        let mut out = LinuxContainerResources {
            cpu_shares: 2,
            ..Default::default()
        };
        let (mut req, mut lim) = (Map::new(), Map::new());
        if let Some(r) = r {
            let r = self.fields(
                r,
                rp,
                &[
                    ("requests", "cpu: CRI cpu_shares (milli × 1024 / 1000, at least 2); memory: QoS (oom_score_adj)"),
                    ("limits", "cpu: CRI CFS quota over a 100 ms period; memory: CRI memory limit"),
                ],
            )?;
            for (key, into) in [("requests", &mut req), ("limits", &mut lim)] {
                if let Some(m) = r.get(key) {
                    let m =
                        self.fields(m, &format!("{rp}.{key}"), &[("cpu", ""), ("memory", "")])?;
                    *into = m.clone();
                }
            }
        }
        // A limit without a request: the API server defaults the request to the limit.
        for k in ["cpu", "memory"] {
            if !req.contains_key(k)
                && let Some(v) = lim.get(k)
            {
                req.insert(k.into(), v.clone());
            }
        }
        if let Some(cpu) = req.get("cpu") {
            out.cpu_shares = (quantity(cpu, true)? * 1024 / 1000).max(2);
        }
        if let Some(cpu) = lim.get("cpu") {
            out.cpu_period = 100_000;
            out.cpu_quota = (quantity(cpu, true)? * 100_000 / 1000).max(1000);
        }
        if let Some(mem) = lim.get("memory") {
            out.memory_limit_in_bytes = quantity(mem, false)?;
        }
        // kubelet's OOM score: critical pods and Guaranteed -997, BestEffort 1000, Burstable
        // by memory request over node memory.
        let guaranteed = ["cpu", "memory"]
            .iter()
            .all(|k| lim.contains_key(*k) && lim.get(*k) == req.get(*k));
        out.oom_score_adj = if critical || guaranteed {
            -997
        } else if req.is_empty() && lim.is_empty() {
            1000
        } else {
            let mem = req
                .get("memory")
                .map(|m| quantity(m, false))
                .transpose()?
                .unwrap_or(0);
            let adj =
                1000 - (1000 * mem as i128 / i128::from(self.node.memory_bytes.max(1))) as i64;
            adj.clamp(2, 999)
        };
        Ok(out)
    }

    fn probe(&mut self, v: &Value, pp: &str, kind: &str) -> Result<Probe, String> {
        let v = self.fields(
            v,
            pp,
            &[
                (
                    "grpc",
                    "grpc.health.v1 Check against the pod IP (the node IP with hostNetwork)",
                ),
                ("initialDelaySeconds", "waited before the first probe"),
                ("periodSeconds", "time between probes"),
                ("timeoutSeconds", "each probe's deadline"),
                (
                    "failureThreshold",
                    "probes that may fail before the probe fails",
                ),
                ("successThreshold", "probes that must pass"),
            ],
        )?;
        let grpc = self.fields(
            &v["grpc"],
            &format!("{pp}.grpc"),
            &[("port", ""), ("service", "")],
        )?;
        let secs = |k: &str, d: i64| Duration::from_secs(int_of(v, k, d).max(0) as u64);
        Ok(Probe {
            kind: kind.to_owned(),
            port: int_of(grpc, "port", 0) as u16,
            service: str_of(grpc, "service").unwrap_or("").to_owned(),
            initial_delay: secs("initialDelaySeconds", 0),
            period: secs("periodSeconds", 10),
            timeout: secs("timeoutSeconds", 1),
            failure_threshold: int_of(v, "failureThreshold", 3) as u32,
            success_threshold: int_of(v, "successThreshold", 1) as u32,
        })
    }
}

/// One gRPC health probe, as kubelet's prober makes it: `grpc.health.v1.Health/Check` with the
/// probe's service to `ip:port`, within its timeout. `Ok(())` iff SERVING.
pub async fn grpc_probe(ip: IpAddr, probe: &Probe) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let addr = std::net::SocketAddr::new(ip, probe.port);
    let call = async {
        let channel = tonic::transport::Endpoint::try_from(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: probe.service.clone(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(format!(
                "status {:?}",
                ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown)
            ))
        }
    };
    tokio::time::timeout(probe.timeout, call)
        .await
        .map_err(|_| format!("timeout after {:?}", probe.timeout))?
}
