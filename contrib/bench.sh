#!/usr/bin/env bash
# chainfs against qemu-storage-daemon on the same images, in the same run,
# reported as ratios (SPEC §7). Needs root (qemu-storage-daemon's FUSE
# export), fio, qemu-utils, and a release build of chainfs.
#
#   contrib/bench.sh [reads|stream|commit|all]   SIZE=1G RUNTIME=10 RUNS=3 by default
#   contrib/bench.sh memory|deep                 chainfs alone, not part of all
#
# reads:  sequential 1 MiB and random 4 KiB reads (fio, 1 and 4 jobs,
#         O_DIRECT) through a node file, against qemu-storage-daemon's FUSE
#         export of the same fully allocated qcow2 image.
# stream: a four-deep chain, each layer holding a disjoint quarter, streamed
#         into the top: chainfs's `stream` against qemu-storage-daemon's
#         block-stream over QMP; fio's random 4 KiB write IOPS on the active
#         layer while each stream runs.
# commit: the same four-deep chain: an intermediate commit (l2 and l1 into
#         the base, l2's child rebacked) and an active commit (everything
#         into the base, ready, then complete/job-complete), chainfs's
#         `commit` against qemu-storage-daemon's block-commit; RUNS runs.
# memory: a 1 TiB virtual, 100-deep qcow2 chain, each layer holding 128
#         scattered 4 KiB writes, each in the range of an L2 table of its
#         own (so random reads load the tables of every layer), read at
#         random (fio 4 KiB, 4 jobs, MEM_RUNTIME=60 s) through the top node
#         file; prints the peak RSS (VmHWM) of `chainfs mount -f` with the
#         default --cache-size, which must stay under 64 MiB.
# deep:   random 4 KiB reads (fio, 1 and 4 jobs) of data in the base of a
#         1,000-deep chain (999 empty qcow2 overlays on a SIZE fully
#         allocated qcow2 base) against the base alone, mounted alike.
#
# Where: BENCH_DIR (default /dev/shm, a tmpfs: the figures then measure the
# two programs, not the disk). BENCH_FS=xfs makes an XFS filesystem with
# reflink in a loop file under BENCH_DIR and works there, where jobs can
# share extents instead of copying them.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
work=$(mktemp -d "${BENCH_DIR:-/dev/shm}/chainfs-bench.XXXXXX")
xfs_image=
if [ "${BENCH_FS:-}" = xfs ]; then
    xfs_image=$work.xfs
    truncate -s $(( $(numfmt --from=iec "$SIZE") * 8 + (1 << 30) )) "$xfs_image"
    mkfs.xfs -q -m reflink=1 "$xfs_image"
    mount -o loop "$xfs_image" "$work"
