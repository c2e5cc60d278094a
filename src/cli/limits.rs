//! Process limits set where the process starts, before any image is opened.
//!
//! Each node of a mounted chain holds its image file open for as long as
//! the mount lives, so a 1,000-node chain needs more descriptors than the
//! usual soft limit of 1,024. Raising the limit is a decision about the
//! whole process, so it is taken here and not in the library: the chain
//! layer opens what it is asked to and, when it runs out, says so
//! ([`crate::chain::ChainError::Descriptors`]).

/// Raises the soft limit on open files to the hard limit. Failing to raise
/// it is not an error: a chain too deep for the limit then fails to open
/// with a message naming the limit.
pub(super) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            log::debug!(
                "could not raise the open-file limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
