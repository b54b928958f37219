//! Who may use the console, and that a state change comes from its own pages.
//!
//! - Credentials: a token (`WARREN_CONSOLE_TOKEN`, or a file given by `--credentials-file`
//!   that holds the token alone) or basic auth (`WARREN_CONSOLE_BASIC_AUTH=user:password`, or a
//!   file holding `user:password`), never on the command line, where `ps` shows it. A token is
//!   accepted as `Authorization: Bearer <token>` or as the password of basic auth with any
//!   user name, so a browser's login prompt works with it too. Without credentials the console
//!   serves 127.0.0.1 alone, and only to requests whose `Host` is a loopback name (a page of
//!   another site cannot reach it by DNS rebinding).
//! - CSRF: every form carries a random token made when the process starts; a POST without it,
//!   or whose `Origin` is another site, is refused.

use std::net::SocketAddr;
use std::path::Path;

use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine;
use subtle::ConstantTimeEq;

pub(crate) const ENV_WARREN_CONSOLE_TOKEN: &str = "WARREN_CONSOLE_TOKEN";
pub(crate) const ENV_WARREN_CONSOLE_BASIC_AUTH: &str = "WARREN_CONSOLE_BASIC_AUTH";

/// What a request must carry.
#[derive(Clone)]
pub(crate) enum Credentials {
    /// Nothing: the console listens on a loopback address.
    None,
    Token(String),
    Basic {
        user: String,
        password: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Token(_) => "Token(..)",
            Credentials::Basic { .. } => "Basic(..)",
        })
    }
}

impl Credentials {
    /// From `--credentials-file`, else the environment; `lookup` reads one variable.
    pub(crate) fn load(
        file: Option<&Path>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--credentials-file {}: {e}", path.display()))?;
            return Self::parse(
                text.trim(),
                &format!("--credentials-file {}", path.display()),
            );
        }
        if let Some(token) = lookup(ENV_WARREN_CONSOLE_TOKEN).filter(|t| !t.is_empty()) {
            return Ok(Credentials::Token(token));
        }
        match lookup(ENV_WARREN_CONSOLE_BASIC_AUTH).filter(|t| !t.is_empty()) {
            Some(pair) if pair.contains(':') => Self::parse(&pair, ENV_WARREN_CONSOLE_BASIC_AUTH),
            Some(_) => Err(format!(
                "{ENV_WARREN_CONSOLE_BASIC_AUTH} must be user:password"
            )),
            None => Ok(Credentials::None),
        }
    }

    /// `user:password` is basic auth; anything else a token.
    fn parse(text: &str, source: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err(format!("{source} is empty"));
        }
        Ok(match text.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Credentials::Basic {
                    user: user.to_string(),
                    password: password.to_string(),
                }
            }
            Some(_) => return Err(format!("{source}: user:password needs both parts")),
            None => Credentials::Token(text.to_string()),
        })
    }

    /// Refuses to serve a non-loopback address without credentials.
    pub(crate) fn check_listen(&self, addr: SocketAddr) -> Result<(), String> {
        match (self, addr.ip().is_loopback()) {
            (Credentials::None, false) => Err(format!(
                "the console would serve {addr} to anyone who reaches it; set {ENV_WARREN_CONSOLE_TOKEN} (or {ENV_WARREN_CONSOLE_BASIC_AUTH}=user:password, or --credentials-file FILE), or listen on 127.0.0.1"
            )),
            _ => Ok(()),
        }
    }

    /// Whether `headers` carry the credentials (and, without any, name a loopback host).
    pub(crate) fn admits(&self, headers: &HeaderMap) -> bool {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let basic = || {
            let encoded = auth.strip_prefix("Basic ")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, password) = text.split_once(':')?;
            Some((user.to_string(), password.to_string()))
        };
        match self {
            Credentials::None => loopback_host(headers),
            Credentials::Token(token) => {
                let given = auth
                    .strip_prefix("Bearer ")
                    .map(str::to_string)
                    .or_else(|| basic().map(|(_, password)| password));
                given.is_some_and(|g| same(&g, token))
            }
            Credentials::Basic { user, password } => {
                basic().is_some_and(|(u, p)| same(&u, user) & same(&p, password))
            }
        }
    }

    /// The response that asks a browser to log in.
    pub(crate) fn challenge(&self) -> (StatusCode, HeaderMap, &'static str) {
        let mut headers = HeaderMap::new();
        if !matches!(self, Credentials::None) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"warren console\""),
            );
        }
        let body = match self {
            Credentials::None => "the console answers requests for 127.0.0.1 or localhost only",
            _ => "credentials needed",
        };
        (StatusCode::UNAUTHORIZED, headers, body)
    }
}

fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "127.0.0.1" | "localhost" | "[::1]")
}

/// The per-process token every form carries.
#[derive(Clone)]
pub(crate) struct Csrf(String);

impl std::fmt::Debug for Csrf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Csrf(..)")
    }
}

impl Csrf {
    pub(crate) fn fresh() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()))
    }

    pub(crate) fn token(&self) -> &str {
        &self.0
    }

    /// A POST is the console's own when it carries the token and, when the browser names the
    /// page it comes from (`Origin`), that page is on this host.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        given: Option<&str>,
    ) -> Result<(), &'static str> {
        if !given.is_some_and(|g| same(g, &self.0)) {
            return Err("the form's CSRF token is missing or stale; reload the page");
        }
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        match (origin, host) {
            (None, _) => Ok(()),
            (Some(origin), Some(host)) => {
                let bare = origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"));
                match bare == Some(host) {
                    true => Ok(()),
                    false => Err("the request comes from another site (Origin)"),
                }
            }
            (Some(_), None) => Err("the request names no Host"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::collections::HashMap;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn basic(user: &str, password: &str) -> String {
        let pair = format!("{user}:{password}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    #[test]
    fn credentials_come_from_the_environment_and_guard_other_addresses() {
        let env = HashMap::from([(ENV_WARREN_CONSOLE_TOKEN, "s3cret")]);
        let token = Credentials::load(None, |k| env.get(k).map(|v| v.to_string())).unwrap();
        let none = Credentials::load(None, |_| None).unwrap();
        let anywhere: SocketAddr = "0.0.0.0:9400".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:9400".parse().unwrap();
        let refused = none.check_listen(anywhere).unwrap_err();
        assert!(refused.contains(ENV_WARREN_CONSOLE_TOKEN), "{refused}");
        assert!(none.check_listen(local).is_ok());
        assert!(token.check_listen(anywhere).is_ok());

        let auth = |v: &str| headers(&[(header::AUTHORIZATION, v)]);
        assert!(token.admits(&auth("Bearer s3cret")));
        assert!(token.admits(&auth(&basic("anyone", "s3cret"))));
        assert!(!token.admits(&auth("Bearer nope")));
        assert!(!token.admits(&HeaderMap::new()));
        let env = HashMap::from([(ENV_WARREN_CONSOLE_BASIC_AUTH, "ops:pw")]);
        let pair = Credentials::load(None, |k| env.get(k).map(|v| v.to_string())).unwrap();
        assert!(pair.admits(&auth(&basic("ops", "pw"))));
        assert!(!pair.admits(&auth(&basic("ops", "px"))));
        let env = HashMap::from([(ENV_WARREN_CONSOLE_BASIC_AUTH, "nocolon")]);
        assert!(Credentials::load(None, |k| env.get(k).map(|v| v.to_string())).is_err());
    }

    #[test]
    fn without_credentials_only_loopback_hosts_are_served() {
        let none = Credentials::None;
        let host = |h: &str| headers(&[(header::HOST, h)]);
        assert!(none.admits(&host("127.0.0.1:9400")));
        assert!(none.admits(&host("localhost:9400")));
        assert!(!none.admits(&host("evil.example:9400")));
    }

    #[test]
    fn a_post_needs_the_token_and_a_same_site_origin() {
        let csrf = Csrf::fresh();
        let good = headers(&[
            (header::HOST, "127.0.0.1:9400"),
            (header::ORIGIN, "http://127.0.0.1:9400"),
        ]);
        assert!(csrf.check(&good, Some(csrf.token())).is_ok());
        assert!(csrf.check(&good, Some("forged")).is_err());
        assert!(csrf.check(&good, None).is_err());
        let elsewhere = headers(&[
            (header::HOST, "127.0.0.1:9400"),
            (header::ORIGIN, "http://evil.example"),
        ]);
        assert!(csrf.check(&elsewhere, Some(csrf.token())).is_err());
    }
}
