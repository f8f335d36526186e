//! A portal visitor over plain HTTP/1.0 on loopback, for the tests that
//! compare what the portal lets each person do with what the gRPC API
//! does: it keeps the cookies it is given and posts forms with the CSRF
//! token the page carried.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::Context;
use betang_proto::v1::CreateInvitationRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Clients;

pub struct Answer {
    pub status: u16,
    pub location: String,
    pub body: String,
}

pub struct Visitor {
    addr: SocketAddr,
    cookies: BTreeMap<String, String>,
}

/// `application/x-www-form-urlencoded`, for the few characters tests use.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The CSRF token in a page's first form.
pub fn csrf_in(page: &str) -> Option<String> {
    let at = page.find("name=\"csrf\" value=\"")? + "name=\"csrf\" value=\"".len();
    Some(page[at..].split('"').next()?.to_owned())
}

impl Visitor {
    pub fn new(addr: SocketAddr) -> Visitor {
        Visitor {
            addr,
            cookies: BTreeMap::new(),
        }
    }

    async fn send(&mut self, method: &str, path: &str, body: &str) -> anyhow::Result<Answer> {
        let mut s = tokio::net::TcpStream::connect(self.addr).await?;
        let cookies = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {}\r\n", self.addr);
        if !cookies.is_empty() {
            head.push_str(&format!("Cookie: {cookies}\r\n"));
        }
        if method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status")?;
        let mut location = String::new();
        for line in head.lines().skip(1) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "location" => location = v.trim().to_owned(),
                "set-cookie" => {
                    if let Some((name, rest)) = v.trim().split_once('=') {
                        let value = rest.split(';').next().unwrap_or_default();
                        if value.is_empty() {
                            self.cookies.remove(name);
                        } else {
                            self.cookies.insert(name.to_owned(), value.to_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Answer {
            status,
            location,
            body: body.to_owned(),
        })
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send("GET", path, "").await
    }

    /// Posts `fields` to `path` with the CSRF token of the page at `form_page`.
    pub async fn post_form(
        &mut self,
        form_page: &str,
        path: &str,
        fields: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let page = self.get(form_page).await?;
        let csrf = csrf_in(&page.body).context("the page has a form with a CSRF token")?;
        self.post_with(path, &csrf, fields).await
    }

    /// Posts with a given CSRF token (empty for none).
    pub async fn post_with(
        &mut self,
        path: &str,
        csrf: &str,
        fields: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let mut body = format!("csrf={}", encode(csrf));
        for (k, v) in fields {
            body.push_str(&format!("&{}={}", encode(k), encode(v)));
        }
        self.send("POST", path, &body).await
    }

    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies.get(name).map(String::as_str)
    }

    /// Sets a password through an invitation an admin makes, and signs in.
    pub async fn join(
        addr: SocketAddr,
        admin: &Clients,
        username: &str,
        password: &str,
    ) -> anyhow::Result<Visitor> {
        let invitation = admin
            .identity
            .clone()
            .create_invitation(CreateInvitationRequest {
                user: username.into(),
            })
            .await?
            .into_inner();
        let mut v = Visitor::new(addr);
        let path = format!("/invite/{}", invitation.secret);
        let set = v
            .post_form(&path, &path, &[("password", password), ("again", password)])
            .await?;
        anyhow::ensure!(set.status == 303, "setting a password: {}", set.status);
        let signed = v
            .post_form(
                "/sign-in",
                "/sign-in",
                &[("username", username), ("password", password)],
            )
            .await?;
        anyhow::ensure!(
            signed.status == 303 && signed.location == "/vps",
            "signing in: {} {}",
            signed.status,
            signed.body
        );
        Ok(v)
    }
}
