//! `[broker] url` / `urls`: the RabbitMQ nodes a process may connect to, and the order it tries
//! them in. Parsing and checks only; dialling is the broker crate's (`broker/src/members.rs`).

use serde::{Deserialize, Deserializer};

/// Which member a process tries first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectOrder {
    /// A random member, so the processes of a cluster spread over its nodes; then the others in
    /// turn. The default.
    #[default]
    Random,
    /// The members in the order listed (a node in the same zone first, say).
    Listed,
}

/// `url = "amqp://..."` or `urls = ["amqp://...", ...]`: either form gives the list.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

pub(super) fn amqp_urls<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let urls = match OneOrMany::deserialize(d)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    };
    check_urls(&urls).map_err(serde::de::Error::custom)?;
    Ok(urls)
}

/// `WARREN_AMQP_URL`: one URL, or several separated by commas (spaces around them ignored).
pub(crate) fn parse_url_list(text: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = text.split(',').map(|u| u.trim().to_string()).collect();
    check_urls(&urls)?;
    Ok(urls)
}

/// At least one member, each `amqp://` or `amqps://`, none twice.
fn check_urls(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err("`urls` needs at least one AMQP URL".into());
    }
    for (i, url) in urls.iter().enumerate() {
        let key = if urls.len() == 1 {
            "url".to_string()
        } else {
            format!("urls[{i}]")
        };
        if url.is_empty() {
            return Err(format!("{key} is empty"));
        }
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(format!(
                "{key} {:?} must start with amqp:// or amqps://",
                crate::telemetry::redact_url(url)
            ));
        }
        if urls[..i].contains(url) {
            return Err(format!(
                "{key} {:?} is listed twice",
                crate::telemetry::redact_url(url)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lists_split_on_commas_and_are_checked() {
        assert_eq!(
            parse_url_list("amqp://a:5672/%2f").unwrap(),
            vec!["amqp://a:5672/%2f"]
        );
        assert_eq!(
            parse_url_list("amqp://a, amqps://b ,amqp://c").unwrap(),
            vec!["amqp://a", "amqps://b", "amqp://c"]
        );
        let e = parse_url_list("amqp://a,,amqp://c").unwrap_err();
        assert!(e.contains("urls[1] is empty"), "{e}");
        let e = parse_url_list("amqp://u:secret@a,http://b").unwrap_err();
        assert!(e.contains("urls[1]") && e.contains("amqp://"), "{e}");
        let e = parse_url_list("amqp://a,amqp://a").unwrap_err();
        assert!(e.contains("urls[1]") && e.contains("twice"), "{e}");
        let e = parse_url_list("rabbit:5672").unwrap_err();
        assert!(e.starts_with("url "), "{e}");
    }

    #[test]
    fn errors_never_show_the_password() {
        let e = parse_url_list("amqp://a,tcp://u:s3cret@b").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
