//! The anti-replay window for data packets.
//!
//! A receiver remembers which of the last [`WINDOW`] counters it has accepted.
//! [`ReplayWindow::check`] is a cheap pre-filter that may run before
//! decryption; [`ReplayWindow::accept`] must only be called *after* the packet
//! authenticated, so that forged packets can never move the window.

/// How many counters behind the highest one are still accepted.
pub const WINDOW: u64 = (BLOCKS as u64 - 1) * 64;
const BLOCKS: usize = 33;

/// Counters at or above this are never valid (the sender rekeys long before).
pub const COUNTER_LIMIT: u64 = 1 << 60;

/// A sliding bitmap over packet counters, as a ring of 64-bit blocks.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    highest: u64,
    bitmap: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: every counter below [`COUNTER_LIMIT`] is new.
    pub fn new() -> Self {
        Self {
            highest: 0,
            bitmap: [0; BLOCKS],
        }
    }

    /// True once any counter was accepted.
    pub fn seen_any(&self) -> bool {
        self.highest > 0 || self.bitmap.iter().any(|b| *b != 0)
    }

    /// Would `counter` be accepted? Does not change the window.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= COUNTER_LIMIT {
            return false;
        }
        if counter > self.highest {
            return true;
        }
        if self.highest - counter >= WINDOW {
            return false;
        }
        let block = (counter >> 6) as usize % BLOCKS;
        self.bitmap[block] & (1 << (counter & 63)) == 0
    }

    /// Records `counter` as received. Returns false (and changes nothing) if
    /// it is a replay or too old. Call only for authenticated packets.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter > self.highest {
            let current = self.highest >> 6;
            let target = counter >> 6;
            let clear = (target - current).min(BLOCKS as u64);
            for i in 1..=clear {
                self.bitmap[((current + i) % BLOCKS as u64) as usize] = 0;
            }
            self.highest = counter;
        }
        let block = (counter >> 6) as usize % BLOCKS;
        self.bitmap[block] |= 1 << (counter & 63);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// The obvious model: a set of everything seen and the highest counter.
    #[derive(Default)]
    struct Naive {
        seen: HashSet<u64>,
        highest: Option<u64>,
    }

    impl Naive {
        fn accept(&mut self, c: u64) -> bool {
            if c >= COUNTER_LIMIT || self.seen.contains(&c) {
                return false;
            }
            if let Some(h) = self.highest {
                if c < h && h - c >= WINDOW {
                    return false;
                }
            }
            self.seen.insert(c);
            self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
            true
        }
    }

    #[test]
    fn basic_rules() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(0));
        assert!(!w.accept(0), "replay of 0");
        assert!(w.accept(5));
        assert!(w.accept(3), "out of order but inside the window");
        assert!(!w.accept(3));
        assert!(w.accept(5000));
        assert!(!w.accept(5000 - WINDOW), "just outside the window");
        assert!(w.accept(5000 - WINDOW + 1), "just inside the window");
        assert!(!w.accept(COUNTER_LIMIT));
        assert!(w.check(6000));
        assert!(w.check(6000), "check does not move the window");
    }

    #[test]
    fn window_is_at_least_2048() {
        const { assert!(WINDOW >= 2048) };
    }

    proptest! {
        #[test]
        fn matches_naive_model(ops in proptest::collection::vec(
            prop_oneof![
                0u64..200,                       // dense, many replays
                0u64..10_000,                    // jumps across blocks
                (0u64..4).prop_map(|k| k * 3000),
            ], 1..600)) {
            let mut w = ReplayWindow::new();
            let mut n = Naive::default();
            for c in ops {
                let expected = n.accept(c);
                prop_assert_eq!(w.check(c), expected, "check({})", c);
                prop_assert_eq!(w.accept(c), expected, "accept({})", c);
            }
        }

        #[test]
        fn monotone_with_gaps(start in 0u64..1_000_000, steps in proptest::collection::vec(1u64..5000, 1..200)) {
            let mut w = ReplayWindow::new();
            let mut n = Naive::default();
            let mut c = start;
            for s in steps {
                c += s;
                prop_assert_eq!(w.accept(c), n.accept(c));
                let old = c.saturating_sub(s / 2);
                prop_assert_eq!(w.accept(old), n.accept(old));
            }
        }
    }
}
