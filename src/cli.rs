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

use crate::cidr::Cidr;
use crate::etcd::ApiChoice;
use crate::health::EjectPolicy;
use crate::httpurl::HttpUrl;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ETCD_URLS: &str = "http://127.0.0.1:2379,http://127.0.0.1:4001";
pub const DEFAULT_ETCD_KEY: &str = "/domains";
/// Workers serving ordinary requests at once: a few per core keep the
/// cores busy while some wait on backends (README, "Workers and
/// connections").
pub const DEFAULT_WORKERS: usize = 16;
pub const MAX_WORKERS: usize = 65_536;
/// Open client connections at most: an idle one costs its socket and well
/// under 1 KiB; at the cap a new connection takes the place of the longest
/// idle keep-alive one, or waits in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
pub const MAX_MAX_CONNECTIONS: usize = 1_048_576;
pub const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 3;
pub const DEFAULT_RESPONSE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_BODY_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_KEEPALIVE_TIMEOUT_SECS: u64 = 15;
pub const DEFAULT_CLIENT_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_TUNNEL_TIMEOUT_SECS: u64 = 600;
pub const DEFAULT_EJECT_AFTER: u32 = 3;
pub const DEFAULT_EJECT_FOR_SECS: u64 = 10;
pub const DEFAULT_RESYNC_INTERVAL_SECS: u64 = 300;

pub const USAGE: &str = "\
httprouter: host-based HTTP reverse proxy with routes discovered from etcd

Usage: httprouter [flags]

Flags (single dash works too: -etcdurl URL; so does --flag=value):
  --listen ADDR             address to serve on (default 0.0.0.0:8080; ':8080' means all interfaces)
  --admin ADDR              serve /, /healthz, /routes and /metrics (read-only, no authentication)
                            on ADDR, e.g. 127.0.0.1:9090 (default: off)
  --etcdurl URL[,URL...]    etcd endpoints, tried in turn
                            (default http://127.0.0.1:2379,http://127.0.0.1:4001)
  --etcdkey KEY             etcd directory holding <domain>/<route-name> = backend URL (default /domains)
  --etcd-api auto|v2|v3     etcd API (default auto: v3 if its store holds the routes, else v2 where
                            etcd serves it, else v3)
  --state-file PATH         keep the routes in PATH; serve from it when etcd cannot be reached at start
  --resync-interval SECS    re-read all routes from etcd this often, repairing any drift
                            (default 300, jittered; 0: never)
  --logfile PATH            append JSON log lines to PATH (created 0600) instead of stdout
  --logurl URL              POST batches of JSON log lines to URL instead of stdout
  --max-connections N       open client connections at most; idle ones cost no thread (default 16384)
  --workers N               threads serving ordinary requests at once; one held by a slow
                            request (over 100 ms) is replaced while others wait (default 16)
  --trusted-proxies CIDR[,CIDR...]
                            peers whose X-Forwarded-For/-Proto/-Host are kept (default: none)

Backend timeouts (seconds; a timeout answers 504, or closes a started answer):
  --connect-timeout SECS    to connect (default 3)
  --response-timeout SECS   from sending the request to the response head (default 60)
  --body-timeout SECS       longest pause inside a body, either way (default 60)
Client timeouts (seconds):
  --header-timeout SECS     to receive a request head, from its first byte (default 10; 408)
  --keepalive-timeout SECS  idle time between requests before closing (default 15)
  --client-timeout SECS     longest pause reading a body from or writing to a client (default 60)
  --tunnel-timeout SECS     idle time of an upgraded connection (WebSocket) before closing (default 600)
Passive health:
  --eject-after N           failures in a row that take a backend out of rotation (default 3)
  --eject-for SECS          how long before it is tried again (default 10)

  --help                    print this help
  --version                 print the version
";

/// How long to wait for what, already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub body: Duration,
    pub header: Duration,
    pub keepalive: Duration,
    pub client: Duration,
    pub tunnel: Duration,
}

/// Everything the process needs to start, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// `--admin`: off when `None`; never the proxy's address.
    pub admin: Option<SocketAddr>,
    pub etcd_urls: Vec<String>,
    /// Normalised: leading `/`, no trailing `/` (the root is the empty string).
    pub etcd_key: String,
    pub log_file: Option<PathBuf>,
    pub log_url: Option<String>,
    pub max_connections: usize,
    pub workers: usize,
    pub timeouts: Timeouts,
    pub eject: EjectPolicy,
    pub trusted_proxies: Vec<Cidr>,
    pub etcd_api: ApiChoice,
    pub state_file: Option<PathBuf>,
    /// Zero: no periodic re-read.
    pub resync_interval: Duration,
}

