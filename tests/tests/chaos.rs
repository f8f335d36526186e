//! The short form of the fault-injection suite, run with every test run:
//! the real controller and agent binaries killed at random moments of random
//! requests, with every invariant checked after each round. The long form is
//! `bash deploy/chaos.sh --rounds 500`.

use std::time::Duration;

use betang_tests::chaos::{ChaosOptions, default_bin_dir, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_during_random_requests_break_no_invariant() -> anyhow::Result<()> {
    let seed = std::env::var("BETANG_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
        });
    // Printed so that a failure replays (BETANG_CHAOS_SEED=…).
    println!("chaos seed {seed}");
    let report = run(ChaosOptions {
        rounds: 12,
        seed,
        hosts: 3,
        bin_dir: default_bin_dir()?,
        settle: Duration::from_secs(120),
        verbose: true,
    })
    .await?;
    println!("{}", report.json(seed));
    assert_eq!(report.rounds, 12);
    assert_eq!(report.faults, 12, "a fault in every round");
    assert!(report.acknowledged > 0, "some creates were acknowledged");
    assert_eq!(
        report.total_violations(),
        0,
        "seed {seed}: {:#?}",
        report.examples
    );
    Ok(())
}
