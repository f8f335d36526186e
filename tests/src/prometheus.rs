//! A real Prometheus server (Debian's `prometheus`) on loopback for the
//! end-to-end tests, scraping given targets every second with Betang's alert
//! rules loaded. Killed when dropped, also when a test fails.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};

use crate::{eventually, http_get, workspace_root};

pub struct Prometheus {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
}

/// Query-string encoding of a PromQL expression.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus with its data under `dir`, scraping `agents` as job
    /// `betang-agent` and `controller` as job `betang-controller`.
    pub async fn start(
        dir: &Path,
        agents: &[SocketAddr],
        controller: SocketAddr,
    ) -> anyhow::Result<Prometheus> {
        let rules = workspace_root().join("deploy/prometheus/betang-rules.yml");
        let targets = |a: &[SocketAddr]| {
            a.iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n\
             \x20 - job_name: betang-agent\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: betang-controller\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets(agents),
            targets(&[controller]),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        // A free loopback port, given back just before Prometheus takes it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context(
                "starting prometheus (Debian package prometheus; deploy/test.sh installs it)",
            )?;
        let p = Prometheus {
            addr,
            _child: child,
        };
        eventually(Duration::from_secs(30), "Prometheus ready", || async {
            http_get(addr, "/-/ready").await.ok().map(|_| ())
        })
        .await?;
        Ok(p)
    }

    /// `GET /api/v1/<path>`; the `data` of a successful answer.
    pub async fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let body = http_get(self.addr, &format!("/api/v1/{path}")).await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        if v["status"] != "success" {
            bail!("Prometheus refused {path}: {body}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let data = self.api(&format!("query?query={}", encode(promql))).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query that yields one sample, if it does.
    pub async fn value(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await.ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Every metric name Prometheus holds.
    pub async fn names(&self) -> anyhow::Result<Vec<String>> {
        let data = self.api("label/__name__/values").await?;
        Ok(data
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Every PromQL expression Betang ships: the alert rules and the dashboard's panels.
pub fn shipped_expressions() -> anyhow::Result<Vec<String>> {
    let root = workspace_root().join("deploy");
    let mut out = Vec::new();
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("grafana/betang-dashboard.json"),
    )?)?;
    for p in dash["panels"].as_array().context("dashboard panels")? {
        for t in p["targets"].as_array().context("panel targets")? {
            out.push(t["expr"].as_str().context("target expr")?.to_owned());
        }
    }
    // The rules file is YAML; each `expr:` is one line or a `|` block below it.
    let rules = std::fs::read_to_string(root.join("prometheus/betang-rules.yml"))?;
    let mut lines = rules.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(rest) = l.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = l.len() - l.trim_start().len();
        if rest.trim() == "|" {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                if next.len() - next.trim_start().len() <= indent && !next.trim().is_empty() {
                    break;
                }
                block.push_str(next.trim());
                block.push(' ');
                lines.next();
            }
            out.push(block.trim().to_owned());
        } else {
            out.push(rest.trim().to_owned());
        }
    }
    Ok(out)
}

/// The `betang_…` metric names an expression reads.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("betang_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}
