//! Fault injection on the real binaries (see `betang_tests::chaos`).
//!
//! `bash deploy/chaos.sh --rounds 500 [--seed N] [--hosts 3] [--settle-seconds 90]`
//!
//! Prints a line per round, the violations found, and one line of JSON; exits
//! non-zero when any invariant was broken.

use std::time::Duration;

use betang_tests::{
    bench::arg,
    chaos::{ChaosOptions, default_bin_dir, run},
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seed = match arg("--seed", 0) {
        0 => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                % 1_000_000_007
        }
        s => s as u64,
    };
    let rounds = arg("--rounds", 100);
    println!("chaos: {rounds} rounds, seed {seed} (replay with --seed {seed})");
    let report = run(ChaosOptions {
        rounds,
        seed,
        hosts: arg("--hosts", 3),
        bin_dir: default_bin_dir()?,
        settle: Duration::from_secs(arg("--settle-seconds", 90) as u64),
        verbose: true,
    })
    .await?;
    for e in &report.examples {
        println!("{e}");
    }
    println!(
        "{} rounds, {} faults, {} requests ({} creates acknowledged), {} violations in {:.0} s",
        report.rounds,
        report.faults,
        report.requests,
        report.acknowledged,
        report.total_violations(),
        report.seconds
    );
    println!("{}", report.json(seed));
    if report.total_violations() > 0 {
        std::process::exit(1);
    }
    Ok(())
}
