//! The static musl binary is linked with `--wrap=memcpy`: every `memcpy`
//! call then reaches `httprouter::memcpy::__wrap_memcpy` (src/memcpy.rs
//! says why). Other targets link as usual.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        println!("cargo:rustc-link-arg-bins=-Wl,--wrap=memcpy");
    }
}
