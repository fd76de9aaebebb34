# The static binary alone, as the original tool's image was. Build the
# binary first (`make static`), then: docker build -t httprouter .
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/httprouter /httprouter
EXPOSE 8080
ENTRYPOINT ["/httprouter"]
