//! Route discovery against a real etcd: every kind of change, history
//! loss, etcd failures and bad data.

mod common;

use std::time::Duration;

use common::{Backend, Etcd, Forwarder, Router};

const D: &str = "/domains";

#[test]
fn deleted_key_leaves_the_pool_and_updated_key_changes_backend() {
    let etcd = Etcd::start();
    let (b1, b2, b3) = (
        Backend::start("b1"),
        Backend::start("b2"),
        Backend::start("b3"),
    );
    etcd.put(&format!("{D}/chg.example.com/one"), &b1.url());
    etcd.put(&format!("{D}/chg.example.com/two"), &b2.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("chg.example.com", &["b1", "b2"]);

    etcd.delete(&format!("{D}/chg.example.com/two"));
    router.wait_backends("chg.example.com", &["b1"]);
    router.wait_event("route.remove", |e| {
        e["key"] == format!("{D}/chg.example.com/two")
    });

    etcd.put(&format!("{D}/chg.example.com/one"), &b3.url());
    router.wait_backends("chg.example.com", &["b3"]);
    let e = router.wait_event("route.change", |e| {
        e["key"] == format!("{D}/chg.example.com/one")
    });
    assert_eq!(e["url"], b3.url());
    assert_eq!(e["previous_url"], b1.url());

    etcd.delete(&format!("{D}/chg.example.com/one"));
    router.wait_backends("chg.example.com", &[]);
}

#[test]
fn expired_ttl_key_removes_the_route() {
    let etcd = Etcd::start();
    let (b1, b2) = (Backend::start("stay"), Backend::start("ttl"));
    etcd.put(&format!("{D}/ttl.example.com/stay"), &b1.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("ttl.example.com", &["stay"]);
    etcd.put_ttl(&format!("{D}/ttl.example.com/ttl"), &b2.url(), 2);
    router.wait_backends("ttl.example.com", &["stay", "ttl"]);
    let e = router.wait_event("route.remove", |e| {
        e["key"] == format!("{D}/ttl.example.com/ttl")
    });
    assert_eq!(e["reason"], "expire");
    router.wait_backends("ttl.example.com", &["stay"]);
}

#[test]
fn rapid_ttl_renewals_keep_two_domains_balanced() {
    let etcd = Etcd::start();
    let backends: Vec<Backend> = ["a1", "a2", "b1", "b2"]
        .iter()
        .map(|n| Backend::start(n))
        .collect();
    let keys = [
        ("bal-a.example.com", "a1", 0),
        ("bal-a.example.com", "a2", 1),
        ("bal-b.example.com", "b1", 2),
        ("bal-b.example.com", "b2", 3),
    ];
    let register = || {
        for (domain, name, i) in keys {
            etcd.put_ttl(&format!("{D}/{domain}/{name}"), &backends[i].url(), 5);
        }
    };
    register();
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("bal-a.example.com", &["a1", "a2"]);
    router.wait_backends("bal-b.example.com", &["b1", "b2"]);
    let mut counts = std::collections::HashMap::<String, usize>::new();
    // Re-set every key (a new watch event each time) between requests, the
    // way the original tool's health checks renewed their TTLs.
    for _ in 0..20 {
        register();
        for host in ["bal-a.example.com", "bal-b.example.com"] {
            let r = router.get(host, "/");
            assert_eq!(r.status, 200);
            *counts.entry(r.backend.unwrap()).or_default() += 1;
        }
    }
    for name in ["a1", "a2", "b1", "b2"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((8..=12).contains(&n), "unbalanced: {counts:?}");
    }
}

#[test]
fn directory_delete_and_expiry_remove_every_route_under_it() {
    let etcd = Etcd::start();
    let (b1, b2, b3) = (
        Backend::start("x1"),
        Backend::start("x2"),
        Backend::start("y"),
    );
    etcd.put(&format!("{D}/dir-x.example.com/1"), &b1.url());
    etcd.put(&format!("{D}/dir-x.example.com/2"), &b2.url());
    etcd.put(&format!("{D}/dir-y.example.com/1"), &b3.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("dir-x.example.com", &["x1", "x2"]);
    etcd.delete_dir(&format!("{D}/dir-x.example.com"));
    router.wait_backends("dir-x.example.com", &[]);
    router.wait_backends("dir-y.example.com", &["y"]);

    // A TTL on a directory expires as one event for the whole subtree.
    let url = format!("{}/v2/keys{D}/dir-z.example.com?dir=true&ttl=2", etcd.url());
    common::agent(Duration::from_secs(10))
        .put(&url)
        .send_empty()
        .expect("mkdir with ttl");
    etcd.put(&format!("{D}/dir-z.example.com/1"), &b1.url());
    router.wait_backends("dir-z.example.com", &["x1"]);
    router.wait_backends("dir-z.example.com", &[]);

    // Deleting the whole tree empties the table.
    etcd.delete_dir(D);
    router.wait_backends("dir-y.example.com", &[]);
}

#[test]
fn cleared_history_triggers_a_resync_without_losing_changes() {
    let etcd = Etcd::start();
    let (b1, b2, b3) = (
        Backend::start("old"),
        Backend::start("new"),
        Backend::start("gone"),
    );
    etcd.put(&format!("{D}/hist.example.com/r"), &b1.url());
    etcd.put(&format!("{D}/hist.example.com/gone"), &b3.url());
    let link = Forwarder::start(format!("127.0.0.1:{}", etcd.client_port).parse().unwrap());
    let router = Router::start(&link.url(), &[]);
    router.wait_backends("hist.example.com", &["gone", "old"]);
    // Cut the router off while more than 1000 writes happen elsewhere, plus
    // two route changes: its watch index falls out of etcd's history.
    link.cut();
    router.wait_event("etcd.error", |_| true);
    for i in 0..1100 {
        etcd.put("/churn/k", &i.to_string());
    }
    etcd.put(&format!("{D}/hist.example.com/r"), &b2.url());
    etcd.delete(&format!("{D}/hist.example.com/gone"));
    link.restore();
    router.wait_event("etcd.resync", |e| e["reason"] == "history_cleared");
    router.wait_backends("hist.example.com", &["new"]);
    router.wait_event("route.remove", |e| {
        e["key"] == format!("{D}/hist.example.com/gone") && e["reason"] == "resync"
    });
}

#[test]
fn changes_made_while_cut_off_arrive_after_reconnecting() {
    let etcd = Etcd::start();
    let (b1, b2) = (Backend::start("before"), Backend::start("during"));
    etcd.put(&format!("{D}/gap.example.com/1"), &b1.url());
    let link = Forwarder::start(format!("127.0.0.1:{}", etcd.client_port).parse().unwrap());
    let router = Router::start(&link.url(), &[]);
    router.wait_backends("gap.example.com", &["before"]);
    link.cut();
    router.wait_event("etcd.error", |_| true);
    etcd.put(&format!("{D}/gap.example.com/2"), &b2.url());
    // The last table keeps serving meanwhile.
    assert_eq!(
        router.get("gap.example.com", "/").backend.as_deref(),
        Some("before")
    );
    link.restore();
    router.wait_backends("gap.example.com", &["before", "during"]);
    // Resumed from its index (no resync needed).
    assert!(router.events_named("etcd.resync").is_empty());
}

/// A member that accepts connections but never answers (frozen, or cut off
/// from its cluster) holds the watch silent; after the watch idle timeout
/// (60 s) the router moves to the next endpoint and catches up. Slow by
/// nature: about a minute.
#[test]
fn a_silent_watch_is_abandoned_for_the_next_endpoint() {
    let etcd = Etcd::start();
    let (b1, b2) = (Backend::start("before"), Backend::start("after"));
    etcd.put(&format!("{D}/quiet.example.com/1"), &b1.url());
    let frozen = Forwarder::start(format!("127.0.0.1:{}", etcd.client_port).parse().unwrap());
    let router = Router::start(&format!("{},{}", frozen.url(), etcd.url()), &[]);
    router.wait_backends("quiet.example.com", &["before"]);
    let listen = router.wait_event("etcd.listen", |_| true);
    assert_eq!(listen["endpoint"], frozen.url());
    frozen
        .frozen
        .store(true, std::sync::atomic::Ordering::SeqCst);
    etcd.put(&format!("{D}/quiet.example.com/1"), &b2.url());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if router.get("quiet.example.com", "/").backend.as_deref() == Some("after") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change never arrived"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_missing_directory_is_an_empty_table_and_is_watched() {
    let etcd = Etcd::start();
    let b = Backend::start("new");
    let router = Router::start(&etcd.url(), &[]);
    let listen = router.wait_event("etcd.listen", |_| true);
    assert_eq!(listen["routes"], 0);
    assert_eq!(router.get("new.example.com", "/").status, 503);
    etcd.put(&format!("{D}/new.example.com/r"), &b.url());
    router.wait_backends("new.example.com", &["new"]);
    assert!(router.events_named("etcd.error").is_empty());
}

#[test]
fn etcd_started_after_the_router() {
    let mut etcd = Etcd::planned();
    let b = Backend::start("late");
    let router = Router::start(&etcd.url(), &[]);
    router.wait_event("etcd.error", |e| e["kind"] == "unreachable");
    assert_eq!(router.get("late.example.com", "/").status, 503);
    etcd.spawn();
    etcd.put(&format!("{D}/late.example.com/r"), &b.url());
    router.wait_backends("late.example.com", &["late"]);
    router.wait_event("etcd.listen", |_| true);
}

#[test]
fn etcd_restart_keeps_serving_and_catches_up() {
    let mut etcd = Etcd::start();
    let (b1, b2) = (Backend::start("r1"), Backend::start("r2"));
    etcd.put(&format!("{D}/restart.example.com/1"), &b1.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("restart.example.com", &["r1"]);
    etcd.stop();
    router.wait_event("etcd.error", |_| true);
    // etcd is down: the last table keeps serving.
    for _ in 0..5 {
        assert_eq!(
            router.get("restart.example.com", "/").backend.as_deref(),
            Some("r1")
        );
    }
    etcd.spawn();
    etcd.put(&format!("{D}/restart.example.com/2"), &b2.url());
    router.wait_backends("restart.example.com", &["r1", "r2"]);
}

#[test]
fn wiped_etcd_is_detected_and_resynced() {
    let mut etcd = Etcd::start();
    let (b1, b2) = (Backend::start("w1"), Backend::start("w2"));
    // Push the index well above what a fresh etcd will have.
    for i in 0..50 {
        etcd.put("/churn/k", &i.to_string());
    }
    etcd.put(&format!("{D}/wipe.example.com/1"), &b1.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("wipe.example.com", &["w1"]);
    etcd.wipe_and_restart();
    etcd.put(&format!("{D}/wipe.example.com/2"), &b2.url());
    router.wait_backends("wipe.example.com", &["w2"]);
    router.wait_event("etcd.resync", |e| e["reason"] == "store_reset");
    router.wait_event("route.remove", |e| {
        e["key"] == format!("{D}/wipe.example.com/1")
    });
}

#[test]
fn bad_keys_and_values_are_skipped_with_a_log_event() {
    let etcd = Etcd::start();
    let good = Backend::start("good");
    etcd.put(&format!("{D}/bad.example.com/empty"), "");
    etcd.put(&format!("{D}/bad.example.com/text"), "not a url at all");
    etcd.put(&format!("{D}/bad.example.com/https"), "https://127.0.0.1:1");
    etcd.put(&format!("{D}/bad.example.com/json"), "http://a\n{\"x\":1}");
    etcd.put(&format!("{D}/bare.example.com"), &good.url());
    etcd.put(&format!("{D}/deep.example.com/a/b"), &good.url());
    etcd.put(&format!("{D}/bad.example.com/_hidden"), &good.url());
    etcd.put(&format!("{D}/bad.example.com/good"), &good.url());
    etcd.put(&format!("{D}/big.example.com/r"), &"x".repeat(2_000_000));
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("bad.example.com", &["good"]);
    for key in [
        "bad.example.com/empty",
        "bad.example.com/text",
        "bad.example.com/https",
        "bare.example.com",
        "deep.example.com/a/b",
        "big.example.com/r",
    ] {
        let e = router.wait_event("route.error", |e| e["key"] == format!("{D}/{key}"));
        assert!(e["error"].is_string());
        assert!(e["value"].as_str().map(|v| v.len() < 1000).unwrap_or(false));
    }
    // Bad values arriving live are skipped too, and remove what the key
    // named before.
    etcd.put(&format!("{D}/bad.example.com/good"), "garbage");
    router.wait_backends("bad.example.com", &[]);
    router.wait_event("route.error", |e| e["value"] == "garbage");
    assert!(
        router
            .events_named("route.add")
            .iter()
            .all(|e| !e["key"].as_str().unwrap().contains("_hidden"))
    );
}

#[test]
fn v2_api_disabled_is_reported_for_the_operator() {
    let etcd = Etcd::start_without_v2();
    let router = Router::start(&etcd.url(), &["--etcd-api", "v2"]);
    let e = router.wait_event("etcd.error", |e| e["kind"] == "v2_disabled");
    assert!(e["error"].as_str().unwrap().contains("--enable-v2"), "{e}");
    // Keeps retrying and serving.
    router.wait_event("etcd.error", |e| {
        e["kind"] == "v2_disabled" && e["retry_in_ms"].as_u64() > Some(100)
    });
    assert_eq!(router.get("any.example.com", "/").status, 503);
}

#[test]
fn second_endpoint_is_used_when_the_first_is_down() {
    let etcd = Etcd::start();
    let b = Backend::start("ep");
    etcd.put(&format!("{D}/ep.example.com/r"), &b.url());
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let router = Router::start(&format!("{dead},{}", etcd.url()), &[]);
    router.wait_backends("ep.example.com", &["ep"]);
    let listen = router.wait_event("etcd.listen", |_| true);
    assert_eq!(listen["endpoint"], etcd.url());
}

/// v2 through a three-member cluster: the watched member frozen (SIGSTOP:
/// it accepts connections and never answers), then killed; each time a
/// change written through another member is served.
#[test]
fn a_frozen_or_killed_v2_member_is_left_for_the_next() {
    let mut members = Etcd::cluster_with_v2();
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let (b1, b2, b3) = (
        Backend::start("v2a"),
        Backend::start("v2b"),
        Backend::start("v2c"),
    );
    members[0].put(&format!("{D}/ha2.example.com/1"), &b1.url());
    let router = Router::start(&urls.join(","), &["--etcd-api", "v2"]);
    router.wait_backends("ha2.example.com", &["v2a"]);
    let watched = |key: &str| -> usize {
        let url = router.watched_at(key);
        urls.iter()
            .position(|u| *u == url)
            .expect("a known endpoint")
    };
    let first = watched(&format!("{D}/ha2.example.com/1"));
    members[first].freeze();
    let other = (first + 1) % 3;
    // Retried while an election (the frozen member led) holds writes.
    common::eventually("a v2 write through another member", || {
        members[other].put(&format!("{D}/ha2.example.com/2"), &b2.url())["node"]
            .as_object()
            .map(|_| ())
    });
    let written = std::time::Instant::now();
    router.wait_backends("ha2.example.com", &["v2a", "v2b"]);
    let took = written.elapsed();
    eprintln!("v2 member frozen: change served after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let e = router.wait_event("etcd.error", |e| e["kind"] == "unresponsive");
    assert_eq!(e["endpoint"], urls[first], "{e}");
    members[first].thaw();

    let second = watched(&format!("{D}/ha2.example.com/2"));
    members[second].kill();
    let alive = (second + 1) % 3;
    common::eventually("a v2 write after the kill", || {
        members[alive].put(&format!("{D}/ha2.example.com/3"), &b3.url())["node"]
            .as_object()
            .map(|_| ())
    });
    router.wait_backends("ha2.example.com", &["v2a", "v2b", "v2c"]);
}
