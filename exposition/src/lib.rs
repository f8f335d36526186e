//! What the agent's and the controller's daemons share: the stop signal
//! and, mostly, `/metrics`. `prometheus-client`
//! writes OpenMetrics, which Prometheus asks for first; tools that ask for the
//! classic text format (`curl`, `promtool check metrics`) get that instead, the
//! same samples with `_total` on the counter families' own names.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{HeaderMap, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder,
        text::encode,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value escaped for the exposition: `prometheus-client` writes label
/// values verbatim, and a VPS name may hold `"`, `\` or a newline.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Label pairs of one sample, values already escaped.
pub type Labels = Vec<(&'static str, String)>;

/// One family with a sample per row; nothing when there are no rows.
fn family<T>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels, T)],
    sample: impl Fn(&T, MetricEncoder) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        sample(v, m.encode_family(labels)?)?;
    }
    Ok(())
}

pub fn gauges<T: EncodeGaugeValue + Copy>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, T)],
) -> Result<(), std::fmt::Error> {
    family(e, name, help, MetricType::Gauge, rows, |v, m| {
        ConstGauge::new(*v).encode(m)
    })
}

/// Counters are named without their `_total`, which the encoder adds.
pub fn counters<T: EncodeCounterValue + Copy>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, T)],
) -> Result<(), std::fmt::Error> {
    family(e, name, help, MetricType::Counter, rows, |v, m| {
        ConstCounter::new(*v).encode(m)
    })
}

/// The size of the last exposition, so the next one is allocated once
/// instead of grown by doubling (which briefly holds both copies).
static LAST_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(64 << 10);

/// The registry in OpenMetrics.
pub fn openmetrics(registry: &Registry) -> String {
    use std::sync::atomic::Ordering;
    let last = LAST_LEN.load(Ordering::Relaxed);
    let mut out = String::with_capacity(last + last / 8);
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    LAST_LEN.store(out.len(), Ordering::Relaxed);
    out
}

/// OpenMetrics turned into the classic text format: counter families are
/// named with their `_total`, and the `# UNIT` and `# EOF` lines go.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// Produces the exposition, in OpenMetrics, on every scrape.
pub type Render =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Refuses a `/metrics` address other machines can reach unless it asks for
/// a token: the figures name VPS and institutions.
pub fn check_listen(field: &str, addr: Option<SocketAddr>, token: bool) -> anyhow::Result<()> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !token => anyhow::bail!(
            "{field}: {a} can be reached from other machines, and its figures name VPS and \
             institutions: set metrics_token_file (Prometheus sends it with \
             authorization.credentials_file), or keep {field} on 127.0.0.1"
        ),
        _ => Ok(()),
    }
}

/// The token `/metrics` asks for, read from `path` (surrounding whitespace
/// dropped; an empty file is refused).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<Arc<str>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("metrics_token_file: {}: {e}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        token.len() >= 16,
        "metrics_token_file: {} must hold a token of at least 16 characters",
        path.display()
    );
    Ok(Arc::from(token))
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in
/// constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Serves `GET /metrics` until the task is dropped; with a `token`, only to
/// requests that carry it.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    token: Option<Arc<str>>,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let render = render.clone();
            let token = token.clone();
            async move {
                if let Some(t) = token
                    && !authorized(&headers, &t)
                {
                    return (
                        axum::http::StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "a bearer token is needed\n",
                    )
                        .into_response();
                }
                let body = render().await;
                if wants_openmetrics(&headers) {
                    ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
                } else {
                    (
                        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                        classic_text(&body),
                    )
                        .into_response()
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

pub async fn bind(field: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{field}: cannot bind {addr}: {e}")))
}

/// SIGINT from a terminal, or SIGTERM from systemd or `kill`: either asks a
/// daemon to finish the calls under way and stop.
pub async fn stop_requested() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The longest the calls under way may take to finish once a daemon is
/// asked to stop; the systemd units' `TimeoutStopSec` is longer.
pub const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_in_the_classic_format() {
        let om = "# HELP a_seconds CPU.\n# TYPE a_seconds counter\na_seconds_total{x=\"1\"} 2.0\n\
                  # HELP b_bytes Memory.\n# TYPE b_bytes gauge\nb_bytes 3\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_seconds_total CPU.\n# TYPE a_seconds_total counter\n\
             a_seconds_total{x=\"1\"} 2.0\n# HELP b_bytes Memory.\n# TYPE b_bytes gauge\nb_bytes 3\n"
        );
    }

    #[test]
    fn metrics_off_loopback_need_a_token() {
        let lo: SocketAddr = "127.0.0.1:9478".parse().unwrap();
        let all: SocketAddr = "0.0.0.0:9478".parse().unwrap();
        assert!(check_listen("metrics_listen", Some(lo), false).is_ok());
        assert!(check_listen("metrics_listen", None, false).is_ok());
        assert!(check_listen("metrics_listen", Some(all), true).is_ok());
        let e = check_listen("metrics_listen", Some(all), false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("metrics_listen: 0.0.0.0:9478 can be reached")
        );
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "s3cret-token-0123"));
        h.insert(
            header::AUTHORIZATION,
            "Bearer s3cret-token-0124".parse().unwrap(),
        );
        assert!(!authorized(&h, "s3cret-token-0123"));
        h.insert(
            header::AUTHORIZATION,
            "Bearer s3cret-token-0123".parse().unwrap(),
        );
        assert!(authorized(&h, "s3cret-token-0123"));
        h.insert(
            header::AUTHORIZATION,
            "Basic s3cret-token-0123".parse().unwrap(),
        );
        assert!(!authorized(&h, "s3cret-token-0123"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd<é>"), "a\\\"b\\\\c\\nd<é>");
    }
}
