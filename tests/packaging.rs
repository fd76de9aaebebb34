//! What ships: the static binary `make static` builds, and the Dockerfile
//! that copies it.

use std::path::Path;
use std::process::Command;

/// Where `make static` (scripts/static.sh) puts the binary.
const STATIC_BINARY: &str = "target/x86_64-unknown-linux-musl/release/httprouter";

#[test]
fn the_dockerfile_holds_the_static_binary_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docker = std::fs::read_to_string(root.join("Dockerfile")).expect("a Dockerfile");
    let lines: Vec<&str> = docker
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.first(), Some(&"FROM scratch"), "{docker}");
    let copies: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("COPY "))
        .copied()
        .collect();
    assert_eq!(
        copies,
        [format!("COPY {STATIC_BINARY} /httprouter")],
        "{docker}"
    );
    let script = std::fs::read_to_string(root.join("scripts/static.sh")).expect("static.sh");
    assert!(
        script.contains("target=x86_64-unknown-linux-musl")
            && script.contains("bin=target/$target/release/httprouter"),
        "scripts/static.sh builds another path than the Dockerfile copies"
    );
}

/// Runs the static binary once, if `make static` has built it.
#[test]
fn the_static_binary_is_static_small_and_runs() {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(STATIC_BINARY);
    if !bin.exists() {
        eprintln!("skipped: no static binary at {STATIC_BINARY} (`make static` builds it)");
        return;
    }
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .expect("run it");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("httprouter "));
    let size = std::fs::metadata(&bin).expect("size").len();
    assert!(size <= 2 * 1024 * 1024, "{size} bytes");
    if let Ok(ldd) = Command::new("ldd").arg(&bin).output() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&ldd.stdout),
            String::from_utf8_lossy(&ldd.stderr)
        );
        assert!(
            text.contains("statically linked") || text.contains("not a dynamic executable"),
            "{text}"
        );
    }
}
