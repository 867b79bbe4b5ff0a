#!/usr/bin/env bash
# Provides the pinned Kubernetes binaries the lab runs: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy, kubectl and helm.
#
# They are built from the Go module proxy (static, CGO_ENABLED=0) and cached in
# ~/.cache/ferrolb/k8s/<version>/bin. k8s.io/kubernetes cannot be `go install`ed
# (its go.mod replaces the staging modules with local paths), so a small wrapper
# module requires it and replaces each k8s.io/<staging> module with v0.<minor>.<patch>,
# the list taken from that release's own go.mod. etcd has the same problem and the
# same fix. helm installs as it is.
#
# FERROLB_K8S_BIN_DIR=<dir of official release binaries> skips the build.
#
# Prints the bin directory on stdout; everything else goes to stderr.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}   # what k8s.io/kubernetes v1.36.3's go.mod requires
HELM_VERSION=${HELM_VERSION:-v4.3.1}
BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl helm)

log() { printf 'k8s-bins: %s\n' "$*" >&2; }
die() { printf 'k8s-bins: error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${FERROLB_K8S_BIN_DIR:-}" ]]; then
  for b in "${BINS[@]}"; do
    [[ -x "$FERROLB_K8S_BIN_DIR/$b" ]] || die "FERROLB_K8S_BIN_DIR=$FERROLB_K8S_BIN_DIR has no executable '$b' (it needs: ${BINS[*]})"
  done
  echo "$FERROLB_K8S_BIN_DIR"
  exit 0
fi

CACHE=${FERROLB_CACHE:-$HOME/.cache/ferrolb}
ROOT=$CACHE/k8s/$K8S_VERSION
BIN=$ROOT/bin

missing=()
for b in "${BINS[@]}"; do [[ -x "$BIN/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "Go is not installed, so the Kubernetes $K8S_VERSION binaries cannot be built. Either install Go (>= 1.26) and run 'make k8s-bins' again, or set FERROLB_K8S_BIN_DIR to a directory holding official release binaries (${BINS[*]})."

mkdir -p "$BIN" "$ROOT/src"
export CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath -buildvcs=false"
start=$(date +%s)

# Release metadata for the version ldflags.
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
patch=${K8S_VERSION##*.}
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)

build_k8s() {
  local src=$ROOT/src/kubernetes
  mkdir -p "$src"
  log "fetching k8s.io/kubernetes $K8S_VERSION go.mod"
  local upstream
  upstream=$(cd "$src" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [[ -f "$upstream" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy"
  {
    echo "module ferrolb.local/k8s-bins"
    echo
    grep -E '^go [0-9]' "$upstream"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    # Every staging module the release replaces with a local path, pinned to its tag.
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 v0.'"$minor.$patch"'#p' "$upstream"
    echo ")"
  } >"$src/go.mod"
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
  done
  log "building kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl $K8S_VERSION (cold: about 8 minutes on 2 cores)"
  (cd "$src" && go build -ldflags "$ld" -o "$BIN/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  local src=$ROOT/src/etcd
  mkdir -p "$src"
  cat >"$src/go.mod" <<MOD
module ferrolb.local/etcd-bin

go 1.24.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
MOD
  log "building etcd $ETCD_VERSION"
  (cd "$src" && go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
}

build_helm() {
  log "building helm $HELM_VERSION"
  local major=${HELM_VERSION%%.*}
  GOBIN=$BIN GOFLAGS="-trimpath -buildvcs=false" go install \
    -ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
}

for b in "${missing[@]}"; do
  case $b in
    etcd) build_etcd ;;
    helm) build_helm ;;
    *) [[ -x "$BIN/kube-apiserver" && -x "$BIN/kubectl" && -x "$BIN/kube-proxy" && -x "$BIN/kube-scheduler" && -x "$BIN/kube-controller-manager" ]] || build_k8s ;;
  esac
done

for b in "${BINS[@]}"; do [[ -x "$BIN/$b" ]] || die "build finished but $BIN/$b is missing"; done
log "built ${missing[*]} in $(( $(date +%s) - start )) s"
echo "$BIN"
