//! The command line as an operator meets it: exit codes and messages.

mod common;

use std::process::Command;

use common::{Etcd, Router};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_httprouter"))
        .args(args)
        .output()
        .expect("run httprouter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--listen",
        "--etcdurl",
        "--etcdkey",
        "--logfile",
        "--logurl",
        "--workers",
    ] {
        assert!(out.contains(flag), "{flag} missing from help");
    }
    let (code, out, _) = run(&["-version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("httprouter "), "{out}");
    // The commit it was built from (or `unknown` outside a git checkout).
    let commit = out
        .split("(commit ")
        .nth(1)
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("no commit in {out:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{out}"
    );
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (args, flag) in [
        (&["--bogus"][..], "--bogus"),
        (&["--workers", "zero"][..], "--workers"),
        (&["--etcdurl", "https://127.0.0.1:2379"][..], "--etcdurl"),
        (&["--listen", "not-an-address"][..], "--listen"),
        (
            &["--logfile", "/nonexistent-dir/router.log"][..],
            "--logfile",
        ),
        (&["-etcdkey"][..], "--etcdkey"),
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed to stdout: {out}");
        let first = err.lines().next().unwrap_or("");
        assert!(first.contains(flag), "{args:?}: {err}");
        assert!(err.contains("--help"), "{args:?}: no usage hint in {err}");
    }
}

#[test]
fn go_style_flags_start_the_router() {
    let etcd = Etcd::start();
    let url = format!("-etcdurl={}", etcd.url());
    let router = Router::start_with(&[&url, "-etcdkey", "/routes", "-workers", "4"]);
    let start = router.wait_event("service.start", |_| true);
    assert_eq!(start["etcd_key"], "/routes");
    assert_eq!(start["workers"], 4);
    assert_eq!(start["etcd_urls"][0], etcd.url());
}
