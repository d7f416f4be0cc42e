#!/usr/bin/env bash
# The Calyx demo: brings up the two-racks lab (etcd, two FRR top-of-rack switches, four hosts running
# felix and bgpd, eight workloads of two tenants) in network namespaces, shows what an operator
# looks at, isolates one tenant with a policy, shows the effect, and tears everything down.
#
# Usage: sudo scripts/demo.sh [--keep] [--hosts systemd]
#   --keep            leave the lab up (`calyxctl lab down two-racks` later)
#   --hosts systemd   every host boots systemd (systemd-nspawn) with Calyx's Debian package installed
#                     (built by scripts/build-deb.sh into dist/ when there is none) and runs its units
# Runs on a fresh Debian 12 machine: scripts/setup.sh installs what is missing first. Nothing is
# changed in the machine's own network namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

keep=0
hosts=processes
while (($#)); do
  case $1 in
    --keep) keep=1; shift ;;
    --hosts) hosts=${2:-}; shift 2 || { echo "demo: --hosts needs processes or systemd" >&2; exit 2; } ;;
    --hosts=*) hosts=${1#--hosts=}; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "demo: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
if [[ $hosts != processes && $hosts != systemd ]]; then
  echo "demo: --hosts is processes or systemd, not '$hosts'" >&2
  exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "demo: run as root (it creates network namespaces): sudo $0 $*" >&2
  exit 1
fi

scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
LAB=two-racks

title() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

teardown() {
  if [[ $keep -eq 0 ]]; then
    title "tearing down"
    calyxctl lab down "$LAB" || true
  else
    title "the lab stays up"
    echo "  calyxctl lab status $LAB | calyxctl lab exec $LAB h1a calyxctl node status | calyxctl lab down $LAB"
  fi
}

if [[ $hosts == systemd ]] && ! compgen -G "dist/calyx_*_amd64.deb" >/dev/null; then
  title "building the Debian package (scripts/build-deb.sh)"
  scripts/build-deb.sh
fi

title "bringing up the $LAB lab (hosts: $hosts)"
calyxctl lab up "$LAB" --hosts "$hosts"
trap teardown EXIT
ETCD=$(calyxctl lab status "$LAB" | sed -n 's/^etcd: \(http[^ ]*\) from this machine.*/\1/p')

title "waiting until every workload reaches every other one"
for _ in $(seq 1 60); do
  if calyxctl lab ping "$LAB" >/dev/null 2>&1; then break; fi
  sleep 0.5
done

title "BGP tables of the top-of-rack switches (one route per host block, not per workload)"
calyxctl lab routes "$LAB"

title "calyxctl node status, every node"
CALYX_ETCD_ENDPOINTS=$ETCD calyxctl node status --all || true
if [[ $hosts == systemd ]]; then
  title "on host h1a: systemctl status of the package's units"
  calyxctl lab exec "$LAB" h1a systemctl --no-pager --lines=0 status felix bgpd calyx-cni || true
fi

title "workloads"
CALYX_ETCD_ENDPOINTS=$ETCD calyxctl get workloads

title "ping matrix (rows ping columns; ok = answered)"
calyxctl lab ping "$LAB" || true

title "policy: isolate tenant a (labs/$LAB/tenant-isolation.yaml)"
sed -n '/^kind/,$p' "labs/$LAB/tenant-isolation.yaml"
calyxctl lab apply "$LAB" tenant-isolation
for _ in $(seq 1 20); do   # until felix has programmed it (some pair stops answering)
  matrix=$(calyxctl lab ping "$LAB" 2>/dev/null || true)   # exits 1 once some pair fails: expected here
  if grep -q -- '--' <<<"$matrix"; then break; fi
  sleep 0.5
done

title "ping matrix with tenant a isolated (a-* talk only to a-*, b-* still to b-*)"
calyxctl lab ping "$LAB" || true
