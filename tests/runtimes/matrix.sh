#!/usr/bin/env bash
# The runtime matrix: the CRI-facing suites (cri, recovery, daemonset, corpus) against each
# containerd line clusters run: the machine's (Debian 12's 1.6.20), trixie's 1.7 and sid's 2.x,
# each unpacked under target/runtimes/ from its Debian package (never installed over the
# machine's) and started from its own directory by the tests' harness (tests/src/cri.rs reads
# SLUICE_CONTAINERD_ROOT and SLUICE_CNI_PLUGINS). containerd 2.x runs with sid's reference
# plugins (1.9.x, CNI 1.1.0); the others with the machine's. One summary line per runtime;
# exits non-zero if a runtime cannot be fetched or started, or any suite fails or did not run.
#
# Usage: tests/runtimes/matrix.sh [SUITE...]   (default: the suites below; needs root)
# Environment:
#   SLUICE_RUNTIMES  entries to run, from: host trixie sid (default: all three)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=$root/target/runtimes
mkdir -p "$work"

suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(cri recovery daemonset corpus)
read -r -a runtimes <<<"${SLUICE_RUNTIMES:-host trixie sid}"

# The test binaries, built once (the suites need root and the workspace's binaries).
cargo build -q --workspace --bins
targets=()
for s in "${suites[@]}"; do targets+=(--test "$s"); done
cargo test -q -p sluice-tests --no-run "${targets[@]}" 2>/dev/null

logs=$work/logs
rm -rf "$logs" && mkdir -p "$logs"
status=0
summary=()
for entry in "${runtimes[@]}"; do
  start=$(date +%s)
  containerd_root="" plugins="" label=""
  case $entry in
    host)
      label="containerd $(containerd --version | awk '{print $3}') (this machine's package), CNI plugins $(dpkg-query -W -f '${Version}' containernetworking-plugins)"
      ;;
    trixie | sid)
      containerd_root=$(bash tests/runtimes/fetch.sh "$entry" containerd)
      label="containerd $(cat "$containerd_root/.version") ($entry)"
      if [ "$entry" = sid ]; then
        plugins_root=$(bash tests/runtimes/fetch.sh sid containernetworking-plugins)
        plugins=$plugins_root/usr/lib/cni
        label+=", CNI plugins $(cat "$plugins_root/.version") (sid)"
      else
        label+=", CNI plugins $(dpkg-query -W -f '${Version}' containernetworking-plugins)"
      fi
      # It must start from its own tree: a binary that does not run here fails the matrix.
      "$containerd_root/usr/bin/containerd" --version >/dev/null ||
        { echo "runtime $entry: its containerd does not run on this machine" >&2; status=1; continue; }
      ;;
    *)
      echo "runtime matrix: unknown runtime $entry (host, trixie, sid)" >&2
      exit 2
      ;;
  esac
  log=$logs/$entry.log
  rc=0
  SLUICE_CONTAINERD_ROOT=$containerd_root SLUICE_CNI_PLUGINS=$plugins \
    cargo test -q -p sluice-tests --no-fail-fast "${targets[@]}" >"$log" 2>&1 || rc=$?
  p=0 f=0 ign=0 runs=0
  while read -r res; do
    runs=$((runs + 1))
    p=$((p + $(awk '{print $4}' <<<"$res")))
    f=$((f + $(awk '{print $6}' <<<"$res")))
    ign=$((ign + $(awk '{print $8}' <<<"$res")))
  done < <(grep -h '^test result:' "$log" || true)
  line="runtime $label: ${#suites[@]} suites"
  if [ "$rc" != 0 ] || [ "$runs" != "${#suites[@]}" ] || [ "$ign" != 0 ] || [ "$p" = 0 ]; then
    status=1
    line+=" FAILED (rc=$rc, $runs of ${#suites[@]} suites ran)"
  fi
  summary+=("$line — $p passed, $f failed, $ign skipped ($(( $(date +%s) - start )) s)")
  echo "${summary[-1]}"
done

echo "runtime matrix summary (logs in $logs):"
printf '  %s\n' "${summary[@]}"
if [ $status != 0 ]; then
  for log in "$logs"/*.log; do
    if grep -qE 'FAILED|panicked' "$log"; then
      echo "---- $log (failures) ----"
      grep -E '^(---- |test .* FAILED|thread .* panicked)|panicked at|containerd: ' "$log" | head -n 40 || true
    fi
  done
fi
exit $status
