//! Discovery against etcd's v3 API, a three-member cluster, the state file
//! and anti-entropy, all with real etcd processes (started without v2
//! unless the test is about choosing between the two).

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Etcd, Router, TempDir};

const D: &str = "/domains";

fn key(domain: &str, name: &str) -> String {
    format!("{D}/{domain}/{name}")
}

#[test]
fn v3_routes_are_served_and_follow_every_kind_of_change() {
    let etcd = Etcd::start_without_v2();
    let (b1, b2) = (Backend::start("v3a"), Backend::start("v3b"));
    etcd.put3(&key("v3.example.com", "a"), &b1.url());
    // Beside the directory, not in it.
    etcd.put3("/domainsX/v3.example.com/x", &b2.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("v3.example.com", &["v3a"]);
    let api = router.wait_event("etcd.api", |_| true);
    assert_eq!(api["api"], "v3", "{api}");
    assert_eq!(router.wait_event("etcd.listen", |_| true)["api"], "v3");

    etcd.put3(&key("v3.example.com", "b"), &b2.url());
    router.wait_backends("v3.example.com", &["v3a", "v3b"]);
    etcd.delete3(&key("v3.example.com", "a"));
    router.wait_backends("v3.example.com", &["v3b"]);
    // A key under a lease that nobody keeps alive goes when it expires.
    etcd.put3_leased(&key("lease.example.com", "r"), &b1.url(), 2);
    router.wait_backends("lease.example.com", &["v3a"]);
    router.wait_backends("lease.example.com", &[]);
    router.wait_event("route.remove", |e| e["domain"] == "lease.example.com");
    // A bad value is refused and logged, the rest keeps serving.
    etcd.put3(&key("v3.example.com", "bad"), "not a url");
    router.wait_event("route.error", |e| e["key"] == key("v3.example.com", "bad"));
    router.wait_backends("v3.example.com", &["v3b"]);
    assert!(router.events_named("log.dropped").is_empty());
}

/// The router is stopped (SIGSTOP) while routes change, the history is
/// compacted and etcd restarts: its watch resumes at a compacted revision,
/// and it reads everything again instead of losing the changes.
#[test]
fn compaction_while_the_router_was_away_leads_to_a_fresh_read() {
    let mut etcd = Etcd::start_without_v2();
    let (b1, b2) = (Backend::start("c1"), Backend::start("c2"));
    etcd.put3(&key("compact.example.com", "1"), &b1.url());
    let router = Router::start(&etcd.url(), &["--etcd-api", "v3"]);
    router.wait_backends("compact.example.com", &["c1"]);
    // Its watch connection ends while it is stopped, and the changes come
    // after: nothing of them is in its socket buffer.
    router.signal("-STOP");
    etcd.restart();
    etcd.delete3(&key("compact.example.com", "1"));
    etcd.put3(&key("compact.example.com", "2"), &b2.url());
    etcd.compact3();
    router.signal("-CONT");
    router.wait_event("etcd.resync", |e| e["reason"] == "compacted");
    router.wait_backends("compact.example.com", &["c2"]);
    router.wait_event("route.remove", |e| {
        e["key"] == key("compact.example.com", "1") && e["reason"] == "resync"
    });
}

#[test]
fn a_wiped_v3_store_is_detected_and_read_again() {
    let mut etcd = Etcd::start_without_v2();
    let (b1, b2) = (Backend::start("w1"), Backend::start("w2"));
    for i in 0..30 {
        etcd.put3("/churn", &i.to_string());
    }
    etcd.put3(&key("wipe3.example.com", "1"), &b1.url());
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("wipe3.example.com", &["w1"]);
    etcd.wipe_and_restart();
    etcd.put3(&key("wipe3.example.com", "2"), &b2.url());
    router.wait_event("etcd.resync", |e| e["reason"] == "store_reset");
    router.wait_backends("wipe3.example.com", &["w2"]);
}

/// The member the router watches is killed, then the next one frozen
/// (SIGSTOP: it accepts connections and never answers), then a killed one
/// restarted: each time a change written through another member is served
/// (within the helpers' patience; the README gives the detection times).
#[test]
fn a_dead_frozen_or_restarted_member_is_left_for_the_next() {
    let mut members = Etcd::cluster();
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let b: Vec<Backend> = ["k1", "k2", "k3"].into_iter().map(Backend::start).collect();
    members[1].put3(&key("ha.example.com", "1"), &b[0].url());
    let router = Router::start(&urls.join(","), &[]);
    router.wait_backends("ha.example.com", &["k1"]);
    // The member watched when the route event for `key` was logged.
    let watched = |router: &Router, key: &str| -> usize {
        let url = router.watched_at(key);
        urls.iter()
            .position(|u| *u == url)
            .expect("a known endpoint")
    };

    let first = watched(&router, &key("ha.example.com", "1"));
    members[first].kill();
    let other = (first + 1) % 3;
    members[other].put3(&key("ha.example.com", "2"), &b[1].url());
    // From the write's answer: an election can hold the write itself.
    let written = Instant::now();
    router.wait_backends("ha.example.com", &["k1", "k2"]);
    served_in_time("killed", written);

    let second = watched(&router, &key("ha.example.com", "2"));
    assert_ne!(second, first, "the watch moved on from the dead member");
    members[second].freeze();
    let alive = (0..3)
        .find(|&i| i != first && i != second)
        .expect("a third member");
    // Quorum needs the killed member back while one is frozen.
    members[first].spawn();
    members[alive].put3(&key("ha.example.com", "3"), &b[2].url());
    // From the write's answer: an election can hold the write itself.
    let written = Instant::now();
    router.wait_backends("ha.example.com", &["k1", "k2", "k3"]);
    served_in_time("frozen", written);
    let e = router.wait_event("etcd.error", |e| e["kind"] == "unresponsive");
    assert_eq!(e["endpoint"], urls[second], "{e}");
    members[second].thaw();

    // A member stopped and started again: still one change at a time.
    let third = watched(&router, &key("ha.example.com", "3"));
    members[third].restart();
    members[(third + 1) % 3].delete3(&key("ha.example.com", "1"));
    // From the write's answer: an election can hold the write itself.
    let written = Instant::now();
    router.wait_backends("ha.example.com", &["k2", "k3"]);
    served_in_time("restarted", written);
}

/// The issue's bound for a change to reach the table while a member fails
/// (detection takes at most about 6 s, README "When etcd fails"); not a
/// speed check: without failover the answer would be a minute or never.
fn served_in_time(what: &str, written: Instant) {
    let took = written.elapsed();
    eprintln!("member {what}: change served after {took:?}");
    assert!(took < Duration::from_secs(15), "member {what}: {took:?}");
}

/// Routes go only when etcd says so: losing quorum, etcd stopping and a
/// member without a leader leave the table serving.
#[test]
fn errors_never_shrink_the_table() {
    let mut members = Etcd::cluster();
    let urls: Vec<String> = members.iter().map(Etcd::url).collect();
    let b = Backend::start("keep");
    members[0].put3(&key("keep.example.com", "1"), &b.url());
    let router = Router::start(&urls.join(","), &[]);
    router.wait_backends("keep.example.com", &["keep"]);
    members[1].kill();
    members[2].kill();
    // The survivor has no leader: its reads fail, its watches end.
    router.wait_event("etcd.error", |e| {
        e["kind"] == "no_leader" || e["kind"] == "unresponsive" || e["kind"] == "unreachable"
    });
    std::thread::sleep(Duration::from_secs(4));
    router.wait_backends("keep.example.com", &["keep"]);
    members[0].stop();
    std::thread::sleep(Duration::from_secs(1));
    router.wait_backends("keep.example.com", &["keep"]);
    assert!(router.events_named("route.remove").is_empty());
}

#[test]
fn a_router_started_while_etcd_is_down_serves_from_its_state_file() {
    let dir = TempDir::new("state");
    let state = dir.path().join("routes.json");
    let state_arg = state.to_str().expect("a UTF-8 path").to_string();
    let mut etcd = Etcd::start_without_v2();
    let (b1, b2) = (Backend::start("s1"), Backend::start("s2"));
    etcd.put3(&key("state.example.com", "1"), &b1.url());
    {
        let router = Router::start(&etcd.url(), &["--state-file", &state_arg]);
        router.wait_backends("state.example.com", &["s1"]);
        common::eventually("the state file", || {
            std::fs::read_to_string(&state)
                .ok()
                .filter(|t| t.contains("state.example.com"))
        });
    }
    etcd.stop();
    let router = Router::start(&etcd.url(), &["--state-file", &state_arg]);
    let loaded = router.wait_event("state.load", |_| true);
    assert_eq!(loaded["routes"], 1, "{loaded}");
    router.wait_backends("state.example.com", &["s1"]);
    // etcd back, with a change made meanwhile: its view replaces the file's.
    etcd.spawn();
    etcd.put3(&key("state.example.com", "1"), &b2.url());
    router.wait_backends("state.example.com", &["s2"]);

    // A corrupt file is logged and ignored.
    drop(router);
    std::fs::write(&state, "{not json").expect("write");
    etcd.stop();
    let router = Router::start(&etcd.url(), &["--state-file", &state_arg]);
    let e = router.wait_event("state.error", |_| true);
    assert!(e["error"].as_str().unwrap_or("").contains("ignored"), "{e}");
    assert_eq!(router.get("state.example.com", "/").status, 503);
}

/// Two routers on the same routes show the same digest, and the periodic
/// re-read finds no drift on a healthy watch.
#[test]
fn periodic_re_reads_report_the_same_digest_on_every_router() {
    let etcd = Etcd::start_without_v2();
    let b = Backend::start("ae");
    for i in 0..5 {
        etcd.put3(&key(&format!("ae{i}.example.com"), "r"), &b.url());
    }
    let one = Router::start(&etcd.url(), &["--resync-interval", "1"]);
    let two = Router::start(&etcd.url(), &["--resync-interval", "1"]);
    let a = one.wait_event("etcd.sync", |e| e["reason"] == "anti_entropy");
    let b2 = two.wait_event("etcd.sync", |e| e["reason"] == "anti_entropy");
    assert_eq!(a["digest"], b2["digest"]);
    assert_eq!(
        (a["domains"].as_u64(), a["routes"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(a["drift"], 0);
    etcd.put3(&key("ae9.example.com", "r"), &b.url());
    let after = one.wait_event("etcd.sync", |e| e["routes"] == 6);
    assert_ne!(after["digest"], a["digest"]);
}

/// Both stores in one etcd (v2 on): the one holding the routes is used.
#[test]
fn auto_picks_the_store_that_holds_the_routes() {
    let etcd = Etcd::start();
    let b = Backend::start("auto");
    etcd.put3(&key("auto.example.com", "r"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    assert_eq!(router.wait_event("etcd.api", |_| true)["api"], "v3");
    router.wait_backends("auto.example.com", &["auto"]);
    drop(router);
    let etcd = Etcd::start();
    etcd.put(&key("auto.example.com", "r"), &b.url());
    let router = Router::start(&etcd.url(), &[]);
    assert_eq!(router.wait_event("etcd.api", |_| true)["api"], "v2");
    router.wait_backends("auto.example.com", &["auto"]);
}

/// 10,000 domains of 3 routes each: every route is served and logged, in
/// `route.bulk` lines, and no route event is dropped.
#[test]
fn ten_thousand_domains_start_without_losing_a_route_event() {
    let etcd = Etcd::start_without_v2();
    let b = Backend::start("many");
    let url = b.url();
    // Transactions of 120 puts (etcd allows 128 operations per txn).
    let keys: Vec<String> = (0..10_000)
        .flat_map(|d| (0..3).map(move |r| key(&format!("d{d}.example.com"), &format!("r{r}"))))
        .collect();
    for chunk in keys.chunks(120) {
        let success: Vec<serde_json::Value> = chunk
            .iter()
            .map(|k| {
                serde_json::json!({"request_put": {
                    "key": common::b64(k.as_bytes()),
                    "value": common::b64(url.as_bytes()),
                }})
            })
            .collect();
        etcd.v3("/v3/kv/txn", serde_json::json!({"success": success}))
            .expect("txn");
    }
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("d9999.example.com", &["many"]);
    router.wait_backends("d0.example.com", &["many"]);
    let sync = router.wait_event("etcd.sync", |_| true);
    assert_eq!(
        (sync["domains"].as_u64(), sync["routes"].as_u64()),
        (Some(10_000), Some(30_000))
    );
    let bulk = router.events_named("route.bulk");
    let listed: usize = bulk
        .iter()
        .map(|e| e["items"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(listed, 30_000);
    assert!(router.events_named("log.dropped").is_empty());
    // One change afterwards is logged on its own line.
    etcd.put3(&key("d5.example.com", "r9"), &url);
    router.wait_event("route.add", |e| e["key"] == key("d5.example.com", "r9"));
}
