#!/usr/bin/env bash
# The plugin tier (tests/plugin) on other QGIS versions than the machine's own, each in a
# Debian chroot made with debootstrap and kept between runs under $TESSERA_MATRIX_DIR
# (default /var/cache/tessera); the checkout is bind-mounted at its own path:
#
#   3.40   QGIS 3.40 LTR from bookworm-backports, on Debian 12 with its Python 3.11, so the
#          checkout's .venv (made from /usr/bin/python3 with system site-packages, the
#          requirements.txt lock) runs there as it is and sees that QGIS's PyQGIS.
#   3.44   QGIS 3.44 LTR from Debian sid, on its Python 3.14: an engine venv of its own inside
#          the chroot (/opt/tessera-venv, with system site-packages, the requirements-py312.txt
#          lock: numpy 2), rebuilt when a lock changes. There the core tier runs too, on that
#          Python and that lock.
#
# The machine's own QGIS (3.22 on Debian 12) is the plain `make test-plugin`.
# Root only: debootstrap, chroot, bind mounts.
#
#   tools/qgis_matrix.sh [VERSION ...]            build what is missing, then run the tiers
#   tools/qgis_matrix.sh --prepare [VERSION ...]  only build (chroots, venvs); no test
set -euo pipefail

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${TESSERA_MATRIX_DIR:-/var/cache/tessera}
MIRROR=${TESSERA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREPARE=0
if [ "${1:-}" = --prepare ]; then PREPARE=1; shift; fi
VERSIONS=${*:-3.40 3.44}
#: the engine venv of a chroot that has one (its own Python); the lock it is made from
ENGINE_VENV=/opt/tessera-venv

if [ "$(id -u)" != 0 ]; then
  echo "tools/qgis_matrix.sh: needs root (debootstrap, chroot, mount)" >&2
  exit 2
fi
if [ ! -x "$CHECKOUT/.venv/bin/python" ]; then
  echo "tools/qgis_matrix.sh: run make setup first (no $CHECKOUT/.venv)" >&2
  exit 2
fi
command -v debootstrap >/dev/null || \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
# one run at a time: `make test` starts a --prepare run in the background, and its test run
# waits here for it
mkdir -p "$BASE"
exec 9>"$BASE/.matrix.lock"
if ! flock -n 9; then
  echo "tools/qgis_matrix.sh: waiting for another run (the background build of the chroots)"
  flock 9
fi

unmount_under() {  # $1: a folder; whatever a killed run left mounted under it (before rm -rf)
  local m
  { findmnt -rn -o TARGET | grep -F "$1/" || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  return 0
}

MOUNTS=()
cleanup() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  MOUNTS=()
}
trap cleanup EXIT

bind() {  # $1 source, $2 target inside the chroot
  mkdir -p "$2"
  mount --bind "$1" "$2"
  MOUNTS+=("$2")
}

mount_system() {  # $1: a chroot; /proc, /dev and /dev/shm (package scripts, Dask, PostgreSQL)
  local root=$1
  mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; MOUNTS+=("$root/proc"); }
  mountpoint -q "$root/dev" || bind /dev "$root/dev"
  mkdir -p "$root/dev/shm"
  mount -t tmpfs tmpfs "$root/dev/shm"; MOUNTS+=("$root/dev/shm")
}

network() {  # $1: a chroot; the host's name servers, certificate authorities, pip settings
  local root=$1
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
  fi
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
  if [ -f "$HOME/.config/pip/pip.conf" ]; then
    mkdir -p "$root/root/.config/pip"; cp "$HOME/.config/pip/pip.conf" "$root/root/.config/pip/"
  fi
  return 0
}

apt_in() {  # $1: a chroot, then apt-get install's arguments; no service is started
  local root=$1; shift
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
  chroot "$root" sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install \
    -y -q --no-install-recommends $* && apt-get clean"
  rm -f "$root/usr/sbin/policy-rc.d"
}

build() {  # $1 version, $2 the chroot folder to make: Debian, QGIS, PostgreSQL with PostGIS
  local v=$1 root=$2 part=$2.part
  unmount_under "$part"
  rm -rf --one-file-system "$part"
  case "$v" in
    3.40)
      debootstrap --variant=minbase --include=ca-certificates bookworm "$part" "$MIRROR"
      cat > "$part/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
