# ferrolb — the two commands for a fresh machine are `make lab` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
LAB := target/debug/ferrolb-lab
export FERROLB_K8S_BIN_DIR ?=

DEB_PACKAGES := nftables iproute2 iputils-arping ndisc6 tcpdump curl openssl procps ca-certificates util-linux python3 conntrack

.PHONY: all deps k8s-bins build lab lab-down test lint fmt fuzz churn bench-controller bench-speaker bench-dataplane bench-membership bench-drills manifests

all: build

## deps: install the Debian packages the lab needs (idempotent; skips apt when all are there).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$(echo ' '$$missing)"; \
	  if [ "$$(id -u)" != 0 ]; then echo "deps: error: installing Debian packages needs root: run 'sudo make deps'" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "deps: all Debian packages present"; fi

## k8s-bins: build (or reuse) the pinned Kubernetes, etcd and helm binaries.
k8s-bins:
	@bash hack/k8s-bins.sh >/dev/null

## build: the ferrolb binaries.
build:
	$(CARGO) build --workspace --bins

## lab: the lab with the demo running (see README.md).
lab: deps k8s-bins build
	bash hack/lab-demo.sh

## lab-down: remove everything the lab made.
lab-down: build
	$(LAB) down

## test: lint, unit tests, then the lab tests (which bring a lab up and take it down).
test: deps k8s-bins lint build
	$(CARGO) test --workspace --exclude ferrolb-e2e
	$(CARGO) test -p ferrolb-e2e --test chart
	$(CARGO) test -p ferrolb-e2e --test lab
	$(CARGO) test -p ferrolb-e2e --test controller
	$(CARGO) test -p ferrolb-e2e --test speaker
	$(CARGO) test -p ferrolb-e2e --test l2flood
	$(CARGO) test -p ferrolb-e2e --test dataplane
	$(CARGO) test -p ferrolb-e2e --test addresses
	$(CARGO) test -p ferrolb-e2e --test bounded
	$(CARGO) test -p ferrolb-e2e --test tenant
	$(CARGO) test -p ferrolb-e2e --test journey
	$(CARGO) test -p ferrolb-e2e --test hostile
	$(CARGO) test -p ferrolb-e2e --test faults

## bench-controller: the controller benchmark table (release build, brings up its own lab).
bench-controller: deps k8s-bins
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p ferrolb-e2e --bench controller

## bench-drills: crash drills 5 times per stream (Cluster/Local x IPv4/IPv6) on a fresh lab with the demo: longest gaps, median, failed (RUNS=N).
bench-drills: deps k8s-bins build
	bash hack/crash-drills.sh

## manifests: render deploy/manifests/ferrolb.yaml from the chart (the chart test checks it).
manifests: k8s-bins
	bash hack/render-manifests.sh

## bench-speaker: the speaker benchmark table (failover drills, ARP latency, memory; brings up its own lab).
bench-speaker: deps k8s-bins
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p ferrolb-e2e --bench speaker

## bench-dataplane: ferrolb's data plane beside kube-proxy's nftables mode at 10, 1,000, 10,000 and 50,000 services: cold and warm full syncs, one-endpoint and one-service updates, RSS, first packet (its own lab; BENCH_STAGES, BENCH_KUBE_PROXY_BOUND).
bench-dataplane: deps k8s-bins
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p ferrolb-e2e --bench dataplane

## bench-membership: the membership simulated in virtual time, 3 and 1,000 members at 0 % and 1 % loss: detection p50/p99, false alarms per hour, bytes/s per node (FERROLB_SIM_SIZES=3,1000,5000 for 5,000: foca's linear member search makes settling 5,000 take about an hour here, see speaker/benches/membership.rs; FERROLB_SIM_SCALE=5 for 10 simulated minutes of 1,000; no lab, no root).
bench-membership:
	$(CARGO) bench -p ferrolb-speaker --bench membership

## fuzz: the data plane property test against real nftables with many more cases (FERROLB_FUZZ_CASES, default 100,000); prints the count and every class of refusal found.
## Then the membership's receive path (FERROLB_MEMBERSHIP_FUZZ_CASES inputs) and the ARP and NDP decoders (FERROLB_FUZZ_L2_INPUTS inputs each), 10,000,000 by default; prints inputs/s.
FERROLB_FUZZ_CASES ?= 100000
FERROLB_MEMBERSHIP_FUZZ_CASES ?= 10000000
FERROLB_FUZZ_L2_INPUTS ?= 10000000
fuzz: deps
	FERROLB_FUZZ_CASES=$(FERROLB_FUZZ_CASES) $(CARGO) test --release -p ferrolb-speaker --test render_props -- --nocapture
	FERROLB_MEMBERSHIP_FUZZ_CASES=$(FERROLB_MEMBERSHIP_FUZZ_CASES) $(CARGO) test --release -p ferrolb-speaker --test membership_fuzz -- --nocapture
	FERROLB_FUZZ_L2_INPUTS=$(FERROLB_FUZZ_L2_INPUTS) $(CARGO) test --release -p ferrolb-speaker --test l2_fuzz -- --nocapture

## churn: the tenant lab suite with its Service patched every second for 10 minutes (kernel objects and memory printed).
churn: deps k8s-bins build
	FERROLB_CHURN_SECS=600 $(CARGO) test -p ferrolb-e2e --test tenant

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
