# Portcullis — common tasks. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/debug/portcullis

.PHONY: help build test run demo crds crds-check lint fmt bench bench-scale control-plane helm kind-up kind-down clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

build: ## Build the portcullis binary
	$(CARGO) build --locked

test: control-plane helm ## Unit and integration tests against a real local control plane
	$(CARGO) test --locked --lib --bins --tests

run: build control-plane ## Run the operator: on the configured cluster, else on a local control plane
	$(BIN) dev

demo: control-plane ## As root: the JIT story with a real sshd, two network namespaces and the agent
	hack/demo.sh

crds: ## Regenerate crds/portcullis.yaml (and the Helm chart's copy) from the Rust types
	$(CARGO) run --quiet --locked --bin portcullis -- crds > crds/portcullis.yaml
	cp crds/portcullis.yaml deploy/helm/portcullis/crds/portcullis.yaml

crds-check: ## Fail if crds/ differs from what the code generates
	@diff -u crds/portcullis.yaml <($(CARGO) run --quiet --locked --bin portcullis -- crds) && echo "crds/ is up to date"

lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

bench: control-plane ## Benchmarks against the local control plane; tables in target/bench/
	$(CARGO) bench --locked --bench operator --bench agent

bench-scale: control-plane ## Only the operator's fleet-size scenario (100,000 grants, one NSG of 10,000 machines)
	$(CARGO) bench --locked --bench operator -- scale

control-plane: ## Build (once) and cache kube-apiserver, etcd, kube-controller-manager, kubectl
	@hack/control-plane-bins.sh >/dev/null

helm: ## Build (once) and cache helm
	@hack/helm-bin.sh >/dev/null

kind-up: ## Create a kind cluster, load the image and deploy (needs Docker and kind)
	kind create cluster --config deploy/kind/kind-config.yaml
	docker build -f deploy/Dockerfile -t portcullis:dev .
	kind load docker-image portcullis:dev --name portcullis
	kubectl --context kind-portcullis apply -k deploy/

kind-down: ## Delete the kind cluster
	kind delete cluster --name portcullis

clean: ## Remove build output (the cached control plane stays)
	$(CARGO) clean
