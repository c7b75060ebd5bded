//! Links the restorer as a static PIE with no C runtime: our own `_start`, no libc, no
//! dynamic loader. The `limitless` build script checks the result (only relative
//! relocations, no interpreter, no TLS) before embedding it.
fn main() {
    for a in
        ["-nostartfiles", "-nostdlib", "-static-pie", "-Wl,-z,noexecstack", "-Wl,--no-undefined", "-Wl,-z,norelro", "-Wl,--hash-style=gnu"]
    {
        println!("cargo:rustc-link-arg-bins={a}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
