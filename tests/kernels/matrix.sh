#!/usr/bin/env bash
# The kernel matrix: boots Debian's own kernel packages in VMs (virtme-ng over QEMU, software
# emulation: KVM is not usable in a nested VM) on the host's root filesystem, and runs the
# kernel-facing test suites inside each, against the binaries built on the host. The host's
# own kernel runs the same suites directly. One summary line per kernel; exits non-zero if any
# kernel fails to boot, any suite fails, or any suite did not run (never a skip).
#
# Usage: tests/kernels/matrix.sh [SUITE...]      (default: the suites below)
# Environment:
#   SLUICE_KERNELS  Debian package names to boot (default: the newest linux-image-6.1.0-N-amd64
#                   and linux-image-6.12.N+deb12-amd64 the archive offers)
#   SLUICE_MATRIX_HOST=0  leave the host kernel out (make test covers it anyway)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=$root/target/kernel-matrix
mkdir -p "$work"

suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(golden traffic cni differential safety check upgrade)

# The oldest supported kernel (README, "Supported platforms") is the first entry. A package
# of another Debian suite is written SUITE:PACKAGE and comes through tests/apt/suite.sh (its
# own apt state, derived from this machine's sources; the host's lists are untouched).
bullseye=bullseye+bullseye-security
resolve() { # newest package whose name matches the regex, from the Debian archive
  apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -n1
}
if [ -n "${SLUICE_KERNELS:-}" ]; then
  read -r -a packages <<<"$SLUICE_KERNELS"
else
  bash tests/apt/suite.sh "$bullseye" update
  packages=("$bullseye:$(bash tests/apt/suite.sh "$bullseye" search '^linux-image-5\.10\.0-[0-9]+-amd64$' | tail -n1)"
            "$(resolve '^linux-image-6\.1\.0-[0-9]+-amd64$')"
            "$(resolve '^linux-image-6\.12\.[0-9]+\+deb12-amd64$')")
fi
for p in "${packages[@]}"; do
  [ -n "${p#*:}" ] || { echo "kernel matrix: a kernel package could not be resolved (apt-get update first)" >&2; exit 1; }
done

# virtme-ng from PyPI, pinned, in its own venv.
venv=$work/venv
if [ ! -x "$venv/bin/vng" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'virtme-ng==1.42'
fi
export PATH=$venv/bin:$PATH

# Kernel packages: downloaded from the archive (never installed as the host's kernel) and
# unpacked; their modules go under /lib/modules, where the guest (which boots over the host's
# root filesystem) loads them from.
kernel_image=()
for entry in "${packages[@]}"; do
  p=${entry#*:}
  dir=$work/$p
  if [ ! -d "$dir/boot" ]; then
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    if [ "$entry" != "$p" ]; then
      bash tests/apt/suite.sh "${entry%%:*}" download "$dir.tmp" "$p"
    else
      (cd "$dir.tmp" && apt-get download -q "$p" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    fi
    deb=$(ls "$dir.tmp"/*.deb)
    dpkg-deb -x "$deb" "$dir.tmp/x"
    mv "$dir.tmp/x" "$dir" && rm -rf "$dir.tmp"
  fi
  ver=$(ls "$dir/lib/modules")
  if [ ! -e "/lib/modules/$ver/modules.dep" ]; then
    mkdir -p /lib/modules
    cp -a "$dir/lib/modules/$ver" /lib/modules/
    depmod "$ver"
  fi
  kernel_image+=("$dir/boot/vmlinuz-$ver")
done

# The host's binaries: the agent, the plugin and the suites' test executables, built with the
# `kernels` profile (optimised, no debug info: see Cargo.toml) into target/kernels/.
cargo build -q --profile kernels --workspace --bins
declare -A exe=()
while IFS=' ' read -r name path; do exe[$name]=$path; done < <(
  cargo test -q --profile kernels -p sluice-tests --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
')
specs=()
for s in "${suites[@]}"; do
  [ -n "${exe[$s]:-}" ] || { echo "kernel matrix: no test suite named $s" >&2; exit 1; }
  specs+=("$s=${exe[$s]}")
done

# Summarises one kernel's results directory; returns non-zero unless every suite passed.
summarise() { # LABEL DIR
  local label=$1 dir=$2 ok=0 line="" p=0 f=0 ign=0
  for s in "${suites[@]}"; do
    local rc res sp=0 sf=0 si=0
    rc=$(cat "$dir/$s.rc" 2>/dev/null || echo missing)
    res=$(grep -h '^test result:' "$dir/$s.log" 2>/dev/null | tail -n1 || true)
    if [ -n "$res" ]; then
      sp=$(awk '{print $4}' <<<"$res"); sf=$(awk '{print $6}' <<<"$res"); si=$(awk '{print $8}' <<<"$res")
    fi
    p=$((p + sp)); f=$((f + sf)); ign=$((ign + si))
    if [ "$rc" != 0 ] || [ -z "$res" ] || [ "$sp" = 0 ] || [ "$si" != 0 ]; then
      ok=1
      line+=" $s:FAILED(rc=$rc,$sp passed,$sf failed,$si ignored)"
    else
      line+=" $s:$sp"
    fi
  done
  echo "kernel $label:$line — $p passed, $f failed, $ign skipped"
  return $ok
}

status=0
summary=()
results=$work/results
rm -rf "$results" && mkdir -p "$results"

if [ "${SLUICE_MATRIX_HOST:-1}" != 0 ]; then
  dir=$results/host && mkdir -p "$dir"
  start=$(date +%s)
  bash tests/kernels/guest.sh "$dir" "${specs[@]}" || true
  if line=$(summarise "host $(uname -r)" "$dir"); then :; else status=1; fi
  summary+=("$line ($(( $(date +%s) - start )) s)")
  echo "${summary[-1]}"
fi

for image in "${kernel_image[@]}"; do
  ver=${image##*/vmlinuz-}
  dir=$results/$ver && mkdir -p "$dir"
  start=$(date +%s)
  # Software emulation (TCG): KVM aborts in a nested VM. 2 vCPUs, 2 GiB. The console goes to
  # a log; results come back through the writable results directory.
  timeout "${SLUICE_VM_TIMEOUT:-2400}" vng --run "$image" --force-9p --disable-kvm \
    --cpus 2 --memory 2G --verbose --rwdir "$dir" \
    --exec "CI='${CI:-}' bash $root/tests/kernels/guest.sh $dir ${specs[*]}" \
    </dev/null >"$dir/console.log" 2>&1 || true
  if [ ! -e "$dir/done" ]; then
    echo "kernel $ver: the VM did not finish (boot failure or timeout); console tail:" >&2
    tail -n 30 "$dir/console.log" >&2
  fi
  if line=$(summarise "$ver" "$dir"); then :; else status=1; fi
  summary+=("$line ($(( $(date +%s) - start )) s)")
  echo "${summary[-1]}"
done

echo "kernel matrix summary (logs in $results):"
printf '  %s\n' "${summary[@]}"
if [ $status != 0 ]; then
  for d in "$results"/*/; do
    for s in "${suites[@]}"; do
      if [ "$(cat "$d$s.rc" 2>/dev/null)" != 0 ]; then
        echo "---- $d$s.log (failures) ----"
        grep -E '^(---- |test .* FAILED|thread .* panicked)|panicked at' "$d$s.log" | head -n 40 || true
      fi
    done
  done
fi
exit $status
