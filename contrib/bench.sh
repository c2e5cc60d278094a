#!/usr/bin/env bash
# chainfs against qemu-storage-daemon on the same images, in the same run,
# reported as ratios (SPEC §7). Needs root (qemu-storage-daemon's FUSE
# export, loop mounts), fio, qemu-utils, and builds chainfs in release.
#
#   contrib/bench.sh [reads|writes|alloc|jobs|load|backup|all|memory|deep]...
#
# Every figure is measured RUNS times, chainfs and qsd one after the other
# within each repetition (so a machine that slows down slows both); the
# table shows the medians of each side and the median of the per-repetition
# ratios, where a ratio above 1 always means chainfs is the better.
#
# reads : a fully allocated qcow2 of SIZE, read through chainfs's node file
#         and through qsd's FUSE export: sequential 1 MiB and random 4 KiB,
#         1 and 4 fio jobs, O_DIRECT and buffered.
# writes: the same image writable: sequential 1 MiB and random 4 KiB
#         writes, O_DIRECT, 1 and 4 jobs.
# alloc : writes into an empty overlay that each allocate a new 64 KiB
#         cluster (64 KiB writes, and 4 KiB writes at cluster starts),
#         1 and 4 jobs, O_DIRECT, a fresh overlay each time. Beside
#         them, the same writes into a sparse raw image through chainfs:
#         one pwrite per write and no metadata, the most any format can
#         get through chainfs's FUSE transport (its ratio to qsd bounds
#         the qcow2 one).
# jobs  : a four-deep chain of SIZE, each layer a disjoint quarter:
#         stream without base and onto the bottom node, intermediate commit
#         (two layers into the base), active commit and a full mirror to a
#         new qcow2 (each to ready, then complete), against qsd's
#         block-stream / block-commit / drive-mirror. Beside each, a
#         floor: the fastest plain copy (copy_file_range by one thread
#         or two, the kernel's own copy) of the bytes the job must write
#         into one file, to a new file in the same directory; its ratio
#         to qsd is about the most any program that writes those bytes
#         can reach on this file system.
# load  : the same jobs at speed=LOAD_SPEED while fio reads 4 KiB at
#         random from the top for LOAD_SECONDS: the read IOPS kept, as a
#         share of the same reads with no job (qsd read through NBD, since
#         its FUSE export cannot share the chain with a job), and the
#         write IOPS on the active layer during an unlimited stream.
# backup: a full backup of the same chain's top while fio writes 4 KiB at
#         random on the active layer (qsd's through NBD): the backup's time
#         and the writes' IOPS during it; then a full backup with no writes
#         that anchors a dirty bitmap, and after it 1 % of the disk rewritten (64 KiB
#         writes at random) and an incremental backup (sync=incremental)
#         into a qcow2 backed by the anchor, against qsd's drive-backup.
# The peak RSS of each daemon is recorded after the reads and the jobs.
#
# chainfs alone (not part of `all`):
# memory: a 1 TiB virtual, 100-deep qcow2 chain, each layer holding 128
#         scattered 4 KiB writes, each in the range of an L2 table of its
#         own (so random reads load the tables of every layer), read at
#         random (fio 4 KiB, 4 jobs, MEM_RUNTIME=60 s) through the top node
#         file: the peak RSS (VmHWM) with the default --cache-size, which
#         must stay under 64 MiB.
# deep:   random 4 KiB reads (fio, 1 and 4 jobs) of data in the base of a
#         1,000-deep chain (999 empty qcow2 overlays on a SIZE fully
#         allocated qcow2 base) against the base alone, mounted alike.
#
# Settings (environment): SIZE=1G RUNTIME=10 (seconds per fio run) RUNS=3
# LOAD_SPEED=256M LOAD_SECONDS=2; BENCH_DIR (default /dev/shm, a tmpfs:
# the figures then measure the two programs, not the disk); BENCH_FS=xfs
# makes an XFS filesystem with reflink in a loop file under BENCH_DIR and
# works there, where jobs share extents instead of copying them;
# BENCH_OUT (default ./bench-result.json) receives every measurement and
# the medians as JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
RUNS=${RUNS:-3}
LOAD_SPEED=${LOAD_SPEED:-256M}
LOAD_SECONDS=${LOAD_SECONDS:-2}
out=${BENCH_OUT:-$PWD/bench-result.json}
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(all)
for section in "${sections[@]}"; do
    case $section in
        reads|writes|alloc|jobs|load|backup|all|memory|deep) ;;
        *) echo "usage: $0 [reads|writes|alloc|jobs|load|backup|all|memory|deep]..." >&2; exit 2 ;;
    esac
