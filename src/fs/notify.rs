//! Telling the kernel when the chain changes shape: node files that left
//! the chain are dropped from its dentry cache, and files whose attributes
//! changed (the old active node turning 0444, `active` now another node)
//! are refreshed, and the pages of every node file kept are dropped (a
//! commit writes into its base) — only for inodes the kernel holds.
//!
//! Notifications are sent from a thread of their own: a change can come
//! from inside a request (a `snapshot` written to `ctl/command`), and the
//! kernel must never wait on the thread that is answering it.

use std::ffi::OsStr;
use std::sync::mpsc;
use std::sync::Weak;

use fuser::{INodeNo, Notifier};

use super::inode::{Inode, ACTIVE, ROOT};
use super::ops::FsModel;
use crate::jobs::{Chain, NodeId};
use crate::sync::Arc;

/// A chain change to tell the kernel about.
type Change = (Arc<Chain>, Arc<Chain>);

/// Starts the notifying thread; returns the watcher to register with the
/// jobs. The thread ends when the watcher is dropped (the jobs closed) or
/// the file system is gone.
pub fn spawn(notifier: Notifier, model: Weak<FsModel>) -> crate::jobs::registry::ChainWatcher {
    let (sender, receiver) = mpsc::channel::<Change>();
    let spawned = std::thread::Builder::new()
        .name("chainfs-notify".into())
        .spawn(move || {
            for (old, new) in receiver {
                let Some(model) = model.upgrade() else {
                    return;
                };
                invalidate(&notifier, &model, &old, &new);
            }
        });
    let thread = spawned
        .map_err(|err| log::error!("cannot start the kernel notification thread: {err}"))
        .ok();
    let notices = Notices {
        sender: Some(sender),
        thread,
    };
    Box::new(move |old: &Arc<Chain>, new: &Arc<Chain>| notices.send(old, new))
}

/// The watcher's end of the notifying thread. Dropping it (when the jobs
/// close the chain) ends the thread and waits for it: changes still queued
/// hold versions of the chain, which must all be gone before it can close.
struct Notices {
    sender: Option<mpsc::Sender<Change>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notices {
    fn send(&self, old: &Arc<Chain>, new: &Arc<Chain>) {
        if let Some(sender) = &self.sender {
            // The receiver is gone only when the mount is; nothing to tell.
            let _ = sender.send((Arc::clone(old), Arc::clone(new)));
        }
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the kernel notification thread panicked");
            }
        }
    }
}

/// The watcher of in-place content changes (a commit writing into its
/// base): drops the pages the kernel holds of that range of the node's file
/// before the job goes on. It runs on the job's thread, or on a request
/// thread writing another file, never on one answering a request for this
/// file, so the kernel never waits on the thread that must answer it.
pub fn content_watcher(
    notifier: Notifier,
    model: Weak<FsModel>,
) -> crate::jobs::content::ContentWatcher {
    Box::new(move |node: NodeId, offset: u64, len: u64| {
        let Some(model) = model.upgrade() else {
            return;
        };
        let ino = Inode::Node(node).ino();
        if !model.lookups().is_held(ino) {
            return;
        }
        // The kernel takes signed values; a range past i64::MAX means
        // "to the end", which 0 says too.
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let len = i64::try_from(len).unwrap_or(0);
        // An error only means the kernel no longer holds the inode.
        let _ = notifier.inval_inode(INodeNo(ino), offset, len);
    })
}

fn invalidate(notifier: &Notifier, model: &FsModel, old: &Chain, new: &Chain) {
    let held = |ino: u64| model.lookups().is_held(ino);
    let entry = |name: &str| {
        // ENOENT only means the kernel had no such entry cached.
        let _ = notifier.inval_entry(INodeNo(ROOT), OsStr::new(name));
    };
    let attributes = |ino: u64| {
        if held(ino) {
            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
        }
    };
    for node in old.nodes() {
        // A node a commit hid has left the mount though not the chain.
        match new.node(node.id()).filter(|now| !now.hidden()) {
            None => {
                entry(node.name());
                attributes(Inode::Node(node.id()).ino());
            }
            Some(now) if now.name() != node.name() => entry(node.name()),
            Some(_) => {}
        }
    }
    // A name may have been looked up, and cached as missing, before it
    // appeared.
    for node in new.nodes().iter().filter(|n| old.node(n.id()).is_none()) {
        entry(node.name());
    }
    // A change may come with new content in a node that stays (a commit's
    // base): no page of a node file cached before it may be trusted.
    for node in new.nodes().iter().filter(|n| old.node(n.id()).is_some()) {
        attributes(Inode::Node(node.id()).ino());
    }
    if old.active().id() != new.active().id() {
        attributes(Inode::Node(old.active().id()).ino());
        attributes(Inode::Node(new.active().id()).ino());
        attributes(ACTIVE);
    }
}
