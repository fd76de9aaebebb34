//! httprouter: a host-based HTTP reverse proxy whose routes live in etcd.
//!
//! Data flows one way:
//! etcd → `discovery` (one thread) → `routes::SharedTable` (whole immutable
//! tables) → `server` workers → `proxy` → `backend`; every part sends log
//! events down a bounded channel to the one `log` thread. This file only
//! wires them together and runs the shutdown sequence.

mod backend;
mod cidr;
mod cli;
mod discovery;
mod etcd_v2;
mod health;
mod http1;
mod httpurl;
mod log;
mod proxy;
mod routes;
mod server;
mod tunnel;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::cli::{Command, Config};

/// How long in-flight requests may run on after SIGTERM/SIGINT.
const SHUTDOWN_GRACE_SECS: u64 = 10;

fn main() -> ExitCode {
    let config = match cli::parse(std::env::args_os().skip(1).collect()) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("httprouter {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("httprouter: {e}");
            eprintln!("Try 'httprouter --help' for the list of flags.");
            return ExitCode::from(2);
        }
    };
    let destination = match (&config.log_file, &config.log_url) {
        (Some(path), _) => log::Destination::File(path.clone()),
        (None, Some(url)) => log::Destination::Url(url.clone()),
        (None, None) => log::Destination::Stdout,
    };
    // Opening the log file is the last check of the command line: a path
    // that cannot be written is a bad flag value, reported as such.
    let (logger, log_thread) = match log::start(destination.clone()) {
        Ok(started) => started,
        Err(e) => {
            match &destination {
                log::Destination::File(p) => {
                    eprintln!("httprouter: --logfile {}: {e}", p.display());
                    eprintln!("Try 'httprouter --help' for the list of flags.");
                    return ExitCode::from(2);
                }
                _ => eprintln!("httprouter: cannot start logging: {e}"),
            }
            return ExitCode::from(1);
        }
    };
    match run(config, logger, log_thread) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("httprouter: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(config: Config, logger: log::Logger, log_thread: log::LogThread) -> Result<(), String> {
    // Registered before anything serves, so an early signal is not lost.
    let signalled = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&signalled))
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }

    let table = Arc::new(routes::SharedTable::default());
    let t = config.timeouts;
    let client = backend::BackendClient::new(t.connect, t.response, t.body, config.workers);
    let settings = proxy::ProxySettings {
        eject: config.eject,
        trusted_proxies: config.trusted_proxies.clone(),
        handshake: tunnel::HandshakeTimeouts {
            connect: t.connect,
            response: t.response,
            write: t.body,
        },
        body_timeout: t.body,
    };
    let proxy = Arc::new(proxy::Proxy::new(
        Arc::clone(&table),
        client,
        settings,
        logger.clone(),
    ));
    let server_settings = server::ServerSettings {
        max_connections: config.workers,
        header_timeout: t.header,
        keepalive_timeout: t.keepalive,
        client_timeout: t.client,
        tunnel_timeout: t.tunnel,
    };
    let server = match server::Server::start(config.listen, server_settings, proxy, logger.clone())
    {
        Ok(s) => s,
        Err(e) => {
            logger.event("service.stop", json!({"error": e}));
            log_thread.shutdown();
            return Err(e);
        }
    };

    logger.event(
        "service.start",
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "listen": config.listen.to_string(),
            "etcd_urls": config.etcd_urls,
            "etcd_key": config.etcd_key,
            "workers": config.workers,
            "trusted_proxies": config.trusted_proxies.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "eject_after": config.eject.after,
            "eject_for_secs": config.eject.duration_ms as f64 / 1000.0,
        }),
    );

    let stop_discovery = Arc::new(AtomicBool::new(false));
    let discovery = discovery::Discovery::new(
        config.etcd_urls.clone(),
        &config.etcd_key,
        Arc::clone(&table),
        logger.clone(),
        Arc::clone(&stop_discovery),
    );
    std::thread::Builder::new()
        .name("discovery".into())
        .spawn(move || discovery.run())
        .map_err(|e| format!("cannot start the discovery thread: {e}"))?;

    while !signalled.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }

    logger.event(
        "service.stopping",
        json!({"grace_secs": SHUTDOWN_GRACE_SECS}),
    );
    stop_discovery.store(true, Ordering::Relaxed);
    let unfinished = server.shutdown(Duration::from_secs(SHUTDOWN_GRACE_SECS));
    logger.event(
        "service.stop",
        json!({"unfinished_requests": unfinished, "log_events_dropped": logger.dropped()}),
    );
    log_thread.shutdown();
    Ok(())
}
