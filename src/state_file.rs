//! `--state-file`: the route table and its etcd revision on disk, so a
//! router that starts while etcd cannot be reached serves the routes it
//! last knew instead of nothing.
//!
//! Written atomically (a temporary file in the same directory, `fsync`,
//! `rename`, `fsync` of the directory): a crash leaves the old file or the
//! new one, never half of one. Read once, at start; a missing or corrupt
//! file is the caller's to log, never fatal.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::etcd::{Leaf, Revision};

const FORMAT: &str = "httprouter-state";
const VERSION: u64 = 1;
/// No state file of a sane table is this large.
const MAX_BYTES: u64 = 512 * 1024 * 1024;

/// What a state file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// `v2` or `v3`.
    pub api: String,
    pub revision: Revision,
    pub saved_at: String,
    pub leaves: Vec<Leaf>,
}

/// Writes the routes (`(key, url)` in any order) atomically to `path`.
pub fn save<'a>(
    path: &Path,
    api: &str,
    etcd_key: &str,
    revision: Revision,
    routes: impl Iterator<Item = (&'a str, &'a str)>,
) -> io::Result<()> {
    let mut text = String::with_capacity(64 * 1024);
    text.push_str("{\"format\":\"");
    text.push_str(FORMAT);
    text.push_str("\",\"version\":");
    text.push_str(&VERSION.to_string());
    text.push_str(",\"api\":");
    text.push_str(&Value::from(api).to_string());
    text.push_str(",\"etcdkey\":");
    text.push_str(&Value::from(etcd_key).to_string());
    text.push_str(",\"revision\":");
    text.push_str(&revision.to_string());
    text.push_str(",\"saved_at\":\"");
    text.push_str(&crate::log::rfc3339(SystemTime::now()));
    text.push_str("\",\"routes\":[");
    for (i, (key, url)) in routes.enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str("\n[");
        text.push_str(&Value::from(key).to_string());
        text.push(',');
        text.push_str(&Value::from(url).to_string());
        text.push(']');
    }
    text.push_str("\n]}\n");
    let tmp = temporary(path);
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// Reads a state file written by [`save`] for `etcd_key`; the error says
/// what is wrong with it.
pub fn load(path: &Path, etcd_key: &str) -> Result<Saved, String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_BYTES).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read it: {e}"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON ({e})"))?;
    if v["format"] != FORMAT || v["version"] != VERSION {
        return Err(format!(
            "not a state file of this version (format {}, version {})",
            v["format"], v["version"]
        ));
    }
    if v["etcdkey"] != etcd_key {
        return Err(format!(
            "written for --etcdkey {}, not {etcd_key:?}",
            v["etcdkey"]
        ));
    }
    let revision = v["revision"].as_u64().ok_or("no revision")?;
    let routes = v["routes"].as_array().ok_or("no routes list")?;
    let mut leaves = Vec::with_capacity(routes.len());
    for r in routes {
        match (r[0].as_str(), r[1].as_str()) {
            (Some(key), Some(value)) => leaves.push(Leaf {
                key: key.to_string(),
                value: value.to_string(),
            }),
            _ => return Err(format!("a route that is not [key, url]: {r}")),
        }
    }
    Ok(Saved {
        api: v["api"].as_str().unwrap_or_default().to_string(),
        revision,
        saved_at: v["saved_at"].as_str().unwrap_or_default().to_string(),
        leaves,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("httprouter-state-{}-{name}", std::process::id()))
    }

    #[test]
    fn saved_routes_load_back() {
        let path = temp("roundtrip");
        let routes = [
            ("/domains/a.com/1", "http://127.0.0.1:1"),
            ("/domains/\"q\"/2", "x"),
        ];
        save(&path, "v3", "/domains", 42, routes.iter().copied()).unwrap();
        let saved = load(&path, "/domains").unwrap();
        assert_eq!((saved.api.as_str(), saved.revision), ("v3", 42));
        let back: Vec<(&str, &str)> = saved
            .leaves
            .iter()
            .map(|l| (l.key.as_str(), l.value.as_str()))
            .collect();
        assert_eq!(back, routes);
        assert!(load(&path, "/other").unwrap_err().contains("--etcdkey"));
        assert!(!temporary(&path).exists());
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn missing_and_corrupt_files_are_errors() {
        let path = temp("corrupt");
        assert!(load(&path, "/domains").is_err());
        for bad in [
            "",
            "{",
            "[]",
            "{\"format\":\"httprouter-state\",\"version\":9}",
        ] {
            fs::write(&path, bad).unwrap();
            assert!(load(&path, "/domains").is_err(), "{bad}");
        }
        let _ = fs::remove_file(&path);
    }
}
