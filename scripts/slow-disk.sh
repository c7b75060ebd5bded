#!/bin/sh
# Makes a slow disk for benchmarks: an ext4 file system on a loop device whose writes the
# blkio cgroup (v1, root group, which is where page-cache write-back is counted) throttles
# to RATE bytes per second. Needs root. Prints the mount point.
# Usage: scripts/slow-disk.sh [MOUNTPOINT [RATE]]     (defaults: /mnt/limitless-slow, 300 MB/s)
#        scripts/slow-disk.sh --remove [MOUNTPOINT]
set -eu
if [ "${1:-}" = "--remove" ]; then
    mnt=${2:-/mnt/limitless-slow}
    dev=$(findmnt -no SOURCE "$mnt")
    # A rate of 0 removes the device's throttle rule.
    echo "$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ') 0" > /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device
    umount "$mnt"
    losetup -d "$dev"
    rm -f "$mnt.img"
    exit 0
fi
mnt=${1:-/mnt/limitless-slow}
rate=${2:-314572800}
throttle=/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device
if [ "$(id -u)" != 0 ]; then
    echo "slow-disk.sh: needs root (loop devices, mount, the blkio cgroup)" >&2
    exit 1
fi
if [ ! -w "$throttle" ]; then
    echo "slow-disk.sh: $throttle is missing: this needs the cgroup v1 blkio controller" >&2
    exit 1
fi
mkdir -p "$mnt"
truncate -s 3G "$mnt.img"
dev=$(losetup -f --show "$mnt.img")
mkfs.ext4 -q "$dev"
mount "$dev" "$mnt"
chmod 1777 "$mnt"
echo "$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ') $rate" > "$throttle"
echo "$mnt"
