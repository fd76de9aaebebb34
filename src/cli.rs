//! Command line → [`Config`].
//!
//! Owns flag names, defaults and validation. Flag names are the original Go
//! tool's (`-etcdurl`, `-etcdkey`, `-logfile`, `-logurl`) so existing unit
//! files keep working: single-dash and double-dash forms, `--flag value` and
//! `--flag=value` are all accepted. Everything is checked here, before any
//! thread starts, so the process never runs half-configured.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::httpurl::HttpUrl;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ETCD_URLS: &str = "http://127.0.0.1:2379,http://127.0.0.1:4001";
pub const DEFAULT_ETCD_KEY: &str = "/domains";
/// Connections served at once, each on its own thread (an idle keep-alive
/// connection costs its thread and about 40 KiB); more wait in the listen
/// backlog.
pub const DEFAULT_WORKERS: usize = 1024;
pub const MAX_WORKERS: usize = 65_536;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 3;
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 60;

pub const USAGE: &str = "\
httprouter: host-based HTTP reverse proxy with routes discovered from etcd

Usage: httprouter [flags]

Flags (single dash works too: -etcdurl URL; so does --flag=value):
  --listen ADDR             address to serve on (default 0.0.0.0:8080; ':8080' means all interfaces)
  --etcdurl URL[,URL...]    etcd endpoints, tried in turn
                            (default http://127.0.0.1:2379,http://127.0.0.1:4001)
  --etcdkey KEY             etcd directory holding <domain>/<route-name> = backend URL (default /domains)
  --logfile PATH            append JSON log lines to PATH (created 0600) instead of stdout
  --logurl URL              POST batches of JSON log lines to URL instead of stdout
  --workers N               connections served at once, a thread each (default 1024)
  --connect-timeout SECS    backend connect timeout (default 3)
  --response-timeout SECS   backend response timeout, and longest pause inside a body (default 60)
  --help                    print this help
  --version                 print the version
";

/// Everything the process needs to start, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub etcd_urls: Vec<String>,
    /// Normalised: leading `/`, no trailing `/` (the root is the empty string).
    pub etcd_key: String,
    pub log_file: Option<PathBuf>,
    pub log_url: Option<String>,
    pub workers: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// What the command line asked for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Run(Config),
    Help,
    Version,
}

/// A usage error: names the flag and what is wrong with it.
#[derive(Debug, PartialEq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const FLAGS: &[&str] = &[
    "help",
    "version",
    "listen",
    "etcdurl",
    "etcdkey",
    "logfile",
    "logurl",
    "workers",
    "connect-timeout",
    "response-timeout",
];

/// Go's flag package accepts `-name` as well as `--name`; pico-args only
/// knows `--name` for long flags, so known single-dash names are rewritten.
fn double_dash(arg: std::ffi::OsString) -> std::ffi::OsString {
    let Some(s) = arg.to_str() else {
        return arg;
    };
    let Some(rest) = s.strip_prefix('-').filter(|r| !r.starts_with('-')) else {
        return arg;
    };
    let name = rest.split_once('=').map_or(rest, |(n, _)| n);
    if FLAGS.contains(&name) {
        format!("-{s}").into()
    } else {
        arg
    }
}

pub fn parse(args: Vec<std::ffi::OsString>) -> Result<Command, UsageError> {
    let mut args = pico_args::Arguments::from_vec(args.into_iter().map(double_dash).collect());
    if args.contains(["-h", "--help"]) {
        return Ok(Command::Help);
    }
    if args.contains(["-V", "--version"]) {
        return Ok(Command::Version);
    }

    let listen = string_flag(&mut args, "--listen")?;
    let etcd_urls = string_flag(&mut args, "--etcdurl")?;
    let etcd_key = string_flag(&mut args, "--etcdkey")?;
    let log_file = string_flag(&mut args, "--logfile")?;
    let log_url = string_flag(&mut args, "--logurl")?;
    let workers = string_flag(&mut args, "--workers")?;
    let connect_timeout = string_flag(&mut args, "--connect-timeout")?;
    let response_timeout = string_flag(&mut args, "--response-timeout")?;

    let rest = args.finish();
    if let Some(first) = rest.first() {
        return Err(UsageError(format!(
            "unknown flag or stray argument '{}'",
            first.to_string_lossy()
        )));
    }

    if log_file.is_some() && log_url.is_some() {
        return Err(UsageError(
            "--logfile and --logurl: choose one log destination".into(),
        ));
    }

    let config = Config {
        listen: parse_listen(listen.as_deref().unwrap_or(DEFAULT_LISTEN))?,
        etcd_urls: parse_etcd_urls(etcd_urls.as_deref().unwrap_or(DEFAULT_ETCD_URLS))?,
        etcd_key: normalise_etcd_key(etcd_key.as_deref().unwrap_or(DEFAULT_ETCD_KEY))?,
        log_file: match log_file {
            Some(p) if p.is_empty() => {
                return Err(UsageError("--logfile: empty path".into()));
            }
            Some(p) => Some(PathBuf::from(p)),
            None => None,
        },
        log_url: log_url
            .map(|u| parse_http_url("--logurl", &u).map(|_| u))
            .transpose()?,
        workers: match workers {
            None => DEFAULT_WORKERS,
            Some(w) => match w.parse::<usize>() {
                Ok(n) if (1..=MAX_WORKERS).contains(&n) => n,
                _ => {
                    return Err(UsageError(format!(
                        "--workers '{w}': expected a whole number from 1 to {MAX_WORKERS}"
                    )));
                }
            },
        },
        connect_timeout: parse_secs(
            "--connect-timeout",
            connect_timeout,
            DEFAULT_CONNECT_TIMEOUT_SECS,
        )?,
        response_timeout: parse_secs(
            "--response-timeout",
            response_timeout,
            DEFAULT_RESPONSE_TIMEOUT_SECS,
        )?,
    };
    Ok(Command::Run(config))
}

