//! SIGTERM/SIGINT: stop accepting, finish what is in flight, flush the
//! log, exit 0.

mod common;

use std::net::TcpStream;

use common::{Backend, Etcd, Router, request};

#[test]
fn a_signal_stops_accepting_and_lets_the_request_in_flight_finish() {
    let etcd = Etcd::start();
    let b = Backend::start("slowpoke");
    etcd.put("/domains/bye.example.com/r", &b.url());
    let mut router = Router::start(&etcd.url(), &[]);
    router.wait_backends("bye.example.com", &["slowpoke"]);
    let addr = router.addr();
    let in_flight = std::thread::spawn(move || {
        request(&addr, "GET", "bye.example.com", "/slow/3000", &[], None)
    });
    // Wait until the backend has the request, then signal.
    common::eventually("the slow request to reach the backend", || {
        b.seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.url == "/slow/3000")
            .then_some(())
    });
    router.signal("-TERM");
    // New connections are refused while the request is still in flight.
    router.wait_event("service.stopping", |_| true);
    common::eventually("the listening socket to close", || {
        TcpStream::connect(router.addr()).is_err().then_some(())
    });
    assert!(
        !in_flight.is_finished(),
        "the slow request should still be running"
    );
    let status = router.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    let reply = in_flight.join().expect("client thread");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slowpoke");
    // The answer said the connection would not be reused.
    assert_eq!(reply.header("connection").as_deref(), Some("close"));
    // The log was flushed: the request and the stop are both in it.
    let events = router.events();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "router.request" && e["path"] == "/slow/3000")
    );
    let stop = events
        .iter()
        .find(|e| e["event"] == "service.stop")
        .expect("service.stop");
    assert_eq!(stop["unfinished_requests"], 0);
}