fi
qsd_pid=
cleanup() {
    [ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null && wait "$qsd_pid" 2>/dev/null
    for m in "$work"/mnt "$work"/export; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m"
    done
    if [ -n "$xfs_image" ]; then
        umount "$work" && rm -f "$xfs_image"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
echo "bench: $(nproc) cores, $(uname -r), work in $(df --output=fstype "$work" | tail -1) at $work, SIZE=$SIZE"

cargo build --release -q
chainfs=$PWD/target/release/chainfs

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }

# fio_value FILE JOBS RW BS -> bandwidth in MiB/s (bs=1M) or IOPS (else)
fio_value() {
    local file=$1 jobs=$2 rw=$3 bs=$4
    local out
    out=$(fio --name=b --filename="$file" --rw="$rw" --bs="$bs" --numjobs="$jobs" \
        --direct=1 --ioengine=psync --time_based --runtime="$RUNTIME" \
        --group_reporting --output-format=json --size="$SIZE" 2>/dev/null)
    python3 -c '
import json, sys
job = json.loads(sys.argv[1])["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
print(round(side["bw"] / 1024, 1) if sys.argv[2] == "1M" else round(side["iops"]))
' "$out" "$bs"
}

# fio_nbd SOCKET EXPORT -> random 4 KiB write IOPS through an NBD export
fio_nbd() {
    local out
    out=$(fio --name=b --ioengine=nbd --uri="nbd+unix:///$2?socket=$1" --rw=randwrite \
        --bs=4k --numjobs=1 --time_based --runtime="$RUNTIME" --size="$SIZE" \
        --output-format=json 2>/dev/null)
    # The nbd engine says "connected" before its JSON.
    python3 -c 'import json, sys; t = sys.argv[1]; print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"]))' "$out"
}

# qmp SOCKET JSON... : sends each command, prints the replies; with
# WAIT_EVENT set, waits for that event and prints the seconds it took.
qmp() {
    python3 - "$@" <<'PY'
import json, os, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
f = sock.makefile("rw")
def read():
    return json.loads(f.readline())
read()
for cmd in ["{\"execute\": \"qmp_capabilities\"}"] + sys.argv[2:]:
    f.write(cmd + "\n"); f.flush()
    start = time.time()
    while True:
        msg = read()
        if "return" in msg or "error" in msg:
            if "error" in msg:
                sys.exit("QMP error: %s" % msg["error"])
            break
wait = os.environ.get("WAIT_EVENT")
if wait:
    while True:
        msg = read()
        if msg.get("event") == wait:
            if msg.get("data", {}).get("error"):
                sys.exit("job failed: %s" % msg["data"]["error"])
            print("%.3f" % (time.time() - start))
            break
PY
}

start_qsd() {
    local socket=$1; shift
    qemu-storage-daemon --chardev socket,id=qmp,path="$socket",server=on,wait=off \
        --monitor chardev=qmp "$@" &
    qsd_pid=$!
    for _ in $(seq 100); do [ -S "$socket" ] && return; sleep 0.1; done
    echo "qemu-storage-daemon did not start" >&2; exit 1
}

stop_qsd() { kill "$qsd_pid"; wait "$qsd_pid" 2>/dev/null || true; qsd_pid=; }

bench_reads() {
    local img=$work/full.qcow2
    qemu-img create -q -f qcow2 "$img" "$SIZE"
    qemu-io -c "write -P 0x5a 0 $SIZE" "$img" >/dev/null
    cat "$img" >/dev/null   # warm the host page cache for both alike
    mkdir -p "$work/mnt"
    "$chainfs" mount --read-only "$img" "$work/mnt"
    local c_seq1 c_seq4 c_rnd1 c_rnd4
    c_seq1=$(fio_value "$work/mnt/full.qcow2" 1 read 1M)
    c_seq4=$(fio_value "$work/mnt/full.qcow2" 4 read 1M)
    c_rnd1=$(fio_value "$work/mnt/full.qcow2" 1 randread 4k)
    c_rnd4=$(fio_value "$work/mnt/full.qcow2" 4 randread 4k)
    "$chainfs" umount "$work/mnt"
    touch "$work/export"
    start_qsd "$work/qmp.sock" \
        --blockdev driver=file,node-name=file0,filename="$img" \
        --blockdev driver=qcow2,node-name=fmt0,file=file0 \
        --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$work/export",writable=off
    sleep 0.5
    local q_seq1 q_seq4 q_rnd1 q_rnd4
    q_seq1=$(fio_value "$work/export" 1 read 1M)
    q_seq4=$(fio_value "$work/export" 4 read 1M)
    q_rnd1=$(fio_value "$work/export" 1 randread 4k)
    q_rnd4=$(fio_value "$work/export" 4 randread 4k)
    stop_qsd
    echo "reads of a $SIZE fully allocated qcow2 (fio O_DIRECT, ${RUNTIME}s each): chainfs | qemu-storage-daemon | ratio"
    echo "  sequential 1M, 1 job : $c_seq1 MiB/s | $q_seq1 MiB/s | $(ratio "$c_seq1" "$q_seq1")"
    echo "  sequential 1M, 4 jobs: $c_seq4 MiB/s | $q_seq4 MiB/s | $(ratio "$c_seq4" "$q_seq4")"
    echo "  random 4K, 1 job     : $c_rnd1 IOPS | $q_rnd1 IOPS | $(ratio "$c_rnd1" "$q_rnd1")"
    echo "  random 4K, 4 jobs    : $c_rnd4 IOPS | $q_rnd4 IOPS | $(ratio "$c_rnd4" "$q_rnd4")"
}

# make_quarters DIR: base.qcow2 <- l1 <- l2 <- top, each a disjoint quarter.
make_quarters() {
    local dir=$1 quarter
    quarter=$(( $(numfmt --from=iec "$SIZE") / 4 ))
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 "$dir/base.qcow2" "$SIZE"
    local prev=base.qcow2 i=0
    for layer in base.qcow2 l1.qcow2 l2.qcow2 top.qcow2; do
        if [ "$layer" != base.qcow2 ]; then
            qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$dir/$layer" "$SIZE"
        fi
        qemu-io -c "write -P $((0x10 + i)) $((i * quarter)) $quarter" "$dir/$layer" >/dev/null
        prev=$layer; i=$((i + 1))
    done
    cat "$dir"/*.qcow2 >/dev/null
}

bench_stream() {
    make_quarters "$work/c"
    make_quarters "$work/q"
    mkdir -p "$work/mnt"
    local start end c_secs q_secs fio_pid
    "$chainfs" mount "$work/c/top.qcow2" "$work/mnt"
    start=$(date +%s.%N)
    echo "stream base=base.qcow2" > "$work/mnt/ctl/command"
    # Random 4K writes on the active layer while the stream runs.
    fio_value "$work/mnt/active" 1 randwrite 4k > "$work/c.iops" &
    fio_pid=$!
    # Timed to within 10 ms, as qsd's is timed by its completion event.
    until grep -q '"outcome"' "$work/mnt/ctl/status.json"; do sleep 0.01; done
    end=$(date +%s.%N)
    grep -q '"outcome": "completed"' "$work/mnt/ctl/status.json"
    wait "$fio_pid"
    "$chainfs" umount "$work/mnt"
    c_secs=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')
    qemu-img check -q "$work/c/top.qcow2"

    # qemu-storage-daemon's writable FUSE export takes the resize permission,
    # which block-stream refuses to share (QEMU 10.0: "Permission conflict
    # ... 'resize'"), so the writes during its stream go through its NBD
    # export instead.
    start_qsd "$work/qmp.sock" \
        --blockdev driver=qcow2,node-name=top,file.driver=file,file.filename="$work/q/top.qcow2" \
        --nbd-server addr.type=unix,addr.path="$work/nbd.sock" \
        --export type=nbd,id=exp0,node-name=top,name=top,writable=on
    sleep 0.5
    fio_nbd "$work/nbd.sock" top > "$work/q.iops" &
    fio_pid=$!
    q_secs=$(WAIT_EVENT=BLOCK_JOB_COMPLETED qmp "$work/qmp.sock" \
        '{"execute": "block-stream", "arguments": {"job-id": "s", "device": "top", "base": "'"$work/q/base.qcow2"'"}}')
    wait "$fio_pid"
    stop_qsd
    qemu-img check -q "$work/q/top.qcow2"
    echo "stream of a four-deep $SIZE chain (each layer a disjoint quarter) into the top: chainfs | qemu-storage-daemon | ratio"
    echo "  time               : ${c_secs}s | ${q_secs}s | $(ratio "$q_secs" "$c_secs") (qsd/chainfs: >1 means chainfs is faster)"
    echo "  4K write IOPS on the active layer during the stream (fio, ${RUNTIME}s; chainfs through its FUSE file, qsd through NBD): $(cat "$work/c.iops") | $(cat "$work/q.iops") | $(ratio "$(cat "$work/c.iops")" "$(cat "$work/q.iops")")"
}

# chainfs_job MNT COMMAND [complete]: runs COMMAND, completes the job once
# it is ready if asked, and prints the seconds until it concluded (status
# polled every 10 ms, as qsd's is timed by its events).
chainfs_job() {
    local mnt=$1 text=$2 complete=${3:-} start end
    start=$(date +%s.%N)
    echo "$text" > "$mnt/ctl/command"
    if [ -n "$complete" ]; then
        until grep -q '"status": "ready"' "$mnt/ctl/status.json"; do sleep 0.01; done
        echo complete > "$mnt/ctl/command"
    fi
    until grep -q '"outcome"' "$mnt/ctl/status.json"; do sleep 0.01; done
    end=$(date +%s.%N)
    grep -q '"outcome": "completed"' "$mnt/ctl/status.json"
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }'
}

# qsd_commit SOCKET ARGS [complete]: block-commit with ARGS (JSON members),
# job-complete on BLOCK_JOB_READY if asked; prints the seconds until
# BLOCK_JOB_COMPLETED.
qsd_commit() {
    python3 - "$@" <<'PY'
import json, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
f = sock.makefile("rw")
def send(cmd):
    f.write(json.dumps(cmd) + "\n"); f.flush()
json.loads(f.readline())
send({"execute": "qmp_capabilities"})
start = time.time()
send({"execute": "block-commit", "arguments": json.loads("{" + sys.argv[2] + "}")})
while True:
    msg = json.loads(f.readline())
    if "error" in msg:
        sys.exit("QMP error: %s" % msg["error"])
    event = msg.get("event")
    if event == "BLOCK_JOB_READY" and len(sys.argv) > 3:
        send({"execute": "job-complete", "arguments": {"id": "c"}})
    elif event == "BLOCK_JOB_COMPLETED":
        if msg.get("data", {}).get("error"):
            sys.exit("job failed: %s" % msg["data"]["error"])
        print("%.3f" % (time.time() - start))
        break
PY
}

# start_qsd_chain DIR: qemu-storage-daemon with the four-deep chain of DIR
# as named nodes base <- l1 <- l2 <- top.
start_qsd_chain() {
    local dir=$1 prev= args=()
    for node in base l1 l2 top; do
        local spec="driver=qcow2,node-name=$node,file.driver=file,file.filename=$dir/$node.qcow2"
        if [ -n "$prev" ]; then spec="$spec,backing=$prev"; fi
        args+=(--blockdev "$spec")
        prev=$node
    done
    start_qsd "$work/qmp.sock" "${args[@]}"
}

bench_commit() {
    local runs=${RUNS:-3} run kind c q c_sum=0 q_sum=0
    echo "commit of a four-deep $SIZE chain (each layer a disjoint quarter): chainfs | qemu-storage-daemon | ratio (qsd/chainfs: >1 means chainfs is faster)"
    for kind in intermediate active; do
        c_sum=0; q_sum=0
        for run in $(seq "$runs"); do
            rm -rf "$work/c" "$work/q"
            make_quarters "$work/c"
            make_quarters "$work/q"
            mkdir -p "$work/mnt"
            "$chainfs" mount "$work/c/top.qcow2" "$work/mnt"
            if [ "$kind" = intermediate ]; then
                c=$(chainfs_job "$work/mnt" "commit top=l2.qcow2 base=base.qcow2")
            else
                c=$(chainfs_job "$work/mnt" "commit top=active base=base.qcow2" complete)
            fi
            "$chainfs" umount "$work/mnt"
            qemu-img check -q "$work/c/base.qcow2"
            start_qsd_chain "$work/q"
            if [ "$kind" = intermediate ]; then
                q=$(qsd_commit "$work/qmp.sock" '"job-id": "c", "device": "top", "top-node": "l2", "base-node": "base"')
            else
                q=$(qsd_commit "$work/qmp.sock" '"job-id": "c", "device": "top", "base-node": "base"' complete)
            fi
            stop_qsd
            qemu-img check -q "$work/q/base.qcow2"
            echo "  $kind, run $run: ${c}s | ${q}s | $(ratio "$q" "$c")"
            c_sum=$(awk -v a="$c_sum" -v b="$c" 'BEGIN { print a + b }')
            q_sum=$(awk -v a="$q_sum" -v b="$q" 'BEGIN { print a + b }')
        done
        echo "  $kind, total of $runs: ${c_sum}s | ${q_sum}s | $(ratio "$q_sum" "$c_sum")"
    done
}

# mount_fg IMAGE MNT: `chainfs mount -f` in the background; sets mount_pid.
mount_fg() {
    mkdir -p "$2"
    "$chainfs" mount -f --read-only "$1" "$2" &
    mount_pid=$!
    local _
    for _ in $(seq 300); do mountpoint -q "$2" && return; sleep 0.1; done
    echo "bench: $1 did not mount on $2" >&2; exit 1
}

umount_fg() { "$chainfs" umount "$1"; wait "$mount_pid" || true; }

bench_memory() {
    local dir=$work/memory depth=100 writes=128 regions l i region img prev= iops
    regions=$(( (1 << 40) / (512 << 20) ))
    mkdir -p "$dir"
    for ((l = 0; l < depth; l++)); do
        img=l$l.qcow2
        if [ -z "$prev" ]; then
            qemu-img create -q -f qcow2 "$dir/$img" 1T
        else
            qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$dir/$img" 1T
        fi
        local args=()
        for ((i = 0; i < writes; i++)); do
            region=$(( (l * 7919 + i * 104729) % regions ))
            args+=(-c "write -P $(( l % 255 + 1 )) $(( region * (512 << 20) + (l % 8192) * 65536 )) 4k")
        done
        qemu-io "${args[@]}" "$dir/$img" >/dev/null
        prev=$img
    done
    mount_fg "$dir/$img" "$work/mnt"
    iops=$(RUNTIME=${MEM_RUNTIME:-60} SIZE=1T fio_value "$work/mnt/$img" 4 randread 4k)
    local peak
    peak=$(awk '/VmHWM/ { print $2 }' "/proc/$mount_pid/status")
    umount_fg "$work/mnt"
    echo "1 TiB virtual, $depth-deep chain, $writes scattered writes a layer, random 4K reads (4 jobs, ${MEM_RUNTIME:-60}s), default --cache-size:"
    echo "  peak RSS of the daemon: $(( peak / 1024 )) MiB (target: under 64 MiB); $iops IOPS"
}

bench_deep() {
    local dir=$work/deep prev=n0999.qcow2
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 "$dir/base.qcow2" "$SIZE"
    qemu-io -c "write -P 0x5a 0 $SIZE" "$dir/base.qcow2" >/dev/null
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$dir/n0001.qcow2" "$SIZE"
    # The other overlays are copies of one template with the backing name
    # patched (same length), far faster than 998 runs of qemu-img.
    qemu-img create -q -f qcow2 -u -b n0000.qcow2 -F qcow2 "$dir/template.qcow2" "$SIZE"
    python3 - "$dir" <<'PY'
import struct, sys
d = sys.argv[1]
t = bytearray(open(f"{d}/template.qcow2", "rb").read())
at, = struct.unpack(">Q", t[8:16])
for i in range(2, 1000):
    t[at:at + 11] = b"n%04d.qcow2" % (i - 1)
    open(f"{d}/n%04d.qcow2" % i, "wb").write(t)
PY
    rm "$dir/template.qcow2"
    cat "$dir/base.qcow2" >/dev/null   # warm the host page cache for both alike
    local d1 d4 s1 s4
    mount_fg "$dir/$prev" "$work/mnt"
    d1=$(fio_value "$work/mnt/$prev" 1 randread 4k)
    d4=$(fio_value "$work/mnt/$prev" 4 randread 4k)
    umount_fg "$work/mnt"
    mount_fg "$dir/base.qcow2" "$work/mnt"
    s1=$(fio_value "$work/mnt/base.qcow2" 1 randread 4k)
    s4=$(fio_value "$work/mnt/base.qcow2" 4 randread 4k)
    umount_fg "$work/mnt"
    echo "random 4K reads of base data (fio O_DIRECT, ${RUNTIME}s each): 1,000-deep | 1-deep | ratio (target: within 2x)"
    echo "  1 job : $d1 IOPS | $s1 IOPS | $(ratio "$s1" "$d1")"
    echo "  4 jobs: $d4 IOPS | $s4 IOPS | $(ratio "$s4" "$d4")"
}

case $what in
    reads) bench_reads ;;
    memory) bench_memory ;;
    deep) bench_deep ;;
    stream) bench_stream ;;
    commit) bench_commit ;;
    all) bench_reads; bench_stream; bench_commit ;;
    *) echo "usage: $0 [reads|stream|commit|all|memory|deep]" >&2; exit 2 ;;
esac
