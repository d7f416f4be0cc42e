#!/usr/bin/env bash
# Install everything Calyx's demo and tests need on a Debian 12 machine, then the project itself
# into ./.venv. Safe to run again: it installs only what is missing.
# Usage: scripts/setup.sh            (as root: apt packages need it)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc
  etcd-server etcd-client            # the datastore (started by hand: no systemd needed)
  iproute2 iptables ipset            # the dataplane felix programs
  iputils-ping tcpdump netcat-openbsd procps psmisc openssl
  bird2 frr                          # BGP peers, ToRs and route reflectors in tests and labs
  golang-go golang-github-appc-cni-dev   # to build cnitool (scripts/build-cnitool.sh)
  containernetworking-plugins        # reference CNI plugins (portmap, tuning, bandwidth, host-local)
  podman runc containerd busybox-static   # real runtimes for the CNI tests
  qemu-system-x86 linux-image-cloud-amd64 kmod cpio   # a second kernel under QEMU (tests/fixtures/vm.py):
                                                       # this host's kernel has no ipip
  systemd                            # systemd-analyze verify of the unit files (no systemd needs to run)
  debhelper help2man lintian debootstrap   # the Debian package: scripts/build-deb.sh, tests/package (marker deb)
  systemd-container                  # lab hosts that boot systemd (calyxctl lab up --hosts systemd)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: Python >= 3.11 is required ($PY is $("$PY" --version 2>&1))" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.calyx-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
# Byte-compile the checkout: environments that set PYTHONDONTWRITEBYTECODE (and the test VM, which
# sees the checkout read-only) would otherwise compile every module again in every daemon they start.
.venv/bin/python -m compileall -q -j 0 calyx felix bgpd tests bench >/dev/null
echo "setup: ok ($(.venv/bin/python --version), $(etcd --version 2>/dev/null | head -1))"
scripts/build-vm-initramfs.sh >/dev/null
# the Debian 12 root filesystem the systemd lab hosts boot (debootstrap, once; calyx/lab/sdhosts.py)
.venv/bin/python -c 'from calyx.lab import sdhosts; sdhosts.base_rootfs(print)'
scripts/build-cnitool.sh >/dev/null || echo "setup: cnitool could not be built (the CNI client tests will fail)" >&2
