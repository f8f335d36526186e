//! Bounded use: one member's flood of requests, a flood of made-up tokens,
//! clients that open calls and never finish sending them, and oversized
//! requests each leave another institution's member their usual latency.
//! Prints its figures as one line of JSON.

use std::time::{Duration, Instant};

use betang_controller::{error::RETRY_AFTER_MS, limits::LimitsConfig};
use betang_proto::v1::{CreateVpsRequest, ListVpsRequest};
use betang_tests::{Clients, Cluster, ClusterOptions};
use tonic::Code;

const RATE: u32 = 20;
const BURST: u32 = 40;
/// The server's time limit for one call here.
const CALL_LIMIT: Duration = Duration::from_secs(2);
const STREAMS: u32 = 16;

/// Another institution's latency under each attack may grow by this much
/// at the 99th percentile over its quiet figure: the two cores here serve
/// the attacker's traffic too. Refused calls cost microseconds each.
const LATENCY_ALLOWANCE: Duration = Duration::from_millis(150);

async fn list(c: &Clients) -> Result<(), tonic::Status> {
    c.vps
        .clone()
        .list_vps(ListVpsRequest::default())
        .await
        .map(|_| ())
}

/// Member B's p99 over `n` calls, one after another.
async fn p99(b: &Clients, n: usize) -> anyhow::Result<Duration> {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        list(b).await?;
        took.push(t.elapsed());
        // Paced under the rate, so B never meets its own budget.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    took.sort();
    Ok(took[(n * 99 / 100).min(n - 1)])
}

