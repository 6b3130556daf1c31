#!/usr/bin/env bash
# System packages the test suite needs beyond Python: redis-server (>= 6.2) for the Redis broker
# tests. Idempotent: does nothing when a recent enough redis-server is already on PATH.
# `make test` runs it; CI runs as root, a developer gets sudo (or a clear error).
#
# The tests start their own redis-server on free loopback ports; the system service that the
# Debian package starts on 6379 is stopped and disabled right after installing it, so nothing
# else answers there.
set -euo pipefail

MIN_MAJOR=6
MIN_MINOR=2

say() { echo "install-test-deps: $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    say "need root to run '$*' (no sudo here): install redis-server (>= $MIN_MAJOR.$MIN_MINOR)" \
        "yourself, e.g. 'apt-get install redis-server', and run 'make test' again."
    exit 1
  fi
}

stop_system_service() {
  # Debian's postinst starts redis-server.service; the tests must not share a server with it.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now redis-server.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/redis-server ]; then
    as_root /etc/init.d/redis-server stop >/dev/null 2>&1 || true
  fi
  if command -v redis-cli >/dev/null 2>&1 \
      && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    say "warning: a redis-server still answers on 127.0.0.1:6379; the tests do not use it" \
        "(they start their own on free ports)."
  fi
}

install_redis() {
  if ! command -v apt-get >/dev/null 2>&1; then
    say "redis-server is not on PATH and this is not a Debian/Ubuntu system (no apt-get):" \
        "install redis-server >= $MIN_MAJOR.$MIN_MINOR with your package manager."
    exit 1
  fi
  say "installing redis-server with apt-get"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends redis-server
  stop_system_service
}

check_version() {
  local version major minor
  version="$(redis-server --version | sed -n 's/.* v=\([0-9][0-9.]*\).*/\1/p')"
  major="${version%%.*}"
  minor="${version#*.}"
  minor="${minor%%.*}"
  if [ -z "$major" ] || [ -z "$minor" ]; then
    say "cannot read the version of $(command -v redis-server): $(redis-server --version)"
    exit 1
  fi
  if [ "$major" -lt "$MIN_MAJOR" ] || { [ "$major" -eq "$MIN_MAJOR" ] && [ "$minor" -lt "$MIN_MINOR" ]; }; then
    say "$(command -v redis-server) is version $version; taskmill's Redis broker needs" \
        ">= $MIN_MAJOR.$MIN_MINOR. Install a newer one (e.g. https://packages.redis.io) first."
    exit 1
  fi
  echo "redis-server $version: $(command -v redis-server)"
}

if ! command -v redis-server >/dev/null 2>&1; then
  install_redis
  if ! command -v redis-server >/dev/null 2>&1; then
    say "apt-get installed redis-server but it is not on PATH (looked in: $PATH)."
    exit 1
  fi
fi
check_version
