//! `limitless inspect`: what an image holds, as text or JSON.

use crate::util::bytes;
use anyhow::{anyhow, Result};
use limitless_image::cpu;
use limitless_image::file::{Fd, Image, Vma};
use limitless_image::format::*;
use limitless_image::wire::unfixed;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Serialize)]
struct Report {
    image: String,
    file_bytes: u64,
    format: String,
    verified: bool,
    program: String,
    cwd: String,
    pid: u32,
    generation: u32,
    restores: u32,
    left_running: bool,
    taken_unix_ms: u64,
    needs: Needs,
    threads: Vec<Thread>,
    memory: Memory,
    files: Vec<FileRow>,
    objects: Vec<ObjectRow>,
    stdin_pending_bytes: usize,
    /// The images a delta image takes unchanged page records from.
    parents: Vec<String>,
    /// Executable files whose ELF build-id a restore checks: (path, build-id in hex).
    build_ids: Vec<(String, String)>,
}

#[derive(Serialize)]
struct ObjectRow {
    id: u32,
    kind: &'static str,
    name: String,
    size: u64,
    stored_bytes: u64,
}

#[derive(Serialize)]
struct Needs {
    kernel: String,
    glibc: String,
    agent_version: u32,
    cpu_vendor: String,
    cpu_features: Vec<&'static str>,
    xcr0: String,
    vdso: String,
}

#[derive(Serialize)]
struct Thread {
    tid: u32,
    role: &'static str,
    name: String,
    rseq: bool,
}

#[derive(Serialize)]
struct Memory {
    areas: usize,
    mapped_bytes: u64,
    stored_bytes: u64,
    guard_bytes: u64,
    /// How the page records are stored.
    records: PageRecords,
    by_kind: BTreeMap<&'static str, KindRow>,
    /// Every area, in address order (with `--areas` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    list: Option<Vec<AreaRow>>,
}

/// One memory area, for `--areas`.
#[derive(Serialize)]
struct AreaRow {
    start: String,
    end: String,
    /// `r`, `w`, `x` or `-` each.
    prot: String,
    kind: &'static str,
    /// The file, `[heap]`, `[stack]` or nothing.
    name: String,
    mapped_bytes: u64,
    stored_bytes: u64,
    guard_bytes: u64,
}

/// Page records by how they are stored, and the bytes they take in this file.
#[derive(Serialize, Default)]
struct PageRecords {
    /// The pages as they are.
    raw: usize,
    /// zstd frames (`dump --compress`).
    compressed: usize,
    /// The words that differ from the file mapped there or from zeros.
    changes: usize,
    /// Those words, compressed (`dump --compress`).
    compressed_changes: usize,
    /// References to records of parent images (a delta image).
    references: usize,
    /// Bytes of the records in this file, headers included.
    file_bytes: u64,
}

impl PageRecords {
    fn of(img: &Image) -> PageRecords {
        let mut r = PageRecords::default();
        for p in &img.pages {
            let e = &img.index[p.index];
            *match e.flags {
                rflags::ZSTD => &mut r.compressed,
                rflags::DIFF => &mut r.changes,
                f if f == rflags::DIFF | rflags::ZSTD => &mut r.compressed_changes,
                rflags::REF => &mut r.references,
                _ => &mut r.raw,
            } += 1;
            r.file_bytes += e.stored_len;
        }
        r
    }

    fn line(&self) -> String {
        let parts = [
            (self.raw, "raw"),
            (self.compressed, "compressed"),
            (self.changes, "as changes to their files or to zeros"),
            (self.compressed_changes, "as compressed changes"),
            (self.references, "in parent images"),
        ];
        let parts: Vec<String> = parts.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
        let total = self.raw + self.compressed + self.changes + self.compressed_changes + self.references;
        format!("{total} page records: {}; {} in this file", parts.join(", "), bytes(self.file_bytes))
    }
}

#[derive(Serialize, Default)]
struct KindRow {
    areas: usize,
    mapped_bytes: u64,
    stored_bytes: u64,
}

#[derive(Serialize)]
struct FileRow {
    fd: i32,
    kind: &'static str,
    path: String,
    offset: u64,
    flags: String,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(unfixed(b)).into_owned()
}

fn flags(f: u32) -> String {
    let mut v = vec![match f as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    }];
    if f as i32 & libc::O_APPEND != 0 {
        v.push("O_APPEND");
    }
    if f as i32 & libc::O_NONBLOCK != 0 {
        v.push("O_NONBLOCK");
    }
    v.join("|")
}

