//! The one random number generator of the tests and the bench: seeded, so a
//! failing run can be repeated, and without a dependency.
//!
//! Tests take their seed from `TEST_SEED` (decimal or 0x-hex; `FUZZ_SEED`,
//! which `cargo xtask fuzz --seed` sets, is read when it is absent) and a
//! fixed default otherwise, so an unchanged tree draws the same packets on
//! every run. A test that panics while its generator is alive prints the
//! seed that repeats it.

/// The seed when no variable names one.
pub const DEFAULT_SEED: u64 = 0x005e_ed0f_5e1c;

/// xorshift64*: fast, reproducible from the seed, good enough to spread test inputs.
pub struct Rng {
    state: u64,
    /// The seed the tests were run with and the stream this generator draws
    /// from it, for the message on failure.
    seed: u64,
    stream: &'static str,
}

/// The run's seed: `TEST_SEED`, else `FUZZ_SEED`, else `DEFAULT_SEED`.
pub fn seed() -> u64 {
    for var in ["TEST_SEED", "FUZZ_SEED"] {
        if let Ok(v) = std::env::var(var) {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                None => v.replace('_', "").parse(),
            };
            return parsed.unwrap_or_else(|e| panic!("{var}={v:?}: {e}"));
        }
    }
    DEFAULT_SEED
}

impl Rng {
    /// A generator for `stream` (one per test, so two tests never draw the
    /// same sequence) from the run's seed.
    pub fn for_test(stream: &'static str) -> Self {
        let seed = seed();
        // FNV-1a of the stream name, mixed into the seed.
        let h = stream.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Self::with_seed(seed ^ h, seed, stream)
    }

    /// A generator from a fixed seed, for code with no test around it (the bench).
    pub fn fixed(seed: u64) -> Self {
        Self::with_seed(seed, seed, "")
    }

    fn with_seed(state: u64, seed: u64, stream: &'static str) -> Self {
        // xorshift never leaves zero.
        let state = if state == 0 { DEFAULT_SEED } else { state };
        Self {
            state,
            seed,
            stream,
        }
    }

    /// The seed the run was started with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.stream.is_empty() {
            eprintln!(
                "random inputs of {}: rerun with TEST_SEED={:#x} to repeat them",
                self.stream, self.seed
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_of_one_seed_differ_and_repeat() {
        let draw = |s| {
            let mut r = Rng::for_test(s);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw("a"), draw("a"));
        assert_ne!(draw("a"), draw("b"));
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::fixed(7);
        assert!((0..1000).all(|_| r.below(10) < 10));
    }
}
