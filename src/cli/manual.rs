//! The text of `chainfs(1)` beyond the flags: the mount helper's form, the
//! mount, the control directory and every command of `ctl/command` (SPEC
//! §2–§5). It is kept here, in one place, as data: `cli::docs` renders it
//! into the man page, and `chainfs --help` points to it.

/// `chainfs --help`'s description, and the man page's DESCRIPTION.
pub const LONG_ABOUT: &str = "\
chainfs mounts a QEMU disk-image chain (qcow2 and raw images linked by \
their backing files) and shows every node of it as a flat raw file: what a \
guest would see if that node were the active image. Beside the node files, \
`active` always presents the active layer, and the control directory `ctl/` \
starts live block jobs (stream, commit, mirror, backup, external \
snapshots) and keeps dirty bitmaps with `echo`, shows them with `cat`, and steers them while the \
active image keeps being written. Everything chainfs writes is QEMU's own \
format.

`chainfs IMAGE MOUNTPOINT -o OPTIONS`, without a subcommand, is `chainfs \
mount`: the form fuse3's mount.fuse3 runs for `mount -t fuse.chainfs` and \
for fstab lines of type fuse.chainfs.";

/// `chainfs --help`'s last words: where the rest is documented.
pub const AFTER_LONG_HELP: &str = "\
The mount, the control directory ctl/ and every command of ctl/command are \
described in the manual page: `man chainfs`, or `chainfs man | man -l -`.";

