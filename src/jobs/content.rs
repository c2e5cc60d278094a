//! Telling the mount when a job changes what a node file shows without
//! changing the chain's shape: a commit writing into its base, and the
//! nodes it hides. The kernel may hold pages of such a file from handles
//! opened before the job (node files that cannot change otherwise are
//! cached); each notice drops them before the job goes on, so no reader
//! sees a page older than a completed write.

use crate::chain::track::WriteHook;
use crate::chain::{Node, NodeId};
use crate::sync::{lock, Arc, Mutex};

/// Told that `len` bytes at `offset` of a node's file changed (`len` 0:
/// everything from `offset` on). Runs on the thread that made the change
/// and returns once the kernel dropped what it cached.
pub type ContentWatcher = Box<dyn Fn(NodeId, u64, u64) + Send + Sync>;

/// The watchers of one mount.
#[derive(Default)]
pub struct ContentWatchers {
    watchers: Mutex<Vec<ContentWatcher>>,
}

impl ContentWatchers {
    /// Calls `watcher` on every notice from now on.
    pub fn watch(&self, watcher: ContentWatcher) {
        lock(&self.watchers).push(watcher);
    }

    /// Tells every watcher that `offset..offset + len` of `node` changed.
    pub fn changed(&self, node: NodeId, offset: u64, len: u64) {
        for watcher in lock(&self.watchers).iter() {
            watcher(node, offset, len);
        }
    }
}

/// A write hook on a node a job writes into, turning each write into a
/// notice for as long as the hook lives: it removes itself when dropped.
pub struct ContentHook {
    node: Node,
    hook: Arc<dyn WriteHook>,
}

struct Notice {
    node: NodeId,
    watchers: Arc<ContentWatchers>,
}

impl WriteHook for Notice {
    fn written(&self, offset: u64, len: u64) {
        self.watchers.changed(self.node, offset, len);
    }
}

impl ContentHook {
    /// Hooks `node`: every write to its image from now on is a notice.
    pub fn new(node: &Node, watchers: &Arc<ContentWatchers>) -> ContentHook {
        let hook: Arc<dyn WriteHook> = Arc::new(Notice {
            node: node.id(),
            watchers: Arc::clone(watchers),
        });
        node.add_write_hook(Arc::clone(&hook));
        ContentHook {
            node: node.clone(),
            hook,
        }
    }
}

impl Drop for ContentHook {
    fn drop(&mut self) {
        self.node.remove_write_hook(&self.hook);
    }
}
