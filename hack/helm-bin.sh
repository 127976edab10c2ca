#!/usr/bin/env bash
# Provide a helm binary for the chart tests (tests/integration/helm.rs) and for
# anyone who wants to try deploy/helm/portcullis without installing helm.
#
# Prints exactly ONE line to stdout: the absolute path of an executable `helm`
# (Helm v3.22.0). Everything else (progress, build logs, errors) goes to stderr.
#
# The binary is built from the upstream Go module with
#   GOTOOLCHAIN=local go install helm.sh/helm/v3/cmd/helm@v3.22.0
# into
#   ${PORTCULLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/portcullis}/helm-v3.22.0/helm
# with the version ldflags of upstream's Makefile. A later run finds it there (and
# the same ldflags in helm.ldflags next to it) and only prints the path.
#
# The build needs Go (`go` on PATH or /usr/local/go/bin/go) and access to the Go
# module proxy; it never downloads a toolchain (GOTOOLCHAIN=local). A cold build
# takes about 5 minutes on 2 cores. Concurrent invocations are serialised with
# flock(1) on a lock file in the cache parent, and the binary is installed into
# a temporary directory and moved into place, so an interrupted build never
# leaves a half-written binary behind.
set -euo pipefail

HELM_VERSION=v3.22.0
HELM_MODULE=helm.sh/helm/v3
# The Kubernetes version `helm template` and `helm lint` assume without a cluster
# (.Capabilities.KubeVersion): upstream's Makefile derives it from the client-go that
# helm.sh/helm/v3@v3.22.0 requires (v0.37.0 -> 1.37); a plain `go install` would leave
# Helm's fallback v1.20.0, which the chart's kubeVersion (>= 1.36) refuses.
K8S_MAJOR=1
K8S_MINOR=37

log() { printf 'helm-bin: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- cache location (same parent as hack/control-plane-bins.sh) -------------
if [[ -n "${PORTCULLIS_CACHE_DIR:-}" ]]; then
  CACHE_PARENT=$PORTCULLIS_CACHE_DIR
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
  CACHE_PARENT=$XDG_CACHE_HOME/portcullis
else
  CACHE_PARENT=${HOME:?HOME is not set; set PORTCULLIS_CACHE_DIR}/.cache/portcullis
fi
mkdir -p "$CACHE_PARENT"
CACHE_PARENT="$(cd "$CACHE_PARENT" && pwd -P)"
CACHE_DIR="$CACHE_PARENT/helm-${HELM_VERSION}"
HELM_BIN="$CACHE_DIR/helm"
STAMP="$CACHE_DIR/helm.ldflags"

# `helm version` and .Capabilities.KubeVersion report what is set here (as upstream's
# Makefile does).
LDFLAGS="-s -w -X ${HELM_MODULE}/internal/version.version=${HELM_VERSION}"
LDFLAGS+=" -X ${HELM_MODULE}/internal/version.gitTreeState=clean"
for pkg in pkg/chartutil pkg/lint/rules; do
  LDFLAGS+=" -X ${HELM_MODULE}/${pkg}.k8sVersionMajor=${K8S_MAJOR}"
  LDFLAGS+=" -X ${HELM_MODULE}/${pkg}.k8sVersionMinor=${K8S_MINOR}"
done

# cached: the binary is there, built with these ldflags.
cached() { [[ -f "$HELM_BIN" && -x "$HELM_BIN" && "$(cat "$STAMP" 2>/dev/null)" == "$LDFLAGS" ]]; }

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    die "no Go toolchain found (need 'go' on PATH or /usr/local/go/bin/go)"
  fi
}

if ! cached; then
  exec {lock_fd}>"$CACHE_PARENT/.helm-build.lock"
  if ! flock -n "$lock_fd"; then
    log "another build holds $CACHE_PARENT/.helm-build.lock; waiting"
    flock "$lock_fd"
  fi
  # Re-check: whoever held the lock may have built it.
  if ! cached; then
    go_bin="$(find_go)"
    tmp="$(mktemp -d "$CACHE_PARENT/.build-helm-${HELM_VERSION}.XXXXXX")"
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    log "building helm ${HELM_VERSION} with $("$go_bin" version)"
    log "into $CACHE_DIR; a cold build takes about 5 minutes"
    start=$SECONDS
    (
      export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=
      cd "$tmp" # outside any module: `go install pkg@version` ignores go.mod files anyway
      "$go_bin" install -trimpath -ldflags "$LDFLAGS" "${HELM_MODULE}/cmd/helm@${HELM_VERSION}"
    ) >&2 || die "go install ${HELM_MODULE}/cmd/helm@${HELM_VERSION} failed"
    [[ -f "$tmp/helm" && -x "$tmp/helm" ]] || die "go install did not produce helm"
    mkdir -p "$CACHE_DIR"
    printf '%s' "$LDFLAGS" >"$tmp/helm.ldflags"
    mv -f "$tmp/helm" "$HELM_BIN" # rename(2) within one filesystem: atomic
    mv -f "$tmp/helm.ldflags" "$STAMP"
    rm -rf "$tmp"
    trap - EXIT
    log "built helm ${HELM_VERSION} in $((SECONDS - start))s"
  fi
  exec {lock_fd}>&-
fi

printf '%s\n' "$HELM_BIN"
