//! Links the agent with immediate binding (`-z now`): a lazy PLT resolution inside the
//! dynamic loader could take its lock while the program's threads are frozen.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,now");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,noexecstack");
    println!("cargo:rerun-if-changed=build.rs");
}