/// A socket's kind, local address and what the restore makes of it.
fn socket(f: &Fd) -> String {
    let Some(s) = SocketState::decode(&f.extra) else { return "socket".into() };
    let a = &s.addr[..(s.addr_len as usize).min(s.addr.len())];
    let port = |a: &[u8]| u16::from_be_bytes([a[2], a[3]]);
    let kind = match (s.family as i32, s.sock_type as i32 & 0xf) {
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_STREAM) => "tcp",
        (libc::AF_INET | libc::AF_INET6, libc::SOCK_DGRAM) => "udp",
        (libc::AF_UNIX, libc::SOCK_STREAM) => "unix-stream",
        (libc::AF_UNIX, libc::SOCK_DGRAM) => "unix-dgram",
        (libc::AF_UNIX, _) => "unix",
        _ => "socket",
    };
    let addr = match s.family as i32 {
        libc::AF_INET if a.len() >= 8 => format!(" {}:{}", std::net::Ipv4Addr::new(a[4], a[5], a[6], a[7]), port(a)),
        libc::AF_INET6 if a.len() >= 24 => {
            let ip: [u8; 16] = a[8..24].try_into().unwrap_or_default();
            format!(" [{}]:{}", std::net::Ipv6Addr::from(ip), port(a))
        }
        libc::AF_UNIX if a.len() > 2 && a[2] == 0 => format!(" @{}", String::from_utf8_lossy(&a[3..])),
        libc::AF_UNIX if a.len() > 2 => format!(" {}", String::from_utf8_lossy(unfixed(&a[2..]))),
        _ => String::new(),
    };
    format!("{kind}{addr}, {}", sock::name(f.info.aux))
}

fn area_row(v: &Vma) -> AreaRow {
    let bit = |b: u32, c: char| if v.info.prot & b != 0 { c } else { '-' };
    AreaRow {
        start: format!("{:#x}", v.info.start),
        end: format!("{:#x}", v.info.end),
        prot: [bit(libc::PROT_READ as u32, 'r'), bit(libc::PROT_WRITE as u32, 'w'), bit(libc::PROT_EXEC as u32, 'x')].iter().collect(),
        kind: vma_kind::name(v.info.kind),
        name: String::from_utf8_lossy(&v.name).into_owned(),
        mapped_bytes: v.info.end - v.info.start,
        stored_bytes: v.info.pages * PAGE,
        guard_bytes: v.guards.iter().map(|g| g.end - g.start).sum(),
    }
}

fn report(path: &Path, img: &Image, verified: bool, areas: bool) -> Report {
    let p = &img.process;
    let mut by_kind: BTreeMap<&'static str, KindRow> = BTreeMap::new();
    let (mut mapped, mut stored) = (0, 0);
    let guards = img.vmas.iter().flat_map(|v| &v.guards).map(|g| g.end - g.start).sum();
    for v in &img.vmas {
        let r = by_kind.entry(vma_kind::name(v.info.kind)).or_default();
        r.areas += 1;
        r.mapped_bytes += v.info.end - v.info.start;
        r.stored_bytes += v.info.pages * PAGE;
        mapped += v.info.end - v.info.start;
        stored += v.info.pages * PAGE;
    }
    let vd = &p.vdso;
    let vdso = vd.areas[..vd.count as usize].iter().map(|a| format!("{}K", a.len / 1024)).collect::<Vec<_>>().join("+");
    Report {
        image: path.display().to_string(),
        file_bytes: img.file_len(),
        format: format!("{}.{}", img.header.major, img.header.minor),
        verified,
        program: String::from_utf8_lossy(&img.exe).into_owned(),
        cwd: String::from_utf8_lossy(&img.cwd).into_owned(),
        pid: p.pid,
        generation: p.generation,
        restores: p.restores,
        left_running: p.flags & pflags::LEFT_RUNNING != 0,
        taken_unix_ms: p.realtime_ns / 1_000_000,
        needs: Needs {
            kernel: text(&p.kernel_release),
            glibc: text(&p.glibc_version),
            agent_version: p.agent_version,
            cpu_vendor: text(&p.cpu.vendor),
            cpu_features: cpu::FEATURES.iter().filter(|f| cpu::has(&p.cpu, f)).map(|f| f.name).collect(),
            xcr0: format!("{:#x}", p.cpu.xcr0),
            vdso,
        },
        threads: img
            .threads
            .iter()
            .map(|t| Thread {
                tid: t.tid,
                role: match t.role {
                    role::MAIN => "main",
                    role::MANAGER => "agent",
                    _ => "thread",
                },
                name: text(&t.name),
                rseq: t.rseq_len != 0,
            })
            .collect(),
        memory: Memory {
            areas: img.vmas.len(),
            mapped_bytes: mapped,
            stored_bytes: stored,
            guard_bytes: guards,
            records: PageRecords::of(img),
            by_kind,
            list: areas.then(|| img.vmas.iter().map(area_row).collect()),
        },
        files: img
            .fds
            .iter()
            .map(|f| FileRow {
                fd: f.info.fd,
                kind: fd_kind::name(f.info.kind),
                path: match f.info.kind {
                    fd_kind::STDIO => ["stdin", "stdout", "stderr"][f.info.aux.min(2) as usize].to_string(),
                    fd_kind::SOCKET => socket(f),
                    _ => String::from_utf8_lossy(&f.path).into_owned(),
                },
                offset: f.info.pos,
                flags: flags(f.info.open_flags),
            })
            .collect(),
        objects: img
            .files
            .iter()
            .map(|o| ObjectRow {
                id: o.info.id,
                kind: file_kind::name(o.info.kind),
                name: String::from_utf8_lossy(&o.name).into_owned(),
                size: o.info.size,
                stored_bytes: o.info.data_bytes,
            })
            .collect(),
        stdin_pending_bytes: img.stdin.len(),
        parents: img.parents.iter().map(|p| String::from_utf8_lossy(&p.path).into_owned()).collect(),
        build_ids: img.build_ids.iter().map(|(p, id)| (String::from_utf8_lossy(p).into_owned(), crate::engine::elf::hex(id))).collect(),
    }
}

