//! An isolated containerd with its CRI plugin, for tests and the pod-level benchmark: its own
//! root, state, socket, CNI bin and conf dirs and bridge under a temporary directory, a conflist
//! of `bridge` + `host-local` (Debian's containernetworking-plugins), optionally chained with
//! `sluice-cni` declaring the pod-annotations capability, and a local busybox image built with
//! umoci (no registry). Everything is stopped and removed on drop, also when a test panics.
//!
//! Facts this rests on (checked on this kind of machine): `restrict_oom_score_adj = true` is
//! required because root lacks CAP_SYS_RESOURCE; containerd passes pod annotations only to
//! plugins that declare the capability; DEL comes twice (Stop with the netns, Remove without).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_proto::cri::image_service_client::ImageServiceClient;
use sluice_proto::cri::runtime_service_client::RuntimeServiceClient;
use sluice_proto::cri::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListImagesRequest, ListPodSandboxRequest, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::Channel;

use crate::{bin, sh, wait_for};

/// Where Debian's containernetworking-plugins put the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The containerd these tests drive: the machine's (Debian 12's 1.6.20) unless the runtime
/// matrix (`tests/runtimes/matrix.sh`) points at another one unpacked from its Debian package:
/// `SLUICE_CONTAINERD_ROOT` is the unpacked tree (`<root>/usr/bin/containerd`, its shims and
/// `ctr` beside it), `SLUICE_CNI_PLUGINS` the reference plugins' directory to use with it.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Directory holding `containerd`, `ctr` and the shims; `None` for the machine's `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// The reference plugins (bridge, host-local, loopback).
    pub plugins: PathBuf,
    /// `containerd --version`'s version, e.g. `1.6.20` or `2.1.9` (packaging suffix cut).
    pub version: String,
    /// Its major version: 2 and later read configuration version 3.
    pub major: u32,
    /// The whole `containerd --version` line (packaging revision included).
    pub describe: String,
}

impl Runtime {
    /// The runtime chosen by the environment (see the type's docs), probed once.
    pub fn current() -> &'static Runtime {
        static RUNTIME: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
        RUNTIME.get_or_init(|| {
            let bin_dir = std::env::var_os("SLUICE_CONTAINERD_ROOT")
                .filter(|v| !v.is_empty())
                .map(|root| PathBuf::from(root).join("usr/bin"));
            let plugins = std::env::var_os("SLUICE_CNI_PLUGINS")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(REFERENCE_PLUGINS), PathBuf::from);
            let mut runtime = Runtime {
                bin_dir,
                plugins,
                version: String::new(),
                major: 0,
                describe: String::new(),
            };
            let out = runtime
                .command("containerd")
                .arg("--version")
                .output()
                .unwrap_or_else(|e| {
                    panic!("containerd --version (Debian package containerd, or SLUICE_CONTAINERD_ROOT): {e}")
                });
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            runtime.describe = text.clone();
            runtime.version = version_of(&text)
                .unwrap_or_else(|| panic!("no version in `containerd --version`: {text:?}"));
            runtime.major = runtime
                .version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or_else(|| panic!("containerd version {:?}", runtime.version));
            runtime
        })
    }

    /// A command for one of this runtime's programs, with its directory first on `PATH` (so
    /// containerd finds its own shim).
    pub fn command(&self, program: &str) -> Command {
        let Some(dir) = &self.bin_dir else {
            return Command::new(program);
        };
        let mut cmd = Command::new(dir.join(program));
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", dir.display()));
        cmd
    }

    /// The `cniVersion`s its libcni accepts results of, among those sluice speaks:
    /// containerd 1.6 and 1.7 reject a 1.1.0 result (`unsupported CNI result version`).
    pub fn cni_versions(&self) -> &'static [&'static str] {
        if self.major >= 2 {
            &["1.1.0", "1.0.0", "0.4.0"]
        } else {
            &["1.0.0", "0.4.0"]
        }
    }
}

