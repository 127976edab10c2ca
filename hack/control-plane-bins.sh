#!/usr/bin/env bash
# Provide real Kubernetes control-plane binaries for the test harness,
# following the envtest convention (a directory of executables).
#
# Prints exactly ONE line to stdout: the absolute path of a directory holding
# executable `kube-apiserver`, `etcd`, `kube-controller-manager` and `kubectl`
# (Kubernetes v1.37.2, etcd v3.7.0 as pinned by k8s.io/kubernetes@v1.37.2).
# Everything else (progress, build logs, errors) goes to stderr.
#
# Resolution order:
#   1. $KUBEBUILDER_ASSETS, if it holds at least `kube-apiserver` and `etcd`.
#      If it holds all four binaries it is printed as is. Otherwise (e.g. a
#      setup-envtest directory, which never ships kube-controller-manager) the
#      missing ones are built into the cache directory below and an "overlay"
#      directory of symlinks (`<cache parent>/assets-<hash>`) is printed, so the
#      caller always gets all four binaries in one directory.
#      Note: versions found in $KUBEBUILDER_ASSETS are NOT checked.
#   2. Otherwise the binaries are built from the upstream Go modules (see
#      hack/envtest/go.mod) into
#        ${PORTCULLIS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/portcullis}/k8s-v1.37.2-<hash>
#      where <hash> covers hack/envtest/{go.mod,go.sum,cmd/*/main.go} and this
#      script. A later run finds them there and only prints the path.
#
# The build needs Go (>= the version in hack/envtest/go.mod; `go` on PATH or
# /usr/local/go/bin/go) and access to the Go module proxy; it never downloads a
# toolchain (GOTOOLCHAIN=local). A cold build takes a long time (tens of
# minutes on 2 cores) and fills the Go build cache with a few GiB.
# Concurrent invocations are serialised with flock(1) on a lock file in the
# cache parent, and binaries are built in a temporary directory and moved into
# place, so an interrupted build never leaves a half-written binary behind.
set -euo pipefail

K8S_VERSION=v1.37.2
K8S_MAJOR=1
K8S_MINOR=37
# Commit date of the v1.37.2 tag (the module proxy's .info Time), used as the
# reported buildDate so builds are reproducible.
K8S_BUILD_DATE=2026-10-27T12:01:04Z
BINARIES=(kube-apiserver etcd kube-controller-manager kubectl)