/// One part of a section.
pub enum Block {
    /// A paragraph of running text.
    Para(&'static str),
    /// A term and its description (a tagged paragraph).
    Item(&'static str, &'static str),
    /// Lines shown as they are (commands, file contents).
    Example(&'static str),
}

/// A section of the man page, after the commands and their flags.
pub struct Section {
    /// The section's heading, in capitals as man pages have them.
    pub title: &'static str,
    /// Its contents, in order.
    pub blocks: &'static [Block],
}

use Block::{Example, Item, Para};

/// The man page's sections after COMMANDS, in order.
pub const SECTIONS: &[Section] = &[
    Section {
        title: "MOUNT, FSTAB AND SYSTEMD",
        blocks: &[
            Para(
                "With the chainfs binary on root's PATH, mount(8) mounts a chain like any \
                 other filesystem; fuse3's mount.fuse3 runs `chainfs IMAGE MOUNTPOINT -o \
                 OPTIONS`, which returns once the mount is ready while the daemon stays \
                 behind. umount(8), `fusermount3 -u` and `systemctl stop` of the mount unit \
                 unmount it; the daemon then writes everything, releases the images and \
                 exits.",
            ),
            Example(
                "mount -t fuse.chainfs /images/top.qcow2 /mnt/chain -o ro,allow_other\n\
                 umount /mnt/chain\n\
                 \n\
                 # /etc/fstab\n\
                 /images/top.qcow2  /mnt/chain  fuse.chainfs  defaults,nofail  0  0",
            ),
            Para(
                "The -o options are ro, rw, allow_other, force_share, threads=N, \
                 cache_size=SIZE and log_file=PATH, with the meaning of the flags of the \
                 same names; an option overrides its flag. The generic options mount(8), \
                 mount.fuse3 and systemd pass along (defaults, nofail, noauto, auto, user, \
                 users, nouser, _netdev, x-systemd.*, dev, nodev, suid, nosuid, exec, \
                 noexec) are accepted and ignored: chainfs always mounts nodev,nosuid. Any \
                 other option is refused, naming it, and nothing is mounted.",
            ),
        ],
    },
    Section {
        title: "THE MOUNT",
        blocks: &[
            Example(
                "MNT/\n\
                 \u{20}   file-A.img ... file-E.img   one flat file per node of the chain\n\
                 \u{20}   active                      the active layer, whichever node that is\n\
                 \u{20}   ctl/                        the control directory",
            ),
            Item(
                "node files",
                "Named after the image's file name (a name taken by a node above, or \
                 `active` or `ctl`, gets the first free suffix ~2, ~3, ...). Size: the \
                 virtual size. Mode 0444, the active node's 0644, never granting group or \
                 others read where the image file does not. lseek SEEK_DATA/SEEK_HOLE \
                 report what the node's chain holds; st_blocks what its own image holds.",
            ),
            Item(
                "active",
                "The active layer, writable. A handle opened on it follows the active layer \
                 across a pivot (snapshot, active commit, mirror); a node that stops being \
                 active becomes 0444 and writes through older handles fail with EROFS.",
            ),
            Item(
                "writes",
                "Complete when write returns: they survive the daemon being killed; fsync \
                 makes them durable. A write at or past the end fails with ENOSPC, one \
                 crossing it is cut short. fallocate PUNCH_HOLE and ZERO_RANGE make a \
                 range read as zeros. Truncate, rename, unlink, create, mkdir: EPERM.",
            ),
            Item(
                "chain changes",
                "When a job changes the chain, node files that left it disappear and new \
                 ones appear; handles open on a departed node keep reading what it held. \
                 Image files are never deleted.",
            ),
        ],
    },
    Section {
        title: "CONTROL DIRECTORY",
        blocks: &[
            Item(
                "ctl/command",
                "Write one command here per write (see COMMANDS OF ctl/command).",
            ),
            Item(
                "ctl/status",
                "The jobs, for people: id, type, node, base, QEMU's job state (created, \
                 running, paused, ready, standby, waiting, pending, aborting, concluded, \
                 with the outcome completed, cancelled or failed and the error), QEMU's \
                 progress words `Completed N of M bytes, speed limit S bytes/s`, the \
                 percentage, rate and ETA; `No active jobs` when there are none. After a refused command, the last \
                 line says why.",
            ),
            Item(
                "ctl/status.json",
                "The same jobs as a JSON array with QEMU's field names (id, type, device, \
                 len, offset, speed, status, error, ready) plus node, base, target, rate, \
                 eta_seconds, outcome and, for mirror and active commit, remaining.",
            ),
            Item(
                "ctl/events",
                "What happened, one JSON object a line, oldest first, each with a \
                 timestamp and an event named as QMP names it: JOB_STATUS_CHANGE, \
                 BLOCK_JOB_COMPLETED, BLOCK_JOB_CANCELLED, BLOCK_JOB_ERROR, \
                 BLOCK_JOB_READY, plus COMMAND_REJECTED and CHAIN_CHANGED.",
            ),
            Item(
                "ctl/chain",
                "The chain as the image headers define it, base first (`file-A.img <- \
                 file-B.img <- ...`), then one line per node with its path, format, \
                 virtual size and backing string; a node a commit took out of the mount \
                 is marked hidden.",
            ),
            Item(
                "ctl/bitmaps",
                "Each dirty bitmap of each node, one a line: node, name, granularity, \
                 dirty bytes and its flags (recording, busy, persistent, inconsistent).",
            ),
            Item(
                "ctl/bitmaps.json",
                "The same as a JSON array with QEMU's query-block field names (name, \
                 granularity, count, recording, busy, persistent, inconsistent) plus node.",
            ),
        ],
    },
    Section {
        title: "COMMANDS OF ctl/command",
        blocks: &[
            Para(
                "One command per write: `VERB key=value ...`; a value in double quotes may \
                 hold spaces; a trailing newline is ignored; at most 4096 bytes, job ids \
                 at most 128. A NODE is a file name in the mount, `active`, or an image's \
                 absolute path; a relative PATH is relative to the active image's \
                 directory, and a PATH inside the mount is refused. A write is either \
                 accepted (it returns its full length and the job already shows in \
                 ctl/status) or fails with an errno: EINVAL (bad syntax, unknown verb or \
                 key, bad value), ENOENT (no such node, job or bitmap), EBUSY (a \
                 conflicting job, or a verb the job's state does not allow), EROFS \
                 (read-only mount), EEXIST (the target file or bitmap exists). The reason \
                 shows in ctl/events and as the last line of ctl/status.",
            ),
            Item(
                "stream [node=NODE] [base=NODE] [backing-file=STRING] [speed=RATE] [id=ID] \
                 [on-error=report|ignore|stop|enospc]",
                "QEMU's block-stream. NODE (default: active) receives the data of every node \
                 strictly between it and BASE (default: none), never overwriting what it \
                 holds; then NODE is rebacked onto BASE and the nodes between leave the \
                 chain. A cancelled or failed stream leaves the backing pointer unchanged; \
                 running it again resumes.",
            ),
            Item(
                "snapshot file=PATH [format=qcow2]",
                "Live external snapshot: creates PATH, a qcow2 image backed by the active \
                 image, and makes it the active layer.",
            ),
            Item(
                "commit top=NODE [base=NODE] [backing-file=STRING] [speed=RATE] [id=ID] \
                 [on-error=report|ignore|stop|enospc] [copy-mode=background|write-blocking]",
                "QEMU's block-commit: the data of TOP and of the nodes between it and BASE \
                 (default: the bottom) is written into BASE; then the node above TOP is \
                 backed by BASE. With TOP the active node it is an active commit: it \
                 reports ready once BASE is in step, keeps it in step, and `complete` \
                 pivots so that BASE becomes the active layer. write-blocking makes guest \
                 writes after ready reach BASE too before they return.",
            ),
            Item(
                "mirror target=PATH [node=NODE] [sync=full|top|none] \
                 [mode=absolute-paths|existing] [format=qcow2|raw] \
                 [copy-mode=background|write-blocking] [granularity=SIZE] [speed=RATE] \
                 [id=ID] [on-error=report|ignore|stop|enospc]",
                "QEMU's drive-mirror: NODE (default: active) is copied to PATH (full: \
                 everything, top: what NODE holds, none: only new writes), guest writes \
                 are tracked, the job reports ready once PATH is in step, and `complete` \
                 pivots: PATH replaces NODE in the chain. absolute-paths (default) \
                 creates PATH; existing uses it as it is.",
            ),
            Item(
                "backup target=PATH [node=NODE] sync=full|top|none|bitmap|incremental \
                 [bitmap=NAME] [bitmap-mode=on-success|never|always] \
                 [mode=absolute-paths|existing] [format=qcow2|raw] [compress=on] \
                 [speed=RATE] [id=ID] [on-error=report|ignore|stop|enospc]",
                "QEMU's drive-backup: PATH receives NODE as it was when the job started, \
                 while the guest keeps writing (old data is copied before it is \
                 overwritten). full: every cluster; top: what NODE holds (PATH backed by \
                 NODE's backing); none: only what is about to be overwritten (PATH backed \
                 by NODE; the job runs until cancel); bitmap and incremental copy what the \
                 dirty bitmap NAME marks; bitmap-mode decides what the bitmap holds \
                 afterwards, as in QEMU. compress=on needs a qcow2 target.",
            ),
            Item(
                "bitmap-add node=NODE name=NAME [granularity=SIZE] [persistent=on] \
                 [disabled=on]",
                "Adds a dirty bitmap to NODE (granularity a power of two, 512 B to 2 GiB); \
                 a persistent one is stored in the qcow2 image, where QEMU reads it.",
            ),
            Item(
                "bitmap-remove, bitmap-clear, bitmap-enable, bitmap-disable node=NODE \
                 name=NAME",
                "Remove the bitmap, clear it, make it record writes, stop it recording.",
            ),
            Item(
                "bitmap-merge node=NODE target=NAME bitmaps=A[,B...]",
                "Adds the bits of bitmaps A, B, ... of NODE to bitmap NAME. The bitmap \
                 commands are synchronous: done when the write returns.",
            ),
            Item(
                "cancel [id=ID] [force=on]",
                "Stops a job: it ends cancelled. On a ready mirror or active commit it is \
                 QEMU's soft cancel: the copy finishes, nothing pivots, and the job ends \
                 completed; force=on aborts instead.",
            ),
            Item(
                "pause [id=ID], resume [id=ID]",
                "Pause a job between two steps (the write returns once it stopped); \
                 resume a paused one.",
            ),
            Item(
                "complete [id=ID]",
                "Pivot a ready (or standby) mirror or active commit.",
            ),
            Item(
                "dismiss [id=ID]",
                "Remove a concluded job from ctl/status.",
            ),
            Item(
                "set-speed [id=ID] speed=RATE",
                "Change a job's speed limit.",
            ),
            Para(
                "ID may be left out when one job exists. RATE is bytes per second with an \
                 optional K, M or G suffix (powers of 1024); 0 means unlimited. Two jobs \
                 run at once when the nodes they touch are disjoint; otherwise EBUSY.",
            ),
            Example(
                "echo \"stream base=file-A.img speed=50M\" > /mnt/chain/ctl/command\n\
                 echo \"commit top=active base=file-B.img id=a\" > /mnt/chain/ctl/command\n\
                 chainfs status --wait /mnt/chain\n\
                 echo \"complete id=a\" > /mnt/chain/ctl/command",
            ),
        ],
    },
    Section {
        title: "EXIT STATUS",
        blocks: &[Para(
            "0 on success; 1 when a command ran and failed (one line on stderr naming the \
             file and the reason; a failed mount leaves nothing mounted and no image \
             modified); 2 for a usage error, an unknown -o option included. `status \
             --wait` exits 1 when a job did not complete.",
        )],
    },
    Section {
        title: "ENVIRONMENT",
        blocks: &[Item(
            "RUST_LOG",
            "The log level (error, warn, info, debug, trace); warn on a terminal, info in \
             a --log-file.",
        )],
    },
    Section {
        title: "SEE ALSO",
        blocks: &[Para(
            "qemu-img(1), mount.fuse3(8), fusermount3(1), fstab(5), systemd.mount(5)",
        )],
    },
];
