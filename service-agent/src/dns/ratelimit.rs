//! Queries a second per source address: one pod flooding the server gets
//! its excess dropped, and every other pod is still answered.
use std::{collections::HashMap, net::IpAddr, sync::Mutex, time::Instant};

/// Sources remembered at most; past that the idle ones are forgotten first,
/// so a flood of spoofed sources costs bounded memory.
const MAX_SOURCES: usize = 16_384;

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimit {
    /// Queries a second per source; 0 is no limit.
    per_second: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `src` may have one more query now. A source can burst a
    /// second's worth, then gets its rate.
    pub fn allow(&self, src: IpAddr, now: Instant) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let rate = f64::from(self.per_second);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&src) {
            // Full buckets are the same as forgotten ones.
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < rate);
            if buckets.len() >= MAX_SOURCES {
                buckets.clear();
            }
        }
        let b = buckets.entry(src).or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_untouched() {
        let rl = RateLimit::new(10);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let allowed = (0..100).filter(|_| rl.allow(a, t0)).count();
        assert_eq!(allowed, 10);
        assert!(rl.allow(b, t0));
        assert!(!rl.allow(a, t0));
        assert!(rl.allow(a, t0 + Duration::from_millis(150)));
        assert!(RateLimit::new(0).allow(a, t0));
    }
}
