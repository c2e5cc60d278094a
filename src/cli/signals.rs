//! SIGINT, SIGTERM and SIGHUP become a clean unmount.
//!
//! The signals are blocked in the calling thread *before* any other thread
//! exists, so every thread inherits the block and none is ever interrupted
//! by them; one dedicated thread takes them with `sigwait(2)` and runs the
//! unmount from ordinary code, where anything may be called (a signal
//! handler could call almost nothing). The unmount makes the FUSE session
//! return, after which the daemon flushes and closes every image and exits.
//!
//! A signal may arrive before the mount exists (while the chain opens): it
//! is remembered, the caller asks [`SignalWatch::stop_requested`] before
//! mounting, and [`SignalWatch::arm`] unmounts at once if one came in
//! between.

use std::io;
use std::thread;

use crate::sync::{lock, Arc, Mutex};

/// The signals that stop a mount.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// What to run to unmount; set once the mount exists.
type UnmountFn = Arc<dyn Fn() + Send + Sync>;

/// Shared between the signal thread and the mount.
#[derive(Default)]
struct WatchState {
    stop_requested: bool,
    unmount: Option<UnmountFn>,
}

/// The running signal thread.
pub struct SignalWatch {
    state: Arc<Mutex<WatchState>>,
}

impl SignalWatch {
    /// Blocks the stop signals in this thread (and so in every thread it
    /// starts from now on) and starts the thread that waits for them.
    ///
    /// Call before any other thread is started.
    pub fn start() -> io::Result<SignalWatch> {
        let set = stop_set()?;
        // SAFETY: `set` is an initialised sigset_t; the old mask is not
        // wanted (null). pthread_sigmask only changes this thread's mask.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let state = Arc::new(Mutex::new(WatchState::default()));
        let shared = Arc::clone(&state);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || wait_for_signals(&set, &shared))?;
        Ok(SignalWatch { state })
    }

    /// Whether a stop signal has come in.
    pub fn stop_requested(&self) -> bool {
        lock(&self.state).stop_requested
    }

    /// The mount exists: from now on a stop signal runs `unmount`; if one
    /// already came, it runs now.
    pub fn arm(&self, unmount: impl Fn() + Send + Sync + 'static) {
        let unmount: UnmountFn = Arc::new(unmount);
        let run_now = {
            let mut state = lock(&self.state);
            state.unmount = Some(Arc::clone(&unmount));
            state.stop_requested
        };
        if run_now {
            log::info!("a stop signal came while mounting; unmounting");
            unmount();
        }
    }
}

/// The set of [`STOP_SIGNALS`].
fn stop_set() -> io::Result<libc::sigset_t> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset then
    // only sets bits of that initialised set, with valid signal numbers.
    unsafe {
        if libc::sigemptyset(set.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        for signal in STOP_SIGNALS {
            if libc::sigaddset(set.as_mut_ptr(), signal) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(set.assume_init())
    }
}

/// The signal thread: forever take a stop signal and unmount. A second
/// signal retries the unmount (the first may have found the mount busy).
fn wait_for_signals(set: &libc::sigset_t, state: &Mutex<WatchState>) {
    loop {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in every thread; sigwait
        // writes the signal number into `signal`.
        let rc = unsafe { libc::sigwait(set, &mut signal) };
        if rc != 0 {
            log::error!("sigwait: {}", io::Error::from_raw_os_error(rc));
            return;
        }
        let unmount = {
            let mut state = lock(state);
            state.stop_requested = true;
            state.unmount.clone()
        };
        log::info!("signal {signal}: unmounting");
        // Run outside the lock: unmounting may take a while (fusermount3).
        if let Some(unmount) = unmount {
            unmount();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_set_holds_int_term_and_hup_only() {
        let set = stop_set().expect("set");
        for (signal, expected) in [
            (libc::SIGINT, 1),
            (libc::SIGTERM, 1),
            (libc::SIGHUP, 1),
            (libc::SIGKILL, 0),
            (libc::SIGUSR1, 0),
        ] {
            // SAFETY: `set` is initialised; sigismember only reads it.
            assert_eq!(unsafe { libc::sigismember(&set, signal) }, expected);
        }
    }

    #[test]
    fn arming_after_a_signal_unmounts_at_once() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // Built by hand: a real watch would block signals in the test thread.
        let watch = SignalWatch {
            state: Arc::new(Mutex::new(WatchState {
                stop_requested: true,
                unmount: None,
            })),
        };
        let called = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&called);
        watch.arm(move || flag.store(true, Ordering::SeqCst));
        assert!(watch.stop_requested());
        assert!(called.load(Ordering::SeqCst));
    }
}
