//! Bad input: truncated and corrupted images, files that are not images, images from
//! another kernel or CPU, a control socket with no program behind it. Each must give one
//! clear error line and a non-zero exit, never a crash, a hang or a partly restored
//! program. Also a mutation fuzz of the image reader.

mod common;

use common::*;
use limitless_image::cpu;
use limitless_image::file::{rewrite, rewrite_as, rewrite_process, Image};
use limitless_image::format::rflags;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A real image of `leaverun` (with a small table) waiting for input, made once and shared
/// by these tests.
fn base_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| image_of_base_program("bad-input-base", &[])).clone()
}

/// The base program's image with `dump --compress=all`.
fn compressed_base_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| image_of_base_program("bad-input-compressed", &["--compress=all"])).clone()
}

/// An image of the base program, dumped with `args`, in the work directory `name`.
fn image_of_base_program(name: &str, args: &[&str]) -> PathBuf {
    let d = workdir(name, User::Root);
    let prog = program("leaverun");
    let user = users()[0];
    let r = launch(user, &d, &prog, &["4096"]);
    r.expect_out("READY");
    let img = d.join("base.img");
    let (ok, err) = dump_with(user, &r.socket, &img, args);
    assert!(ok, "dump {args:?} failed: {err}");
    let (st, _, _) = r.finish();
    assert_eq!(st.code(), Some(EXIT_CHECKPOINTED));
    img
}

