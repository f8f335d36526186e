//! The portal in a real browser: Debian's Chromium driven through
//! chromedriver (WebDriver), against a real controller and agent on the real
//! libvirtd. A member sets a password from an invitation, signs in (in
//! Indonesian), requests a VPS; an operator approves it from the queue; the
//! member sees it running, stops it and deletes it. A form posted without
//! its CSRF token changes nothing; another institution's VPS is a
//! not-found page; the pages fit 360 px.
//!
//! Needs root, libvirtd, chromium and chromium-driver (`deploy/test.sh`
//! installs them); fails, never skips, when they are missing. With
//! `BETANG_SCREENSHOTS=DIR` it also saves the main pages as PNG files there.

use std::{process::Stdio, time::Duration};

use anyhow::Context;
use betang_proto::v1::{CreateInvitationRequest, GetVpsRequest, Quota, VpsState, WhoAmIRequest};
use betang_tests::{Clients, eventually, real::RealHost, wait_state};
use fantoccini::{Client, ClientBuilder, Locator};

const T: Duration = Duration::from_secs(240);

/// chromedriver on a port of its own, stopped when dropped.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> anyhow::Result<Driver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("chromedriver must be installed (chromium-driver); run deploy/test.sh")?;
        let url = format!("http://127.0.0.1:{port}");
        eventually(
            Duration::from_secs(30),
            "chromedriver listening",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await?;
        Ok(Driver { child, url })
    }

    /// A new headless Chromium with an empty profile of its own, talking to
    /// nothing but loopback.
    async fn browser(&self, profile: &std::path::Path) -> anyhow::Result<Client> {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let http = hyper_util::client::legacy::connect::HttpConnector::new();
        Ok(ClientBuilder::new(http)
            .capabilities(caps)
            .connect(&self.url)
            .await?)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn text_of(c: &Client) -> anyhow::Result<String> {
    Ok(c.find(Locator::Css("body")).await?.text().await?)
}

/// Waits until the page in the browser says `what` (a form's answer may
/// still be loading when asked).
async fn says(c: &Client, what: &str) -> anyhow::Result<()> {
    let waited = eventually(Duration::from_secs(20), what, || async {
        text_of(c).await.ok()?.contains(what).then_some(())
    })
    .await;
    if let Err(e) = waited {
        let page = text_of(c).await.unwrap_or_default();
        anyhow::bail!("{e}; {:?} says: {page}", c.current_url().await.ok());
    }
    Ok(())
}

async fn fill(c: &Client, css: &str, value: &str) -> anyhow::Result<()> {
    let e = c.find(Locator::Css(css)).await?;
    e.clear().await?;
    e.send_keys(value).await?;
    Ok(())
}

async fn click(c: &Client, css: &str) -> anyhow::Result<()> {
    c.find(Locator::Css(css)).await?.click().await?;
    Ok(())
}

/// Reloads `url` until its page says `what`.
async fn until_page_says(c: &Client, url: &str, what: &str) -> anyhow::Result<()> {
    eventually(T, what, || async {
        c.goto(url).await.ok()?;
        text_of(c).await.ok()?.contains(what).then_some(())
    })
    .await
}

async fn shot(c: &Client, name: &str) -> anyhow::Result<()> {
    if let Ok(dir) = std::env::var("BETANG_SCREENSHOTS") {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(format!("{dir}/{name}.png"), c.screenshot().await?)?;
    }
    Ok(())
}

/// The page is no wider than the window: nothing to scroll sideways.
async fn fits(c: &Client, width: u32) -> anyhow::Result<()> {
    let w = c
        .execute("return document.documentElement.scrollWidth", vec![])
        .await?
        .as_u64()
        .context("a width")?;
    anyhow::ensure!(
        w <= u64::from(width),
        "the page is {w} px wide at {width} px"
    );
    Ok(())
}

/// An invitation, its password set in the browser, and a sign-in.
async fn join(
    c: &Client,
    portal: &str,
    admin: &Clients,
    username: &str,
    password: &str,
) -> anyhow::Result<()> {
    let invitation = admin
        .identity
        .clone()
        .create_invitation(CreateInvitationRequest {
            user: username.into(),
        })
        .await?
        .into_inner();
    c.goto(&format!("{portal}/invite/{}", invitation.secret))
        .await?;
    says(c, "Atur kata sandi").await?;
    fill(c, "#password", password).await?;
    fill(c, "#again", password).await?;
    click(c, "#save").await?;
    says(c, "Kata sandi tersimpan").await?;
    sign_in(c, portal, username, password).await
}

async fn sign_in(c: &Client, portal: &str, username: &str, password: &str) -> anyhow::Result<()> {
    c.goto(&format!("{portal}/sign-in")).await?;
    fill(c, "#username", username).await?;
    fill(c, "#password", password).await?;
    click(c, "#sign-in").await?;
    says(c, "Daftar VPS").await
}

/// A raw form post with only the session cookie: what a forged form from
/// another site would send. Returns the status code.
async fn post_without_token(
    addr: std::net::SocketAddr,
    path: &str,
    session: &str,
) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let body = "reason=forged";
    s.write_all(
        format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nCookie: betang_session={session}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let head = String::from_utf8_lossy(&raw);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("an HTTP status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_and_an_operator_take_a_vps_through_its_life_in_chromium() -> anyhow::Result<()> {
    let host = RealHost::start(Quota {
        vcpus: 4,
        memory_mib: 4096,
        disk_gib: 40,
        vps_count: 4,
    })
    .await?;
    let addr = host
        .controller
        .portal_addr
        .context("portal_listen is set")?;
    let portal = format!("http://{addr}");
    let admin = Clients::connect(&host.endpoint, Some(&host.people.admin)).await?;
    let member = host.member().await?;
    let op = host.operator().await?;
    let whoami = |c: &Clients| {
        let mut i = c.identity.clone();
        async move { anyhow::Ok(i.who_am_i(WhoAmIRequest {}).await?.into_inner().username) }
    };
    let (member_name, op_name) = (whoami(&member).await?, whoami(&op).await?);

    let driver = Driver::start().await?;
    let profiles = tempfile::tempdir()?;
    let a = driver.browser(&profiles.path().join("member")).await?;
    let result = async {
        // The member joins and requests a VPS, in Indonesian.
        join(&a, &portal, &admin, &member_name, "kata-sandi-anggota-1").await?;
        says(&a, "Kuota instansi").await?;
        shot(&a, "vps-list-id").await?;
        a.goto(&format!("{portal}/vps/new")).await?;
        says(&a, "Ajukan VPS baru").await?;
        let name = format!("{}-portal", host.prefix);
        fill(&a, "#name", &name).await?;
        a.find(Locator::Css("#size"))
            .await?
            .select_by_value("xs")
            .await?;
        a.find(Locator::Css("#image"))
            .await?
            .select_by_value("betang-test")
            .await?;
        fill(&a, "#app_name", "Situs Dinas").await?;
        fill(&a, "#app_kind", "website").await?;
        fill(&a, "#responsible_name", "Ani").await?;
        fill(&a, "#responsible_nip", "198001012005011001").await?;
        shot(&a, "request-id").await?;
        click(&a, "#submit").await?;
        says(&a, "Menunggu persetujuan").await?;
        let url = a.current_url().await?.to_string();
        let id = url
            .rsplit('/')
            .next()
            .context("the VPS page's address")?
            .to_owned();
        let v = member
            .vps
            .clone()
            .get_vps(GetVpsRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(v.state() == VpsState::PendingApproval);
        anyhow::ensure!(v.application.unwrap_or_default().responsible_nip == "198001012005011001");

        // A form without its CSRF token: refused, nothing changes.
        let cookie = a
            .get_named_cookie("betang_session")
            .await?
            .value()
            .to_owned();
        let status = post_without_token(addr, &format!("/vps/{id}/cancel"), &cookie).await?;
        anyhow::ensure!(status == 403, "a forged cancel answered {status}");
        wait_state(&member.vps, &id, VpsState::PendingApproval, T).await?;

        // Another institution's VPS, by editing the address: not found.
        let theirs = Clients::connect(&host.endpoint, Some(&host.people.member_b)).await?;
        let mut other = host.small_vps("other");
        other.institution_id = host.people.inst_b.clone();
        let other = theirs.vps.clone().create_vps(other).await?.into_inner();
        a.goto(&format!("{portal}/vps/{}", other.id)).await?;
        let page = text_of(&a).await?;
        anyhow::ensure!(
            page.contains("tidak ditemukan")
                && !page.contains(&other.spec.unwrap_or_default().name),
            "{page}"
        );

        // 360 px wide: every main page fits.
        a.set_window_size(360, 800).await?;
        for path in ["/vps", "/vps/new", &format!("/vps/{id}")] {
            a.goto(&format!("{portal}{path}")).await?;
            fits(&a, 360).await?;
        }
        a.set_window_size(1280, 900).await?;

        // The operator approves it from the queue.
        let b = driver.browser(&profiles.path().join("operator")).await?;
        let approved = async {
            join(&b, &portal, &admin, &op_name, "kata-sandi-operator-1").await?;
            b.goto(&format!("{portal}/queue")).await?;
            says(&b, &name).await?;
            shot(&b, "queue-id").await?;
            click(&b, &format!("tr[data-id='{id}'] a")).await?;
            says(&b, "Setujui").await?;
            click(&b, "#approve").await?;
            until_page_says(&b, &format!("{portal}/vps/{id}"), "Berjalan").await?;
            // And reads it in English, on the switch.
            click(&b, "a[lang='en']").await?;
            let page = text_of(&b).await?;
            anyhow::ensure!(
                page.contains("Running") && page.contains("Sign out"),
                "{page}"
            );
            shot(&b, "vps-en").await?;
            b.clone().close().await?;
            anyhow::Ok(())
        }
        .await;
        approved?;

        // The member sees it running, stops it, and deletes it.
        until_page_says(&a, &format!("{portal}/vps/{id}"), "Berjalan").await?;
        shot(&a, "vps-id").await?;
        click(&a, "#do-stop").await?;
        says(&a, "Konfirmasi").await?;
        click(&a, "#confirm").await?;
        until_page_says(&a, &format!("{portal}/vps/{id}"), "Mati").await?;
        wait_state(&member.vps, &id, VpsState::Stopped, T).await?;
        click(&a, "#do-delete").await?;
        says(&a, "Konfirmasi").await?;
        click(&a, "#confirm").await?;
        wait_state(&member.vps, &id, VpsState::Deleted, T).await?;
        anyhow::ensure!(host.domain(&id).is_none(), "the domain is gone");

        // Signed out, the session no longer opens a page.
        click(&a, "form.who button[value='']").await?;
        says(&a, "Masuk").await?;
        a.goto(&format!("{portal}/vps")).await?;
        anyhow::ensure!(a.current_url().await?.path() == "/sign-in");
        let status = post_without_token(addr, "/sign-out", &cookie).await?;
        anyhow::ensure!(
            status == 303,
            "an ended session is sent to sign in: {status}"
        );
        anyhow::Ok(())
    }
    .await;
    a.close().await.ok();
    result
}
