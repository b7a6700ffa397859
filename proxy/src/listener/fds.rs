//! File descriptors: the soft limit raised at start, and a small reserve kept for the admin API.
//! A flood of connections can use every descriptor the process may hold; then every `accept`
//! fails, the admin listener's too, and operators lose `/ready` and `/metrics` exactly when they
//! need them. A few descriptors opened at start (on `/dev/null`) are given back one at a time
//! when the admin listener cannot accept, so it can take the connection waiting for it.

use std::{fs::File, io, sync::Mutex};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors held back for the admin API: one per admin connection served while the data
/// plane holds all the others.
pub const RESERVE: usize = 4;

static SPARE: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// The descriptor limits after [`raise_nofile_limit`]: soft, then hard (`None`: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the default soft limit (often 1024) is
/// far below what a proxy's connections need, and only the hard limit is the operator's choice.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    let now = getrlimit(Resource::Nofile);
    Ok(NofileLimit {
        soft: now.current,
        hard: now.maximum,
    })
}

/// Opens the reserve, up to [`RESERVE`] descriptors; returns how many are held.
pub fn fill_reserve() -> usize {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    while spare.len() < RESERVE {
        match File::open("/dev/null") {
            Ok(f) => spare.push(f),
            Err(_) => break, // still short of descriptors: refilled on a later call
        }
    }
    spare.len()
}

/// Closes one reserved descriptor, so the next `accept` can succeed. False if none is left.
pub fn release_one() -> bool {
    SPARE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .is_some()
}

/// Whether `accept` failed for want of descriptors (per process or system-wide).
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_keeps_the_hard_limit_and_reaches_it() {
        let before = getrlimit(Resource::Nofile);
        let after = raise_nofile_limit().expect("raising to the hard limit is allowed");
        assert_eq!(after.hard, before.maximum);
        assert_eq!(after.soft, before.maximum);
    }

    #[test]
    fn the_reserve_is_released_one_at_a_time() {
        assert_eq!(fill_reserve(), RESERVE);
        assert!(release_one());
        assert_eq!(fill_reserve(), RESERVE, "refilled");
    }

    #[test]
    fn exhaustion_errors() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error()
        )));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(
            rustix::io::Errno::NFILE.raw_os_error()
        )));
        assert!(!is_exhaustion(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }
}
