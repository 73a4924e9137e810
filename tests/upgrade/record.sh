#!/bin/bash
# Records what a release of the agent leaves in a pod's namespace, for the upgrade test
# (tests/tests/upgrade.rs): for each case, the kernel's listing of the table (`<case>.nft`) and
# of the namespace's routing state (`<case>.device`), after an ADD through that release's
# sluice-cni and sluice-agent.
#
#   bash tests/upgrade/record.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds the release's sluice-agent and sluice-cni (e.g. built from its commit with
# `git worktree add /tmp/rel <commit> && CARGO_TARGET_DIR=/tmp/rel-target cargo build --bins`).
# Run as root.
set -euo pipefail
bin=$(realpath "$1")
out=$2
mkdir -p "$out"
work=$(mktemp -d)
cases=(redirect tproxy dual)
agent=
cleanup() {
  [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
  for c in "${cases[@]}"; do ip netns del "sl-up-rec-$c" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Annotations (a JSON object) and prevResult addresses (a JSON array) of each case.
declare -A ann ips
ann[redirect]='{"sluice.dev/redirect":"enabled","sluice.dev/sysctls":"net.ipv4.ip_local_port_range=20000 30000"}'
ips[redirect]='[{"address":"10.99.0.2/24","interface":0}]'
ann[tproxy]='{"sluice.dev/redirect":"enabled","sluice.dev/mode":"tproxy"}'
ips[tproxy]='[{"address":"10.99.0.2/24","interface":0}]'
ann[dual]='{"sidecar.istio.io/status":"{}","sidecar.istio.io/interceptionMode":"TPROXY"}'
ips[dual]='[{"address":"10.99.0.2/24","interface":0},{"address":"fd00::2/64","interface":0}]'

# Everything a namespace holding only `lo` has in its routing state, unfiltered (iproute2's
# `proto` filters differ between versions): two such listings are equal exactly when the
# device state is.
device() {
  ip -n "$1" -4 rule show
  ip -n "$1" -6 rule show
  ip -n "$1" -4 route show table all
  ip -n "$1" -6 route show table all
  ip -n "$1" addr show dev lo
  ip netns exec "$1" sysctl net.ipv4.ip_local_port_range
}

"$bin/sluice-agent" --socket "$work/agent.sock" --metrics-addr 127.0.0.1:0 2>"$work/agent.log" &
agent=$!
for _ in $(seq 100); do [ -S "$work/agent.sock" ] && break; sleep 0.1; done

for c in "${cases[@]}"; do
  ns=sl-up-rec-$c
  ip netns add "$ns"
  stdin=$(printf '{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","agentSocket":"%s","runtimeConfig":{"io.kubernetes.cri.pod-annotations":%s},"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"x"}],"ips":%s}}' \
    "$work/agent.sock" "${ann[$c]}" "${ips[$c]}")
  echo "$stdin" | CNI_COMMAND=ADD CNI_CONTAINERID="upgrade-$c" CNI_NETNS="/var/run/netns/$ns" CNI_IFNAME=eth0 \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=upgrade-$c;K8S_POD_UID=uid-upgrade-$c" \
    CNI_PATH=/usr/lib/cni "$bin/sluice-cni" >/dev/null
  printf '%s\n' "$stdin" | sed "s|$work/agent.sock|AGENT_SOCKET|" >"$out/$c.stdin"
  ip netns exec "$ns" nft list table inet sluice >"$out/$c.nft"
  device "$ns" >"$out/$c.device"
  echo "$c: $(grep -c . "$out/$c.nft") table lines, $(grep -c . "$out/$c.device") device lines"
done
