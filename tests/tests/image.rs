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
    // Beside the tar: the SBOM (crates compiled in, Debian packages copied) and the Debian
    // source packages of those libraries.
    let sbom: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("sluice-agent.cdx.json")).expect("the SBOM beside the image"),
    )
    .expect("SBOM JSON");
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    let components = sbom["components"].as_array().expect("components");
    let has = |purl: &str| {
        components
            .iter()
            .any(|c| c["purl"].as_str().is_some_and(|p| p.starts_with(purl)))
    };
    for purl in [
        "pkg:cargo/nftnl@",
        "pkg:cargo/tokio@",
        "pkg:cargo/sluice-daemon@",
        "pkg:cargo/sluice-cni@",
        "pkg:deb/debian/libnftnl11@",
        "pkg:deb/debian/libmnl0@",
        "pkg:deb/debian/libc6@",
    ] {
        assert!(has(purl), "the SBOM lists {purl}");
    }
    assert!(
        !has("pkg:cargo/proptest@"),
        "dev-dependencies are not in the image"
    );
    let sources = std::fs::read_to_string(dir.join("sluice-agent.sources.txt")).expect("sources");
    for source in ["libnftnl ", "libmnl ", "glibc "] {
        assert!(
            sources.lines().any(|l| l.starts_with(source)),
            "{source}in {sources}"
        );
    }
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
    // The image config's OCI labels: version, revision, the licenses of what it carries.
    let blob = |digest: &serde_json::Value| -> serde_json::Value {
        let hex = digest
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("a sha256 digest");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob"))
            .expect("blob JSON")
    };
    let manifest = blob(&index["manifests"][0]["digest"]);
    let labels = &blob(&manifest["config"]["digest"])["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], tag);
    let licenses = labels["org.opencontainers.image.licenses"]
        .as_str()
        .unwrap_or_default();
    for spdx in ["Apache-2.0", "GPL-2.0-or-later", "LGPL-2.1-or-later"] {
        assert!(licenses.contains(spdx), "{licenses}");
    }
    let revision = sh(&["git", "-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"]);
    assert_eq!(
        labels["org.opencontainers.image.revision"].as_str(),
        Some(revision.trim()),
        "{labels}"
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
