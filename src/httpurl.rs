//! Parsing of the `http://host[:port][/path]` URLs this router accepts: for
//! backends (etcd values), etcd endpoints and the log collector.
//!
//! One strict parser for all of them, so a value accepted in one place is
//! accepted everywhere. Only plain `http://` is supported (there is no TLS
//! client), and URLs with credentials or a query are refused rather than
//! half-honoured.

use ureq::http::Uri;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// As in the URL: a name, an IPv4 address, or a bracketed IPv6 literal.
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(value: &str) -> Result<HttpUrl, &'static str> {
        let value = value.trim();
        if value.is_empty() {
            return Err("empty value");
        }
        let uri: Uri = value.parse().map_err(|_| "not an absolute URL")?;
        match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => {}
            Some(_) => return Err("only http:// URLs are supported"),
            None => return Err("not an absolute URL"),
        }
        let authority = uri.authority().ok_or("URL has no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in URLs are not supported");
        }
        let host = authority.host();
        if host.is_empty() {
            return Err("URL has no host");
        }
        // `Authority::port` hides a port that does not fit in 16 bits, so
        // read what follows the host ourselves.
        let port = match authority.as_str()[host.len()..].strip_prefix(':') {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err("URL has an invalid port"),
            },
        };
        if uri.query().is_some() {
            return Err("URL cannot carry a query");
        }
        let path = match uri.path() {
            "" => "/".to_string(),
            p => p.to_string(),
        };
        Ok(HttpUrl {
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    /// `host:port`, for connecting and for the `Host` header.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_http_urls() {
        let u = HttpUrl::parse(" http://10.0.0.5:8000 \n").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.0.5", 8000, "/")
        );
        let u = HttpUrl::parse("HTTP://Backend.local/app/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("backend.local", 80, "/app/")
        );
        let u = HttpUrl::parse("http://[::1]:9000").unwrap();
        assert_eq!(u.authority(), "[::1]:9000");
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "not a url at all",
            "10.0.0.1:80",
            "/relative",
            "https://10.0.0.1",
            "http://",
            "http://u:p@10.0.0.1",
            "http://10.0.0.1/?q=1",
            "http://10.0.0.1:99999",
            "http://10.0.0.1:0",
            "http://a\n{\"x\":1}",
            "{\"host\":\"10.0.0.1\"}",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
