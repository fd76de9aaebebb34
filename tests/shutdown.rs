//! SIGTERM/SIGINT: stop accepting, finish what is in flight, flush the
//! log, exit 0.

mod common;

use std::net::TcpStream;

use common::{Backend, Etcd, Router, request};

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let etcd = Etcd::start();
    let b = Backend::start("slowpoke");
    etcd.put("/domains/bye.example.com/r", &b.url());
    let mut router = Router::start(&etcd.url(), &[]);
    router.wait_backends("bye.example.com", &["slowpoke"]);
    let addr = router.addr();
    let in_flight = std::thread::spawn(move || {
        request(&addr, "GET", "bye.example.com", "/slow/2000", &[], None)
    });
    // Wait until the backend has the request, then signal.
    common::eventually("the slow request to reach the backend", || {
        b.seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.url == "/slow/2000")
            .then_some(())
    });
    let status = router.terminate();
    assert!(status.success(), "exit status {status:?}");
    let reply = in_flight.join().expect("client thread");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slowpoke");
    // The log was flushed: the request and the stop are both in it.
    let events = router.events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "router.request" && e["path"] == "/slow/2000")
    );
    let stop = events
        .iter()
        .find(|e| e["event"] == "service.stop")
        .expect("service.stop");
    assert_eq!(stop["unfinished_requests"], 0);
    // And nothing listens any more.
    assert!(TcpStream::connect(router.addr()).is_err());
}
