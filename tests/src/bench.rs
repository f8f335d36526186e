//! What the benchmarks share: arguments, process figures from /proc, percentiles.

use std::time::Duration;

/// Runs `betang-controller --config CONFIG bootstrap-admin` and answers the
/// first admin's token, as `deploy/up.sh` does.
pub async fn bootstrap_admin(
    bin: &std::path::Path,
    config: &std::path::Path,
) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("bootstrap-admin")
        .env("RUST_LOG", "error")
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "bootstrap-admin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `--name N` from the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User plus system CPU seconds a process (or `self`) has used so far.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// A `Key:  N kB` line of /proc/<pid>/status (or smaps_rollup), in MiB.
pub fn proc_mib(pid: &str, file: &str, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The `p` quantile of sorted durations, in milliseconds.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}
