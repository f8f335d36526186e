//! SIGTERM, as systemd and `kill` send it: the real controller binary stops
//! taking connections at once, lets a call under way finish with its
//! answer, and then exits 0.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use betang_tests::{Clients, chaos::default_bin_dir};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_under_way_finish_then_exits() -> anyhow::Result<()> {
    let bin = default_bin_dir()?.join("betang-controller");
    let dir = tempfile::tempdir()?;
    let (api, registry) = (free_port()?, free_port()?);
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{api}\"\nagent_listen = \"127.0.0.1:{registry}\"\n\
             data_dir = {:?}\n",
            dir.path().join("data").display().to_string()
        ),
    )?;
    let token = betang_tests::bench::bootstrap_admin(&bin, &config).await?;
    let mut child = tokio::process::Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("controller.log"))?)
        .kill_on_drop(true)
        .spawn()?;
    let endpoint = format!("http://127.0.0.1:{api}");
    betang_tests::eventually(Duration::from_secs(30), "the controller up", || async {
        let mut c = Clients::connect(&endpoint, Some(&token)).await.ok()?;
        c.identity
            .who_am_i(betang_proto::v1::WhoAmIRequest {})
            .await
            .ok()
    })
    .await?;

    // A call under way: WhoAmI, whose (empty) message is sent in two parts,
    // the second only after SIGTERM.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{api}").parse()?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut client = client.ready().await?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/betang.v1.IdentityService/WhoAmI"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())?;
    let (response, mut body) = client.send_request(req, false)?;
    body.send_data(bytes::Bytes::from_static(&[0, 0]), false)?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pid = child.id().expect("running");
    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    anyhow::ensure!(kill.success(), "kill -TERM {pid}");

    // New connections are refused while the call is still open.
    betang_tests::eventually(
        Duration::from_secs(5),
        "new connections refused",
        || async {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await?;
    let refused_after = signalled.elapsed();
    assert!(
        child.try_wait()?.is_none(),
        "the controller waits for the call under way"
    );

    body.send_data(bytes::Bytes::from_static(&[0, 0, 0]), true)?;
    let response = tokio::time::timeout(Duration::from_secs(10), response).await??;
    let mut status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let mut stream = response.into_body();
    let mut answer = Vec::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk?;
        let _ = stream.flow_control().release_capacity(chunk.len());
        answer.extend_from_slice(&chunk);
    }
    if status.is_none() {
        status = stream.trailers().await?.and_then(|t| {
            t.get("grpc-status")
                .map(|v| v.to_str().unwrap_or("?").to_owned())
        });
    }
    assert_eq!(
        status.as_deref(),
        Some("0"),
        "the call under way is answered"
    );
    assert!(answer.len() > 5, "with its message");

    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    let exited_after = signalled.elapsed();
    assert!(exit.success(), "{exit}");
    let log = std::fs::read_to_string(dir.path().join("controller.log"))?;
    assert!(log.contains("finishing those under way"), "{log}");
    println!(
        "{}",
        serde_json::json!({
            "connections_refused_after_sigterm_s": refused_after.as_secs_f64(),
            "exited_after_sigterm_s": exited_after.as_secs_f64(),
        })
    );
    Ok(())
}
