//! Links the `calico-ipsec` binary as a position-dependent executable.
//!
//! Like the Go-built CNI reference plugins, the plugin then loads at a fixed
//! address. Every ADD is a fresh process; at fixed addresses an emulated CPU
//! (qemu TCG, where `make e2e` and `make bench` run) reuses the code it has
//! already translated instead of translating it again for each process.
//! Shared libraries are still randomised.
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
