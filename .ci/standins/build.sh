#!/usr/bin/env bash
# Local stand-ins for the three upstream images docker-compose.yml and the Dockerfile start
# from (python:3.11-slim, redis:7-alpine, postgres:16-alpine), for a host that cannot pull from
# Docker Hub but reaches Debian's mirror and the Python registry (this project's CI machine).
#
# Each is built from a `debootstrap --variant=minbase bookworm` root imported with
# `docker import`, and honours what the compose file relies on:
#   python:3.11-slim    Python 3.11 (Debian's) with pip in a venv first on PATH
#   redis:7-alpine      redis-server and redis-cli (Debian's 7.0) on PATH, working dir /data
#   postgres:16-alpine  PostgreSQL (Debian bookworm's 15: no 16 there) that creates the
#                       POSTGRES_USER role and POSTGRES_DB from POSTGRES_PASSWORD on first start,
#                       listens on TCP with password auth, and answers pg_isready
#
# A tag that already exists is left alone (a real upstream image is never replaced); stand-ins
# carry the label org.cxr-triage.standin (images built on them inherit it) and `--force`
# rebuilds those. Needs root, docker and debootstrap. Usage: .ci/standins/build.sh [--force]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
base=cxr-standin/debian:bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
label=org.cxr-triage.standin
force=0
[ "${1:-}" = "--force" ] && force=1

is_standin() { [ -n "$(docker image inspect --format "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null)" ]; }
wanted() {  # build $1 unless it exists (and is not a stand-in we were told to rebuild)
  docker image inspect "$1" >/dev/null 2>&1 || return 0
  [ "$force" = 1 ] && is_standin "$1"
}

if wanted "$base"; then
  rootfs="$(mktemp -d /tmp/cxr-standin-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm (minbase) from $mirror"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  # What Docker's own debian images do: no service starts during package installs, no apt cache.
  printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$rootfs/etc/apt/apt.conf.d/90standin"
  # The host's own extra CAs (a TLS-inspecting egress proxy), so builds inside reach PyPI.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  fi
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" --numeric-owner -c . \
    | docker import --change "LABEL $label=base" --change 'CMD ["bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "built $base"
fi

build() {  # build <tag> <dockerfile>
  if wanted "$1"; then
    docker build --network host --quiet --label "$label=$2" -t "$1" -f "$here/$2" "$here" >/dev/null
    echo "built $1 (stand-in: $2)"
  else
    echo "kept $1 (already present)"
  fi
}
build python:3.11-slim python.Dockerfile
build redis:7-alpine redis.Dockerfile
build postgres:16-alpine postgres.Dockerfile
