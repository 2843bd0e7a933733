# calico-ipsec: build, demo, tests, benchmarks, fuzzing.
# Every target that touches namespaces or the VM needs root.

CARGO        ?= cargo
# What ships (install/Dockerfile builds the same): a static musl binary, the
# one the init container copies to /opt/cni/bin. The VM suites, the demo and
# the benchmarks run it; `cargo test` runs the host build.
MUSL         := x86_64-unknown-linux-musl
BIN          := target/$(MUSL)/release/calico-ipsec
HOST_BIN     := target/release/calico-ipsec
# The binary the VM runs: the shipped one, or the host build if `make build`
# could not build it (it says so loudly).
VM_BIN        = $$(if [ -x $(BIN) ]; then echo $(CURDIR)/$(BIN); else echo $(CURDIR)/$(HOST_BIN); fi)
FUZZ_SECONDS ?= 60
# The release before this one: the rolling-upgrade suite (test_upgrade.sh)
# starts the cluster on it and rolls it to this tree's build. `prev-build`
# builds it from git's copy of this commit into $(PREV_BIN).
PREV_RELEASE := 9dcf2ae
PREV_SRC     := target/prev-src
PREV_BIN     := target/prev-bin/calico-ipsec

# Debian packages the build and the tests need (see DESIGN §7); prometheus
# brings promtool, which checks both /metrics endpoints in `make unit`;
# podman (with crun and conmon) runs real containers in `make podman`.
APT_PACKAGES := build-essential pkg-config protobuf-compiler libprotobuf-dev \
	musl-tools iproute2 iputils-ping tcpdump jq kmod cpio busybox-static openssl \
	containernetworking-plugins etcd-server etcd-client \
	qemu-system-x86 linux-image-amd64 python3-venv python3-cryptography \
	prometheus podman nftables

# The manifest validator (PyPI; Debian packages none with the Kubernetes schemas).
VALIDATOR_VERSION := 1.37.0
VALIDATOR_VENV    := target/manifest-venv
VALIDATOR         := $(VALIDATOR_VENV)/bin/kubernetes-validate
IMAGE             ?= calico-ipsec:0.1.0

.PHONY: all build dist prev-build deps lint unit podman e2e test test-long fips fips-e2e demo demo-run bench bench-scale fuzz clean validate-manifests image

all: build

## deps: install the Debian packages (only when something is missing).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## build: one cargo run: the shipped static binary, $(BIN), and the CNI
## client the VM suites drive the chain with (examples/cni_client.rs), beside
## it. The VM suites, the demo, podman and the benchmarks all run that binary.
## Where the musl target cannot be installed (rustup cannot reach its
## server), the host release build $(HOST_BIN) stands in, with a warning.
build:
	@rm -f $(BIN)
	@$(MAKE) --no-print-directory dist DIST_EXTRA="--example cni_client" || { \
	echo "WARNING: the shipped static binary could not be built (see above); \
	the VM suites, demo and bench run the host build $(HOST_BIN)" >&2; \
	$(CARGO) build --release --locked --bin calico-ipsec --example cni_client; }

## dist: the shipped binary, static (musl, static-pie), as install/Dockerfile builds it.
DIST_BIN := --bin calico-ipsec
dist:
	@rustup target list --installed | grep -qx $(MUSL) || rustup target add $(MUSL)
	CC_x86_64_unknown_linux_musl=musl-gcc \
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static" \
		$(CARGO) build --release --locked --target $(MUSL) $(DIST_BIN) $(DIST_EXTRA)

