//! Which of the registry's threads wins a core when they all want one.
//!
//! The socket loop answers STUN, forwards relayed datagrams and reads
//! control messages; each answer takes microseconds, and a node measures
//! its NAT and its tunnel's round trip by them. Beside it, the admission
//! thread computes the Diffie-Hellman of every handshake, the storage
//! thread encodes rows and waits for the disk, and the audit thread writes
//! its log: work that takes longer and waits well. During a burst of
//! registrations on a machine with few cores they all run at once, and the
//! scheduler gives the loop a turn only after the others' slices. Those
//! threads therefore run at a lower priority (a nice value of
//! [`BACKGROUND_NICE`], on Linux a per-thread attribute): they use any
//! core the loop leaves idle, and the loop runs first when it wakes.

use tracing::debug;

/// The nice value of the threads beside the socket loop.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread to [`BACKGROUND_NICE`]. A failure (a
/// sandbox that forbids it) is logged and changes nothing else.
pub fn background(thread: &str) {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority reads its three integer arguments only; for
    // PRIO_PROCESS on Linux the id is a thread id, so only this thread
    // changes. Raising one's own nice value needs no privilege.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
    if r != 0 {
        debug!(
            thread,
            "cannot lower the thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The calling thread's nice value.
pub fn current() -> std::io::Result<i32> {
    // SAFETY: as in `background`.
    let tid = unsafe { libc::gettid() };
    // getpriority returns the nice value, and -1 both for nice -1 and for
    // an error: errno tells them apart.
    // SAFETY: errno is thread-local; clearing it is always allowed.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: as setpriority above.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let err = std::io::Error::last_os_error();
    if n == -1 && err.raw_os_error().unwrap_or(0) != 0 {
        return Err(err);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_thread_yields_and_the_caller_keeps_its_priority() {
        let before = current().unwrap();
        let inside = std::thread::spawn(|| {
            background("test");
            current().unwrap()
        })
        .join()
        .unwrap();
        assert!(inside >= BACKGROUND_NICE, "the thread is at nice {inside}");
        assert_eq!(current().unwrap(), before, "only that thread changed");
    }
}