fn within(quiet: Duration, loaded: Duration, what: &str) {
    assert!(
        loaded <= quiet + LATENCY_ALLOWANCE,
        "{what}: member B's p99 {loaded:?}, quiet {quiet:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_callers_flood_and_slow_streams_leave_others_their_latency() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        limits: Some(LimitsConfig {
            requests_per_second: RATE,
            burst: BURST,
            request_timeout_seconds: CALL_LIMIT.as_secs(),
            streams_per_connection: STREAMS,
            ..LimitsConfig::default()
        }),
        ..Default::default()
    })
    .await?;
    let a = cluster.clients(&cluster.people.member_a).await?;
    let b = cluster.clients(&cluster.people.member_b).await?;
    let quiet = p99(&b, 60).await?;

    // Member A's burst: beyond it, calls are refused with a wait.
    let started = Instant::now();
    let flood = futures::future::join_all((0..200).map(|_| {
        let a = a.clone();
        async move { list(&a).await }
    }));
    let (answers, during_flood) = tokio::join!(flood, p99(&b, 30));
    let elapsed = started.elapsed();
    let during_flood = during_flood?;
    let served = answers.iter().filter(|r| r.is_ok()).count() as u32;
    let refused: Vec<&tonic::Status> = answers.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused.iter().all(|s| s.code() == Code::ResourceExhausted),
        "{:?}",
        refused.iter().find(|s| s.code() != Code::ResourceExhausted)
    );
    let budget = BURST + (elapsed.as_secs_f64() * f64::from(RATE)).ceil() as u32;
    assert!(
        (BURST..=budget).contains(&served),
        "{served} served in {elapsed:?}, budget {budget}"
    );
    let hint: u64 = refused
        .first()
        .expect("some calls refused")
        .metadata()
        .get(RETRY_AFTER_MS)
        .expect("a retry hint")
        .to_str()?
        .parse()?;
    assert!(
        (1..=1000 / u64::from(RATE) + 1).contains(&hint),
        "retry after {hint} ms"
    );
    assert!(refused[0].message().contains("retry in"), "{refused:?}");
    within(quiet, during_flood, "one member's flood");
    tokio::time::sleep(Duration::from_millis(hint + 50)).await;
    list(&a).await.expect("served again after the wait");

    // Made-up tokens: refused from memory or a few at a time, never served,
    // never queued in front of B.
    let endpoint = cluster.endpoint.clone();
    let strangers = tokio::spawn(async move {
        let mut codes = Vec::new();
        for round in 0..20 {
            let calls = (0..50).map(|i| {
                let endpoint = endpoint.clone();
                async move {
                    let token = format!("btg_{:064x}", round * 1000 + i);
                    let c = Clients::connect(&endpoint, Some(&token)).await?;
                    anyhow::Ok(list(&c).await.err().map(|s| s.code()))
                }
            });
            for r in futures::future::join_all(calls).await {
                codes.push(r?);
            }
        }
        anyhow::Ok(codes)
    });
    let during_strangers = p99(&b, 30).await?;
    let codes = strangers.await??;
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Some(Code::Unauthenticated | Code::Unavailable))),
        "{codes:?}"
    );
    within(quiet, during_strangers, "a flood of made-up tokens");

    // Slow clients: calls opened and never finished are ended at the time
    // limit, and B is served meanwhile.
    let addr = cluster
        .endpoint
        .trim_start_matches("http://")
        .parse::<std::net::SocketAddr>()?;
    let token = cluster.people.member_a.clone();
    let slow = tokio::spawn(async move {
        let mut ends = Vec::new();
        let mut pending = Vec::new();
        for _ in 0..4 {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let (client, conn) = h2::client::handshake(tcp).await?;
            tokio::spawn(conn);
            for _ in 0..STREAMS {
                let mut client = client.clone().ready().await?;
                let req = http::Request::builder()
                    .method("POST")
                    .uri(format!("http://{addr}/betang.v1.VpsService/GetVps"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .header("authorization", format!("Bearer {token}"))
                    .body(())?;
                let (response, mut body) = client.send_request(req, false)?;
                // A message header promising 100 bytes, and then nothing.
                body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 100]), false)?;
                pending.push((Instant::now(), response, body));
            }
        }
        for (opened, response, _body) in pending {
            let r = tokio::time::timeout(CALL_LIMIT * 5, response).await;
            let status = match r {
                Ok(Ok(resp)) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned(),
                Ok(Err(e)) => format!("reset: {e}"),
                Err(_) => "still open".to_owned(),
            };
            ends.push((opened.elapsed(), status));
        }
        anyhow::Ok(ends)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during_slow = p99(&b, 30).await?;
    let ends = slow.await??;
    assert_eq!(ends.len(), 4 * STREAMS as usize);
    let longest = ends.iter().map(|(d, _)| *d).max().unwrap_or_default();
    for (took, status) in &ends {
        assert!(
            status != "still open" && status != "0",
            "a slow call ended with {status} after {took:?}"
        );
    }
    assert!(
        longest <= CALL_LIMIT + Duration::from_secs(3),
        "the slowest call ended after {longest:?}"
    );
    within(quiet, during_slow, "slow streams");

    // Oversized: refused before it is read into a request.
    let mut big = cluster.create(cluster.spec("big"));
    if let Some(spec) = big.spec.as_mut() {
        spec.user_data = "x".repeat(2 << 20);
    }
    let e = a
        .vps
        .clone()
        .create_vps(CreateVpsRequest {
            institution_id: String::new(),
            ..big
        })
        .await
        .expect_err("a 2 MiB request is refused");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    list(&b).await?;

    println!(
        "{}",
        serde_json::json!({
            "member_b_p99_quiet_ms": quiet.as_secs_f64() * 1e3,
            "member_b_p99_during_flood_ms": during_flood.as_secs_f64() * 1e3,
            "member_b_p99_during_made_up_tokens_ms": during_strangers.as_secs_f64() * 1e3,
            "member_b_p99_during_slow_streams_ms": during_slow.as_secs_f64() * 1e3,
            "flood_served": served,
            "flood_refused": refused.len(),
            "slow_calls_ended_within_s": longest.as_secs_f64(),
        })
    );
    Ok(())
}