done

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
fstype=$(df --output=fstype "$work" | tail -1 | tr -d ' ')
machine="$(nproc) cores, $(free -g | awk '/Mem:/ { print $2 }') GiB, $(uname -r), $fstype, qemu $(qemu-img --version | head -1 | awk '{ print $3 }'), fio $(fio --version)"
echo "bench: $machine; SIZE=$SIZE RUNTIME=$RUNTIME RUNS=$RUNS"

cargo build --release -q
chainfs=$PWD/target/release/chainfs
mnt=$work/mnt
export_point=$work/export
results=$work/results.jsonl
: > "$results"
run=0

# record FIGURE UNIT BETTER CHAINFS QSD: one measurement of both sides;
# BETTER is `higher` (throughput) or `lower` (time, memory).
record() {
    echo "{\"figure\": \"$1\", \"unit\": \"$2\", \"better\": \"$3\", \"run\": $run, \"chainfs\": $4, \"qsd\": $5}" >> "$results"
    printf '  run %s  %-52s %12s | %12s %s\n' "$run" "$1" "$4" "$5" "$2"
}

# record_alone FIGURE UNIT VALUE: a figure of chainfs alone.
record_alone() {
    echo "{\"figure\": \"$1\", \"unit\": \"$2\", \"better\": \"none\", \"run\": $run, \"chainfs\": $3, \"qsd\": null}" >> "$results"
    printf '  run %s  %-52s %12s %s\n' "$run" "$1" "$3" "$2"
}

# fio_json ARGS...: fio's JSON for one group of jobs.
fio_json() {
    fio --name=b --group_reporting --output-format=json "$@" 2>/dev/null
}

# fio_value JSON: MiB/s when the block size is 1 MiB, else IOPS, of the
# side (read or write) that moved data.
fio_value() {
    python3 -c '
import json, sys
text = sys.stdin.read()
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] else job["write"]
bs = job["job options"].get("bs", "4k")
print(round(side["bw"] / 1024, 1) if bs == "1M" else round(side["iops"]))
'
}

# fio_file FILE JOBS RW BS DIRECT [EXTRA...] -> MiB/s or IOPS, time based.
fio_file() {
    local file=$1 jobs=$2 rw=$3 bs=$4 direct=$5
    shift 5
    fio_json --filename="$file" --rw="$rw" --bs="$bs" --numjobs="$jobs" \
        --direct="$direct" --ioengine=psync --time_based --runtime="$RUNTIME" \
        --size="$SIZE" "$@" | fio_value
}

# fio_nbd SOCKET EXPORT RW SECONDS -> 4 KiB IOPS through an NBD export.
fio_nbd() {
    fio_json --ioengine=nbd --uri="nbd+unix:///$2?socket=$1" --rw="$3" --bs=4k \
        --numjobs=1 --time_based --runtime="$4" --size="$SIZE" | fio_value
}

# peak_rss PID -> the process's peak resident set in MiB.
peak_rss() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# The pid of the chainfs daemon serving $mnt.
chainfs_pid() { pgrep -f "chainfs mount .* $mnt\$" | head -1; }

start_qsd() {
    local socket=$work/qmp.sock
    rm -f "$socket"
    qemu-storage-daemon --chardev socket,id=qmp,path="$socket",server=on,wait=off \
        --monitor chardev=qmp "$@" &
    qsd_pid=$!
    for _ in $(seq 100); do [ -S "$socket" ] && return; sleep 0.1; done
    echo "qemu-storage-daemon did not start" >&2; exit 1
}

stop_qsd() { kill "$qsd_pid"; wait "$qsd_pid" 2>/dev/null || true; qsd_pid=; }

# qsd_export IMAGE WRITABLE: qsd with IMAGE (qcow2) exported over FUSE at
# $export_point.
qsd_export() {
    touch "$export_point"
    start_qsd --blockdev driver=file,node-name=file0,filename="$1" \
        --blockdev driver=qcow2,node-name=fmt0,file=file0 \
        --export type=fuse,id=exp0,node-name=fmt0,mountpoint="$export_point",writable="$2"
    for _ in $(seq 100); do mountpoint -q "$export_point" && return; sleep 0.05; done
    echo "qemu-storage-daemon's export did not appear" >&2; exit 1
}

# full_image PATH: a qcow2 of SIZE with every cluster allocated.
full_image() {
    qemu-img create -q -f qcow2 "$1" "$SIZE"
    qemu-io -c "write -P 0x5a 0 $SIZE" "$1" >/dev/null
    cat "$1" >/dev/null   # in the host page cache for both alike
}

