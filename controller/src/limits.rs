//! How much one caller may ask of the controller, so that one member's
//! script or flood leaves the others their usual latency: a budget of
//! requests per token (a steady rate and a burst), and the server's own
//! bounds on time, streams and message sizes (applied in `server`).

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use serde::Deserialize;

use crate::error::ApiError;

/// `[limits]` in the controller's configuration.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests a second one token may make, over time; 0: no limit.
    #[serde(default = "default_rate")]
    pub requests_per_second: u32,
    /// Requests one token may make at once before the rate applies.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// A call not answered within this is ended with DEADLINE_EXCEEDED,
    /// however slowly its client sends.
    #[serde(default = "default_timeout_s")]
    pub request_timeout_seconds: u64,
    /// Calls one connection may have open at once.
    #[serde(default = "default_streams")]
    pub streams_per_connection: u32,
    /// The largest request the user API reads (a VPS request with its
    /// user-data and key is under 100 KiB).
    #[serde(default = "default_request_bytes")]
    pub max_request_bytes: usize,
}

fn default_rate() -> u32 {
    50
}
fn default_burst() -> u32 {
    200
}
fn default_timeout_s() -> u64 {
    60
}
fn default_streams() -> u32 {
    64
}
fn default_request_bytes() -> usize {
    1024 * 1024
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_second: default_rate(),
            burst: default_burst(),
            request_timeout_seconds: default_timeout_s(),
            streams_per_connection: default_streams(),
            max_request_bytes: default_request_bytes(),
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.requests_per_second == 0 || self.burst >= 1,
            "limits.burst: must be at least 1 when limits.requests_per_second is set"
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.request_timeout_seconds),
            "limits.request_timeout_seconds: must be between 1 and 3600, got {}",
            self.request_timeout_seconds
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.streams_per_connection),
            "limits.streams_per_connection: must be between 1 and 10000, got {}",
            self.streams_per_connection
        );
        anyhow::ensure!(
            (64 * 1024..=64 * 1024 * 1024).contains(&self.max_request_bytes),
            "limits.max_request_bytes: must be between 65536 and 67108864, got {}",
            self.max_request_bytes
        );
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }
}

/// Each token's request budget.
pub struct RateLimits {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(cfg: &LimitsConfig) -> Self {
        let limiter = NonZeroU32::new(cfg.requests_per_second).map(|rate| {
            let burst = NonZeroU32::new(cfg.burst).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        RateLimits {
            limiter,
            clock: DefaultClock::default(),
        }
    }

    /// Spends one request of the token's budget, or says how long to wait.
    pub fn check(&self, token_hash: &str) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&token_hash.to_owned())
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                ApiError::RateLimited {
                    retry_after_ms: (wait.as_millis() as u64).max(1),
                }
            })
    }

    /// Forgets tokens whose budget is full again, so the table holds only
    /// those in use.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_past_its_burst_waits_and_others_do_not() {
        let limits = RateLimits::new(&LimitsConfig {
            requests_per_second: 2,
            burst: 3,
            ..LimitsConfig::default()
        });
        for _ in 0..3 {
            limits.check("a").unwrap();
        }
        match limits.check("a") {
            Err(ApiError::RateLimited { retry_after_ms }) => {
                assert!((1..=500).contains(&retry_after_ms), "{retry_after_ms}")
            }
            other => panic!("{other:?}"),
        }
        limits.check("b").unwrap();
        std::thread::sleep(Duration::from_millis(520));
        limits.check("a").unwrap();
    }

    #[test]
    fn zero_means_no_limit() {
        let limits = RateLimits::new(&LimitsConfig {
            requests_per_second: 0,
            ..LimitsConfig::default()
        });
        for _ in 0..10_000 {
            limits.check("a").unwrap();
        }
    }

    #[test]
    fn bounds_are_checked() {
        let bad = LimitsConfig {
            request_timeout_seconds: 0,
            ..LimitsConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .starts_with("limits.request_timeout_seconds:")
        );
        LimitsConfig::default().validate().unwrap();
    }
}
