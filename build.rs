//! Builds the engine's two no_std parts (the agent and the restorer) with the `engine`
//! profile, checks the restorer is a self-relocating static PIE, and hands both to the
//! `limitless` crate for embedding (`src/engine/embedded.rs`), so that the one binary is a
//! complete install.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out.join("engine-target");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--profile", "engine", "-p", "limitless-agent", "-p", "limitless-restorer", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags and target settings do not apply to the engine build.
    for v in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_PANIC",
    ] {
        cmd.env_remove(v);
    }
    let status = cmd.status().expect("cannot run cargo to build the agent and the restorer");
    if !status.success() {
        panic!("building the agent and the restorer failed");
    }
    let built = target_dir.join("engine");
    let agent = fs::read(built.join("liblimitless_agent.so")).expect("agent library missing after build");
    let restorer = fs::read(built.join("limitless-restorer")).expect("restorer missing after build");
    if let Err(e) = check_restorer(&restorer) {
        panic!("the restorer is not a self-relocating static PIE: {e}");
    }
    fs::write(out.join("agent.so"), &agent).expect("write agent");
    fs::write(out.join("restorer"), &restorer).expect("write restorer");
    let hashes = format!(
        "/// BLAKE3 of the embedded agent library.\npub const AGENT_HASH: &str = \"{}\";\n/// BLAKE3 of the embedded restorer.\npub const RESTORER_HASH: &str = \"{}\";\n",
        blake3::hash(&agent).to_hex(),
        blake3::hash(&restorer).to_hex()
    );
    fs::write(out.join("engine_hashes.rs"), hashes).expect("write hashes");
    for d in ["crates/agent", "crates/restorer", "crates/image", "crates/sys"] {
        rerun_dir(&root.join(d));
    }
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=build.rs");
}

fn rerun_dir(d: &Path) {
    println!("cargo:rerun-if-changed={}", d.display());
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                rerun_dir(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn u16le(b: &[u8], o: usize) -> u64 {
    u16::from_le_bytes([b[o], b[o + 1]]) as u64
}
fn u32le(b: &[u8], o: usize) -> u64 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes")) as u64
}
fn u64le(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// ET_DYN, no PT_INTERP, no PT_TLS, and only R_X86_64_RELATIVE dynamic relocations (the
/// restorer applies those itself, twice: where the kernel loads it and in its gap).
fn check_restorer(b: &[u8]) -> Result<(), String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return Err("not a 64-bit ELF file".into());
    }
    if u16le(b, 16) != 3 {
        return Err("not ET_DYN (position independent)".into());
    }
    let (phoff, phnum) = (u64le(b, 32) as usize, u16le(b, 56) as usize);
    let mut dynamic = None;
    for i in 0..phnum {
        let p = phoff + i * 56;
        match u32le(b, p) {
            3 => return Err("has an interpreter (PT_INTERP)".into()),
            7 => return Err("uses thread-local storage (PT_TLS)".into()),
            2 => dynamic = Some((u64le(b, p + 8) as usize, u64le(b, p + 32) as usize)),
            _ => {}
        }
    }
    let (off, len) = dynamic.ok_or("has no dynamic section")?;
    let (mut rela, mut relasz, mut relaent) = (0, 0, 24);
    let mut i = off;
    while i + 16 <= off + len {
        let (tag, val) = (u64le(b, i) as i64, u64le(b, i + 8) as usize);
        match tag {
            0 => break,
            7 => rela = val,
            8 => relasz = val,
            9 => relaent = val,
            36 => return Err("uses packed RELR relocations".into()),
            17 => return Err("uses REL relocations".into()),
            _ => {}
        }
        i += 16;
    }
    // vaddr == file offset for the restorer's read-only first segment (linked at 0).
    let mut o = 0;
    while o < relasz {
        let ty = u64le(b, rela + o + 8) & 0xffff_ffff;
        if ty != 8 {
            return Err(format!("has relocation type {ty}, not R_X86_64_RELATIVE"));
        }
        o += relaent;
    }
    Ok(())
}