deb $MIRROR bookworm-backports main
EOF
      ;;
    3.44)
      debootstrap --variant=minbase --include=ca-certificates sid "$part" "$MIRROR"
      echo "deb $MIRROR sid main" > "$part/etc/apt/sources.list"
      # a mirror that is a snapshot serves a sid Release past its one-week Valid-Until
      echo 'Acquire::Check-Valid-Until "false";' > "$part/etc/apt/apt.conf.d/99tessera-snapshot"
      ;;
  esac
  network "$part"
  mount_system "$part"
  case "$v" in
    3.40) apt_in "$part" -t bookworm-backports python3-qgis qgis-providers qgis python3-venv ;;
    3.44) apt_in "$part" python3-qgis qgis-providers qgis python3-venv ;;
  esac
  cleanup
  mv "$part" "$root"
}

ensure_postgis() {  # $1: a chroot; the tier's PostGIS tests start a server of their own there
  local root=$1
  ls "$root"/usr/share/postgresql/*/extension/postgis.control >/dev/null 2>&1 && return 0
  case "$(chroot "$root" sh -c '. /etc/os-release; echo "${VERSION_CODENAME:-sid}"')" in
    bookworm) apt_in "$root" postgresql postgresql-15-postgis-3 ;;
    *) apt_in "$root" postgresql postgresql-postgis ;;
  esac
}

ensure_engine_venv() {  # $1: a chroot whose Python is not the host's: its own engine venv
  local root=$1 want have
  local locks=("$CHECKOUT/requirements-py312.txt" "$CHECKOUT/requirements-dev.txt")
  want=$(cat "${locks[@]}" | sha256sum | cut -c1-16)
  have=$(cat "$root$ENGINE_VENV/.tessera-locks" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "== the engine venv of $root: $ENGINE_VENV from requirements-py312.txt =="
    rm -rf "$root$ENGINE_VENV"
    chroot "$root" /usr/bin/python3 -m venv --system-site-packages "$ENGINE_VENV"
    chroot "$root" "$ENGINE_VENV/bin/python" -m pip install -q --disable-pip-version-check \
      -r "$CHECKOUT/requirements-py312.txt" -r "$CHECKOUT/requirements-dev.txt"
    echo "$want" > "$root$ENGINE_VENV/.tessera-locks"
  fi
  chroot "$root" "$ENGINE_VENV/bin/python" "$CHECKOUT/tools/link_checkout.py" "$CHECKOUT"
  chroot "$root" env HOME=/root "$ENGINE_VENV/bin/python" -m tessera.core.jobs.envcheck >/dev/null
}

status=0
for v in $VERSIONS; do
  case "$v" in
    3.40|3.44) root="$BASE/qgis-$v" ;;
    *) echo "tools/qgis_matrix.sh: QGIS $v is not in the matrix (3.40, 3.44)" >&2; exit 2 ;;
  esac
  [ -d "$root" ] || build "$v" "$root"
  # the last run's test files (a failed test's are kept, pyproject.toml): nothing there is kept
  unmount_under "$root/tmp"
  find "$root/tmp" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system {} +
  network "$root"
  mount_system "$root"
  ensure_postgis "$root"
  bind "$CHECKOUT" "$root$CHECKOUT"
  py="$CHECKOUT/.venv/bin/python"
  if [ "$v" = 3.44 ]; then ensure_engine_venv "$root"; py="$ENGINE_VENV/bin/python"; fi
  if [ "$PREPARE" = 1 ]; then echo "== QGIS $v: $root is ready"; cleanup; continue; fi
  have=$(chroot "$root" /usr/bin/python3 -c \
    "from qgis.core import Qgis; print(Qgis.QGIS_VERSION)" 2>/dev/null || true)
  pyv=$(chroot "$root" "$py" -c "import sys, numpy; print(sys.version.split()[0], \
'numpy', numpy.__version__)")
  echo "== the plugin tier on QGIS ${have:-?}, Python $pyv (chroot $root) =="
  case "$have" in "$v".*) ;; *) echo "expected QGIS $v, found '${have}'" >&2; exit 1 ;; esac
  run() { chroot "$root" env HOME=/root QT_QPA_PLATFORM=offscreen sh -c "cd '$CHECKOUT' && $*"; }
  run "$py -m pytest -q -p no:cacheprovider tests/plugin" || status=1
  if [ "$v" = 3.44 ]; then
    echo "== the core tier on Python $pyv (chroot $root) =="
    run "$py -m pytest -q -p no:cacheprovider -p no:pytest_qgis tests/core" || status=1
  fi
  cleanup
done
exit $status