/// `1.6.20` from "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1",
/// `2.1.9` from "containerd github.com/containerd/containerd/v2 2.1.9+unknown ".
pub fn version_of(text: &str) -> Option<String> {
    let word = text.split_whitespace().nth(2)?;
    let version = word.split(['~', '+', '-']).next()?.trim_start_matches('v');
    version
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .then(|| version.to_owned())
}
/// The image every sandbox and test container uses (busybox-static, built locally).
pub const IMAGE: &str = "localhost/sluice-test:1.0";

/// Serializes containerd instances within one test binary: each is heavy, and 2 cores do not
/// run several well at once.
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How the CNI chain looks.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Chain `sluice-cni` after bridge with this agent socket; `None` for bridge alone.
    pub agent_socket: Option<String>,
    /// Distinguishes bridges and subnets of instances that might coexist (0-50).
    pub index: u8,
    /// The conflist's `cniVersion` (what every plugin in it is called with).
    pub cni_version: &'static str,
    /// Put `sluice-cni` (this build's) into containerd's CNI bin dir; off when something else
    /// installs it there (the DaemonSet's `--install`).
    pub link_plugin: bool,
    /// Dual-stack pods: host-local also hands out an address of `fd00:2NN::/64`.
    pub ipv6: bool,
    /// `SLUICE_CNI_TIMING` in containerd's environment, which libcni passes on to plugins:
    /// sluice-cni then prints its stage timestamps to stderr, which containerd writes to its
    /// log (the pod-level benchmark reads them there).
    pub plugin_timing: bool,
}

impl Chain {
    /// bridge + host-local, chained with sluice at `agent_socket` if given, CNI 1.0.0.
    pub fn new(agent_socket: Option<String>, index: u8) -> Self {
        Chain {
            agent_socket,
            index,
            cni_version: "1.0.0",
            link_plugin: true,
            ipv6: false,
            plugin_timing: false,
        }
    }
}

#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub bridge: String,
    pub subnet: String,
    plugin_timing: bool,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The conflist: bridge + host-local, then sluice-cni if asked.
pub fn conflist(chain: &Chain, ipam_dir: &Path) -> serde_json::Value {
    let bridge = format!("slbr{}", chain.index);
    let subnet = format!("10.{}.0.0/24", 200 + u16::from(chain.index));
    let mut ranges = vec![serde_json::json!([{"subnet": subnet}])];
    let mut routes = vec![serde_json::json!({"dst": "0.0.0.0/0"})];
    if chain.ipv6 {
        ranges.push(
            serde_json::json!([{"subnet": format!("fd00:{}::/64", 200 + u16::from(chain.index))}]),
        );
        routes.push(serde_json::json!({"dst": "::/0"}));
    }
    let mut plugins = vec![serde_json::json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
            "dataDir": ipam_dir,
        },
    })];
    if let Some(socket) = &chain.agent_socket {
        plugins.push(serde_json::json!({
            "type": "sluice-cni",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "agentSocket": socket,
            "timeoutMs": 5000,
        }));
    }
    serde_json::json!({"cniVersion": chain.cni_version, "name": "sluice-test", "plugins": plugins})
}

/// containerd's configuration: its own root, state, socket, `opt` directory and CNI dirs,
/// NRI off, in the format its major version reads (2 up to 1.7, 3 from 2.0 on).
fn config_toml(dir: &Path, runtime: &Runtime) -> String {
    if runtime.major >= 2 {
        return config_toml_v3(dir);
    }
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#
    )
}

/// containerd 2.x: the CRI plugin split into `cri.v1.images` and `cri.v1.runtime`, the
/// sandbox image is a pinned image, CNI takes a list of bin dirs.
fn config_toml_v3(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.erofs", "io.containerd.differ.v1.erofs", "io.containerd.nri.v1.nri"]

[grpc]
  address = "{d}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  enable_cdi = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/conf"
    max_conf_num = 1
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#
    )
}

/// Starts containerd with the configuration in `dir`, its stderr appended to `log`.
fn spawn(runtime: &Runtime, dir: &Path, log: &Path, plugin_timing: bool) -> Child {
    let logfile = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("containerd log");
    let mut containerd = runtime.command("containerd");
    if plugin_timing {
        containerd.env("SLUICE_CNI_TIMING", "1");
    }
    containerd
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(logfile)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning containerd {runtime:?}: {e}"))
}