## prev-build: the previous release's binary ($(PREV_RELEASE), PREV_RELEASE) in
## $(PREV_BIN), for the upgrade suite: git's copy of that commit in
## $(PREV_SRC), built as `dist` builds (the host build where that cannot be
## built, like `build`) in this target directory, so that the dependencies
## built for this release are reused and only the crate itself compiles.
## cargo tells two copies of one package apart by name and version, not by
## directory, and takes a crate for up to date when its files are older
## than its last build: under one name, this release's build could take the
## other's crate for its own (and the reverse), another commit extracted
## with older file times would keep the binary of the one before, and both
## binaries would land on $(BIN). So the copy's package and binary are
## renamed after the commit, $(PREV_NAME) (in Cargo.toml and Cargo.lock;
## the code is untouched): nothing this release builds is read or
## overwritten, and each PREV_RELEASE builds on its own.
PREV_NAME   = calico-ipsec-prev-$(shell git rev-parse --short=12 '$(PREV_RELEASE)^{commit}' 2>/dev/null)
PREV_CARGO  = --manifest-path $(PREV_SRC)/Cargo.toml --target-dir $(CURDIR)/target
prev-build:
	@git rev-parse -q --verify '$(PREV_RELEASE)^{commit}' >/dev/null || { \
	echo "prev-build: commit $(PREV_RELEASE) (PREV_RELEASE, the previous release) is not in this clone's history;" \
	"a shallow clone? run 'git fetch --unshallow' or clone without --depth" >&2; exit 1; }
	@rm -rf $(PREV_SRC) $(PREV_BIN) && mkdir -p $(PREV_SRC) $(dir $(PREV_BIN))
	git archive $(PREV_RELEASE) | tar -x -C $(PREV_SRC)
	sed -i 's/^name = "calico-ipsec"$$/name = "$(PREV_NAME)"/' $(PREV_SRC)/Cargo.toml $(PREV_SRC)/Cargo.lock
	@grep -qx 'name = "$(PREV_NAME)"' $(PREV_SRC)/Cargo.lock || { \
	echo "prev-build: no package calico-ipsec in $(PREV_RELEASE)'s Cargo.lock to rename" >&2; exit 1; }
	@if $(MAKE) --no-print-directory dist DIST_BIN="--bin $(PREV_NAME)" DIST_EXTRA="$(PREV_CARGO)"; then \
		cp target/$(MUSL)/release/$(PREV_NAME) $(PREV_BIN); \
	else echo "WARNING: the previous release's static binary could not be built; building the host one" >&2; \
		$(CARGO) build --release --locked --bin $(PREV_NAME) $(PREV_CARGO) && cp target/release/$(PREV_NAME) $(PREV_BIN); fi
	@echo "prev-build: $(PREV_RELEASE) built: $(PREV_BIN)"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## unit: unit tests, and the integration tests in real network namespaces (root).
unit:
	$(CARGO) test --locked

## podman: real containers through [bridge + host-local, calico-ipsec] with
## Debian's podman (CNI backend), on the host, in MTU-only mode (root).
podman: deps build
	tests/podman.sh $(VM_BIN)

## e2e: boots Debian's kernel under qemu and runs tests/e2e inside it, one VM
## boot per suite (tests/e2e/suites.sh; E2E_TIMEOUT is the budget for them all).
## The Rust tier of xfrm/kernel.rs (tests/xfrm_kernel.rs, #[ignore]d on the host) runs first.
## The upgrade suite (test_upgrade.sh) also runs the previous release (prev-build).
e2e: build prev-build
	exe=$$($(CARGO) test --locked --no-run --test xfrm_kernel --message-format=json 2>/dev/null \
		| jq -r 'select(.target.name == "xfrm_kernel" and .executable != null) | .executable'); \
	test -n "$$exe" && CALICO_IPSEC=$(VM_BIN) E2E_TIMEOUT=600 tests/e2e/vm.sh "$$exe" --ignored
	CALICO_IPSEC=$(VM_BIN) E2E_PREV_BIN=$(CURDIR)/$(PREV_BIN) E2E_SUITE_TIMEOUT=$${E2E_SUITE_TIMEOUT:-1500} E2E_TIMEOUT=$${E2E_TIMEOUT:-3600} tests/e2e/suites.sh

## validate-manifests: install/*.yaml against the Kubernetes API schemas, with negative cases.
validate-manifests: deps $(VALIDATOR)
	tests/manifests.sh $(VALIDATOR)

$(VALIDATOR):
	python3 -m venv $(VALIDATOR_VENV)
	$(VALIDATOR_VENV)/bin/pip install --quiet --disable-pip-version-check kubernetes-validate==$(VALIDATOR_VERSION)

## image: the container image (static musl binary, with nft for the guard), with docker or podman.
image:
	@engine=$$(command -v docker || command -v podman) || { echo "image: neither docker nor podman is installed" >&2; exit 1; }; \
	$$engine build -f install/Dockerfile -t $(IMAGE) .

## test: everything CI runs, stage by stage, with each stage's duration at the end.
test:
	@tests/stages.sh deps lint unit podman validate-manifests e2e fips-e2e fuzz

