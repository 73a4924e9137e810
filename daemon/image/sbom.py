"""The image's software bill of materials (CycloneDX 1.5 JSON) and its source list.

    sbom.py VERSION LIBS_FILE SBOM_OUT SOURCES_OUT

Components: the Rust crates compiled into the binaries the image ships (sluice-agent,
sluicectl, sluice-cni: the normal dependencies of sluice-daemon and sluice-cni, for this
target, from `cargo metadata`), and the Debian packages whose files the image carries (each
library path in LIBS_FILE, found with `dpkg -S`), with their source packages. SOURCES_OUT lists
those source packages and versions, one `name version` a line, for `make image-sources`.

Written here, not with a crate: cargo-cyclonedx covers the crates but not the Debian libraries
the image copies from the build machine, and the two must be one document.
"""
import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone

TARGET = "x86_64-unknown-linux-gnu"


def run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def crates():
    meta = json.loads(run("cargo", "metadata", "--format-version", "1", "--locked",
                          "--filter-platform", TARGET))
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    roots = [p["id"] for p in meta["packages"] if p["name"] in ("sluice-daemon", "sluice-cni")]
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            # Normal dependencies only: build scripts and dev-dependencies are not shipped.
            if any(k["kind"] is None for k in dep["dep_kinds"]):
                todo.append(dep["pkg"])
    out = []
    for pid in sorted(seen, key=lambda i: (packages[i]["name"], packages[i]["version"])):
        p = packages[pid]
        c = {
            "type": "library" if pid not in roots else "application",
            "bom-ref": f"pkg:cargo/{p['name']}@{p['version']}",
            "name": p["name"],
            "version": p["version"],
            "purl": f"pkg:cargo/{p['name']}@{p['version']}",
        }
        if p.get("license"):
            c["licenses"] = [{"expression": p["license"].replace("/", " OR ")}]
        if p["source"] is None:
            c["properties"] = [{"name": "sluice:workspace-crate", "value": "true"}]
        out.append(c)
    return out


def owner_of(path):
    """`dpkg -S` of a library path as the loader names it, or as the package registered it
    (merged /usr: Debian 12 registers some under /lib, some under /usr/lib; the name may be a
    symlink to the versioned file)."""
    import os
    real = os.path.realpath(path)
    candidates = [path, "/usr" + path, real, real.removeprefix("/usr"),
                  os.path.join("/usr" + os.path.dirname(path), os.path.basename(real))]
    for candidate in candidates:
        found = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.splitlines()[0]
    sys.exit(f"sbom: no Debian package owns {path}")


def debian(libs_file):
    packages = {}
    for path in open(libs_file).read().split():
        owner = owner_of(path).split(":")[0:2]
        pkg = owner[0] if len(owner) < 2 or owner[1].startswith(" ") else f"{owner[0]}:{owner[1]}"
        pkg = pkg.strip()
        packages.setdefault(pkg, []).append(path)
    out, sources = [], set()
    for pkg, paths in sorted(packages.items()):
        name, _, arch = pkg.partition(":")
        fields = run("dpkg-query", "-W", "-f", "${Version}\t${source:Package}\t${source:Version}",
                     pkg).split("\t")
        version, src, src_version = fields
        sources.add((src, src_version))
        purl = f"pkg:deb/debian/{name}@{version}?arch={arch or 'amd64'}&distro=debian-12"
        out.append({
            "type": "library",
            "bom-ref": purl,
            "name": name,
            "version": version,
            "purl": purl,
            "properties": [
                {"name": "debian:source", "value": src},
                {"name": "debian:source-version", "value": src_version},
            ] + [{"name": "sluice:file", "value": p} for p in sorted(paths)],
        })
    return out, sorted(sources)


def main():
    version, libs_file, sbom_out, sources_out = sys.argv[1:5]
    debs, sources = debian(libs_file)
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "component": {
                "type": "container",
                "bom-ref": f"sluice-agent@{version}",
                "name": "sluice-agent",
                "version": version,
            },
        },
        "components": crates() + debs,
    }
    with open(sbom_out, "w") as f:
        json.dump(bom, f, indent=2)
        f.write("\n")
    with open(sources_out, "w") as f:
        for src, src_version in sources:
            f.write(f"{src} {src_version}\n")


main()
