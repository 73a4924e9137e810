# sluice — run as root on Debian 12. Targets install missing Debian packages first.
CARGO ?= cargo
DEBS := nftables iptables iproute2 libnftnl-dev libmnl-dev pkg-config gcc make runc busybox-static \
  containerd containernetworking-plugins umoci python3 python3-venv prometheus

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE := localhost/sluice-agent:$(VERSION)
IMAGE_TAR := target/image/sluice-agent-$(VERSION).tar

# The kernel matrix boots Debian's kernel packages under QEMU (virtme-ng comes from PyPI).
KERNEL_DEBS := qemu-system-x86 kmod python3-venv

.PHONY: deps build plugin-static demo test test-kernels test-runtimes corpus lint bench bench-quick image image-sources clean

deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

build: deps
	$(CARGO) build --workspace --bins

## sluice-cni as a static executable (glibc's crt-static; an explicit --target keeps the flag off
## build scripts and proc-macros): it runs on any x86_64 Linux host, whatever its libc. Not
## position-independent (relocation-model=static, as Go links CNI plugins): nothing to relocate
## at start-up, ~40 µs and 12 page faults less per exec here.
STATIC_TARGET := x86_64-unknown-linux-gnu
STATIC_PLUGIN := target/$(STATIC_TARGET)/release/sluice-cni
plugin-static: deps
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
		$(CARGO) build --release -p sluice-cni --target $(STATIC_TARGET)

## The main job on this machine: agent + real sluice-cni ADD in a real netns, proven by packets.
demo: build
	$(CARGO) run -q -p sluice-tests --bin sluice-demo

## Unit + integration tests (real kernel, real netns, real containerd; needs root). The
## DaemonSet test (tests/tests/daemonset.rs) runs `make image` itself.
test: build plugin-static
	$(CARGO) test --workspace --no-fail-fast

## The kernel-facing suites on Debian's own kernels (6.1, 6.12) in VMs, and on this host's.
## One summary line per kernel; fails if a VM does not boot or a suite fails or cannot run.
test-kernels: deps
	@missing=""; for p in $(KERNEL_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	bash tests/kernels/matrix.sh

## The CRI-facing suites against containerd 1.6 (this machine's), 1.7 (trixie) and 2.x (sid),
## each unpacked under target/runtimes from its Debian package. One summary line per runtime.
test-runtimes: build plugin-static
	bash tests/runtimes/matrix.sh

## Re-record what each real containerd of the runtime matrix sends sluice-cni (tests/corpus;
## replayed by `make test`).
corpus: build
	bash tests/runtimes/corpus.sh

## Formatting, clippy, and the dependency policy (deny.toml: licenses, bans, sources; the
## advisory database cannot be fetched offline, see deny.toml).
CARGO_DENY_VERSION := 0.20.2
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@cargo-deny --version 2>/dev/null | grep -qF "$(CARGO_DENY_VERSION)" || $(CARGO) install --locked --quiet cargo-deny@$(CARGO_DENY_VERSION)
	cargo-deny check --hide-inclusion-graph licenses bans sources

## Attach-latency benchmark (a few minutes on 2 cores); results in results/.
bench: deps plugin-static
	$(CARGO) build --release --workspace --bins
	./target/release/sluice-bench --out results

## A small run that keeps the benchmark from rotting (CI); results in results/quick.
bench-quick: deps plugin-static
	$(CARGO) build --release --workspace --bins
	./target/release/sluice-bench --quick --out results/quick

## OCI image of the agent + plugin (umoci, no container engine): $(IMAGE_TAR), named $(IMAGE),
## with its SBOM ($(IMAGE_TAR:.tar=.cdx.json)) and the Debian sources it needs ($(IMAGE_TAR:.tar=.sources.txt)).
image: deps plugin-static
	$(CARGO) build --release -p sluice-daemon --bins
	bash daemon/image/build.sh target/release $(IMAGE_TAR) $(VERSION) $(STATIC_PLUGIN)
	@echo "$(IMAGE): import with 'ctr -n k8s.io images import --base-name localhost/sluice-agent $(IMAGE_TAR)', or push it with skopeo/crane"

## The Debian source packages of the libraries the image carries (GPL/LGPL: glibc, libgcc,
## libnftnl, libmnl), as `make image` listed them, into target/image/sources/.
image-sources: image
	bash daemon/image/sources.sh $(IMAGE_TAR:.tar=.sources.txt) target/image/sources

clean:
	$(CARGO) clean