## fips: the FIPS build: every key primitive and TLS from AWS-LC's FIPS 140-3
## validated module (aws-lc-fips-sys, through aws-lc-rs and rustls's FIPS
## provider; src/keys/crypto). Building the module needs cmake, Go and clang
## (FIPS_PACKAGES, installed here). Runs the library's unit tests (the same
## vectors as the standard build) and a TLS etcd connection through the FIPS
## provider, on this host's kernel (not in FIPS mode: allowed explicitly),
## and leaves the binary and the CNI client, release builds as shipped, in
## target/fips-bin/. (A debug build took 30-40 s for fips-e2e's 50 concurrent
## ADDs under TCG, and its slowest waited 21-25 s of the 25 s node lock wait.)
FIPS_PACKAGES := cmake golang-go clang libclang-dev
fips:
	@missing=$$(for p in $(FIPS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	CALICO_IPSEC_ALLOW_NON_FIPS_KERNEL=1 $(CARGO) test --locked --features fips --lib
	CALICO_IPSEC_ALLOW_NON_FIPS_KERNEL=1 $(CARGO) test --locked --features fips \
		--test etcd_datastore reads_calico_topology_over_tls
	$(CARGO) build --release --locked --features fips --bin calico-ipsec --example cni_client
	mkdir -p target/fips-bin/examples
	cp target/release/calico-ipsec target/fips-bin/calico-ipsec
	cp target/release/examples/cni_client target/fips-bin/examples/cni_client

## fips-e2e: one VM round with the FIPS build, on Debian's kernel booted with
## fips=1 (its crypto in FIPS mode): the data-plane suite. No override: the
## binary refuses to run unless the kernel is in FIPS mode. `make test` runs it.
fips-e2e: fips
	CALICO_IPSEC=$(CURDIR)/target/fips-bin/calico-ipsec E2E_APPEND=fips=1 \
		E2E_SUITE_TIMEOUT=$${E2E_SUITE_TIMEOUT:-900} E2E_TIMEOUT=$${E2E_TIMEOUT:-1200} \
		tests/e2e/suites.sh 'test_dataplane.sh'

## test-long: the soak rounds `make test` leaves out, on the same binary: the
## heal suite's agent kills during rotations, E2E_HEAL_ROUNDS rounds (default 5)
## of E2E_HEAL_KILLS kills (default 60), instead of one round of 20.
test-long: build
	CALICO_IPSEC=$(VM_BIN) E2E_HEAL_ROUNDS=$${E2E_HEAL_ROUNDS:-5} E2E_HEAL_KILLS=$${E2E_HEAL_KILLS:-60} \
		E2E_SUITE_TIMEOUT=$${E2E_SUITE_TIMEOUT:-5400} E2E_TIMEOUT=$${E2E_TIMEOUT:-6000} \
		tests/e2e/suites.sh 'test_heal.sh'

## demo: the main job: a three-node cluster in the VM, pods through [ptp, calico-ipsec],
## `calico-ipsec status`, and ESP on the wire while pods ping.
## Each step says when it starts, and the durations come at the end.
demo:
	@tests/stages.sh deps build demo-run

demo-run:
	CALICO_IPSEC=$(VM_BIN) tests/e2e/vm.sh tests/e2e/demo.sh

## bench: ADD latency against tuning; 5,000-node datastore read against etcdctl; ADD
## against a 3-member etcd cluster with one member hung against healthy (host);
## XFRM convergence against ip -batch and per-object ip, no-op ADD with 1,000 peers (VM).
bench: deps build
	$(CARGO) bench --locked --bench cni_add
	$(CARGO) bench --locked --bench datastore
	$(CARGO) bench --locked --bench etcd_cluster
	exe=$$($(CARGO) bench --locked --no-run --bench xfrm --message-format=json 2>/dev/null \
		| jq -r 'select(.target.name == "xfrm" and .executable != null) | .executable'); \
	CALICO_IPSEC=$(VM_BIN) E2E_TIMEOUT=$${E2E_TIMEOUT:-2400} tests/e2e/vm.sh "$$exe"
	mkdir -p target/bench && cp target/e2e/last/bench-xfrm.txt target/bench/xfrm.txt
	exe=$$($(CARGO) bench --locked --no-run --bench scrape --message-format=json 2>/dev/null \
		| jq -r 'select(.target.name == "scrape" and .executable != null) | .executable'); \
	CALICO_IPSEC=$(VM_BIN) E2E_TIMEOUT=$${E2E_TIMEOUT:-2400} tests/e2e/vm.sh "$$exe"
	cp target/e2e/last/bench-scrape.txt target/bench/scrape.txt
	@echo "tables written to target/bench/xfrm.txt and target/bench/scrape.txt"

## bench-scale: one etcd (loopback), the real manager and simulated nodes
## at 100, 1,000 and 5,000 nodes (BENCH_SCALE_NODES): etcd events and bytes
## per node per second idle and during a step, the manager's CPU and RSS,
## and the time for ids, `enable --wait` and one rotation (benches/scale.rs).
bench-scale: deps
	mkdir -p target/bench
	$(CARGO) bench --locked --bench scale | tee target/bench/scale.txt

## fuzz: fuzz the config/prevResult parsers for FUZZ_SECONDS.
fuzz:
	tests/fuzz.sh $(FUZZ_SECONDS)

clean:
	$(CARGO) clean
	rm -rf fuzz/target fuzz/corpus fuzz/artifacts
