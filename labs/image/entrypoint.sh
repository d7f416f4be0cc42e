#!/bin/sh
# calyx-node: the entrypoint of the calyx-lab-host image. Runs felix and bgpd and restarts either
# when it exits (what Restart=always does under systemd), with a pause between restarts; stops
# both on SIGTERM. With arguments, runs them instead (e.g. `sleep infinity` for a BIRD node).
set -u
if [ $# -gt 0 ]; then exec "$@"; fi

: "${CALYX_NODE_NAME:=$(hostname)}"
export CALYX_NODE_NAME
mkdir -p /var/log/calyx /var/lib/calyx/felix /var/lib/calyx/bgpd /run/calyx/felix /run/calyx/bgpd

supervise() {  # name, then the command
  name=$1; shift
  while :; do
    CALYX_STATE_DIR=/var/lib/calyx/$name CALYX_RUN_DIR=/run/calyx/$name "$@" >>"/var/log/calyx/$name.log" 2>&1
    echo "$(date -Is) $name exited with $?; restarting in 3 s" >>"/var/log/calyx/$name.log"
    sleep 3
  done
}

supervise felix felix run &
felix_loop=$!
supervise bgpd bgpd run &
bgpd_loop=$!
trap 'kill $felix_loop $bgpd_loop 2>/dev/null; pkill -TERM -P $felix_loop; pkill -TERM -P $bgpd_loop; exit 0' TERM INT
echo "calyx-node: felix and bgpd started for node $CALYX_NODE_NAME (logs in /var/log/calyx)"
wait
