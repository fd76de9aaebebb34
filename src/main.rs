//! The httprouter binary: flags, signals, and the start and shutdown order
//! of the pieces in the library (see `lib.rs` for the data flow).

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use httprouter::cli::{self, Command, Config};
use httprouter::event::Event;
use httprouter::{
    admin, admin_view, backend, discovery, log, metrics, proxy, routes, server, tunnel,
};

const BUILD: admin_view::Build = admin_view::Build {
    version: env!("CARGO_PKG_VERSION"),
    commit: env!("HTTPROUTER_COMMIT"),
};

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
            println!("httprouter {} (commit {})", BUILD.version, BUILD.commit);
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
    // SIGHUP reopens the log file (logrotate's `postrotate`, a service
    // manager's reload); its default would end the process.
    let reopen_log = Arc::new(AtomicBool::new(false));
    if let Err(e) =
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reopen_log))
    {
        eprintln!("httprouter: cannot install the SIGHUP handler: {e}");
        return ExitCode::from(1);
    }
    // Opening the log file is the last check of the command line: a path
    // that cannot be written is a bad flag value, reported as such.
    let (logger, log_thread) = match log::start(destination.clone(), reopen_log) {
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

    let fd_limit = raise_fd_limit();
    let table = Arc::new(routes::SharedTable::default());
    let metrics = Arc::new(metrics::Metrics::default());
    let status = Arc::new(discovery::Status::default());
    let t = config.timeouts;
    let client = backend::BackendClient::new(t.connect, t.response, t.body, config.max_connections);
    let settings = proxy::ProxySettings {
        eject: config.eject,
        trusted_proxies: config.trusted_proxies.clone(),
        handshake: tunnel::HandshakeTimeouts {
            connect: t.connect,
            response: t.response,
            body: t.body,
        },
    };
    let proxy = Arc::new(proxy::Proxy::new(
        Arc::clone(&table),
        client,
        settings,
        logger.clone(),
    ));
    let server_settings = server::ServerSettings {
        max_connections: config.max_connections,
        workers: config.workers,
        header_timeout: t.header,
        keepalive_timeout: t.keepalive,
        client_timeout: t.client,
        tunnel_timeout: t.tunnel,
    };
    let started = server::Server::start(
        config.listen,
        server_settings,
        proxy,
        logger.clone(),
        Arc::clone(&metrics),
    )
    .and_then(|server| {
        // The admin side reads what the proxy and discovery write.
        let admin = config
            .admin
            .map(|addr| {
                admin::Admin::start(
                    addr,
                    admin_view::Sources {
                        table: Arc::clone(&table),
                        status: Arc::clone(&status),
                        metrics: Arc::clone(&metrics),
                        log: logger.clone(),
                        build: BUILD,
                    },
                )
                .map_err(|e| e.to_string())
            })
            .transpose()?;
        Ok((server, admin))
    });
    let (server, admin) = match started {
        Ok(s) => s,
        Err(e) => {
            logger.emit(Event::ServiceStop {
                error: Some(e.clone()),
                unfinished_requests: None,
                log_events_dropped: None,
            });
            log_thread.shutdown();
            return Err(e);
        }
    };

    logger.emit(Event::ServiceStart {
        version: BUILD.version,
        commit: BUILD.commit,
        listen: config.listen.to_string(),
        admin: admin.as_ref().map(|a| a.local_addr().to_string()),
        etcd_urls: config.etcd_urls.clone(),
        etcd_key: config.etcd_key.clone(),
        max_connections: config.max_connections,
        workers: config.workers,
        trusted_proxies: config
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect(),
        eject_after: config.eject.after,
        eject_for_secs: config.eject.duration_ms as f64 / 1000.0,
        fd_limit,
    });
    if let Some(a) = &admin
        && !a.local_addr().ip().is_loopback()
    {
        logger.emit(Event::ServiceWarning {
            message: "--admin listens beyond loopback: it has no authentication, so firewall it or bind it to 127.0.0.1",
            fd_limit: None,
            max_connections: None,
            needed: None,
            admin: Some(a.local_addr().to_string()),
        });
    }
    // Each connection needs a descriptor, and one to its backend.
    let needed = (config.max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    if fd_limit.is_some_and(|limit| limit < needed) {
        logger.emit(Event::ServiceWarning {
            message: "the open-file limit is below what --max-connections needs: connections past it wait in the listen backlog (raise LimitNOFILE or lower --max-connections)",
            fd_limit,
            max_connections: Some(config.max_connections),
            needed: Some(needed),
            admin: None,
        });
    }

    let stop_discovery = Arc::new(AtomicBool::new(false));
    let discovery = discovery::Discovery::new(
        discovery::DiscoverySettings {
            endpoints: config.etcd_urls.clone(),
            etcd_key: config.etcd_key.clone(),
            api: config.etcd_api,
            state_file: config.state_file.clone(),
            resync_interval: config.resync_interval,
        },
        Arc::clone(&table),
        Arc::clone(&status),
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

    logger.emit(Event::ServiceStopping {
        grace_secs: SHUTDOWN_GRACE_SECS,
    });
    stop_discovery.store(true, Ordering::Relaxed);
    let unfinished = server.shutdown(Duration::from_secs(SHUTDOWN_GRACE_SECS));
    drop(admin);
    logger.emit(Event::ServiceStop {
        error: None,
        unfinished_requests: Some(unfinished),
        log_events_dropped: Some(logger.dropped()),
    });
    log_thread.shutdown();
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, as Go programs
/// do: the soft default (often 1024) is far below what `--max-connections`
/// connections need, while the hard limit is what the operator allows.
/// Returns the limit in force.
fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    // rlim_t is u64 on the targets built for, but not on every libc.
    #[allow(clippy::unnecessary_cast)]
    Some(limit.rlim_cur as u64)
}