log() { printf 'control-plane-bins: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
MOD_DIR="$(dirname "$SCRIPT_PATH")/envtest"
[[ -f "$MOD_DIR/go.mod" && -f "$MOD_DIR/go.sum" ]] || die "missing $MOD_DIR/go.mod or go.sum"
grep -q "^[[:space:]]*k8s.io/kubernetes ${K8S_VERSION}\$" "$MOD_DIR/go.mod" ||
  die "$MOD_DIR/go.mod does not pin k8s.io/kubernetes ${K8S_VERSION}; update K8S_* in this script too"

# has_bins DIR NAME... : all NAMEs are executable regular files in DIR.
has_bins() {
  local dir=$1 b
  shift
  for b in "$@"; do
    [[ -f "$dir/$b" && -x "$dir/$b" ]] || return 1
  done
}

# missing_bins DIR NAME... : prints the NAMEs that are not executable in DIR.
missing_bins() {
  local dir=$1 b
  shift
  for b in "$@"; do
    [[ -f "$dir/$b" && -x "$dir/$b" ]] || printf '%s\n' "$b"
  done
}

short_hash() { sha256sum | cut -c1-12; }

# --- cache location --------------------------------------------------------
if [[ -n "${PORTCULLIS_CACHE_DIR:-}" ]]; then
  CACHE_PARENT=$PORTCULLIS_CACHE_DIR
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
  CACHE_PARENT=$XDG_CACHE_HOME/portcullis
else
  CACHE_PARENT=${HOME:?HOME is not set; set PORTCULLIS_CACHE_DIR}/.cache/portcullis
fi

INPUT_HASH="$(
  cd "$MOD_DIR" &&
    cat go.mod go.sum cmd/*/main.go "$SCRIPT_PATH" | short_hash
)"
CACHE_NAME="k8s-${K8S_VERSION}-${INPUT_HASH}"

# ensure_cache_parent: creates the cache parent, sets the absolute CACHE_DIR.
ensure_cache_parent() {
  mkdir -p "$CACHE_PARENT"
  CACHE_PARENT="$(cd "$CACHE_PARENT" && pwd -P)"
  CACHE_DIR="$CACHE_PARENT/$CACHE_NAME"
}

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    die "no Go toolchain found (need 'go' on PATH or /usr/local/go/bin/go)"
  fi
}

# build_into_cache NAME... : ensure the named binaries exist in $CACHE_DIR,
# building the missing ones. Serialised by a lock in the cache parent.
build_into_cache() {
  local want=("$@") missing lock_fd
  ensure_cache_parent
  if has_bins "$CACHE_DIR" "${want[@]}"; then
    return 0
  fi

  exec {lock_fd}>"$CACHE_PARENT/.build.lock"
  if ! flock -n "$lock_fd"; then
    log "another build holds $CACHE_PARENT/.build.lock; waiting"
    flock "$lock_fd"
  fi
  # Re-check: whoever held the lock may have built them.
  mapfile -t missing < <(missing_bins "$CACHE_DIR" "${want[@]}")
  if ((${#missing[@]} == 0)); then
    exec {lock_fd}>&-
    return 0
  fi

  local go_bin tmp pkgs=() b ldflags="-s -w" pkg start
  go_bin="$(find_go)"
  for b in "${missing[@]}"; do pkgs+=("./cmd/$b"); done
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
    ldflags+=" -X ${pkg}.gitMajor=${K8S_MAJOR}"
    ldflags+=" -X ${pkg}.gitMinor=${K8S_MINOR}"
    ldflags+=" -X ${pkg}.gitTreeState=archive"
    ldflags+=" -X ${pkg}.buildDate=${K8S_BUILD_DATE}"
  done

  tmp="$(mktemp -d "$CACHE_PARENT/.build-${CACHE_NAME}.XXXXXX")"
  # shellcheck disable=SC2064 # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  log "building ${missing[*]} (Kubernetes ${K8S_VERSION}) with $("$go_bin" version)"
  log "into $CACHE_DIR; a cold build takes a long time"
  start=$SECONDS
  (
    cd "$MOD_DIR"
    export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0
    # -mod=readonly: the committed go.sum is complete; never rewrite it.
    "$go_bin" build -mod=readonly -buildvcs=false -trimpath \
      -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}"
  ) >&2 || die "go build failed"
  has_bins "$tmp" "${missing[@]}" || die "go build did not produce ${missing[*]}"

  mkdir -p "$CACHE_DIR"
  for b in "${missing[@]}"; do
    mv -f "$tmp/$b" "$CACHE_DIR/$b" # rename(2) within one filesystem: atomic
  done
  rm -rf "$tmp"
  trap - EXIT
  log "built ${missing[*]} in $((SECONDS - start))s"
  exec {lock_fd}>&-
}

# --- 1. KUBEBUILDER_ASSETS -------------------------------------------------
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && has_bins "$KUBEBUILDER_ASSETS" kube-apiserver etcd; then
  assets="$(cd "$KUBEBUILDER_ASSETS" && pwd -P)"
  mapfile -t absent < <(missing_bins "$assets" "${BINARIES[@]}")
  if ((${#absent[@]} == 0)); then
    printf '%s\n' "$assets"
    exit 0
  fi
  log "KUBEBUILDER_ASSETS=$assets lacks ${absent[*]}; using cached builds for those"
  build_into_cache "${absent[@]}"
  overlay="$CACHE_PARENT/assets-$(printf '%s\n%s\n' "$assets" "$CACHE_NAME" | short_hash)"
  mkdir -p "$overlay"
  for b in "${BINARIES[@]}"; do
    src="$assets/$b"
    has_bins "$assets" "$b" || src="$CACHE_DIR/$b"
    # Replace the link atomically (rename over the old one).
    ln -sfn "$src" "$overlay/.$b.$$"
    mv -Tf "$overlay/.$b.$$" "$overlay/$b"
  done
  printf '%s\n' "$overlay"
  exit 0
fi
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; ignoring it"
fi

# --- 2. cache (build on a miss) --------------------------------------------
build_into_cache "${BINARIES[@]}"
printf '%s\n' "$CACHE_DIR"
