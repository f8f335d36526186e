//! Who is signed in to the portal, and the guards around it: the session
//! cookie holds a portal token's secret, so every page reaches the services
//! as the same caller a gRPC call with that token would be; forms carry a
//! token derived from it (CSRF); sign-ins fail slowly for a name or an
//! address that keeps getting the password wrong.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

pub const SESSION_COOKIE: &str = "betang_session";
pub const LANG_COOKIE: &str = "betang_lang";
/// The sign-in form's own CSRF cookie, set before anyone is signed in.
pub const FORM_COOKIE: &str = "betang_form";

/// A sign-in ends after this long, however busy.
pub const SESSION_HOURS: i64 = 12;
/// And after this long without a page.
pub const IDLE: Duration = Duration::from_secs(30 * 60);

/// The value of cookie `name` in the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value: never readable by scripts, never sent from
/// another site; `Secure` when the portal is reached over HTTPS.
pub fn set_cookie(name: &str, value: &str, max_age_s: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The token a form posted by this session must carry: derived from the
/// session's secret, which no other site can read.
pub fn csrf_for(secret: &str) -> String {
    let d = Sha256::digest(format!("betang-portal-csrf:{secret}").as_bytes());
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Compares without stopping at the first difference.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Who is signing in, for throttling: the portal listens on loopback only,
/// behind a proxy, so the peer is the proxy and the client is the address
/// the proxy appended last to `X-Forwarded-For`.
pub fn client_address(headers: &HeaderMap, peer: std::net::SocketAddr) -> String {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|a| a.parse::<std::net::IpAddr>().is_ok());
    match forwarded {
        Some(a) if peer.ip().is_loopback() => a.to_owned(),
        _ => peer.ip().to_string(),
    }
}

/// `path` when it is a path on this site and nothing else: browsers read
/// `//host`, `/\host` and paths with tabs or newlines in them (which they
/// drop) as other sites.
pub fn local_path(path: &str) -> Option<&str> {
    let plain = path.bytes().all(|b| b.is_ascii_graphic()) && !path.contains('\\');
    (plain && path.starts_with('/') && !path.starts_with("//")).then_some(path)
}

/// When each sign-in was last used. Kept in memory: after a restart every
/// sign-in has been idle too long, and its owner signs in again.
#[derive(Default)]
pub struct Idle(Mutex<HashMap<String, Instant>>);

impl Idle {
    pub fn start(&self, secret: &str) {
        self.lock().insert(key(secret), Instant::now());
    }

    /// Whether the sign-in is still fresh, marking it used if so.
    pub fn touch(&self, secret: &str) -> bool {
        let mut m = self.lock();
        m.retain(|_, at| at.elapsed() < IDLE);
        match m.get_mut(&key(secret)) {
            Some(at) => {
                *at = Instant::now();
                true
            }
            None => false,
        }
    }

    pub fn end(&self, secret: &str) {
        self.lock().remove(&key(secret));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn key(secret: &str) -> String {
    crate::auth::hash_secret(secret)
}

/// Failed sign-ins per username and per address within a window.
pub struct Throttle {
    window: Duration,
    per_user: usize,
    per_address: usize,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            window: Duration::from_secs(15 * 60),
            per_user: 5,
            per_address: 20,
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl Throttle {
    /// Whether a sign-in as `user` from `address` may be tried now.
    pub fn allows(&self, user: &str, address: &str) -> bool {
        let mut f = self.lock();
        let window = self.window;
        f.retain(|_, v| {
            v.retain(|t| t.elapsed() < window);
            !v.is_empty()
        });
        let count = |k: String| f.get(&k).map_or(0, Vec::len);
        count(format!("u:{user}")) < self.per_user
            && count(format!("a:{address}")) < self.per_address
    }

    pub fn failed(&self, user: &str, address: &str) {
        let mut f = self.lock();
        let now = Instant::now();
        f.entry(format!("u:{user}")).or_default().push(now);
        f.entry(format!("a:{address}")).or_default().push(now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Instant>>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_csrf_and_throttling() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; betang_session=s3cret; betang_lang=en"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("s3cret"));
        assert_eq!(cookie(&h, LANG_COOKIE), Some("en"));
        assert_eq!(cookie(&h, "betang"), None);
        let c = csrf_for("s3cret");
        assert_eq!(c.len(), 32);
        assert!(same(&c, &csrf_for("s3cret")) && !same(&c, &csrf_for("other")));
        let v = set_cookie(SESSION_COOKIE, "x", 60, true);
        let v = v.to_str().unwrap();
        assert!(v.contains("HttpOnly") && v.contains("SameSite=Strict") && v.contains("Secure"));

        let t = Throttle::default();
        for _ in 0..5 {
            assert!(t.allows("ani", "10.0.0.1"));
            t.failed("ani", "10.0.0.1");
        }
        assert!(
            !t.allows("ani", "10.0.0.2"),
            "five wrong passwords for a name"
        );
        assert!(
            t.allows("budi", "10.0.0.1"),
            "another name from the same address"
        );
        for i in 0..20 {
            t.failed(&format!("u{i}"), "10.0.0.9");
        }
        assert!(!t.allows("someone", "10.0.0.9"), "twenty from one address");
    }

    #[test]
    fn the_language_switch_goes_back_only_to_this_site() {
        assert_eq!(local_path("/vps/1?page=2"), Some("/vps/1?page=2"));
        for away in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "https://evil.example",
            "",
            "/a b",
        ] {
            assert_eq!(local_path(away), None, "{away:?}");
        }
    }

    #[test]
    fn behind_the_proxy_the_client_is_the_last_forwarded_address() {
        let proxy: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(client_address(&h, proxy), "127.0.0.1");
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 198.51.100.7"),
        );
        assert_eq!(client_address(&h, proxy), "198.51.100.7");
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("not an address"),
        );
        assert_eq!(client_address(&h, proxy), "127.0.0.1");
    }
}
