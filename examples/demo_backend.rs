//! A tiny HTTP backend for the demo (`make run`): answers every request
//! with its name, so round robin can be seen with curl.
//!
//! Usage: demo_backend LISTEN_ADDR NAME

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(name)) = (args.next(), args.next()) else {
        eprintln!("usage: demo_backend LISTEN_ADDR NAME");
        std::process::exit(2);
    };
    let server = match tiny_http::Server::http(&listen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo_backend: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    let tag = tiny_http::Header::from_bytes("X-Backend", name.as_bytes()).unwrap_or_else(|_| {
        tiny_http::Header::from_bytes("X-Backend", "demo").expect("static header")
    });
    for request in server.incoming_requests() {
        let body = format!(
            "hello from {name} ({} {})\n",
            request.method(),
            request.url()
        );
        let _ = request.respond(tiny_http::Response::from_string(body).with_header(tag.clone()));
    }
}