fn string_flag(
    args: &mut pico_args::Arguments,
    flag: &'static str,
) -> Result<Option<String>, UsageError> {
    args.opt_value_from_str::<_, String>(flag)
        .map_err(|e| match e {
            pico_args::Error::OptionWithoutAValue(flag) => {
                UsageError(format!("{flag}: missing value"))
            }
            pico_args::Error::Utf8ArgumentParsingFailed { .. }
            | pico_args::Error::NonUtf8Argument => {
                UsageError(format!("{flag}: value is not valid UTF-8"))
            }
            other => UsageError(format!("{flag}: {other}")),
        })
}

fn parse_secs(flag: &str, value: Option<String>, default: u64) -> Result<Duration, UsageError> {
    let Some(v) = value else {
        return Ok(Duration::from_secs(default));
    };
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(UsageError(format!(
            "{flag} '{v}': expected a number of seconds above 0 and at most 86400"
        ))),
    }
}

/// Accepts `host:port`, `[v6]:port`, a resolvable name with a port, and the
/// Go-style `:port` meaning every interface.
fn parse_listen(value: &str) -> Result<SocketAddr, UsageError> {
    let candidate = if value.starts_with(':') {
        format!("0.0.0.0{value}")
    } else {
        value.to_string()
    };
    if let Ok(addr) = candidate.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match candidate.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| UsageError(format!("--listen '{value}': name resolves to no address"))),
        Err(e) => Err(UsageError(format!(
            "--listen '{value}': expected host:port such as 0.0.0.0:8080 ({e})"
        ))),
    }
}

fn parse_etcd_urls(value: &str) -> Result<Vec<String>, UsageError> {
    let mut urls = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = parse_http_url("--etcdurl", part)?;
        if url.path != "/" {
            return Err(UsageError(format!(
                "--etcdurl '{part}': give the endpoint only (http://host:port), without a path"
            )));
        }
        // Keep the origin only: request paths are built from it.
        urls.push(format!("http://{}", url.authority()));
    }
    if urls.is_empty() {
        return Err(UsageError("--etcdurl: no endpoint given".into()));
    }
    Ok(urls)
}

fn parse_http_url(flag: &str, value: &str) -> Result<HttpUrl, UsageError> {
    HttpUrl::parse(value).map_err(|why| UsageError(format!("{flag} '{value}': {why}")))
}

/// `/domains/` and `domains` both mean `/domains`; `/` means the whole
/// keyspace. Empty segments (`//`) are refused because etcd answers a path
/// containing `//` with a 301 and silently does nothing.
fn normalise_etcd_key(value: &str) -> Result<String, UsageError> {
    let trimmed = value.trim_matches('/');
    if trimmed.split('/').any(|s| s.is_empty()) && !trimmed.is_empty() {
        return Err(UsageError(format!(
            "--etcdkey '{value}': empty path segment (//)"
        )));
    }
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    Ok(format!("/{trimmed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(|a| a.into()).collect())
    }

    fn config(args: &[&str]) -> Config {
        match run(args) {
            Ok(Command::Run(c)) => c,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = config(&[]);
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(
            c.etcd_urls,
            vec!["http://127.0.0.1:2379", "http://127.0.0.1:4001"]
        );
        assert_eq!(c.etcd_key, "/domains");
        assert_eq!(c.workers, DEFAULT_WORKERS);
        assert_eq!(c.log_file, None);
        assert_eq!(c.log_url, None);
    }

    #[test]
    fn go_style_single_dash_and_equals_forms() {
        let c = config(&[
            "-etcdurl",
            "http://127.0.0.1:1",
            "--etcdkey=/routes/",
            "-listen=:9000",
            "--workers",
            "3",
        ]);
        assert_eq!(c.etcd_urls, vec!["http://127.0.0.1:1"]);
        assert_eq!(c.etcd_key, "/routes");
        assert_eq!(c.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.workers, 3);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(run(&["--help"]), Ok(Command::Help));
        assert_eq!(run(&["-help"]), Ok(Command::Help));
        assert_eq!(run(&["--version"]), Ok(Command::Version));
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--bogus"], "--bogus"),
            (&["--workers", "0"], "--workers"),
            (&["--workers", "many"], "--workers"),
            (&["--listen", "nowhere"], "--listen"),
            (&["--etcdurl", "https://x:1"], "--etcdurl"),
            (&["--etcdurl", "127.0.0.1:2379"], "--etcdurl"),
            (&["--etcdkey", "/a//b"], "--etcdkey"),
            (&["--logurl", "ftp://x"], "--logurl"),
            (&["--listen"], "--listen"),
            (&["--connect-timeout", "-1"], "--connect-timeout"),
            (&["--logfile", "a", "--logurl", "http://x"], "--logfile"),
        ];
        for (args, flag) in cases {
            match run(args) {
                Err(UsageError(msg)) => assert!(msg.contains(flag), "{args:?}: {msg}"),
                other => panic!("{args:?}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn etcd_key_root() {
        assert_eq!(config(&["--etcdkey", "/"]).etcd_key, "");
    }
}
