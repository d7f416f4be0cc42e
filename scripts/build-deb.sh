#!/usr/bin/env bash
# Build Calyx's Debian package from this checkout: dist/calyx_<version>_amd64.deb.
# Debian 12 (bookworm), amd64. Installs the build dependencies (debian/control) with apt-get when
# run as root and they are missing; PyPI must be reachable (the Python dependencies are pinned
# wheels, debian/requirements.txt). The package is built by dpkg-buildpackage + debhelper in a
# copy of the sources under .cache/deb-build/, so the checkout gets nothing but the .deb.
#
# Usage: scripts/build-deb.sh [--version VERSION] [--output DIR]
#        scripts/build-deb.sh --list-inputs      (the files the package is built from, one a line)
#   --version  the package's version (default: pyproject.toml's), e.g. 0.1.0+2 to upgrade hosts
#              to a rebuild of the same release
#   --output   where the .deb goes (default: dist/)
# Docs: docs/install.md, "The Debian package".
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)

# What the package is built from; everything else in the checkout (tests, labs, benchmarks) is not.
INPUTS=(pyproject.toml README.md calyx felix bgpd etc systemd docs debian scripts/build-deb.sh)

list_inputs() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files --cached --others --exclude-standard -- "${INPUTS[@]}" | while read -r f; do
      [[ -f $f ]] && echo "$f"
    done | sort
  else
    find "${INPUTS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | sort
  fi
}

version=
out=$top/dist
while (($#)); do
  case $1 in
    --version) version=$2; shift 2 ;;
    --output) out=$(realpath -m "$2"); shift 2 ;;
    --list-inputs) list_inputs; exit 0 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=/usr/bin/python3.11
if [[ -z $version ]]; then
  version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -1)
fi
# a native package's version: no Debian revision (no hyphen)
if [[ ! $version =~ ^[0-9][A-Za-z0-9.+~]*$ ]]; then
  echo "build-deb: '$version' is not a version this package can carry (digits first, then letters, digits, . + ~)" >&2
  exit 2
fi
arch=amd64
if [[ $(dpkg --print-architecture 2>/dev/null) != "$arch" ]]; then
  echo "build-deb: builds on $arch only (the wheels pinned in debian/requirements.txt are x86_64)" >&2
  exit 1
fi

# Build dependencies: debian/control's Build-Depends (keep the two in step: dpkg-checkbuilddeps below
# holds this list to it), and dpkg-dev. Not build-essential, which dpkg-buildpackage would demand
# by default: nothing is compiled (make, strip come with dpkg-dev and debhelper).
need=(dpkg-dev debhelper help2man python3.11 python3.11-venv)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "build-deb: missing Debian packages: ${missing[*]} (run as root to install them, or apt-get install them)" >&2
    exit 1
  fi
  echo "build-deb: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# A fresh copy of the inputs: dpkg-buildpackage writes into its source tree and next to it.
mkdir -p .cache/deb-build "$out"
work=$(mktemp -d "$top/.cache/deb-build/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/calyx-$version
mkdir "$src"
list_inputs | tar -cf - -T - | tar -xf - -C "$src"
dpkg-checkbuilddeps -I "$src/debian/control"

# debian/changelog names the version; its date is the commit's (reproducible builds use it)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  commit=$(git rev-parse --short=12 HEAD)
  dirty=$(git status --porcelain -- "${INPUTS[@]}")
  when=$(git log -1 --format=%cD)
else
  commit=unknown dirty= when=$(date -R)
fi
maintainer=$(sed -n 's/^Maintainer: *//p' debian/control)
{
  echo "calyx ($version) unstable; urgency=medium"
  echo
  echo "  * Built by scripts/build-deb.sh from commit $commit${dirty:+"
    (with uncommitted changes)"}."
  echo
  echo " -- $maintainer  $when"
} >"$src/debian/changelog"

echo "build-deb: building calyx $version in $src"
log=$top/.cache/deb-build/last.log
if ! (cd "$src" && dpkg-buildpackage -b -us -uc --no-pre-clean --no-check-builddeps) >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "build-deb: dpkg-buildpackage failed (the end of $log is above)" >&2
  exit 1
fi
deb=calyx_${version}_${arch}.deb
mv "$work/$deb" "$out/$deb"
echo "$out/$deb"
