#!/usr/bin/env bash
# Runs inside a kernel-matrix VM (virtme-ng, the host's root filesystem over 9p, this script's
# results directory writable). Usage: guest.sh RESULTS_DIR SUITE=TEST_BINARY...
# Writes RESULTS_DIR/<suite>.log and RESULTS_DIR/<suite>.rc per suite, then RESULTS_DIR/done.
# The host reads only these files: the VM's own exit status is not reliable under virtme-ng.
set -uo pipefail
out=$1
shift
{
  echo "kernel: $(uname -r) ($(cat /proc/version))"
  echo "cpus: $(nproc), memory: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
} >"$out/guest.info"
# /run, /tmp and /var/tmp are the guest's own (tmpfs); named netns live under /run/netns.
mkdir -p /run/netns /var/run/netns 2>/dev/null
export CI="${CI:-}" RUST_BACKTRACE=1
# Software emulation is many times slower than a node: stretch control-plane deadlines.
export SLUICE_TEST_TIME_SCALE="${SLUICE_TEST_TIME_SCALE:-20}"
for spec in "$@"; do
  suite=${spec%%=*}
  bin=${spec#*=}
  # One test at a time: software emulation has two slow vCPUs, and the kernel suites time
  # their agents' answers against deadlines meant for real hardware.
  "$bin" --test-threads="${SLUICE_GUEST_TEST_THREADS:-2}" >"$out/$suite.log" 2>&1
  echo $? >"$out/$suite.rc"
  # The agents' logs live in the guest's /tmp; keep them with the suite's log.
  mkdir -p "$out/$suite.agent-logs"
  cp /tmp/sluice-agent-*.log "$out/$suite.agent-logs/" 2>/dev/null
  rm -f /tmp/sluice-agent-*.log
done
date -u +%s >"$out/done"
