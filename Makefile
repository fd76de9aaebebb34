# httprouter: the README explains each target.
.PHONY: build release static test run lint fmt bench clean deps

build:
	cargo build --locked

release:
	cargo build --locked --release

# The fully static x86_64 musl binary (scripts/static.sh), which the
# Dockerfile copies.
static:
	scripts/static.sh

deps:
	scripts/deps.sh

# Unit tests and the integration tests (real etcd, real backends).
test: deps
	cargo test --locked

# The router for real: a local etcd and demo backends unless --etcdurl is
# given, e.g. make run ARGS='--etcdurl http://10.0.0.1:2379'.
run:
	scripts/demo.sh $(ARGS)

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

fmt:
	cargo fmt --all

bench: release
	scripts/bench.sh

clean:
	cargo clean
