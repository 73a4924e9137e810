//! `make image`'s builder (daemon/image/build.sh): an OCI image of the agent and the plugin it
//! installs, built with umoci without a container engine. Inspected (config, layers), run
//! from its unpacked rootfs (every library the binaries need is inside), and imported into
//! the test containerd, where the CRI image service lists it under the DaemonSet's name.

use std::path::Path;
use std::process::Command;

use sluice_tests::cri::{Chain, Containerd, ONE_AT_A_TIME};
use sluice_tests::*;

#[test]
fn the_image_carries_the_binaries_and_their_libraries_and_imports_into_containerd() {
    require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = env!("CARGO_PKG_VERSION");
    let dir = std::env::temp_dir().join(format!("sluice-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let tar = dir.join("sluice-agent.tar");
    let bins = bin("sluice-agent");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/image/build.sh");
    sh(&[
        "bash",
        &script.display().to_string(),
        &bins.parent().expect("bin dir").display().to_string(),
        &tar.display().to_string(),
        tag,
    ]);
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).expect("layout");
    sh(&[
        "tar",
        "-C",
        &layout.display().to_string(),
        "-xf",
        &tar.display().to_string(),
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        tag
    );
    let image = format!("{}:{tag}", layout.display());
    let stat = sh(&["umoci", "stat", "--image", &image, "--json"]);
    assert!(stat.contains("history") || stat.contains("layer"), "{stat}");

    // Unpack and run the binaries from the image's own rootfs.
    let bundle = dir.join("bundle");
    sh(&[
        "umoci",
        "unpack",
        "--image",
        &image,
        &bundle.display().to_string(),
    ]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(
        config["process"]["args"][0], "/usr/local/bin/sluice-agent",
        "entrypoint"
    );
    let rootfs = bundle.join("rootfs").display().to_string();
    let version = sh(&[
        "chroot",
        &rootfs,
        "/usr/local/bin/sluice-agent",
        "--version",
    ]);
    assert!(version.contains(tag), "{version}");
    let cni = Command::new("/usr/sbin/chroot")
        .args([&rootfs, "/usr/local/bin/sluice-cni"])
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("sluice-cni in the image");
    assert!(
        String::from_utf8_lossy(&cni.stdout).contains("supportedVersions"),
        "{cni:?}"
    );
    let ctl = sh(&["chroot", &rootfs, "/usr/local/bin/sluicectl", "--help"]);
    assert!(ctl.contains("explain"));

    // Import into the test containerd: the CRI lists the DaemonSet's image name.
    let containerd = Containerd::start("image", &Chain::new(None, 9));
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&containerd.socket)
        .args([
            "-n",
            "k8s.io",
            "images",
            "import",
            "--base-name",
            "localhost/sluice-agent",
        ])
        .arg(&tar)
        .output()
        .expect("ctr import");
    assert!(out.status.success(), "{out:?}");
    let listed = Command::new("ctr")
        .arg("--address")
        .arg(&containerd.socket)
        .args(["-n", "k8s.io", "images", "ls", "-q"])
        .output()
        .expect("ctr ls");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains(&format!("localhost/sluice-agent:{tag}")),
        "{listed}"
    );
    drop(containerd);
    let _ = std::fs::remove_dir_all(&dir);
}
