#!/usr/bin/env bash
# `make corpus`: records tests/corpus/containerd-<version>/ from each containerd of the runtime
# matrix (see matrix.sh) through tests/src/bin/sluice-corpus.rs; containerd 2.x with sid's
# reference plugins, so its corpus has CNI 1.1.0 too.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build -q --workspace --bins
./target/debug/sluice-corpus record tests/corpus
SLUICE_CONTAINERD_ROOT=$(bash tests/runtimes/fetch.sh trixie containerd) \
  ./target/debug/sluice-corpus record tests/corpus
SLUICE_CONTAINERD_ROOT=$(bash tests/runtimes/fetch.sh sid containerd) \
SLUICE_CNI_PLUGINS=$(bash tests/runtimes/fetch.sh sid containernetworking-plugins)/usr/lib/cni \
  ./target/debug/sluice-corpus record tests/corpus
