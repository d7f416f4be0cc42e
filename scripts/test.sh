#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run every check: ruff, mypy, and the pytest suite (unit, etcd,
# privileged netns tests, labs). Run as root on Debian 12. Extra arguments go to pytest,
# e.g. scripts/test.sh -m unit   or   scripts/test.sh tests/etcd -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check calyx felix bgpd tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