/// Prints what `image` holds; with `areas`, every memory area too.
pub fn run(image: &Path, json: bool, verify: bool, areas: bool) -> Result<()> {
    let mut img = Image::open(image).map_err(|e| anyhow!("{}: {e}", image.display()))?;
    if verify {
        img.attach_parents().map_err(|e| anyhow!("{}: {e}", image.display()))?;
        img.verify_pages().map_err(|e| anyhow!("{}: {e}", image.display()))?;
    }
    let r = report(image, &img, verify, areas);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("image     {} ({}, format {}{})", r.image, bytes(r.file_bytes), r.format, if verify { ", checksums verified" } else { "" });
    println!("program   {} (pid {}, cwd {})", r.program, r.pid, r.cwd);
    println!(
        "history   checkpoint {} of this program, after {} restore(s){}",
        r.generation,
        r.restores,
        if r.left_running { "; it kept running" } else { "" }
    );
    println!("needs     kernel {} (vDSO {}), glibc {}, agent v{}", r.needs.kernel, r.needs.vdso, r.needs.glibc, r.needs.agent_version);
    println!("cpu       {} with {} features, XCR0 {}", r.needs.cpu_vendor, r.needs.cpu_features.len(), r.needs.xcr0);
    println!("          {}", r.needs.cpu_features.join(" "));
    println!("threads   {}", r.threads.len());
    for t in &r.threads {
        println!("          {:>7} {:<6} {}{}", t.tid, t.role, t.name, if t.rseq { " (rseq)" } else { "" });
    }
    println!(
        "memory    {} areas, {} mapped, {} of it in the image",
        r.memory.areas,
        bytes(r.memory.mapped_bytes),
        bytes(r.memory.stored_bytes)
    );
    println!("          {}", r.memory.records.line());
    if r.memory.guard_bytes > 0 {
        println!("          guard pages over {}", bytes(r.memory.guard_bytes));
    }
    for (k, row) in &r.memory.by_kind {
        println!(
            "          {:<13} {:>4} areas {:>11} mapped {:>11} stored",
            k,
            row.areas,
            bytes(row.mapped_bytes),
            bytes(row.stored_bytes)
        );
    }
    for a in r.memory.list.iter().flatten() {
        println!(
            "          {:>14}-{:<14} {} {:<13} {:>11} mapped {:>11} stored{} {}",
            a.start,
            a.end,
            a.prot,
            a.kind,
            bytes(a.mapped_bytes),
            bytes(a.stored_bytes),
            if a.guard_bytes > 0 { format!(", guard pages over {}", bytes(a.guard_bytes)) } else { String::new() },
            a.name
        );
    }
    println!("files     {}", r.files.len());
    for f in &r.files {
        println!("          {:>4} {:<8} {} (offset {}, {})", f.fd, f.kind, f.path, f.offset, f.flags);
    }
    if !r.objects.is_empty() {
        println!("objects   {} carried in the image", r.objects.len());
        for o in &r.objects {
            println!("          {:<14} {} ({}, {} stored)", o.kind, o.name, bytes(o.size), bytes(o.stored_bytes));
        }
    }
    for (p, id) in &r.build_ids {
        println!("build-id  {p} {id}");
    }
    for p in &r.parents {
        println!("parent    {p} (a delta image: unchanged pages are read from there)");
    }
    if r.stdin_pending_bytes > 0 {
        println!("stdin     {} not yet read by the program", bytes(r.stdin_pending_bytes as u64));
    }
    Ok(())
}
