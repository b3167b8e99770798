#!/usr/bin/env bash
# Build the images with podman, on a machine that may reach no container registry.
#
#   deploy/build-images.sh [--if-room] [cpu|train|all]     (default: cpu)
#
# The Dockerfiles are used unchanged. Their base, python:3.11.13-slim, is taken from local
# storage, else pulled, else made here from Debian's archive with mmdebstrap (bookworm's
# python3 3.11, under the same name), so that `podman build --pull=never` finds it. Where the
# PyTorch CPU index cannot be reached, the training image takes a CPU torch wheel from a local
# folder (SINE_WHEELS, default: pip's find-links) through deploy/wheels/.
#
# Tags, as the chart's defaults name them: <repo>:<version> (the service, CPU) and
# <repo>:<version>-train. Environment: SINE_IMAGE_TAG (default: the project's version),
# SINE_IMAGE_REPO (default localhost/sine-retrieval), SINE_BUILD_DIR (default build/images: the stand-in base and the
# timing file), CONTAINERS_CONF (default deploy/podman/containers.conf: runc, lowered ulimits).
# Prints and writes build/images/build.json: each image's build seconds and size in bytes.
# Disk: a build needs room for the image twice over on the storage disk, and for a temporary copy
# while it commits (NEED_MB, BLOB_MB, measured); that copy goes to /dev/shm where it has room, else
# to TMPDIR or /var/tmp. An image that does not fit is refused before it starts (exit 4), or with --if-room
# skipped, and build.json says why. A rebuilt tag's previous image is removed, not left dangling.
# Normal users keep `docker build -f deploy/Dockerfile .`, which pulls the real base.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

if_room=0
[ "${1:-}" = --if-room ] && { if_room=1; shift; }
what="${1:-cpu}"
case "$what" in cpu | train | all) ;; *) echo "usage: $0 [--if-room] [cpu|train|all]" >&2; exit 2 ;; esac
version="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)"
tag="${SINE_IMAGE_TAG:-$version}"
repo="${SINE_IMAGE_REPO:-localhost/sine-retrieval}"
out="${SINE_BUILD_DIR:-build/images}"
mkdir -p "$out"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"
base="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' deploy/Dockerfile | head -1)"

# MB each build needs at its peak, with a margin: on the storage disk (the build container's files
# and the committed layer; measured 0.9 and 3.0 GB), and where the commit's temporary copy goes
# (measured 0.6 and 2.9 GB on /dev/shm)
# (SINE_NEED_MB_CPU, SINE_NEED_MB_TRAIN override the first: for images grown since, and tests)
declare -A NEED_MB=([cpu]=${SINE_NEED_MB_CPU:-1200} [train]=${SINE_NEED_MB_TRAIN:-3600})
declare -A BLOB_MB=([cpu]=800 [train]=3400)

need() { command -v "$1" >/dev/null || { echo "$0: $1 is not installed ($2)" >&2; exit 3; }; }
need podman "apt-get install podman runc"

ensure_base() {
  if podman image exists "$base"; then return; fi
  if timeout 60 podman pull -q "docker.io/library/$base" >/dev/null 2>&1; then return; fi
  need mmdebstrap "apt-get install mmdebstrap"
  echo "no registry: making $base from Debian's archive (mmdebstrap)" >&2
  # the machine's CA bundle goes in, so that pip inside the build trusts what the host trusts
  local hook='mkdir -p "$1/usr/local/share/ca-certificates/host"
    cp /etc/ssl/certs/ca-certificates.crt "$1/usr/local/share/ca-certificates/host/host.crt"
    chroot "$1" update-ca-certificates >/dev/null 2>&1'
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    --customize-hook="$hook" bookworm "$out/base.tar"
  podman import -q "$out/base.tar" "$base" >/dev/null
  rm -f "$out/base.tar"
}

free_mb() { df -Pm "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }

blob_dir() {  # kind: where the commit's temporary copy goes (exported as TMPDIR for podman)
  if [ -w /dev/shm ] && [ "$(free_mb /dev/shm || echo 0)" -gt "${BLOB_MB[$1]}" ]; then
    echo /dev/shm
  else
    echo "${TMPDIR:-/var/tmp}"
  fi
}

room() {  # kind image: 0 if the build fits (TMPDIR already chosen), else says why on stdout
  local kind="$1" image="$2" store have left
  store="$(podman info --format '{{.Store.GraphRoot}}')"
  mkdir -p "$store"
  have=$(free_mb "$store")
  left=$((have - NEED_MB[$kind]))
  if [ "$(df -P "$TMPDIR" | awk 'NR == 2 {print $1}')" = "$(df -P "$store" | awk 'NR == 2 {print $1}')" ]; then
    left=$((left - BLOB_MB[$kind]))               # the blob shares the store's disk
  elif [ "$(free_mb "$TMPDIR")" -lt "${BLOB_MB[$kind]}" ]; then
    left=-1
  fi
  if [ "$left" -lt 0 ]; then
    echo "$image needs about ${NEED_MB[$kind]} MB free in $store and ${BLOB_MB[$kind]} MB in $TMPDIR for the commit; $store has $have MB"
    return 1
  fi
}

build() {  # kind image dockerfile [build args...]
  local kind="$1" image="$2" file="$3" t0 t1 size old why
  shift 3
  TMPDIR="$(blob_dir "$kind")"
  export TMPDIR
  if ! why="$(room "$kind" "$image")"; then
    echo "$0: $why" >&2
    [ "$if_room" = 1 ] || exit 4
    echo "{\"image\": \"$image\", \"dockerfile\": \"$file\", \"skipped\": \"$why\"}"
    return
  fi
  old="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
  t0=$(date +%s.%N)
  # --format docker keeps HEALTHCHECK, which the OCI format drops; --layers=false commits the
  # result only, not every step (a third of the training image's build time)
  podman build -q --pull=never --layers=false --format docker -f "$file" -t "$image" "$@" . >/dev/null
  t1=$(date +%s.%N)
  size=$(podman image inspect --format '{{.Size}}' "$image")
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true    # still used by a container: kept
  fi
  echo "{\"image\": \"$image\", \"dockerfile\": \"$file\", \"build_s\": $(awk "BEGIN {printf \"%.1f\", $t1 - $t0}"), \"size_bytes\": $size}"
}

ensure_base
results=()
if [ "$what" != train ]; then
  results+=("$(build cpu "$repo:$tag" deploy/Dockerfile)")
fi
if [ "$what" != cpu ]; then
  index="https://download.pytorch.org/whl/cpu"
  if ! curl -s -m 10 -o /dev/null "$index/"; then
    index=""
    wheels="${SINE_WHEELS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
    torch="$(ls "$wheels"/torch-*+cpu-*.whl 2>/dev/null | head -1 || true)"
    [ -n "$torch" ] || { echo "$0: neither $index nor a torch-*+cpu wheel in SINE_WHEELS" >&2; exit 3; }
    cp -u "$torch" deploy/wheels/
  fi
  results+=("$(build train "$repo:$tag-train" deploy/Dockerfile.train --build-arg "TORCH_INDEX_URL=$index")")
fi
printf '%s\n' "${results[@]}"
printf '[%s]\n' "$(IFS=,; echo "${results[*]}")" > "$out/build.json"
