//! Per-minute counts of repeated events (policy decisions per peer,
//! direction and port; refused handshakes per source), so the audit log
//! grows with what was decided, not with traffic.
//!
//! The first occurrence of a key in a minute is reported at once
//! ([`Recorded::First`], for the caller to log it); the count for the minute
//! comes out of [`Aggregator::flush`] once the minute is over. The table is
//! bounded: when it is full, new keys are not kept but counted per minute as
//! dropped, so a flood of distinct keys cannot fill memory or the disk, and
//! the log still says how much it missed.

use std::collections::BTreeMap;

use crate::lifetime::MINUTE;

/// What [`Aggregator::record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The first time this key was seen this minute: log it now.
    First,
    /// Counted with the earlier ones.
    Counted,
    /// The table is full: only counted as dropped.
    Dropped,
}

/// One key's count for one minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Count<K> {
    /// Unix time of the minute's start.
    pub minute: u64,
    /// What was counted.
    pub key: K,
    /// How many times, the first included.
    pub count: u64,
}

/// Everything [`Aggregator::flush`] returns: counts in (minute, key) order,
/// and per minute the events that found the table full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flushed<K> {
    /// The counts of the minutes that are over.
    pub counts: Vec<Count<K>>,
    /// (minute start, events not kept) for minutes in which the table was full.
    pub dropped: Vec<(u64, u64)>,
}

impl<K> Flushed<K> {
    /// True if there is nothing to log.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.dropped.is_empty()
    }
}

/// Counts per key and minute, at most `capacity` keys at a time.
#[derive(Clone, Debug)]
pub struct Aggregator<K> {
    counts: BTreeMap<(u64, K), u64>,
    dropped: BTreeMap<u64, u64>,
    capacity: usize,
}

fn minute_of(now: u64) -> u64 {
    now - now % MINUTE
}

impl<K: Ord + Clone> Aggregator<K> {
    /// A table holding at most `capacity` (minute, key) counts.
    pub fn new(capacity: usize) -> Self {
        Aggregator {
            counts: BTreeMap::new(),
            dropped: BTreeMap::new(),
            capacity,
        }
    }

    /// Counts one event of `key` at unix time `now`.
    pub fn record(&mut self, key: K, now: u64) -> Recorded {
        let minute = minute_of(now);
        if let Some(n) = self.counts.get_mut(&(minute, key.clone())) {
            *n += 1;
            return Recorded::Counted;
        }
        if self.counts.len() >= self.capacity {
            *self.dropped.entry(minute).or_insert(0) += 1;
            return Recorded::Dropped;
        }
        self.counts.insert((minute, key), 1);
        Recorded::First
    }

    /// Takes out the counts of every minute before the one `now` is in.
    pub fn flush(&mut self, now: u64) -> Flushed<K> {
        self.take_before(minute_of(now))
    }

    /// Takes out everything, the current minute too (at shutdown).
    pub fn flush_all(&mut self) -> Flushed<K> {
        self.take_before(u64::MAX)
    }

    fn take_before(&mut self, minute: u64) -> Flushed<K> {
        let mut counts = Vec::new();
        while let Some(entry) = self.counts.first_entry() {
            if entry.key().0 >= minute {
                break;
            }
            let ((m, key), count) = entry.remove_entry();
            counts.push(Count {
                minute: m,
                key,
                count,
            });
        }
        let later = self.dropped.split_off(&minute);
        let dropped = std::mem::replace(&mut self.dropped, later)
            .into_iter()
            .collect();
        Flushed { counts, dropped }
    }

    /// Counts held now.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_749_999_980; // 20 s into a minute

    #[test]
    fn first_of_a_minute_then_counted_then_flushed_when_over() {
        assert_eq!(T % 60, 20);
        let mut a = Aggregator::new(16);
        assert_eq!(a.record("p1 in tcp/22 deny", T), Recorded::First);
        assert_eq!(a.record("p1 in tcp/22 deny", T + 1), Recorded::Counted);
        assert_eq!(a.record("p2 in tcp/22 deny", T + 2), Recorded::First);
        assert_eq!(a.record("p1 in tcp/22 deny", T + 39), Recorded::Counted);
        // Still the same minute: nothing to flush.
        assert!(a.flush(T + 39).is_empty());
        // The next minute starts a new count.
        assert_eq!(a.record("p1 in tcp/22 deny", T + 40), Recorded::First);
        let f = a.flush(T + 40);
        let m = T - 20;
        assert_eq!(
            f.counts,
            vec![
                Count {
                    minute: m,
                    key: "p1 in tcp/22 deny",
                    count: 3
                },
                Count {
                    minute: m,
                    key: "p2 in tcp/22 deny",
                    count: 1
                },
            ]
        );
        assert!(f.dropped.is_empty());
        assert_eq!(a.len(), 1);
        let rest = a.flush_all();
        assert_eq!(
            rest.counts,
            vec![Count {
                minute: m + 60,
                key: "p1 in tcp/22 deny",
                count: 1
            }]
        );
        assert!(a.is_empty());
    }

    #[test]
    fn a_full_table_counts_what_it_drops() {
        let mut a = Aggregator::new(3);
        for k in 0..3u32 {
            assert_eq!(a.record(k, T), Recorded::First);
        }
        // Known keys still count; new ones are dropped and counted.
        assert_eq!(a.record(1, T), Recorded::Counted);
        for k in 3..1000u32 {
            assert_eq!(a.record(k, T), Recorded::Dropped);
        }
        assert_eq!(a.len(), 3);
        let f = a.flush(T + 60);
        assert_eq!(f.counts.len(), 3);
        assert_eq!(f.dropped, vec![(T - 20, 997)]);
        // Flushing made room again.
        assert_eq!(a.record(5, T + 60), Recorded::First);
        assert!(a.flush(T + 60).dropped.is_empty());
    }

    #[test]
    fn a_late_event_for_an_earlier_minute_is_still_counted_there() {
        let mut a = Aggregator::new(8);
        a.record('x', T + 60);
        // The clock stepped back a minute.
        assert_eq!(a.record('x', T), Recorded::First);
        let f = a.flush(T + 60);
        assert_eq!(
            f.counts,
            vec![Count {
                minute: T - 20,
                key: 'x',
                count: 1
            }]
        );
        assert_eq!(a.len(), 1);
    }

    proptest::proptest! {
        /// Nothing is lost: every event comes out either in a count or as
        /// dropped, and the table never exceeds its capacity.
        #[test]
        fn every_event_is_accounted_for(
            events in proptest::collection::vec((0u8..20, 0u64..300), 0..300),
            capacity in 1usize..12,
            flush_every in 1usize..50,
        ) {
            let mut a = Aggregator::new(capacity);
            let mut out = 0u64;
            let mut now = T;
            for (i, (k, step)) in events.iter().enumerate() {
                now += step;
                a.record(*k, now);
                proptest::prop_assert!(a.len() <= capacity);
                if i % flush_every == 0 {
                    let f = a.flush(now);
                    out += f.counts.iter().map(|c| c.count).sum::<u64>();
                    out += f.dropped.iter().map(|d| d.1).sum::<u64>();
                }
            }
            let f = a.flush_all();
            out += f.counts.iter().map(|c| c.count).sum::<u64>();
            out += f.dropped.iter().map(|d| d.1).sum::<u64>();
            proptest::prop_assert_eq!(out, events.len() as u64);
        }
    }
}