/// What the command line asked for.
// Made once per process: the size of `Run` costs nothing.
#[allow(clippy::large_enum_variant)]
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
    "admin",
    "etcdurl",
    "etcdkey",
    "logfile",
    "logurl",
    "max-connections",
    "workers",
    "connect-timeout",
    "response-timeout",
    "body-timeout",
    "header-timeout",
    "keepalive-timeout",
    "client-timeout",
    "tunnel-timeout",
    "eject-after",
    "eject-for",
    "trusted-proxies",
    "etcd-api",
    "state-file",
    "resync-interval",
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
    let admin = string_flag(&mut args, "--admin")?;
    let etcd_urls = string_flag(&mut args, "--etcdurl")?;
    let etcd_key = string_flag(&mut args, "--etcdkey")?;
    let log_file = string_flag(&mut args, "--logfile")?;
    let log_url = string_flag(&mut args, "--logurl")?;
    let max_connections = string_flag(&mut args, "--max-connections")?;
    let workers = string_flag(&mut args, "--workers")?;
    let mut secs = |flag: &'static str, default: u64| -> Result<Duration, UsageError> {
        parse_secs(flag, string_flag(&mut args, flag)?, default)
    };
    let timeouts = Timeouts {
        connect: secs("--connect-timeout", DEFAULT_CONNECT_TIMEOUT_SECS)?,
        response: secs("--response-timeout", DEFAULT_RESPONSE_TIMEOUT_SECS)?,
        body: secs("--body-timeout", DEFAULT_BODY_TIMEOUT_SECS)?,
        header: secs("--header-timeout", DEFAULT_HEADER_TIMEOUT_SECS)?,
        keepalive: secs("--keepalive-timeout", DEFAULT_KEEPALIVE_TIMEOUT_SECS)?,
        client: secs("--client-timeout", DEFAULT_CLIENT_TIMEOUT_SECS)?,
        tunnel: secs("--tunnel-timeout", DEFAULT_TUNNEL_TIMEOUT_SECS)?,
    };
    let eject_for = secs("--eject-for", DEFAULT_EJECT_FOR_SECS)?;
    let eject_after = string_flag(&mut args, "--eject-after")?;
    let trusted_proxies = string_flag(&mut args, "--trusted-proxies")?;
    let etcd_api = string_flag(&mut args, "--etcd-api")?;
    let state_file = string_flag(&mut args, "--state-file")?;
    let resync_interval = string_flag(&mut args, "--resync-interval")?;

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

    let listen = parse_listen("--listen", listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
    let admin = admin.map(|a| parse_listen("--admin", &a)).transpose()?;
    if let Some(a) = admin
        && a.port() == listen.port()
        && (a.ip() == listen.ip() || a.ip().is_unspecified() || listen.ip().is_unspecified())
    {
        return Err(UsageError(format!(
            "--admin {a}: the proxy listens there (--listen {listen}); give the admin side its own port"
        )));
    }
    let config = Config {
        listen,
        admin,
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
        max_connections: parse_count(
            "--max-connections",
            max_connections,
            DEFAULT_MAX_CONNECTIONS,
            MAX_MAX_CONNECTIONS,
        )?,
        workers: parse_count("--workers", workers, DEFAULT_WORKERS, MAX_WORKERS)?,
        timeouts,
        eject: EjectPolicy {
            after: match eject_after {
                None => DEFAULT_EJECT_AFTER,
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => {
                        return Err(UsageError(format!(
                            "--eject-after '{v}': expected a whole number from 1 to 1000"
                        )));
                    }
                },
            },
            duration_ms: u64::try_from(eject_for.as_millis()).unwrap_or(u64::MAX),
        },
        trusted_proxies: match trusted_proxies {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(Cidr::parse)
                .collect::<Result<_, _>>()
                .map_err(|e| UsageError(format!("--trusted-proxies: {e}")))?,
        },
        etcd_api: match etcd_api.as_deref() {
            None | Some("auto") => ApiChoice::Auto,
            Some("v2") => ApiChoice::V2,
            Some("v3") => ApiChoice::V3,
            Some(other) => {
                return Err(UsageError(format!(
                    "--etcd-api '{other}': expected auto, v2 or v3"
                )));
            }
        },
        state_file: match state_file {
            Some(p) if p.is_empty() => {
                return Err(UsageError("--state-file: empty path".into()));
            }
            p => p.map(PathBuf::from),
        },
        resync_interval: match resync_interval.as_deref() {
            Some("0") => Duration::ZERO,
            _ => parse_secs(
                "--resync-interval",
                resync_interval,
                DEFAULT_RESYNC_INTERVAL_SECS,
            )?,
        },
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

fn parse_count(
    flag: &str,
    value: Option<String>,
    default: usize,
    max: usize,
) -> Result<usize, UsageError> {
    match value {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(UsageError(format!(
                "{flag} '{v}': expected a whole number from 1 to {max}"
            ))),
        },
    }
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
fn parse_listen(flag: &str, value: &str) -> Result<SocketAddr, UsageError> {
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
            .ok_or_else(|| UsageError(format!("{flag} '{value}': name resolves to no address"))),
        Err(e) => Err(UsageError(format!(
            "{flag} '{value}': expected host:port such as 0.0.0.0:8080 ({e})"
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
        assert_eq!(c.admin, None);
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
            "-admin=127.0.0.1:9001",
        ]);
        assert_eq!(c.admin, Some("127.0.0.1:9001".parse().unwrap()));
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
            (&["--admin", "nowhere"], "--admin"),
            (&["--admin", ":8080"], "--admin"),
            (
                &["--listen", "127.0.0.1:9000", "--admin", "0.0.0.0:9000"],
                "--admin",
            ),
            (&["--connect-timeout", "-1"], "--connect-timeout"),
            (&["--tunnel-timeout", "0"], "--tunnel-timeout"),
            (&["--eject-after", "0"], "--eject-after"),
            (&["--trusted-proxies", "10.0.0.0/33"], "--trusted-proxies"),
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
    fn timeouts_health_and_trust() {
        let c = config(&[
            "--body-timeout",
            "0.5",
            "--eject-after=5",
            "--eject-for",
            "2",
            "--trusted-proxies",
            "10.0.0.0/8, ::1",
        ]);
        assert_eq!(c.timeouts.body, Duration::from_millis(500));
        assert_eq!(c.timeouts.header, Duration::from_secs(10));
        assert_eq!(c.eject.after, 5);
        assert_eq!(c.eject.duration_ms, 2000);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(config(&[]).trusted_proxies.is_empty());
    }

    #[test]
    fn etcd_key_root() {
        assert_eq!(config(&["--etcdkey", "/"]).etcd_key, "");
    }
}