/// Builds the busybox image as an OCI layout tarball with umoci (once per directory). Besides
/// busybox it has the merged-/usr links (`/lib`, `/lib64`, `/sbin` → `/usr/...`), so a
/// container with the host's `/usr` mounted read-only can run the host's iptables, as an
/// istio-init container would.
fn build_image(dir: &Path) -> PathBuf {
    let tar = dir.join("image.tar");
    let rootfs = dir.join("image-rootfs");
    let layout = dir.join("image-oci");
    for d in ["bin", "usr", "rules", "tmp", "run"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("image rootfs");
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("copy /bin/busybox (Debian busybox-static)");
    for (link, to) in [
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        std::os::unix::fs::symlink(to, rootfs.join(link)).expect("image link");
    }
    let image = format!("{}:1.0", layout.display());
    let s = |p: &Path| p.display().to_string();
    sh(&["umoci", "init", "--layout", &s(&layout)]);
    sh(&["umoci", "new", "--image", &image]);
    sh(&["umoci", "insert", "--image", &image, &s(&rootfs), "/"]);
    sh(&[
        "umoci",
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        "/bin/busybox",
        "--config.cmd",
        "sleep",
        "--config.cmd",
        "2147483647",
    ]);
    sh(&["tar", "-C", &s(&layout), "-cf", &s(&tar), "."]);
    tar
}

impl Containerd {
    /// Starts containerd and imports the test image; panics with containerd's log if it does
    /// not come up.
    pub fn start(name: &str, chain: &Chain) -> Self {
        let dir = Self::dir_for(name);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root", "state", "cni/bin", "cni/conf", "ipam", "logs"] {
            std::fs::create_dir_all(dir.join(sub)).expect("containerd dirs");
        }
        let runtime = Runtime::current();
        for plugin in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(
                runtime.plugins.join(plugin),
                dir.join("cni/bin").join(plugin),
            )
            .expect("link reference plugin");
        }
        if chain.link_plugin {
            std::os::unix::fs::symlink(bin("sluice-cni"), dir.join("cni/bin/sluice-cni"))
                .expect("link sluice-cni");
        }
        write(
            &dir.join("cni/conf/10-sluice-test.conflist"),
            &conflist(chain, &dir.join("ipam")).to_string(),
        );
        write(&dir.join("config.toml"), &config_toml(&dir, runtime));
        let socket = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        std::fs::File::create(&log).expect("containerd log");
        let child = spawn(runtime, &dir, &log, chain.plugin_timing);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut me = Containerd {
            child: Some(child),
            dir,
            socket,
            log,
            bridge: format!("slbr{}", chain.index),
            subnet: format!("10.{}.0.0/24", 200 + u16::from(chain.index)),
            plugin_timing: chain.plugin_timing,
            runtime: rt.block_on(async {
                RuntimeServiceClient::new(Endpoint::lazy("unix:///nonexistent"))
            }),
            rt,
        };
        me.wait_ready();
        me.import_image();
        me
    }

    /// containerd's process id (for its CPU time in /proc).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The directory of the instance `start(name, ..)` makes (its socket is `containerd.sock`
    /// in it), known before it starts: for an agent that is started first.
    pub fn dir_for(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("sluice-cri-{name}-{}", std::process::id()))
    }

    /// Restarts containerd as a node's service manager would (SIGTERM, then the same
    /// configuration): its shims and so the pods keep running, and it loads them back from
    /// its store. Its log goes on in the same file.
    pub fn restart(&mut self) {
        self.terminate();
        self.child = Some(spawn(
            Runtime::current(),
            &self.dir,
            &self.log,
            self.plugin_timing,
        ));
        self.wait_ready();
    }

    /// SIGTERM to containerd; SIGKILL after 10 s.
    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn fail(&self, what: &str) -> ! {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "containerd: {what}\n--- last lines of {} ---\n{}",
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.fail(&format!("exited during start-up with {status}"));
            }
            if self.socket.exists() {
                let channel = self.rt.block_on(Endpoint::connect(&self.socket));
                if let Ok(channel) = channel {
                    let mut client = RuntimeServiceClient::new(channel);
                    let version = self.rt.block_on(client.version(VersionRequest::default()));
                    if version.is_ok() {
                        self.runtime = client;
                        return;
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                self.fail("its CRI service did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn import_image(&mut self) {
        let tar = build_image(&self.dir);
        let out = Runtime::current()
            .command("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import", "--base-name"])
            .arg(IMAGE.trim_end_matches(":1.0"))
            .arg(&tar)
            .output()
            .expect("ctr images import");
        if !out.status.success() {
            self.fail(&format!(
                "importing the test image failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // containerd 2.x's CRI image store learns of an import from an event, a moment later.
        let channel = self.runtime_channel();
        let start = Instant::now();
        let found = loop {
            let images = self.rt.block_on(async {
                ImageServiceClient::new(channel.clone())
                    .list_images(ListImagesRequest::default())
                    .await
            });
            let found = images.is_ok_and(|r| {
                r.into_inner()
                    .images
                    .iter()
                    .any(|i| i.repo_tags.iter().any(|t| t == IMAGE))
            });
            if found || start.elapsed() > Duration::from_secs(10) {
                break found;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !found {
            self.fail(&format!("{IMAGE} is not listed by the CRI image service"));
        }
    }

    fn runtime_channel(&self) -> Channel {
        self.rt
            .block_on(Endpoint::connect(&self.socket))
            .unwrap_or_else(|e| self.fail(&format!("connecting: {e}")))
    }

    /// A CRI runtime client for use on another thread's tokio runtime (a channel's worker
    /// lives on the runtime that created it).
    pub async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(
            Endpoint::connect(socket)
                .await
                .expect("connect to containerd"),
        )
    }

    /// Runs a future on this harness's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// RunPodSandbox with these annotations; the sandbox id or containerd's error message.
    pub fn run_pod(&self, name: &str, annotations: &[(&str, &str)]) -> Result<String, String> {
        let mut client = self.runtime.clone();
        let req = pod_request(name, annotations, &self.dir.join("logs"));
        self.rt
            .block_on(client.run_pod_sandbox(req))
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(|s| s.message().to_owned())
    }

    /// StopPodSandbox then RemovePodSandbox, each must succeed.
    pub fn stop_and_remove(&self, id: &str) -> Result<(), String> {
        self.stop_pod(id)?;
        self.remove_pod(id)
    }

    /// StopPodSandbox (containerd's first DEL: with the netns and the cached prevResult).
    pub fn stop_pod(&self, id: &str) -> Result<(), String> {
        let mut client = self.runtime.clone();
        self.rt
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .map(drop)
            .map_err(|s| format!("StopPodSandbox: {}", s.message()))
    }

    /// RemovePodSandbox (containerd's second DEL: no netns, no prevResult).
    pub fn remove_pod(&self, id: &str) -> Result<(), String> {
        let mut client = self.runtime.clone();
        self.rt
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .map(drop)
            .map_err(|s| format!("RemovePodSandbox: {}", s.message()))
    }

    /// The ids of the sandboxes containerd knows, by pod name.
    pub fn sandboxes(&self) -> HashMap<String, String> {
        let mut client = self.runtime.clone();
        self.rt
            .block_on(client.list_pod_sandbox(ListPodSandboxRequest::default()))
            .map(|r| {
                r.into_inner()
                    .items
                    .into_iter()
                    .map(|s| (s.metadata.map(|m| m.name).unwrap_or_default(), s.id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The sandbox's network namespace path, from its verbose status (runtime spec).
    pub fn netns_of(&self, id: &str) -> String {
        self.sandbox_info(id)["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| self.fail(&format!("no network namespace path for {id}")))
    }

    /// The JSON of a sandbox's verbose `PodSandboxStatus` `info` (what discovery reads).
    pub fn sandbox_info(&self, id: &str) -> serde_json::Value {
        let mut client = self.runtime.clone();
        let status = self
            .rt
            .block_on(
                client.pod_sandbox_status(sluice_proto::cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.to_owned(),
                    verbose: true,
                }),
            )
            .unwrap_or_else(|s| self.fail(&format!("PodSandboxStatus {id}: {}", s.message())))
            .into_inner();
        self.verbose_info(&status.info, "PodSandboxStatus")
    }

    /// Creates and starts a busybox container (`sleep`) in the sandbox, as `uid`.
    pub fn start_container(&self, sandbox: &str, pod: &str, name: &str, uid: i64) -> String {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.to_owned(),
                ..Default::default()
            }),
            command: vec!["/bin/busybox".into(), "sleep".into(), "3600".into()],
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    run_as_user: Some(sluice_proto::cri::Int64Value { value: uid }),
                    namespace_options: Some(NamespaceOption::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.create_and_start(sandbox, pod, config)
            .unwrap_or_else(|m| panic!("{m}"))
    }

    /// CreateContainer + StartContainer; the container id or the CRI error.
    fn create_and_start(
        &self,
        sandbox: &str,
        pod: &str,
        config: ContainerConfig,
    ) -> Result<String, String> {
        let sandbox_config = pod_request(pod, &[], &self.dir.join("logs"))
            .config
            .unwrap_or_default();
        self.create_and_start_in(sandbox, &sandbox_config, config)
    }

    /// Starts a busybox app container (uid 1000) in the sandbox and connects from it to `to`
    /// (`IP PORT`) with `nc`: the line the listener answered, or the exit code and stderr.
    pub fn app_connects(
        &self,
        sandbox: &str,
        pod: &str,
        ip: &str,
        port: &str,
    ) -> Result<String, String> {
        let app = self.start_container(sandbox, pod, "app", 1000);
        let (code, out, err) = self.exec(&app, &["/bin/busybox", "nc", "-w", "3", ip, port]);
        if code == 0 {
            Ok(out.trim().to_owned())
        } else {
            Err(format!("nc exited {code}: {err}"))
        }
    }

    /// Imports an OCI image tarball (e.g. `make image`'s) under `base_name` into the CRI's
    /// namespace, as `ctr images import` does on a node.
    pub fn import(&self, tar: &Path, base_name: &str) {
        let out = Runtime::current()
            .command("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import", "--base-name", base_name])
            .arg(tar)
            .output()
            .expect("ctr images import");
        if !out.status.success() {
            self.fail(&format!(
                "importing {}: {}",
                tar.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }

    /// RunPodSandbox with a config built elsewhere (e.g. from a manifest).
    pub fn run_sandbox(&self, config: PodSandboxConfig) -> Result<String, String> {
        let mut client = self.runtime.clone();
        self.rt
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .map(|r| r.into_inner().pod_sandbox_id)
            .map_err(|s| format!("RunPodSandbox: {}", s.message()))
    }

    /// CreateContainer then StartContainer, with the sandbox's own config (as kubelet sends it).
    pub fn create_and_start_in(
        &self,
        sandbox: &str,
        sandbox_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<String, String> {
        let mut client = self.runtime.clone();
        self.rt.block_on(async {
            let id = client
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: sandbox.to_owned(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config.clone()),
                })
                .await
                .map_err(|s| format!("CreateContainer: {}", s.message()))?
                .into_inner()
                .container_id;
            client
                .start_container(StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .map_err(|s| format!("StartContainer: {}", s.message()))?;
            Ok(id)
        })
    }

    /// StopContainer: SIGTERM (the image's stop signal), SIGKILL after `timeout_s`.
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<(), String> {
        let mut client = self.runtime.clone();
        self.rt
            .block_on(
                client.stop_container(sluice_proto::cri::StopContainerRequest {
                    container_id: id.to_owned(),
                    timeout: timeout_s,
                }),
            )
            .map(drop)
            .map_err(|s| format!("StopContainer: {}", s.message()))
    }

    /// A running container's process id on the host (from its verbose status).
    pub fn container_pid(&self, id: &str) -> u32 {
        let response = self.container_status_of(id, true);
        self.verbose_info(&response.info, "ContainerStatus")["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| self.fail(&format!("no pid in the verbose status of {id}")))
    }

    /// The JSON of a verbose CRI status's `info` map.
    fn verbose_info(&self, info: &HashMap<String, String>, call: &str) -> serde_json::Value {
        info.get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_else(|| self.fail(&format!("{call} has no verbose info")))
    }

    fn container_status_of(
        &self,
        id: &str,
        verbose: bool,
    ) -> sluice_proto::cri::ContainerStatusResponse {
        let mut client = self.runtime.clone();
        self.rt
            .block_on(
                client.container_status(sluice_proto::cri::ContainerStatusRequest {
                    container_id: id.to_owned(),
                    verbose,
                }),
            )
            .unwrap_or_else(|s| self.fail(&format!("ContainerStatus {id}: {}", s.message())))
            .into_inner()
    }

    /// A container's status: state, exit code, reason, message.
    pub fn container_status(&self, id: &str) -> sluice_proto::cri::ContainerStatus {
        self.container_status_of(id, false)
            .status
            .unwrap_or_else(|| self.fail("ContainerStatus without a status"))
    }

    /// Creates and starts a container from `config` in the sandbox and waits for it to exit
    /// (polling its status every millisecond, as fast as a kubelet could notice); returns its
    /// exit code or the CRI error.
    pub fn run_to_exit(
        &self,
        sandbox: &str,
        pod: &str,
        config: ContainerConfig,
    ) -> Result<i32, String> {
        let id = self.create_and_start(sandbox, pod, config)?;
        let mut client = self.runtime.clone();
        self.rt.block_on(async {
            loop {
                let status = client
                    .container_status(sluice_proto::cri::ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    })
                    .await
                    .map_err(|s| format!("ContainerStatus: {}", s.message()))?
                    .into_inner()
                    .status
                    .ok_or("ContainerStatus without a status")?;
                if status.state == sluice_proto::cri::ContainerState::ContainerExited as i32 {
                    return Ok(status.exit_code);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    /// ExecSync in a container: (exit code, stdout, stderr).
    pub fn exec(&self, container: &str, cmd: &[&str]) -> (i32, String, String) {
        let mut client = self.runtime.clone();
        let r = self
            .rt
            .block_on(client.exec_sync(ExecSyncRequest {
                container_id: container.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 10,
            }))
            .unwrap_or_else(|s| panic!("ExecSync {cmd:?}: {}", s.message()))
            .into_inner();
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    /// Removes every sandbox containerd still has (best effort).
    pub fn remove_all(&self) {
        for id in self.sandboxes().into_values() {
            let _ = self.stop_and_remove(&id);
        }
    }
}

/// A RunPodSandbox request the way kubelet shapes it (pod network namespace, annotations).
pub fn pod_request(name: &str, annotations: &[(&str, &str)], logs: &Path) -> RunPodSandboxRequest {
    RunPodSandboxRequest {
        config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("uid-{name}"),
                namespace: "default".to_owned(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            log_directory: logs.join(name).display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        runtime_handler: String::new(),
    }
}

/// Channel construction over a unix socket (tonic connects to `unix://` natively).
struct Endpoint;

impl Endpoint {
    async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    fn lazy(uri: &'static str) -> Channel {
        tonic::transport::Endpoint::from_static(uri).connect_lazy()
    }
}

/// Processes whose command line mentions `needle` (containerd's shims name its socket).
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all();
        self.terminate();
        // Shims outlive containerd by design; ours name our socket.
        for pid in pids_mentioning(&self.socket.display().to_string()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for m in mounts_below(&self.dir) {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        if std::thread::panicking() {
            eprintln!(
                "containerd log kept at {} (directory {})",
                self.log.display(),
                self.dir.display()
            );
            // Keep the log, drop the rest.
            let keep = std::env::temp_dir().join(format!(
                "{}.log",
                self.dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("containerd")
            ));
            let _ = std::fs::copy(&self.log, keep);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `path` exists (e.g. a socket), for tests that restart things.
pub fn wait_for_path(path: &Path) {
    wait_for(
        &format!("{}", path.display()),
        Duration::from_secs(10),
        || path.exists(),
    );
}
