#!/usr/bin/env bash
# Sequential read of a fully allocated qcow2 image: the chainfs engine
# against `qemu-img convert -O raw` to tmpfs, same image, same run.
# Usage: contrib/bench-engine.sh [SIZE] (default 1G). Prints the ratio.
set -euo pipefail
size=${1:-1G}
work=$(mktemp -d /var/tmp/chainfs-bench.XXXXXX)
tmpfs=$(mktemp -d /dev/shm/chainfs-bench.XXXXXX)
trap 'rm -rf "$work" "$tmpfs"' EXIT
img=$work/full.qcow2
qemu-img create -q -f qcow2 "$img" "$size"
qemu-io -c "write -P 0x5a 0 $size" "$img" >/dev/null
cargo build --release --benches -q
bench=$(ls -t target/release/deps/engine_read-* | grep -v '\.d$' | head -1)
# Warm the host page cache for both readers alike.
cat "$img" >/dev/null
best_engine=0; best_qemu=0
for run in 1 2 3; do
    engine=$("$bench" "$img" "$tmpfs/engine.raw" | awk '{print $1}')
    rm -f "$tmpfs/engine.raw"
    start=$(date +%s.%N)
    qemu-img convert -O raw "$img" "$tmpfs/out.raw"
    end=$(date +%s.%N)
    rm -f "$tmpfs/out.raw"
    bytes=$(qemu-img info --output=json "$img" | awk -F'[:,]' '/"virtual-size"/{print $2; exit}')
    qemu=$(awk -v b="$bytes" -v s="$start" -v e="$end" 'BEGIN{printf "%.1f", b/(e-s)/1048576}')
    echo "run $run: engine $engine MiB/s, qemu-img convert $qemu MiB/s"
    best_engine=$(awk -v a="$best_engine" -v b="$engine" 'BEGIN{print (b>a)?b:a}')
    best_qemu=$(awk -v a="$best_qemu" -v b="$qemu" 'BEGIN{print (b>a)?b:a}')
done
awk -v e="$best_engine" -v q="$best_qemu" 'BEGIN{printf "best: engine %.1f MiB/s, qemu-img convert %.1f MiB/s, ratio %.2f\n", e, q, e/q}'
