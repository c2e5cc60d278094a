#!/bin/sh
# Seeds the fuzz corpora with the first 4 KiB of qcow2 images made by
# qemu-img in several shapes (v2, v3, backing file, extended L2, zstd,
# external data file, small clusters). Run from fuzz/: sh seed.sh
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p corpus/header corpus/open_image
n=0
make() {
    n=$((n + 1))
    qemu-img create -q -f qcow2 "$@" "$tmp/img$n" 1M
    head -c 4096 "$tmp/img$n" > "corpus/header/seed$n"
    # open_image gets whole files when they are small enough.
    if [ "$(stat -c %s "$tmp/img$n")" -le 262144 ]; then
        cp "$tmp/img$n" "corpus/open_image/seed$n"
    fi
}
make
make -o compat=0.10
make -o cluster_size=512
make -o cluster_size=4096,refcount_bits=1
make -o cluster_size=2M
make -o extended_l2=on
make -o compression_type=zstd
make -o lazy_refcounts=on,refcount_bits=64
make -o data_file="$tmp/data$n.raw",data_file_raw=on
qemu-img create -q -f raw "$tmp/base.raw" 1M
make -b "$tmp/base.raw" -F raw
