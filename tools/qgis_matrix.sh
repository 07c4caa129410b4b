#!/usr/bin/env bash
# The plugin tier (tests/plugin) on other QGIS versions than the machine's own, each in a
# Debian chroot made with debootstrap and kept between runs under $TESSERA_MATRIX_DIR
# (default /var/cache/tessera):
#
#   3.40   QGIS 3.40 LTR from bookworm-backports, on Debian 12 with its Python 3.11, so the
#          checkout's .venv (made from /usr/bin/python3 with system site-packages) runs there
#          as it is and sees that QGIS's PyQGIS; the checkout is bind-mounted at its own path.
#
# The machine's own QGIS (3.22 on Debian 12) is the plain `make test-plugin`. 3.44 (sid,
# Python 3.14) needs an engine environment built for Python 3.14 and is not in the matrix yet.
# Root only: debootstrap, chroot, bind mounts. Usage: tools/qgis_matrix.sh [VERSION ...]
set -euo pipefail

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${TESSERA_MATRIX_DIR:-/var/cache/tessera}
MIRROR=${TESSERA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
VERSIONS=${*:-3.40}

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

build_340() {  # $1: the chroot folder to make
  local root=$1 part=$1.part
  rm -rf "$part"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$part" "$MIRROR"
  cat > "$part/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
deb $MIRROR bookworm-backports main
EOF
  cp /etc/resolv.conf "$part/etc/resolv.conf"
  chroot "$part" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install \
    -y -q --no-install-recommends -t bookworm-backports python3-qgis qgis-providers qgis \
    python3-venv && apt-get clean'
  mv "$part" "$root"
}

ensure_postgis() {  # $1: a chroot; the tier's PostGIS tests start a server of their own there
  local root=$1
  ls "$root"/usr/share/postgresql/*/extension/postgis.control >/dev/null 2>&1 && return 0
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"  # start no service
  chmod +x "$root/usr/sbin/policy-rc.d"
  chroot "$root" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install \
    -y -q --no-install-recommends postgresql postgresql-15-postgis-3 && apt-get clean'
  rm -f "$root/usr/sbin/policy-rc.d"
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

status=0
for v in $VERSIONS; do
  case "$v" in
    3.40) root="$BASE/qgis-3.40"; [ -d "$root" ] || build_340 "$root" ;;
    *) echo "tools/qgis_matrix.sh: QGIS $v is not in the matrix (3.40)" >&2; exit 2 ;;
  esac
  # the host's network settings: name servers, certificate authorities, pip's configuration
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  ensure_postgis "$root"
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
  fi
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
  if [ -f "$HOME/.config/pip/pip.conf" ]; then
    mkdir -p "$root/root/.config/pip"; cp "$HOME/.config/pip/pip.conf" "$root/root/.config/pip/"
  fi
  mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; MOUNTS+=("$root/proc"); }
  bind /dev "$root/dev"
  mkdir -p "$root/dev/shm"
  mount -t tmpfs tmpfs "$root/dev/shm"; MOUNTS+=("$root/dev/shm")
  bind "$CHECKOUT" "$root$CHECKOUT"
  have=$(chroot "$root" /usr/bin/python3 -c \
    "from qgis.core import Qgis; print(Qgis.QGIS_VERSION)" 2>/dev/null || true)
  echo "== the plugin tier on QGIS ${have:-?} (chroot $root) =="
  case "$have" in "$v".*) ;; *) echo "expected QGIS $v, found '${have}'" >&2; exit 1 ;; esac
  if ! chroot "$root" env HOME=/root QT_QPA_PLATFORM=offscreen sh -c \
      "cd '$CHECKOUT' && .venv/bin/python -m pytest -q -p no:cacheprovider tests/plugin"; then
    status=1
  fi
  cleanup
done
exit $status
