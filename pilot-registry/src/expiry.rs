//! The expiry sweeper: a thread of its own that, every so often, expires
//! the registrations nobody has seen for `--expire-unused`
//! ([`crate::registrar::expire_unused`] has the rules).
//!
//! It keeps a database connection of its own (a second SQLite connection
//! on the same WAL file, or a second PostgreSQL session), so a sweep never
//! waits in the storage thread's queue and never runs on the packet task;
//! each batch is one short transaction, so registrations wait at most for
//! one batch. Several instances sharing one PostgreSQL may all sweep: a
//! row one of them is expiring is skipped by the others.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use crate::registrar;
use crate::storage::{Storage, StorageError};

/// Opens the sweeper's own connection to the registry's database.
pub type Opener = Box<dyn FnMut() -> Result<Box<dyn Storage>, StorageError> + Send>;

/// How often a registry sweeps for a given `--expire-unused` (seconds):
/// a hundredth of it, between a minute and an hour, so an expired node
/// goes within about 1% of its time.
pub fn interval(unused: u64) -> Duration {
    Duration::from_secs((unused / 100).clamp(60, 3600))
}

/// The `--expire-unused` value: an age (`90d`, `12h`, `30m`, `45s`), or
/// `0`, `never` or `off` for no expiry (0 seconds).
pub fn parse_unused(s: &str) -> Result<u64, String> {
    match s.trim() {
        "0" | "never" | "off" => Ok(0),
        t => {
            pilot_proto::lifetime::parse(t).map_err(|e| format!("{e}; or 0 or never for no expiry"))
        }
    }
}

/// The running sweeper; dropping it stops the thread (after the sweep in
/// progress, if any) and waits for it.
pub struct Sweeper {
    stop: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts sweeping every `every` (the first sweep after `every` too): nodes
/// not seen for `unused` seconds expire. `open` is called on the thread
/// (a PostgreSQL connection must be opened outside any async runtime), and
/// again after a failed sweep.
pub fn spawn(mut open: Opener, unused: u64, every: Duration) -> std::io::Result<Sweeper> {
    let (stop, stopped) = mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("expiry".into())
        .spawn(move || {
            crate::priority::background("expiry");
            let mut storage: Option<Box<dyn Storage>> = None;
            loop {
                match stopped.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                let s = match storage.as_mut() {
                    Some(s) => s,
                    None => match open() {
                        Ok(s) => storage.insert(s),
                        Err(e) => {
                            warn!("expiry: cannot open the database: {e}");
                            continue;
                        }
                    },
                };
                match registrar::expire_unused(&mut **s, unused, unix_now()) {
                    Ok(gone) if gone.is_empty() => {}
                    Ok(gone) => {
                        for id in &gone {
                            info!(%id, "expired: not seen for {}", pilot_proto::lifetime::format(unused));
                        }
                        info!(count = gone.len(), "expired unused registrations: their hostnames are free, their addresses tombstones");
                    }
                    Err(e) => {
                        warn!("expiry: the sweep failed (tried again at the next): {e}");
                        storage = None;
                    }
                }
            }
        })?;
    Ok(Sweeper {
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.try_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_come_every_hundredth_of_the_time_within_a_minute_and_an_hour() {
        assert_eq!(interval(90 * 86_400), Duration::from_secs(3600));
        assert_eq!(interval(3 * 3600), Duration::from_secs(108));
        assert_eq!(interval(10), Duration::from_secs(60));
    }

    #[test]
    fn the_age_parses_like_other_ages_and_zero_or_never_is_off() {
        assert_eq!(parse_unused("90d"), Ok(90 * 86_400));
        assert_eq!(parse_unused("36h"), Ok(36 * 3600));
        for off in ["0", "never", "off"] {
            assert_eq!(parse_unused(off), Ok(0), "{off}");
        }
        for bad in ["", "-1", "7 weeks", "3y", "d"] {
            let e = parse_unused(bad).unwrap_err();
            assert!(e.contains("never for no expiry"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_sweeper_stops_when_dropped_and_reopens_after_a_failure() {
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = opened.clone();
        let sweeper = spawn(
            Box::new(move || {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err(StorageError::Unsupported("a database, in this test"))
            }),
            60,
            Duration::from_millis(5),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        while opened.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(t0.elapsed() < Duration::from_secs(10), "tries again");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(sweeper);
        let n = opened.load(std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            opened.load(std::sync::atomic::Ordering::SeqCst),
            n,
            "stopped"
        );
    }
}