/// `limitless restore IMAGE` as `user` with "go" on stdin: must fail cleanly.
fn restore_must_fail(user: User, dir: &Path, image: &Path, want: &str) {
    let mut r = restore(user, dir, image);
    let _ = r.stdin.as_mut().map(|s| std::io::Write::write_all(s, b"go\n"));
    let (st, out, err) = r.finish();
    assert_eq!(st.code(), Some(125), "restore of {} should fail with 125; stdout: {out}; stderr: {err}", image.display());
    assert!(out.is_empty(), "the program must not run; it printed: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(lines[0].starts_with("limitless: "), "{err}");
    assert!(lines[0].contains(want), "`{}` does not mention `{want}`", lines[0]);
}

/// `restore_must_fail` of each image with its message, as every test user, in a work
/// directory named `name`.
fn every_user_restore_fails(name: &str, cases: &[(&Path, &str)]) {
    for u in users() {
        let d = workdir(name, u);
        for (image, want) in cases {
            restore_must_fail(u, &d, image, want);
        }
    }
}

/// `limitless inspect ARGS IMAGE`, as the first test user.
fn inspect(args: &[&str], image: &Path) -> std::process::Output {
    command(users()[0], limitless()).arg("inspect").args(args).arg(image).output().expect("run limitless inspect")
}

fn inspect_fails(image: &Path) -> String {
    let o = inspect(&[], image);
    assert_eq!(o.status.code(), Some(125), "inspect must fail on {}", image.display());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn base_image_restores_and_inspects() {
    let img = base_image();
    let o = inspect(&[], &img);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("checksums verified") && text.contains("threads   2"), "{text}");
    let o = inspect(&["--json"], &img);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect --json prints JSON");
    assert_eq!(v["threads"].as_array().map(|a| a.len()), Some(2));
    assert!(v["memory"].get("list").is_none(), "areas are listed only when asked: {}", v["memory"]);
    // --areas: one row per area, in address order, adding up to the totals.
    let o = inspect(&["--json", "--no-verify", "--areas"], &img);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect --areas --json prints JSON");
    let list = v["memory"]["list"].as_array().expect("memory.list with --areas");
    assert_eq!(Some(list.len() as u64), v["memory"]["areas"].as_u64());
    let sum = |k: &str| list.iter().map(|a| a[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(Some(sum("stored_bytes")), v["memory"]["stored_bytes"].as_u64());
    assert_eq!(Some(sum("mapped_bytes")), v["memory"]["mapped_bytes"].as_u64());
    let start = |a: &serde_json::Value| u64::from_str_radix(a["start"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert!(list.windows(2).all(|w| start(&w[0]) < start(&w[1])), "areas out of order");
    assert!(list.iter().any(|a| a["kind"] == "stack" && a["name"] == "[stack]" && a["prot"] == "rw-"), "{list:?}");
    let o = inspect(&["--areas"], &img);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.lines().filter(|l| l.contains(" mapped ") && l.trim_start().starts_with("0x")).count(), list.len(), "{text}");
    for u in users() {
        restores_and_answers(u, &workdir("base-restore", u), &img);
    }
}

/// Restores `image` (of the base program) as `user` in `dir`: it must run on and answer.
fn restores_and_answers(user: User, dir: &Path, image: &Path) {
    let mut r = restore(user, dir, image);
    r.send("go\n");
    let (st, out, err) = r.finish();
    assert_eq!(st.code(), Some(0), "{err}");
    assert!(out.starts_with("result go "), "{out}");
}

/// An image as format 1.3 wrote it (BLAKE3 page checksums, which the supervisor checks
/// rather than the restorer) inspects, restores exactly, and has its damage caught.
#[test]
fn an_image_in_format_1_3_still_restores() {
    let d = workdir("format-1-3", User::Root);
    let old = d.join("old.img");
    rewrite_as(&base_image(), &old, 3, |_, _| {}).unwrap();
    let o = inspect(&[], &old);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("format 1.3, checksums verified"), "{text}");
    let parsed = Image::open(&old).unwrap();
    let e = parsed.index[parsed.pages.last().unwrap().index];
    let mut bad = std::fs::read(&old).unwrap();
    bad[(e.offset + e.stored_len) as usize] ^= 1;
    let bad_path = d.join("bad.img");
    std::fs::write(&bad_path, &bad).unwrap();
    for u in users() {
        let d = workdir("format-1-3-restore", u);
        restores_and_answers(u, &d, &old);
        restore_must_fail(u, &d, &bad_path, "checksum");
    }
}

#[test]
fn truncated_images_are_refused() {
    let img = base_image();
    let bytes = std::fs::read(&img).unwrap();
    for u in users() {
        let d = workdir("truncated", u);
        for (i, n) in [0, 7, 64, 100, bytes.len() / 3, bytes.len() / 2, bytes.len() - 200, bytes.len() - 1].into_iter().enumerate() {
            let p = d.join(format!("cut-{i}.img"));
            std::fs::write(&p, &bytes[..n]).unwrap();
            let want = if n < 8 { "truncated" } else { "" };
            restore_must_fail(u, &d, &p, want);
            inspect_fails(&p);
        }
    }
}

#[test]
fn corrupted_bytes_are_detected_everywhere() {
    let img = base_image();
    let good = std::fs::read(&img).unwrap();
    let parsed = Image::open(&img).unwrap();
    // Every byte of the file header, of each record header, of the index and of the
    // trailer; every 13th byte of metadata payloads; every 509th byte of page data. (The
    // image crate's unit tests flip every single byte of a small image.)
    let mut positions: Vec<usize> = (0..64).collect();
    for (i, e) in parsed.index.iter().enumerate() {
        let o = e.offset as usize;
        positions.extend(o..o + 32);
        let is_pages = parsed.pages.iter().any(|p| p.index == i);
        let step = if is_pages { 509 } else { 13 };
        positions.extend((o + 32..o + 32 + e.stored_len as usize).step_by(step));
    }
    positions.extend(parsed.trailer.index_offset as usize..good.len());
    let d = workdir("corrupt-lib", User::Root);
    let p = d.join("c.img");
    for &i in &positions {
        let mut b = good.clone();
        b[i] ^= 0x5a;
        std::fs::write(&p, &b).unwrap();
        let r = Image::open(&p).and_then(|im| im.verify_pages());
        assert!(r.is_err(), "a corrupted byte at {i} of {} went unnoticed", good.len());
    }
    eprintln!("checked {} corrupted positions of {}", positions.len(), good.len());
    // Through the command, a spread of positions, as each user.
    for u in users() {
        let d = workdir("corrupt", u);
        for k in 0..12 {
            let i = positions[k * positions.len() / 12];
            let mut b = good.clone();
            b[i] ^= 0x5a;
            let p = d.join(format!("c{k}.img"));
            std::fs::write(&p, &b).unwrap();
            restore_must_fail(u, &d, &p, "");
        }
        // Page data corrupted in the last record: detected while streaming, before the
        // program runs.
        let last = parsed.pages.last().unwrap();
        let e = parsed.index[last.index];
        let mut b = good.clone();
        b[(e.offset + e.stored_len) as usize] ^= 1;
        let p = d.join("last-page.img");
        std::fs::write(&p, &b).unwrap();
        restore_must_fail(u, &d, &p, "checksum");
    }
}

#[test]
fn corrupted_compressed_page_data_is_refused_before_the_program_runs() {
    // Compressed records do not reach the restorer in place: the supervisor checks and
    // decompresses them into the ring's slots. A bad one must stop the restore there too.
    let prog = program("churn");
    for u in users() {
        let d = workdir("corrupt-zstd", u);
        let img = d.join("z.img");
        launch_and_stop(u, &d, &prog, &["8", "6", "200", "text"], "iteration 1", &img, &["--compress=all"]);
        let good = std::fs::read(&img).unwrap();
        let parsed = Image::open(&img).unwrap();
        let zipped: Vec<_> = parsed.pages.iter().map(|p| parsed.index[p.index]).filter(|e| e.flags & rflags::ZSTD != 0).collect();
        assert!(zipped.len() >= 4, "only {} page records compressed", zipped.len());
        // A flipped bit in the middle of one compressed record, and in the last one.
        for (k, e) in [zipped[zipped.len() / 2], zipped[zipped.len() - 1]].into_iter().enumerate() {
            let mut b = good.clone();
            b[(e.offset + 32 + e.stored_len / 2) as usize] ^= 1;
            let p = d.join(format!("z{k}.img"));
            std::fs::write(&p, &b).unwrap();
            restore_must_fail(u, &d, &p, "checksum");
        }
    }
}

#[test]
fn files_that_are_not_images_are_refused() {
    for u in users() {
        let d = workdir("not-image", u);
        let junk: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let cases: Vec<(PathBuf, &str)> = vec![
            (d.join("empty.img"), "truncated"),
            (d.join("junk.img"), "not a Limitless checkpoint image"),
            (d.join("text.img"), "not a Limitless checkpoint image"),
            (PathBuf::from("/bin/true"), "not a Limitless checkpoint image"),
            (d.join("missing.img"), "No such file"),
            (d.clone(), "directory"),
        ];
        std::fs::write(&cases[0].0, b"").unwrap();
        std::fs::write(&cases[1].0, &junk).unwrap();
        std::fs::write(&cases[2].0, b"just some text\n").unwrap();
        for (p, want) in &cases {
            restore_must_fail(u, &d, p, want);
        }
    }
}

#[test]
fn image_from_a_kernel_with_another_vdso_layout_is_refused() {
    let img = base_image();
    for u in users() {
        let d = workdir("vdso", u);
        let bigger = d.join("bigger-vdso.img");
        rewrite_process(&img, &bigger, |p| {
            let n = p.vdso.count as usize;
            p.vdso.areas[n - 1].len -= 4096;
        })
        .unwrap();
        restore_must_fail(u, &d, &bigger, "vDSO layout");
        let other_code = d.join("other-vdso-code.img");
        rewrite_process(&img, &other_code, |p| p.vdso.vdso_hash ^= 1).unwrap();
        restore_must_fail(u, &d, &other_code, "vDSO");
    }
}

#[test]
fn image_whose_program_file_is_another_build_is_refused() {
    let img = base_image();
    let parsed = Image::open(&img).unwrap();
    let prog = program("leaverun");
    let (path, _) = parsed
        .build_ids
        .iter()
        .find(|(p, _)| p.as_slice() == prog.as_os_str().as_encoded_bytes())
        .expect("the image records the build-id of the program (gcc links with --build-id)");
    // The same image, with the program's build-id changed in its FILE_IDS record (sealed
    // again, so only the build-id check can tell).
    let other = img.with_file_name("other-build.img");
    let mut changed = false;
    rewrite(&img, &other, |k, payload| {
        if k == limitless_image::format::kind::FILE_IDS {
            // Entries: path_len, id_len, id, path; flip the first byte of the program's id.
            let mut o = 8;
            while o + 8 <= payload.len() {
                let plen = u32::from_le_bytes(payload[o..o + 4].try_into().unwrap()) as usize;
                let ilen = u32::from_le_bytes(payload[o + 4..o + 8].try_into().unwrap()) as usize;
                if payload[o + 8 + ilen..o + 8 + ilen + plen] == path[..] {
                    payload[o + 8] ^= 0xff;
                    changed = true;
                }
                o += 8 + ilen + plen;
            }
        }
    })
    .unwrap();
    assert!(changed, "no FILE_IDS entry for {}", prog.display());
    for u in users() {
        let d = workdir("build-id", u);
        restore_must_fail(u, &d, &other, "is another build (ELF build-id");
    }
}

#[test]
fn image_needing_a_cpu_feature_this_cpu_lacks_is_refused() {
    let img = base_image();
    let here = cpu::current();
    let missing = cpu::FEATURES.iter().find(|f| !cpu::has(&here, f));
    for u in users() {
        let d = workdir("cpu", u);
        let p = d.join("other-cpu.img");
        match missing {
            Some(f) => {
                rewrite_process(&img, &p, |pi| cpu::set(&mut pi.cpu, f, true)).unwrap();
                restore_must_fail(u, &d, &p, &format!("lacks the `{}` feature", f.name));
            }
            None => {
                eprintln!("NOTE: this CPU has every listed feature; testing the XSAVE check instead");
                rewrite_process(&img, &p, |pi| pi.cpu.xcr0 |= 1 << 62).unwrap();
                restore_must_fail(u, &d, &p, "XSAVE");
            }
        }
    }
}

#[test]
fn dump_with_no_program_behind_the_socket() {
    for u in users() {
        let d = workdir("nosocket", u);
        let img = d.join("x.img");
        let missing = d.join("missing.sock");
        let (ok, err) = dump(u, &missing, &img, false);
        assert!(!ok && err.lines().count() == 1 && err.contains("no limitless launch or restore is listening"), "{err}");
        // A socket file left behind by a dead supervisor.
        let stale = d.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let _ = std::fs::set_permissions(&stale, std::os::unix::fs::PermissionsExt::from_mode(0o777));
        let (ok, err) = dump(u, &stale, &img, false);
        assert!(!ok && err.lines().count() == 1 && err.contains("no limitless launch or restore is listening"), "{err}");
        let plain = d.join("plain.sock");
        std::fs::write(&plain, b"").unwrap();
        let (ok, err) = dump(u, &plain, &img, false);
        assert!(!ok && err.lines().count() == 1, "{err}");
        assert!(!img.exists(), "no image may be written");
    }
}

/// One mutation of an image.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Splice { from: usize, to: usize, len: usize },
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    let n = b.len();
    if n == 0 {
        // A truncation to nothing left no byte for a later mutation to touch.
        return;
    }
    match *m {
        Mutation::Flip(i, x) => b[i % n] ^= x.max(1),
        Mutation::Truncate(k) => b.truncate(k % n),
        Mutation::Splice { from, to, len } => {
            let (f, t) = (from % n, to % n);
            let len = len.min(n - f).min(n - t);
            let chunk = b[f..f + len].to_vec();
            b[t..t + len].copy_from_slice(&chunk);
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Flip(i, x)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), any::<usize>(), 1usize..512).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

#[test]
fn fuzz_image_reader_with_random_mutations() {
    let img = base_image();
    let good = std::fs::read(&img).unwrap();
    let d = workdir("fuzz", User::Root);
    let path = d.join("m.img");
    let cases = std::env::var("LIMITLESS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000u32);
    let mut cfg = ProptestConfig::with_cases(cases);
    cfg.failure_persistence = None;
    let mut runner = proptest::test_runner::TestRunner::new(cfg);
    let ran = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&proptest::collection::vec(mutation(), 1..6), |ms| {
            let mut b = good.clone();
            for m in &ms {
                apply(&mut b, m);
            }
            std::fs::write(&path, &b).unwrap();
            let r = Image::open(&path).and_then(|im| im.verify_pages());
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Every byte is covered by a hash: a changed image must be refused.
            if b != good {
                prop_assert!(r.is_err(), "a mutated image was accepted: {ms:?}");
            } else {
                prop_assert!(r.is_ok());
            }
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz: {} mutated images, all refused without a panic", ran.into_inner());
}

/// A page record stored as changes, re-sealed with valid checksums but with a word map
/// that does not match its words, is refused by `inspect` and by the restore; one whose
/// form is right but one changed word is wrong verifies (`inspect` reads no base file)
/// but fails the restore's check of the rebuilt pages. Each in one line, before the
/// program runs.
#[test]
fn page_records_stored_as_changes_that_are_malformed_or_wrong_are_refused() {
    use limitless_image::diff;
    use limitless_image::format::PagesHeader;
    let d = workdir("bad-changes", User::Root);
    let img = base_image();
    let parsed = Image::open(&img).unwrap();
    let target = parsed.pages.iter().position(|p| parsed.index[p.index].flags == rflags::DIFF).expect("no record stored as changes");
    let edit = |name: &str, f: &dyn Fn(&mut Vec<u8>)| rewrite_page_record(&img, &d.join(name), target, f);
    let first_map = PagesHeader::SIZE + diff::HEAD;
    // One bit of the first page's word map flipped: the words no longer add up.
    let malformed = edit("malformed.img", &|p| p[first_map] ^= 1);
    assert!(inspect_fails(&malformed).contains("malformed changes"));
    // The first changed word of the first page flipped, the form kept.
    let words = |p: &[u8]| p[first_map..first_map + diff::MAP].iter().map(|b| b.count_ones()).sum::<u32>();
    let wrong = edit("wrong.img", &|p| {
        assert!(words(p) > 0, "the first page has no changed word");
        p[first_map + diff::MAP] ^= 0x80;
    });
    let o = inspect(&[], &wrong);
    assert!(o.status.success(), "inspect of a well-formed record failed: {}", String::from_utf8_lossy(&o.stderr));
    every_user_restore_fails("bad-changes-restore", &[(&malformed, "malformed"), (&wrong, "does not rebuild")]);
}

/// Rewrites `img` to `out` (sealed again, valid checksums) with the payload of its page
/// record number `target` (pages header, then its data as stored) changed by `f`.
fn rewrite_page_record(img: &Path, out: &Path, target: usize, f: &dyn Fn(&mut Vec<u8>)) -> PathBuf {
    let mut n = 0;
    rewrite_as(img, out, limitless_image::format::FORMAT_MINOR, |k, payload| {
        if k == limitless_image::format::kind::PAGES {
            if n == target {
                f(payload);
            }
            n += 1;
        }
    })
    .unwrap();
    out.to_path_buf()
}

/// Page records stored as compressed changes (`dump --compress=all`, format 1.7), sealed
/// again with valid checksums: a frame that is not zstd, one that decompresses to more
/// than the record's pages, and changes whose word map does not match their words are
/// each refused by `inspect` and by the restore, in one line, before the program runs;
/// one changed word in well-formed changes fails the restore's check of the rebuilt pages.
#[test]
fn page_records_stored_as_compressed_changes_that_are_malformed_or_wrong_are_refused() {
    use limitless_image::diff;
    use limitless_image::format::PagesHeader;
    let d = workdir("bad-zchanges", User::Root);
    let img = compressed_base_image();
    let parsed = Image::open(&img).unwrap();
    let zdiff = rflags::DIFF | rflags::ZSTD;
    let target = parsed.pages.iter().position(|p| parsed.index[p.index].flags == zdiff).expect("no record stored as compressed changes");
    let pages = parsed.pages[target].header.count as usize * 4096;
    // Rewrites the target record's payload (pages header, then frame) with `f`.
    let raw_edit = |name: &str, f: &dyn Fn(&mut Vec<u8>)| rewrite_page_record(&img, &d.join(name), target, f);
    // Rewrites the target record's changes, decompressed, with `f`, and compresses them
    // again.
    let edit = |name: &str, f: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        raw_edit(name, &|payload| {
            let mut changes = zstd::bulk::decompress(&payload[PagesHeader::SIZE..], pages).unwrap();
            f(&mut changes);
            payload.truncate(PagesHeader::SIZE);
            payload.extend_from_slice(&zstd::bulk::compress(&changes, 1).unwrap());
        })
    };
    let first_map = diff::HEAD;
    let malformed = edit("malformed.img", &|c| c[first_map] ^= 1);
    assert!(inspect_fails(&malformed).contains("malformed changes"));
    let too_long = edit("too-long.img", &|c| c.resize(pages + 1, 0));
    assert!(inspect_fails(&too_long).contains("does not decompress"));
    let not_zstd = raw_edit("not-zstd.img", &|p| p[PagesHeader::SIZE..].iter_mut().for_each(|b| *b = 0x5a));
    assert!(inspect_fails(&not_zstd).contains("does not decompress"));
    let wrong = edit("wrong.img", &|c| {
        assert!(c[first_map..first_map + diff::MAP].iter().any(|&b| b != 0), "the first page has no changed word");
        c[first_map + diff::MAP] ^= 0x80;
    });
    let o = inspect(&[], &wrong);
    assert!(o.status.success(), "inspect of well-formed changes failed: {}", String::from_utf8_lossy(&o.stderr));
    every_user_restore_fails(
        "bad-zchanges-restore",
        &[(&malformed, "malformed"), (&too_long, "does not decompress"), (&not_zstd, "does not decompress"), (&wrong, "does not rebuild")],
    );
}
