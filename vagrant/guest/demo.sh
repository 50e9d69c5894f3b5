# thinsnap demo, run inside the VM guest by `vagrant/demo` (busybox sh).
set -e
T=${THINSNAP:-thinsnap}
say() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" | sed "s|$T|thinsnap|"; "$@"; }

say "Real device-mapper: kernel $(uname -r), no udev, no dmsetup on PATH"
say "Start the daemon with no configuration at all (defaults: 100G sparse loopback pool in /var/lib/thinsnap)"
$T serve > /tmp/thinsnap.log 2>&1 &
pid=$!
i=0; while [ ! -S /run/thinsnap/thinsnap.sock ]; do i=$((i+1)); [ $i -gt 600 ] && { cat /tmp/thinsnap.log; exit 1; }; sleep 0.1; done
run $T pool status

say "Layer 1: Prepare with no parent snapshots the base device (formatted once), then commit"
run $T snapshot prepare extract-1
mkdir -p /mnt/work /mnt/look
run $T snapshot mount extract-1 /mnt/work
mkdir -p /mnt/work/etc /mnt/work/app
echo "hello from layer 1" > /mnt/work/etc/motd
echo "obsolete" > /mnt/work/app/old.conf
run $T snapshot umount /mnt/work
run $T snapshot commit layer-1 extract-1

say "Layer 2: a thin snapshot of layer 1 (O(1), copy-on-write) deletes a file and adds one"
run $T snapshot prepare extract-2 layer-1
run $T snapshot mount extract-2 /mnt/work
rm /mnt/work/app/old.conf
echo "new" > /mnt/work/app/new.conf
run $T snapshot umount /mnt/work
run $T snapshot commit layer-2 extract-2

say "Two containers on layer 2: each writes only to its own thin snapshot"
run $T snapshot prepare container-a layer-2 --label containerd.io/snapshot/thinsnap.size=20G
run $T snapshot prepare container-b layer-2
run $T snapshot mount container-a /mnt/work
echo "a was here" > /mnt/work/a.txt
run $T snapshot mount container-b /mnt/look
run ls /mnt/work /mnt/look /mnt/look/app
run df -h /mnt/work /mnt/look

say "What a storage admin sees"
run $T snapshot tree
run $T snapshot list
run $T snapshot usage
run $T pool status

say "Restart the daemon while containers run: devices are re-adopted, mounts keep working"
kill -TERM $pid; wait $pid || true
$T serve >> /tmp/thinsnap.log 2>&1 &
pid=$!
i=0; while [ ! -S /run/thinsnap/thinsnap.sock ]; do i=$((i+1)); [ $i -gt 600 ] && { cat /tmp/thinsnap.log; exit 1; }; sleep 0.1; done
echo "still writing" >> /mnt/work/a.txt
run cat /mnt/work/a.txt
run $T snapshot info container-a

say "Clean up: removal refuses while mounted, then frees everything"
$T snapshot rm container-a || true
run $T snapshot umount /mnt/work
run $T snapshot umount /mnt/look
run $T snapshot rm container-a container-b layer-2 layer-1
run $T snapshot list
run $T gc --dry-run
run $T pool check
kill -TERM $pid; wait $pid || true
say "With the daemon stopped, check that the store and the pool agree"
run $T check
say "Daemon log"
cat /tmp/thinsnap.log