bench_reads() {
    echo "reads of a $SIZE fully allocated qcow2 (fio, ${RUNTIME}s each)"
    local img=$work/full.qcow2 spec name jobs rw bs direct c q c_rss q_rss
    full_image "$img"
    local specs=("1 read 1M 1" "4 read 1M 1" "1 randread 4k 1" "4 randread 4k 1"
        "1 read 1M 0" "1 randread 4k 0")
    for run in $(seq "$RUNS"); do
        declare -A cf=()
        mkdir -p "$mnt"
        "$chainfs" mount --read-only "$img" "$mnt"
        for spec in "${specs[@]}"; do
            read -r jobs rw bs direct <<< "$spec"
            cf[$spec]=$(fio_file "$mnt/full.qcow2" "$jobs" "$rw" "$bs" "$direct")
        done
        c_rss=$(peak_rss "$(chainfs_pid)")
        "$chainfs" umount "$mnt"
        qsd_export "$img" off
        for spec in "${specs[@]}"; do
            read -r jobs rw bs direct <<< "$spec"
            q=$(fio_file "$export_point" "$jobs" "$rw" "$bs" "$direct")
            name="$rw $bs, $jobs job(s), $([ "$direct" = 1 ] && echo O_DIRECT || echo buffered)"
            record "read: $name" "$([ "$bs" = 1M ] && echo MiB/s || echo IOPS)" higher "${cf[$spec]}" "$q"
        done
        q_rss=$(peak_rss "$qsd_pid")
        stop_qsd
        record "peak RSS after the reads" MiB lower "$c_rss" "$q_rss"
        unset cf
    done
}

bench_writes() {
    echo "writes into a $SIZE fully allocated qcow2 (fio O_DIRECT, ${RUNTIME}s each)"
    local img=$work/full.qcow2 spec jobs rw bs c q
    full_image "$img"
    local specs=("1 write 1M" "1 randwrite 4k" "4 randwrite 4k")
    for run in $(seq "$RUNS"); do
        declare -A cf=()
        mkdir -p "$mnt"
        "$chainfs" mount "$img" "$mnt"
        for spec in "${specs[@]}"; do
            read -r jobs rw bs <<< "$spec"
            cf[$spec]=$(fio_file "$mnt/active" "$jobs" "$rw" "$bs" 1)
        done
        "$chainfs" umount "$mnt"
        qemu-img check -q "$img"
        qsd_export "$img" on
        for spec in "${specs[@]}"; do
            read -r jobs rw bs <<< "$spec"
            q=$(fio_file "$export_point" "$jobs" "$rw" "$bs" 1)
            record "write: $rw $bs, $jobs job(s), O_DIRECT" "$([ "$bs" = 1M ] && echo MiB/s || echo IOPS)" higher "${cf[$spec]}" "$q"
        done
        stop_qsd
        qemu-img check -q "$img"
        unset cf
    done
}

# fio_alloc FILE JOBS BS -> IOPS of writes that each allocate a cluster:
# each job writes its own share of the image once, one write per 64 KiB
# cluster: 64 KiB writes at random, 4 KiB writes at each cluster's start.
fio_alloc() {
    local file=$1 jobs=$2 bs=$3 size pattern=randwrite writes
    size=$(( $(numfmt --from=iec "$SIZE") / jobs ))
    writes=$size
    if [ "$bs" = 4k ]; then
        pattern=write:60k
        # One 4 KiB write per 64 KiB: without the bound, fio would go
        # round its share again and write the same clusters in place.
        writes=$(( size / 16 ))
    fi
    fio_json --filename="$file" --rw="$pattern" --bs="$bs" --numjobs="$jobs" \
        --size="$size" --io_size="$writes" --offset_increment="$size" --direct=1 \
        --ioengine=psync | fio_value
}

# empty_overlay DIR: base.qcow2 (empty) <- top.qcow2 (empty), 64 KiB clusters.
empty_overlay() {
    rm -rf "$1"; mkdir -p "$1"
    qemu-img create -q -f qcow2 "$1/base.qcow2" "$SIZE"
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$1/top.qcow2" "$SIZE"
}

# raw_writes JOBS BS -> IOPS of fio_alloc's writes into a sparse raw image
# of SIZE mounted by chainfs.
raw_writes() {
    local iops
    rm -rf "$work/r"; mkdir -p "$work/r" "$mnt"
    truncate -s "$SIZE" "$work/r/disk.raw"
    # Error level: a raw image named alone draws a probing warning.
    RUST_LOG=error "$chainfs" mount "$work/r/disk.raw" "$mnt"
    iops=$(fio_alloc "$mnt/active" "$1" "$2")
    "$chainfs" umount "$mnt"
    echo "$iops"
}

