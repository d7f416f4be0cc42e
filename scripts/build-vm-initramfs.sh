#!/usr/bin/env bash
# Build the tiny initramfs with which the test VM (tests/fixtures/vm.py) boots Debian's cloud kernel
# under QEMU: static busybox, the virtio PCI / virtiofs / virtio-console modules, and an /init that
# mounts the host's / (shared read-only over virtiofs), puts tmpfs on /run and /tmp, and hands over
# to the test agent (tests/vm/agent.py) named on the kernel command line.
#
# Usage: scripts/build-vm-initramfs.sh [KERNEL_RELEASE]    (default: the newest *-cloud-amd64 in /boot)
# Writes .cache/vm/initramfs-<release>.img; does nothing when it is already up to date. Prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."

kver=${1:-}
if [[ -z $kver ]]; then
  kver=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' -printf '%f\n' 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -1)
fi
if [[ -z $kver || ! -f /boot/vmlinuz-$kver ]]; then
  echo "build-vm-initramfs: no Debian cloud kernel in /boot (Debian package linux-image-cloud-amd64)" >&2
  exit 1
fi
if [[ ! -d /lib/modules/$kver ]]; then
  echo "build-vm-initramfs: /lib/modules/$kver missing (reinstall linux-image-$kver)" >&2
  exit 1
fi
for tool in busybox cpio modprobe; do
  command -v "$tool" >/dev/null || { echo "build-vm-initramfs: $tool missing (Debian packages busybox-static, cpio, kmod)" >&2; exit 1; }
done
if ! busybox --list | grep -qx switch_root; then
  echo "build-vm-initramfs: this busybox has no switch_root (Debian package busybox-static)" >&2
  exit 1
fi

out_dir=.cache/vm
out=$out_dir/initramfs-$kver.img
# rebuilt when this script, the kernel's modules or busybox change
stamp_want=$(cat "$0" /lib/modules/"$kver"/modules.dep "$(command -v busybox)" | sha256sum | cut -d' ' -f1)
if [[ -f $out && -f $out.stamp && $(cat "$out.stamp") == "$stamp_want" ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$out_dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$(command -v busybox)" "$tmp/bin/busybox"
mknod -m 600 "$tmp/dev/console" c 5 1
mknod -m 666 "$tmp/dev/null" c 1 3

# the modules the kernel needs before the root is mounted, in dependency order, each once
: > "$tmp/modules"
modprobe -S "$kver" -a --show-depends virtio_pci virtiofs virtio_console \
  | awk '$1 == "insmod" && !seen[$2]++ {print $2}' \
  | while read -r ko; do
      mkdir -p "$tmp/$(dirname "$ko")"
      cp "$ko" "$tmp/$ko"
      echo "$ko" >> "$tmp/modules"
    done

cat > "$tmp/init" <<'EOF'
#!/bin/busybox sh
# Stage 1 of the Calyx test VM: mount the host's root read-only, add scratch tmpfs, run the agent.
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
  echo "CALYX-VM-INIT-FAILED: $*" > /dev/console
  echo 1 > /proc/sys/kernel/sysrq
  echo o > /proc/sysrq-trigger
  sleep 10
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for ko in $(cat /modules); do insmod "$ko" || fail "insmod $ko"; done
python= agent=
for arg in $(cat /proc/cmdline); do
  case $arg in
    calyx.python=*) python=${arg#calyx.python=} ;;
    calyx.agent=*) agent=${arg#calyx.agent=} ;;
  esac
done
[ -n "$python" ] && [ -n "$agent" ] || fail "calyx.python= and calyx.agent= must be on the kernel command line"
mount -t virtiofs hostroot /newroot -o ro || fail "mount the virtiofs share hostroot"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "tmpfs on /run"
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || fail "tmpfs on /tmp"
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp || fail "tmpfs on /var/tmp"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot "$python" "$agent"
EOF
chmod 755 "$tmp/init"

(cd "$tmp" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1) > "$out.new"
mv "$out.new" "$out"
echo "$stamp_want" > "$out.stamp"
echo "$out"
