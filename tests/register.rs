//! scripts/register.sh: the health-checked registration loop, end to end
//! with etcd and the router.

mod common;

use std::process::{Child, Command, Stdio};

use common::{Backend, Etcd, Router, eventually};

/// A running register.sh, stopped (TERM) by PID on drop.
struct Registration(Child);

impl Registration {
    fn start(etcd: &Etcd, domain: &str, b: &Backend) -> Registration {
        let child = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/register.sh"))
            .args([
                domain,
                &b.addr.ip().to_string(),
                &b.addr.port().to_string(),
                &etcd.url(),
            ])
            .env("TTL", "4")
            .env("INTERVAL", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start register.sh");
        Registration(child)
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.terminate();
        }
    }
}

#[test]
fn registered_backends_are_served_round_robin_and_removed_when_unhealthy() {
    let etcd = Etcd::start();
    let (b1, b2) = (Backend::start("web1"), Backend::start("web2"));
    let _r1 = Registration::start(&etcd, "demo.example.com", &b1);
    let mut r2 = Registration::start(&etcd, "demo.example.com", &b2);
    let router = Router::start(&etcd.url(), &[]);
    router.wait_backends("demo.example.com", &["web1", "web2"]);
    let got: Vec<String> = (0..6)
        .map(|_| router.get("demo.example.com", "/").backend.unwrap())
        .collect();
    assert!(
        got.windows(2).all(|w| w[0] != w[1]),
        "not round robin: {got:?}"
    );

    // Heartbeats refresh the TTL without watch events: the key outlives its
    // TTL and no route.change/route.add repeats.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let adds = router.events_named("route.add").len();
    assert_eq!(adds, 2, "heartbeats must not re-add routes");
    assert!(router.events_named("route.change").is_empty());
    assert!(router.events_named("route.remove").is_empty());

    // A backend whose health check fails is deregistered.
    drop(b1);
    router.wait_backends("demo.example.com", &["web2"]);

    // Stopping the script removes its key at once.
    r2.terminate();
    router.wait_backends("demo.example.com", &[]);
    eventually("the key to be gone", || {
        let url = format!("{}/v2/keys/domains/demo.example.com/", etcd.url());
        let body = common::agent(std::time::Duration::from_secs(5))
            .get(&url)
            .call()
            .ok()?
            .into_body()
            .read_to_string()
            .ok()?;
        (!body.contains("\"value\"")).then_some(())
    });
}
