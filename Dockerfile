# The static binary alone, as the original tool's image was. Build the
# binary first (`make static`), then: docker build -t httprouter .
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/httprouter /httprouter
EXPOSE 8080
# The status page and /metrics are off by default; in a container, e.g.
# `docker run … httprouter --etcdurl … --admin 0.0.0.0:9090` and publish
# the port to loopback only: the admin side has no authentication.
ENTRYPOINT ["/httprouter"]