bench_alloc() {
    echo "allocating writes into an empty $SIZE overlay (fio O_DIRECT, one write per new cluster)"
    local spec jobs bs c q
    for run in $(seq "$RUNS"); do
        for spec in "1 64k" "4 64k" "1 4k" "4 4k"; do
            read -r jobs bs <<< "$spec"
            empty_overlay "$work/a"
            mkdir -p "$mnt"
            "$chainfs" mount "$work/a/top.qcow2" "$mnt"
            c=$(fio_alloc "$mnt/active" "$jobs" "$bs")
            "$chainfs" umount "$mnt"
            qemu-img check -q "$work/a/top.qcow2"
            empty_overlay "$work/a"
            qsd_export "$work/a/top.qcow2" on
            q=$(fio_alloc "$export_point" "$jobs" "$bs")
            stop_qsd
            qemu-img check -q "$work/a/top.qcow2"
            record "allocating write: $bs, $jobs job(s)" IOPS higher "$c" "$q"
            record "  ceiling of $bs, $jobs job(s): a raw image" IOPS higher "$(raw_writes "$jobs" "$bs")" "$q"
        done
    done
}

# make_quarters DIR: base.qcow2 <- l1 <- l2 <- top, each a disjoint quarter.
make_quarters() {
    local dir=$1 quarter prev=base.qcow2 i=0 layer
    quarter=$(( $(numfmt --from=iec "$SIZE") / 4 ))
    rm -rf "$dir"; mkdir -p "$dir"
    qemu-img create -q -f qcow2 "$dir/base.qcow2" "$SIZE"
    for layer in base.qcow2 l1.qcow2 l2.qcow2 top.qcow2; do
        if [ "$layer" != base.qcow2 ]; then
            qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$dir/$layer" "$SIZE"
        fi
        qemu-io -c "write -P $((0x10 + i)) $((i * quarter)) $quarter" "$dir/$layer" >/dev/null
        prev=$layer; i=$((i + 1))
    done
    cat "$dir"/*.qcow2 >/dev/null
}

# The four jobs: name, chainfs command, qsd QMP command (JSON), whether
# it needs `complete`, and the image qemu-img check must pass after it.
job_names=("stream, no base" "stream onto the bottom node" "commit, intermediate" "commit, active" "mirror, sync=full")
job_chainfs=("stream" "stream base=base.qcow2" "commit top=l2.qcow2 base=base.qcow2" "commit top=active base=base.qcow2" "mirror target=$work/c/copy.qcow2")
job_qsd=('"block-stream", "arguments": {"job-id": "j", "device": "top"'
    '"block-stream", "arguments": {"job-id": "j", "device": "top", "base-node": "base"'
    '"block-commit", "arguments": {"job-id": "j", "device": "top", "top-node": "l2", "base-node": "base"'
    '"block-commit", "arguments": {"job-id": "j", "device": "top", "base-node": "base"'
    '"drive-mirror", "arguments": {"job-id": "j", "device": "top", "target": "'"$work/q/copy.qcow2"'", "format": "qcow2", "sync": "full", "mode": "absolute-paths"')
job_complete=("" "" "" complete complete)
# The quarters of the chain each job writes into one file.
job_quarters=(3 2 2 3 4)
job_checked=(top top base base copy)

# Both sides' jobs are timed by the daemon's own event timestamps (QMP's
# `timestamp`, which ctl/events carries too): from the command to
# BLOCK_JOB_COMPLETED, less the time the client took to send `complete`
# after BLOCK_JOB_READY. So the client's reaction time counts for neither,
# and chainfs's status is polled only every 20 ms: a tighter poll would
# take CPU from the job it measures.

# chainfs_job COMMAND [complete]: runs COMMAND on $mnt, completes it once
# ready if asked, and prints its seconds. Fails unless every job listed
# completed.
chainfs_job() {
    python3 - "$mnt/ctl" "$@" <<'PY'
import json, sys, time
ctl, command = sys.argv[1], sys.argv[2]
complete = len(sys.argv) > 3 and sys.argv[3]
def jobs():
    with open(ctl + "/status.json") as f:
        return json.load(f)
def event_time(name, after):
    with open(ctl + "/events") as f:
        for line in f:
            event = json.loads(line)
            stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
            if event["event"] == name and stamp >= after:
                return stamp
    sys.exit("no %s event" % name)
start = time.time()
with open(ctl + "/command", "w") as f:
    f.write(command + "\n")
while complete and not any(j["status"] == "ready" for j in jobs()):
    time.sleep(0.02)
reaction = 0
if complete:
    sent = time.time()
    reaction = sent - event_time("BLOCK_JOB_READY", start)
    with open(ctl + "/command", "w") as f:
        f.write("complete\n")
while not all("outcome" in j for j in jobs()):
    time.sleep(0.02)
failed = [j for j in jobs() if j["outcome"] != "completed"]
if failed:
    sys.exit("job failed: %s" % failed)
print("%.3f" % (event_time("BLOCK_JOB_COMPLETED", start) - start - reaction))
PY
}

# qmp MODE COMMAND [complete]: sends one QMP command (the inside of its
# JSON) to qsd. MODE `command`: returns once QMP replied. MODE `job`: a
# job's command, job-complete on BLOCK_JOB_READY if asked; prints its
# seconds. Fails on a QMP error or a failed job.
qmp() {
    python3 - "$work/qmp.sock" "$@" <<'PY'
import json, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
mode, command = sys.argv[2], sys.argv[3]
complete = len(sys.argv) > 4 and sys.argv[4]
f = sock.makefile("rw")
def send(cmd):
    f.write(json.dumps(cmd) + "\n"); f.flush()
def receive():
    msg = json.loads(f.readline())
    if "error" in msg:
        sys.exit("QMP error: %s" % msg["error"])
    return msg
def stamp(msg):
    return msg["timestamp"]["seconds"] + msg["timestamp"]["microseconds"] / 1e6
receive()
send({"execute": "qmp_capabilities"})
while "return" not in receive():
    pass
start = time.time()
reaction = 0
send(json.loads('{"execute": ' + command + "}}"))
while True:
    msg = receive()
    event = msg.get("event")
    if mode == "command" and "return" in msg:
        break
    if event == "BLOCK_JOB_READY" and complete:
        reaction = time.time() - stamp(msg)
        send({"execute": "job-complete", "arguments": {"id": "j"}})
    elif event == "BLOCK_JOB_COMPLETED":
        if msg.get("data", {}).get("error"):
            sys.exit("job failed: %s" % msg["data"]["error"])
        print("%.3f" % (stamp(msg) - start - reaction))
        break
PY
}

qsd_job() { qmp job "$@"; }
qsd_command() { qmp command "$1"; }

# start_qsd_chain DIR [EXTRA...]: qsd with the four-deep chain of DIR as
# named nodes base <- l1 <- l2 <- top.
start_qsd_chain() {
    local dir=$1 prev= args=() node
    shift
    for node in base l1 l2 top; do
        local spec="driver=qcow2,node-name=$node,file.driver=file,file.filename=$dir/$node.qcow2"
        if [ -n "$prev" ]; then spec="$spec,backing=$prev"; fi
        args+=(--blockdev "$spec")
        prev=$node
    done
    start_qsd "${args[@]}" "$@"
}

# copy_floor QUARTERS -> the seconds the fastest plain copy takes to put
# QUARTERS quarters of SIZE, held in the page cache, into a new file
# beside them: copy_file_range (the kernel's own copy, no user space) in
# 1 MiB pieces by one thread and by two, the better of the two.
copy_floor() {
    local src=$work/floor.src dst=$work/floor.dst bytes
    bytes=$(( $(numfmt --from=iec "$SIZE") / 4 * $1 ))
    dd if=/dev/zero of="$src" bs=1M count=$(( bytes >> 20 )) status=none
    python3 - "$src" "$dst" "$bytes" <<'PY'
import os, sys, threading, time
src, dst, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
PIECE = 1 << 20
def copy(threads):
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    def worker(first):
        for at in range(first * PIECE, total, threads * PIECE):
            done = 0
            while done < PIECE:
                done += os.copy_file_range(fin, fout, PIECE - done, at + done, at + done)
    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    start = time.time()
    for w in workers: w.start()
    for w in workers: w.join()
    seconds = time.time() - start
    os.close(fin); os.close(fout); os.unlink(dst)
    return seconds
print("%.3f" % min(copy(1), copy(2)))
PY
    rm -f "$src"
}

bench_jobs() {
    echo "jobs on a four-deep $SIZE chain (each layer a disjoint quarter), in seconds"
    local i c q c_rss q_rss
    for run in $(seq "$RUNS"); do
        for i in "${!job_names[@]}"; do
            make_quarters "$work/c"
            mkdir -p "$mnt"
            "$chainfs" mount "$work/c/top.qcow2" "$mnt"
            c=$(chainfs_job "${job_chainfs[$i]}" "${job_complete[$i]}")
            c_rss=$(peak_rss "$(chainfs_pid)")
            "$chainfs" umount "$mnt"
            qemu-img check -q "$work/c/${job_checked[$i]}.qcow2"
            make_quarters "$work/q"
            start_qsd_chain "$work/q"
            q=$(qsd_job "${job_qsd[$i]}" "${job_complete[$i]}")
            q_rss=$(peak_rss "$qsd_pid")
            stop_qsd
            qemu-img check -q "$work/q/${job_checked[$i]}.qcow2"
            record "${job_names[$i]}" s lower "$c" "$q"
            record "  floor of ${job_names[$i]}" s lower "$(copy_floor "${job_quarters[$i]}")" "$q"
        done
        record "peak RSS after a job" MiB lower "$c_rss" "$q_rss"
    done
}

# fio_reads_during FILE SECONDS -> random 4 KiB read IOPS on FILE.
fio_reads_during() {
    fio_json --filename="$1" --rw=randread --bs=4k --numjobs=1 --direct=1 \
        --ioengine=psync --time_based --runtime="$2" --size="$SIZE" | fio_value
}

bench_load() {
    echo "reads kept during jobs at speed=$LOAD_SPEED (4 KiB random reads of the top for ${LOAD_SECONDS}s, % of the same reads with no job)"
    local i idle busy c q speed fio_pid
    speed=$(numfmt --from=iec "$LOAD_SPEED")
    for run in $(seq "$RUNS"); do
        for i in "${!job_names[@]}"; do
            make_quarters "$work/c"
            mkdir -p "$mnt"
            "$chainfs" mount "$work/c/top.qcow2" "$mnt"
            # A first pass loads the metadata, so that the idle figure is
            # not that of a cold cache.
            fio_reads_during "$mnt/top.qcow2" "$LOAD_SECONDS" > /dev/null
            idle=$(fio_reads_during "$mnt/top.qcow2" "$LOAD_SECONDS")
            fio_reads_during "$mnt/top.qcow2" "$LOAD_SECONDS" > "$work/busy" &
            fio_pid=$!
            chainfs_job "${job_chainfs[$i]} speed=$LOAD_SPEED" "${job_complete[$i]}" > /dev/null
            wait "$fio_pid"
            busy=$(cat "$work/busy")
            c=$(awk -v b="$busy" -v i="$idle" 'BEGIN { printf "%.1f", 100 * b / i }')
            "$chainfs" umount "$mnt"
            make_quarters "$work/q"
            start_qsd_chain "$work/q" \
                --nbd-server addr.type=unix,addr.path="$work/nbd.sock" \
                --export type=nbd,id=exp0,node-name=top,name=top,writable=on
            sleep 0.3
            fio_nbd "$work/nbd.sock" top randread "$LOAD_SECONDS" > /dev/null
            idle=$(fio_nbd "$work/nbd.sock" top randread "$LOAD_SECONDS")
            fio_nbd "$work/nbd.sock" top randread "$LOAD_SECONDS" > "$work/busy" &
            fio_pid=$!
            qsd_job "${job_qsd[$i]}, \"speed\": $speed" "${job_complete[$i]}" > /dev/null
            wait "$fio_pid"
            busy=$(cat "$work/busy")
            q=$(awk -v b="$busy" -v i="$idle" 'BEGIN { printf "%.1f", 100 * b / i }')
            stop_qsd
            record "reads kept during ${job_names[$i]}" % higher "$c" "$q"
        done
        # Writes on the active layer while an unlimited stream runs.
        make_quarters "$work/c"
        "$chainfs" mount "$work/c/top.qcow2" "$mnt"
        echo "stream base=base.qcow2" > "$mnt/ctl/command"
        c=$(fio_file "$mnt/active" 1 randwrite 4k 1)
        "$chainfs" umount "$mnt"
        qemu-img check -q "$work/c/top.qcow2"
        make_quarters "$work/q"
        start_qsd_chain "$work/q" \
            --nbd-server addr.type=unix,addr.path="$work/nbd.sock" \
            --export type=nbd,id=exp0,node-name=top,name=top,writable=on
        sleep 0.3
        fio_nbd "$work/nbd.sock" top randwrite "$RUNTIME" > "$work/busy" &
        fio_pid=$!
        qsd_job "${job_qsd[1]}" > /dev/null
        wait "$fio_pid"
        stop_qsd
        qemu-img check -q "$work/q/top.qcow2"
        record "4K random write IOPS on the active layer during a stream" IOPS higher "$c" "$(cat "$work/busy")"
    done
}

# guest_writes FIO_ARGS...: 4 KiB random writes in the background until
# stopped (SIGINT, after which fio still writes its JSON to
# $work/guest.json); sets fio_pid.
guest_writes() {
    fio --name=b --group_reporting --output-format=json --rw=randwrite --bs=4k \
        --numjobs=1 --time_based --runtime=600 --size="$SIZE" "$@" > "$work/guest.json" 2>/dev/null &
    fio_pid=$!
    sleep 0.2
}

# guest_iops: stops the writes guest_writes started; prints their IOPS.
guest_iops() {
    kill -INT "$fio_pid"
    wait "$fio_pid" || true
    fio_value < "$work/guest.json"
}

bench_backup() {
    echo "backups of the four-deep $SIZE chain's top, in seconds, while the guest writes 4 KiB at random"
    local c q cw qw ca qa ci qi one nbd=$work/nbd.sock
    one=$(( $(numfmt --from=iec "$SIZE") / 100 ))
    for run in $(seq "$RUNS"); do
        make_quarters "$work/c"
        mkdir -p "$mnt"
        "$chainfs" mount "$work/c/top.qcow2" "$mnt"
        guest_writes --filename="$mnt/active" --direct=1 --ioengine=psync
        c=$(chainfs_job "backup target=$work/c/full.qcow2 sync=full")
        cw=$(guest_iops)
        echo dismiss > "$mnt/ctl/command"
        # A quiet full backup anchors the bitmap, so that the incremental
        # copies only the 1 % rewritten after it.
        echo "bitmap-add node=active name=b0" > "$mnt/ctl/command"
        ca=$(chainfs_job "backup target=$work/c/anchor.qcow2 sync=full bitmap=b0 bitmap-mode=on-success")
        echo dismiss > "$mnt/ctl/command"
        fio_json --filename="$mnt/active" --rw=randwrite --bs=64k --io_size="$one" \
            --size="$SIZE" --direct=1 --ioengine=psync > /dev/null
        qemu-img create -q -f qcow2 -b anchor.qcow2 -F qcow2 "$work/c/inc.qcow2" "$SIZE"
        ci=$(chainfs_job "backup target=$work/c/inc.qcow2 sync=incremental bitmap=b0 mode=existing")
        "$chainfs" umount "$mnt"
        for image in full anchor inc; do qemu-img check -q "$work/c/$image.qcow2"; done
        make_quarters "$work/q"
        start_qsd_chain "$work/q" --nbd-server addr.type=unix,addr.path="$nbd" \
            --export type=nbd,id=exp0,node-name=top,name=top,writable=on
        sleep 0.3
        guest_writes --ioengine=nbd --uri="nbd+unix:///top?socket=$nbd"
        q=$(qsd_job '"drive-backup", "arguments": {"job-id": "j", "device": "top", "target": "'"$work/q/full.qcow2"'", "format": "qcow2", "sync": "full", "mode": "absolute-paths"')
        qw=$(guest_iops)
        qsd_command '"block-dirty-bitmap-add", "arguments": {"node": "top", "name": "b0"'
        qa=$(qsd_job '"drive-backup", "arguments": {"job-id": "j", "device": "top", "target": "'"$work/q/anchor.qcow2"'", "format": "qcow2", "sync": "full", "mode": "absolute-paths", "bitmap": "b0", "bitmap-mode": "on-success"')
        fio_json --ioengine=nbd --uri="nbd+unix:///top?socket=$nbd" --rw=randwrite --bs=64k \
            --io_size="$one" --size="$SIZE" > /dev/null
        qemu-img create -q -f qcow2 -b anchor.qcow2 -F qcow2 "$work/q/inc.qcow2" "$SIZE"
        qi=$(qsd_job '"drive-backup", "arguments": {"job-id": "j", "device": "top", "target": "'"$work/q/inc.qcow2"'", "format": "qcow2", "sync": "incremental", "mode": "existing", "bitmap": "b0"')
        stop_qsd
        for image in full anchor inc; do qemu-img check -q "$work/q/$image.qcow2"; done
        record "backup, sync=full, under 4K random writes" s lower "$c" "$q"
        record "guest 4K random write IOPS during the backup" IOPS higher "$cw" "$qw"
        record "backup, sync=full, no writes (anchoring a bitmap)" s lower "$ca" "$qa"
        record "backup, sync=incremental, after 1 % rewritten" s lower "$ci" "$qi"
    done
}

bench_memory() {
    local dir=$work/memory depth=100 writes=128 regions l i region img prev= iops peak
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
    echo "1 TiB virtual, $depth-deep chain, $writes scattered writes a layer, random 4K reads (4 jobs, ${MEM_RUNTIME:-60}s), default --cache-size"
    for run in $(seq "$RUNS"); do
        mkdir -p "$mnt"
        "$chainfs" mount --read-only "$dir/$img" "$mnt"
        iops=$(RUNTIME=${MEM_RUNTIME:-60} SIZE=1T fio_file "$mnt/$img" 4 randread 4k 1)
        peak=$(peak_rss "$(chainfs_pid)")
        "$chainfs" umount "$mnt"
        record_alone "1 TiB 100-deep chain, random reads: peak RSS (target < 64)" MiB "$peak"
        record_alone "1 TiB 100-deep chain, random reads: IOPS" IOPS "$iops"
    done
}

bench_deep() {
    local dir=$work/deep top=n0999.qcow2 d1 d4 s1 s4
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
    cat "$dir/base.qcow2" >/dev/null   # in the host page cache for both alike
    echo "random 4K reads of base data (fio O_DIRECT, ${RUNTIME}s each): 1,000-deep chain, then the base alone"
    for run in $(seq "$RUNS"); do
        mkdir -p "$mnt"
        "$chainfs" mount --read-only "$dir/$top" "$mnt"
        d1=$(fio_file "$mnt/$top" 1 randread 4k 1)
        d4=$(fio_file "$mnt/$top" 4 randread 4k 1)
        "$chainfs" umount "$mnt"
        "$chainfs" mount --read-only "$dir/base.qcow2" "$mnt"
        s1=$(fio_file "$mnt/base.qcow2" 1 randread 4k 1)
        s4=$(fio_file "$mnt/base.qcow2" 4 randread 4k 1)
        "$chainfs" umount "$mnt"
        record_alone "1,000-deep chain, base data, 4K reads, 1 job" IOPS "$d1"
        record_alone "1-deep chain, same reads, 1 job" IOPS "$s1"
        record_alone "1,000-deep chain, base data, 4K reads, 4 jobs" IOPS "$d4"
        record_alone "1-deep chain, same reads, 4 jobs" IOPS "$s4"
    done
}

for section in "${sections[@]}"; do
    case $section in
        memory) bench_memory ;;
        deep) bench_deep ;;
        reads) bench_reads ;;
        writes) bench_writes ;;
        alloc) bench_alloc ;;
        jobs) bench_jobs ;;
        load) bench_load ;;
        backup) bench_backup ;;
        all) bench_reads; bench_writes; bench_alloc; bench_jobs; bench_load; bench_backup ;;
    esac
done

python3 - "$results" "$out" "$machine" "$SIZE" "$RUNTIME" "$RUNS" <<'PY'
import json, statistics, sys
results, out, machine, size, runtime, runs = sys.argv[1:]
rows = [json.loads(line) for line in open(results)]
figures = {}
for row in rows:
    figures.setdefault(row["figure"], []).append(row)
table = []
print()
print("%-62s %12s %12s %7s" % ("median of %s runs" % runs, "chainfs", "qsd", "ratio"))
for name, runs_of in figures.items():
    def ratio(r):
        c, q = r["chainfs"], r["qsd"]
        if r["better"] == "higher":
            return c / q if q else 0.0
        return q / c if c else 0.0
    alone = runs_of[0]["qsd"] is None
    entry = {
        "figure": name,
        "unit": runs_of[0]["unit"],
        "better": runs_of[0]["better"],
        "chainfs": statistics.median(r["chainfs"] for r in runs_of),
        "qsd": None if alone else statistics.median(r["qsd"] for r in runs_of),
        "ratio": None if alone else round(statistics.median(ratio(r) for r in runs_of), 2),
        "runs": len(runs_of),
    }
    table.append(entry)
    if alone:
        print("%-62s %12g %12s %7s  %s" % (name, entry["chainfs"], "-", "-", entry["unit"]))
    else:
        print("%-62s %12g %12g %6.2fx  %s" % (name, entry["chainfs"], entry["qsd"], entry["ratio"], entry["unit"]))
json.dump({"machine": machine, "size": size, "runtime_s": int(runtime), "figures": table,
           "measurements": rows}, open(out, "w"), indent=1)
print("\nresults: %s (ratio > 1: chainfs is the better)" % out)
PY
