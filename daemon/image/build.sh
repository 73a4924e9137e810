#!/usr/bin/env bash
# Builds the sluice-agent OCI image without a container engine: the release binaries plus
# the shared libraries they load (found with ldd: glibc, libgcc_s, libnftnl, libmnl), packed
# with umoci into an OCI layout and tarred. `ctr images import --base-name localhost/sluice-agent`
# (or skopeo/crane to push) turns it into the image the DaemonSet names. Beside the tar:
# <tar>.cdx.json (CycloneDX SBOM: the crates compiled in, the Debian packages copied) and
# <tar>.sources.txt (those packages' Debian source packages; `make image-sources` fetches them).
#
# usage: build.sh BIN_DIR OUT_TAR TAG [PLUGIN]
#   PLUGIN: the sluice-cni to ship instead of BIN_DIR's (`make image` passes the static one,
#   which the agent copies onto nodes whatever their libc).
set -euo pipefail
bin_dir=$1 out=$(realpath -m "$2") tag=$3 plugin=${4:-$1/sluice-cni}
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs/usr/local/bin" "$rootfs/run/sluice" "$rootfs/tmp" "$rootfs/etc"
for b in sluice-agent sluicectl; do
  install -m 0755 "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
done
install -m 0755 "$plugin" "$rootfs/usr/local/bin/sluice-cni"
dynamic=("$bin_dir"/sluice-agent "$bin_dir"/sluicectl)
# A static plugin loads nothing (ldd would refuse it).
if ldd "$plugin" >/dev/null 2>&1; then dynamic+=("$plugin"); fi
# Every library the binaries load, at the path the loader looks for it.
for lib in $(ldd "${dynamic[@]}" \
    | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | sort -u); do
  echo "$lib" >>"$work/libs.txt"
  real=$(readlink -f "$lib")
  mkdir -p "$rootfs$(dirname "$lib")"
  cp "$real" "$rootfs$lib"
done
# Merged /usr, as Debian: /lib and /lib64 resolve into /usr.
if [ -d "$rootfs/lib" ] && [ ! -L "$rootfs/lib" ]; then
  mkdir -p "$rootfs/usr/lib"; cp -a "$rootfs/lib/." "$rootfs/usr/lib/"; rm -rf "$rootfs/lib"
fi
ln -s usr/lib "$rootfs/lib"
if [ -d "$rootfs/lib64" ] && [ ! -L "$rootfs/lib64" ]; then
  mkdir -p "$rootfs/usr/lib64"; cp -a "$rootfs/lib64/." "$rootfs/usr/lib64/"; rm -rf "$rootfs/lib64"
fi
[ -e "$rootfs/lib64" ] || ln -s usr/lib64 "$rootfs/lib64"
echo 'root:x:0:0:root:/:/usr/local/bin/sluice-agent' > "$rootfs/etc/passwd"
# sluice's own code is Apache-2.0; the image also carries glibc and libmnl (LGPL-2.1+),
# libnftnl (GPL-2.0+) and libgcc_s (GPL-3.0+ with the GCC runtime exception).
licenses="Apache-2.0 AND GPL-2.0-or-later AND LGPL-2.1-or-later AND GPL-3.0-or-later WITH GCC-exception-3.1"
labels=()
repo=$(cd "$(dirname "$0")/../.." && pwd)
if revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null); then
  labels+=(--config.label "org.opencontainers.image.revision=$revision")
fi
# The source's address only when the checkout knows one (never made up here).
if source=$(git -C "$repo" remote get-url origin 2>/dev/null) && [[ $source == http* ]]; then
  labels+=(--config.label "org.opencontainers.image.source=$source")
fi
# The SBOM and the Debian source packages of what the image carries, beside the tar.
(cd "$repo" && python3 daemon/image/sbom.py "$tag" "$work/libs.txt" \
  "${out%.tar}.cdx.json" "${out%.tar}.sources.txt")
layout=$work/oci
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci insert --image "$layout:$tag" "$rootfs" /
umoci config --image "$layout:$tag" \
  --config.entrypoint /usr/local/bin/sluice-agent \
  --config.workingdir / \
  --config.env PATH=/usr/local/bin \
  --config.label org.opencontainers.image.title=sluice-agent \
  --config.label "org.opencontainers.image.licenses=$licenses" \
  --config.label "org.opencontainers.image.description=sluice node agent and sluice-cni (links libnftnl, GPL-2.0-or-later; sources of the Debian libraries: make image-sources)" \
  --config.label org.opencontainers.image.version="$tag" \
  "${labels[@]}"
umoci gc --layout "$layout"
mkdir -p "$(dirname "$out")"
tar -C "$layout" -cf "$out" .
echo "built $out ($tag)"
