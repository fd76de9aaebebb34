//! Two things the binary needs from its build:
//! - the git commit it is built from, for `--version` (`unknown` outside a
//!   git checkout, as from a source tarball);
//! - for the static musl binary, `--wrap=memcpy`: every `memcpy` call then
//!   reaches `httprouter::memcpy::__wrap_memcpy` (src/memcpy.rs says why).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // A new commit or checkout changes HEAD or the branch it names.
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed=.git/{branch}");
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=HTTPROUTER_COMMIT={commit}");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        println!("cargo:rustc-link-arg-bins=-Wl,--wrap=memcpy");
    }
}
