//! End-to-end tests of the checkpoint engine, in the style of CRIU's zdtm: each C program in
//! `tests/programs/` sets up some state, is checkpointed, killed and restored (or kept
//! running), then checks its own state; its output must be identical to an uninterrupted
//! run. Every scenario runs as uid 65534 with no capabilities and, when the tests run as
//! root, as root too.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn single_thread_keeps_registers_stack_heap_and_fp() {
    stop_and_restore("regs", &["2500000000"], "");
}

#[test]
fn threads_with_mutexes_condvars_sleep_read_and_join() {
    stop_and_restore("threads", &[], "hello\n");
}

#[test]
fn memory_in_thousands_of_separate_runs_of_pages() {
    // More runs than the kernel's PAGEMAP_SCAN reports in one pass: Linux 6.18 then hands
    // back a stale walk_end, and a scan that trusted it saw pages twice, out of order.
    stop_and_restore("sparse", &[], "go\n");
}

#[test]
fn signal_handlers_mask_and_altstack_survive() {
    stop_and_restore("signals", &[], "go\n");
}

#[test]
fn files_keep_offsets_flags_and_sharing() {
    stop_and_restore("files", &[], "go\n");
}

#[test]
fn sched_getcpu_agrees_with_getcpu_after_restore() {
    stop_and_restore("getcpu", &[], "go\n");
}

#[test]
fn pthread_self_tls_pthread_kill_and_join_keep_working() {
    stop_and_restore("tids", &[], "go\n");
}

#[test]
fn read_write_locks_held_for_writing_across_two_restores_keep_working() {
    // glibc names a read-write lock's writer by tid.
    locks_held_across_two_restores("rwlocks");
}

#[test]
fn mutexes_that_name_their_owner_held_across_two_restores_keep_working() {
    // Recursive, error-checking and robust mutexes (and a C11 one) name their owner by tid.
    locks_held_across_two_restores("mutexes");
}

/// Runs `name`, which takes locks that glibc names by their holder's tid, prints READY and
/// waits for a line; each holder's tid changes at each restore, so after two restores the
/// locks still name the first run's tids. Then the holders use and release them and other
/// threads take them: the output must equal an uninterrupted run's.
fn locks_held_across_two_restores(name: &str) {
    let prog = program(name);
    let want = reference(&prog, &[], "go\n");
    each_user(name, |u, d| {
        let r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let (mut r, mut out) = stop_restore_steps(u, d, r, 2, |r, _| r.wait_socket());
        r.send("go\n");
        let (st, o, e) = r.finish();
        assert_eq!(st.code(), Some(0), "after two restores (142: a lock call hung until the alarm): {e}");
        out += &o;
        assert_eq!(lines(&out), lines(&want));
    });
}

#[test]
fn cpu_time_goes_on_across_restores() {
    // Checkpointed while it reads its CPU time in a loop, so the checkpoint often lands
    // inside one of those calls.
    let prog = program("cputime");
    each_user("cputime", |u, d| {
        let r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let (r, mut out) = stop_restore_steps(u, d, r, 3, |_, _| std::thread::sleep(Duration::from_millis(150)));
        let (st, o, e) = r.finish();
        out += &o;
        assert_eq!((st.code(), lines(&out)), (Some(0), vec!["READY", "ok"]), "{e}");
    });
}

#[test]
fn chain_of_six_checkpoints_and_restores() {
    let prog = program("ticker");
    let args = ["250"];
    let want = reference(&prog, &args, "");
    each_user("chain", |u, d| {
        let r = launch(u, d, &prog, &args);
        r.expect_out("READY");
        let (r, mut out) = stop_restore_steps(u, d, r, 6, |_, _| std::thread::sleep(Duration::from_millis(250)));
        let (st, o, e) = r.finish();
        assert_eq!(st.code(), Some(0), "last step: {e}");
        out += &o;
        assert_eq!(lines(&out), lines(&want));
    });
}

#[test]
fn leave_running_checkpoint_restored_as_a_second_copy() {
    let prog = program("leaverun");
    let want = reference(&prog, &[], "go\n");
    let result = want.lines().last().expect("result line").to_string();
    each_user("leaverun", |u, d| {
        let r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let img = d.join("image");
        dump_ok(u, &r, &img, true);
        // The copy runs while the original is still alive.
        let copy = restore(u, d, &img);
        finish_original_and_copy(r, copy, &want, &[result.as_str()]);
    });
}

/// Lets a checkpointed original and its restored copy go (both wait for `go`); checks the
/// original printed `want` and the copy `copy_want` (what follows READY).
fn finish_original_and_copy(mut r: Running, mut copy: Running, want: &str, copy_want: &[&str]) {
    r.send("go\n");
    let (st, out, err) = r.finish();
    assert_eq!(st.code(), Some(0), "original: {err}");
    assert_eq!(lines(&out), lines(want));
    copy.send("go\n");
    let (st2, out2, err2) = copy.finish();
    assert_eq!(st2.code(), Some(0), "copy: {err2}");
    assert_eq!(lines(&out2), copy_want, "the copy continues after READY");
}

#[test]
fn fifty_checkpoints_while_threads_hammer_malloc_and_stdio() {
    let prog = program("hammer");
    each_user("hammer", |u, d| {
        let mut r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let img = d.join("image");
        for i in 0..50 {
            let (ok, err) = dump(u, &r.socket, &img, true);
            assert!(ok, "checkpoint {i} failed: {err}");
        }
        r.send("stop\n");
        let (st, out, err) = r.finish();
        assert_eq!(st.code(), Some(0), "{err}");
        assert!(out.contains("all 4 threads made progress: 1"), "{out}");
        let mut copy = restore(u, d, &img);
        copy.send("stop\n");
        let (st2, out2, err2) = copy.finish();
        assert_eq!(st2.code(), Some(0), "{err2}");
        assert!(out2.contains("all 4 threads made progress: 1"), "{out2}");
    });
}

#[test]
fn unread_stdin_is_carried_in_the_image() {
    let prog = program("slowread");
    each_user("stdin", |u, d| {
        let mut r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        r.send("first line\nsecond line\n");
        std::thread::sleep(Duration::from_millis(100));
        let img = d.join("image");
        dump_ok(u, &r, &img, false);
        let (st, out1, _) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED));
        let mut r2 = restore(u, d, &img);
        r2.send("third line\n");
        r2.close_stdin();
        let (st2, out2, err2) = r2.finish();
        assert_eq!(st2.code(), Some(0), "{err2}");
        assert_eq!(lines(&(out1 + &out2)), vec!["READY", "echo: first line", "echo: second line", "echo: third line", "eof"]);
    });
}

#[test]
fn children_that_ended_before_the_checkpoint_can_be_waited_for_after_the_restore() {
    // Three zombies (exit 7, SIGKILL, exit 3) at the checkpoint; after the restore,
    // waitpid, wait and waitid (with WNOWAIT first) return their pids and statuses, and
    // then there is no child left.
    stop_and_restore("zombies", &[], "go\n");
}

#[test]
fn a_program_that_leaves_a_full_stdin_pipe_unread_can_be_checkpointed() {
    // slowread reads nothing for a second after READY. Input far larger than a pipe fills
    // its stdin pipe meanwhile; the checkpoint must still be able to pause the feeding (it
    // used to wait for the blocked write forever) and carry what is in the pipe.
    let prog = program("slowread");
    let input: String = (0..40000).map(|i| format!("line {i:05}\n")).collect();
    each_user("stdin-full", |u, d| {
        let mut r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let mut w = r.stdin.take().expect("stdin");
        let data = input.clone();
        // Blocks once every pipe on the way is full; ends with EPIPE when launch exits.
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(data.as_bytes());
        });
        std::thread::sleep(Duration::from_millis(300));
        let img = d.join("image");
        let mut dump = command(u, limitless())
            .arg("dump")
            .arg("--socket")
            .arg(&r.socket)
            .arg("--output")
            .arg(&img)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run limitless dump");
        let t = std::time::Instant::now();
        let st = loop {
            if let Some(st) = dump.try_wait().expect("wait for dump") {
                break st;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = dump.kill();
                let _ = r.child.kill();
                panic!("dump did not end within 30 s: the stdin feeding could not be paused");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(st.success(), "dump failed");
        let (st, out1, err1) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "{err1}");
        let _ = feeder.join();
        let o = Command::new(limitless()).arg("inspect").arg("--json").arg(&img).output().expect("inspect");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect --json");
        let k = v["stdin_pending_bytes"].as_u64().expect("stdin_pending_bytes") as usize;
        assert!(k >= 4096, "the image carries only {k} bytes of the unread input");
        // The restored program reads exactly what the pipe held, then its end.
        let mut r2 = restore(u, d, &img);
        r2.close_stdin();
        let (st2, out2, err2) = r2.finish();
        assert_eq!(st2.code(), Some(0), "{err2}");
        let want = reference(&prog, &[], &input[..k]);
        assert_eq!(out1 + &out2, want, "the restored program's input differs from what the pipe held");
    });
}

#[test]
fn launch_passes_on_exit_status_and_signals() {
    let prog = program("exiter");
    each_user("exit", |u, d| {
        let (st, out, _) = launch(u, d, &prog, &["7"]).finish();
        assert_eq!(st.code(), Some(7), "{out}");
        let (st, _, _) = launch(u, d, &prog, &["kill"]).finish();
        assert_eq!(st.code(), Some(128 + 9));
        // The agent's own thread must not keep the process alive (glibc ends it when its
        // last thread returns), nor make it wait.
        let t = Instant::now();
        let (st, out, e) = launch(u, d, &prog, &["thread"]).finish();
        assert_eq!((st.code(), out.as_str()), (Some(0), "the last thread ends\n"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
        let (_, out, _) = launch(u, d, &prog, &["single"]).finish();
        assert_eq!(out, "single-threaded: 1\n", "glibc must not see the agent's thread");
    });
}

#[test]
fn what_cannot_be_checkpointed_fails_clearly_and_the_program_runs_on() {
    let prog = program("refuse");
    each_user("refuse", |u, d| {
        for (arg, want) in [
            ("block", "did not stop within 500 ms"),
            ("io_uring", "io_uring"),
            ("perf", "perf event"),
            ("bpf", "BPF"),
            ("child", "child process"),
            ("traced", "traced (ptrace)"),
            ("handler", "replaced the handler of the checkpoint signal"),
            ("output", "is not a regular file"),
        ] {
            if arg == "bpf" && u != User::Root {
                eprintln!("NOTE: BPF objects need root here (kernel.unprivileged_bpf_disabled); the bpf case runs as root only");
                continue;
            }
            let mut r = launch(u, d, &prog, &[arg]);
            r.expect_out("READY");
            let img = d.join(format!("{arg}.img"));
            if arg == "output" {
                // A path that names no file is refused, not replaced (`-o /dev/null` once
                // replaced the device node): a FIFO here.
                let st = Command::new("mkfifo").arg(&img).status().expect("mkfifo");
                assert!(st.success());
            }
            let mut c = command(u, limitless());
            c.arg("dump").arg("--socket").arg(&r.socket).arg("--output").arg(&img).arg("--freeze-timeout").arg("500ms");
            let o = c.output().expect("dump");
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(125), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(want), "`{err}` should say `{want}`");
            if arg == "output" {
                assert!(fs::symlink_metadata(&img).expect("the FIFO").file_type().is_fifo(), "the FIFO was replaced");
            } else {
                assert!(!img.exists(), "no image after a failed checkpoint");
            }
            r.send("go\n");
            let (st, out, e) = r.finish();
            assert_eq!(st.code(), Some(0), "{e}");
            assert_eq!(lines(&out), vec!["READY", "still running"]);
        }
    });
}

/// The time in `limitless dump`'s report after `label` ("in 12.3 ms", "frozen 4.5 ms").
fn reported_ms(report: &str, label: &str) -> f64 {
    let at = report.find(label).unwrap_or_else(|| panic!("no `{label}` in: {report}")) + label.len();
    report[at..].split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no time after `{label}` in: {report}"))
}

#[test]
fn snapshot_image_is_of_one_instant_while_every_page_is_rewritten() {
    // The snapshot child puts the pages into the pipe by reference (vmsplice) while the
    // program runs on and rewrites every page: the image must still hold each page as it
    // was at the snapshot, which the restored copy checks page by page as it goes on.
    let prog = program("genpages");
    each_user("genpages", |u, d| {
        let r = launch(u, d, &prog, &["128", "4000"]);
        r.expect_out("gen 20");
        let img = d.join("image");
        let (ok, report) = dump(u, &r.socket, &img, true);
        assert!(ok, "dump failed: {report}");
        assert!(report.contains("still running (snapshot)"), "the checkpoint was not a snapshot: {report}");
        let (st, out, err) = r.finish();
        assert_eq!(st.code(), Some(0), "original: {out}{err}");
        assert_eq!(out.lines().last(), Some("done"), "original: {out}");
        let (st2, out2, err2) = restore(u, d, &img).finish();
        assert!(
            !out2.contains("BAD"),
            "the image mixes pages from different moments: {}",
            out2.lines().find(|l| l.contains("BAD")).unwrap_or("")
        );
        assert_eq!(st2.code(), Some(0), "copy: {err2}");
        assert_eq!(out2.lines().last(), Some("done"), "copy: {out2}");
    });
}

#[test]
fn snapshot_checkpoint_while_the_program_changes_memory_and_prints() {
    let prog = program("snapwork");
    let want = reference(&prog, &["1500"], "");
    let want = lines(&want);
    each_user("snapwork", |u, d| {
        let r = launch(u, d, &prog, &["1500"]);
        r.expect_out("step 100 ");
        let img = d.join("image");
        let (ok, report) = dump(u, &r.socket, &img, true);
        assert!(ok, "dump failed: {report}\nstdout so far:\n{}\nstderr:\n{}", r.out.text(), r.err.text());
        assert!(report.contains("still running (snapshot)"), "the checkpoint was not a snapshot: {report}");
        assert!(reported_ms(&report, "frozen ") < reported_ms(&report, " in "), "frozen until the image was durable: {report}");
        // The copy runs while the original is still alive.
        let copy = restore(u, d, &img);
        let (st, out, err) = r.finish();
        assert_eq!(st.code(), Some(0), "original: {err}");
        assert_eq!(lines(&out), want, "the original's output differs from an uninterrupted run");
        let (st2, out2, err2) = copy.finish();
        assert_eq!(st2.code(), Some(0), "copy: {err2}");
        let got = lines(&out2);
        assert!(got.len() > 1 && got.len() < want.len() - 100, "the copy should resume mid-run: {} lines", got.len());
        assert_eq!(got, want[want.len() - got.len()..], "the copy does not continue the uninterrupted run");
        let _ = std::fs::remove_dir_all(d); // its images
    });
}

#[test]
fn snapshot_child_is_invisible_to_the_programs_sigchld_handler_and_waits() {
    let prog = program("sigchld");
    each_user("sigchld", |u, d| {
        let mut r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        for i in 0..3 {
            let (ok, report) = dump(u, &r.socket, &d.join(format!("image-{i}")), true);
            assert!(ok && report.contains("(snapshot)"), "checkpoint {i}: {report}");
        }
        std::thread::sleep(Duration::from_millis(50));
        r.send("stop\n");
        let (st, out, err) = r.finish();
        assert_eq!(st.code(), Some(0), "{err}");
        assert_eq!(lines(&out), vec!["READY", "sigchld 0 waited 0 other-errors 0 looped 1"]);
        let _ = std::fs::remove_dir_all(d); // its images
    });
}

#[test]
fn dontfork_and_wipeonfork_memory_is_checkpointed_frozen_and_keeps_its_flags() {
    let prog = program("forkflags");
    let want = reference(&prog, &[], "go\n");
    each_user("forkflags", |u, d| {
        let r = launch(u, d, &prog, &[]);
        r.expect_out("READY");
        let img = d.join("image");
        let (ok, report) = dump(u, &r.socket, &img, true);
        assert!(ok, "dump failed: {report}");
        assert!(report.contains("still running") && !report.contains("(snapshot)"), "expected the frozen path: {report}");
        let copy = restore(u, d, &img);
        finish_original_and_copy(r, copy, &want, &lines(&want)[1..]);
        let _ = std::fs::remove_dir_all(d); // its images
    });
}

#[test]
fn compressible_memory_is_stored_compressed_and_restores_identically() {
    let prog = program("churn");
    let args = ["32", "6", "200", "text"];
    let want = reference(&prog, &args, "");
    each_user("compress", |u, d| {
        // `--compress` compresses only while the disk is behind, which it never is for an
        // image this small (it looks 96 MiB back): its image is a raw one.
        // `--compress=all` stores every record that compresses.
        let mut sizes = Vec::new();
        for (i, flags) in [&["--compress=all"][..], &["--compress"], &[]].into_iter().enumerate() {
            let img = d.join(format!("image-{i}"));
            let out1 = launch_and_stop(u, d, &prog, &args, "iteration 1", &img, flags);
            let (st2, out2, err2) = restore(u, d, &img).finish();
            assert_eq!(st2.code(), Some(0), "restored program failed ({flags:?}); stderr: {err2}");
            assert_eq!(lines(&(out1 + &out2)), lines(&want), "output differs ({flags:?})");
            sizes.push(std::fs::metadata(&img).unwrap().len());
        }
        eprintln!(
            "32 MiB of text-like memory: image {} bytes with --compress=all, {} with --compress, {} raw",
            sizes[0], sizes[1], sizes[2]
        );
        assert!(sizes[0] * 10 < sizes[2] * 7, "compressed image {} bytes, raw {}", sizes[0], sizes[2]);
        // Two runs of the program differ by a few pages of runtime state (stack, stdio),
        // so "not larger than raw" allows for those.
        assert!(sizes[1] <= sizes[2] + (64 << 10), "an image with --compress is larger than raw: {} > {}", sizes[1], sizes[2]);
    });
}

#[test]
fn a_chain_of_ten_delta_images_stores_only_changes_and_restores_identically() {
    let prog = program("churn");
    // 128 MiB whose 1 % window changes every 50 ms; about 10 s in all.
    let args = ["128", "100", "50"];
    let want = reference(&prog, &args, "");
    each_user("delta", |u, d| {
        let r = launch(u, d, &prog, &args);
        r.expect_out("iteration 1");
        // A parent that does not exist: one line, no image, the program runs on.
        let (ok, err) = dump_with(u, &r.socket, &d.join("orphan"), &["--leave-running", "--parent", "/nonexistent/parent.img"]);
        assert!(!ok && err.contains("cannot use /nonexistent/parent.img as the parent image"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!d.join("orphan").exists());
        // A full image, nine deltas taken while the program runs on (snapshots), and a
        // tenth that stops it; each delta is on top of the one before.
        let mut imgs: Vec<std::path::PathBuf> = Vec::new();
        for i in 0..11 {
            let img = d.join(format!("delta-{i}"));
            dump_delta(u, &r, &img, imgs.last().map(|p| p.as_path()), i < 10);
            imgs.push(img);
        }
        let (st, out1, err1) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err1}");
        let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        let sizes: Vec<u64> = imgs.iter().map(|p| size(p)).collect();
        eprintln!("image sizes: full {} bytes, deltas {:?}", sizes[0], &sizes[1..]);
        for (i, &s) in sizes.iter().enumerate().skip(1) {
            assert!(s * 100 <= sizes[0] * 5, "delta {i} is {s} bytes, more than 5 % of the full image ({})", sizes[0]);
        }
        // Without its parents a delta cannot be restored, and says why.
        let moved = d.join("moved");
        std::fs::rename(&imgs[0], &moved).unwrap();
        let (st, _, err) = restore(u, d, &imgs[10]).finish();
        assert_eq!(st.code(), Some(125), "a delta without its parent was restored: {err}");
        assert!(err.contains("parent image") && err.contains("delta-0"), "{err}");
        std::fs::rename(&moved, &imgs[0]).unwrap();
        // With them, it carries on exactly.
        let (st2, out2, err2) = restore(u, d, &imgs[10]).finish();
        assert_eq!(st2.code(), Some(0), "restored program failed; stderr: {err2}");
        assert_eq!(lines(&(out1 + &out2)), lines(&want), "output differs from an uninterrupted run");
    });
}

/// Where userfaultfd is refused (Docker's default seccomp profile, here a seccomp filter
/// around `limitless`): the checkpoint takes deltas by content hashes instead of dirty
/// tracking, and the restorer fills memory with `pread` instead of `UFFDIO_COPY`; a
/// 64 MiB program restores exactly from a leave-running delta (`restore --track` then
/// warns that it cannot track).
#[test]
fn where_userfaultfd_is_refused_deltas_and_restore_fall_back_and_stay_exact() {
    let wrap = program("nouffd");
    let prog = program("churn");
    let args = ["64", "6", "200"];
    let want = reference(&prog, &args, "");
    each_user("nouffd", |u, d| {
        let r = launch_via(u, Some(&wrap), d, &prog, &args);
        r.expect_out("iteration 1");
        let (full, delta) = (d.join("full"), d.join("delta"));
        dump_delta(u, &r, &full, None, true);
        let said = dump_delta(u, &r, &delta, Some(&full), false);
        assert!(!said.contains("unchanged without reading"), "dirty tracking without userfaultfd? {said}");
        let (st, out1, err1) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err1}");
        // `--track` cannot start tracking here: the restore goes on, and says so.
        let (st2, out2, err2) = restore_with(u, Some(&wrap), d, &delta, &["--track"]).finish();
        assert_eq!(st2.code(), Some(0), "restored program failed; stderr: {err2}");
        assert_eq!(lines(&(out1 + &out2)), lines(&want), "output differs from an uninterrupted run");
        assert!(err2.contains("--track could not start dirty tracking"), "no word that --track did nothing: {err2}");
    });
}

/// Dirty-page tracking (userfaultfd write-protect, Linux 6.7+): deltas of a program that
/// changes its memory in every way the tracking must notice (writes, `read(2)` into it,
/// `MADV_DONTNEED`, a mapping replaced in place, areas swapped with `mremap`, heap growth)
/// restore exactly, and each delta on top of the last tracked image found most of the
/// memory unchanged without reading it. A delta on top of an older image must not use the
/// tracking (its baseline is a later image) and restores exactly too.
#[test]
fn deltas_with_dirty_tracking_see_every_kind_of_change() {
    let prog = program("wpedge");
    let args = ["16", "250"];
    let want = reference(&prog, &args, "");
    each_user("track", |u, d| {
        let r = launch(u, d, &prog, &args);
        let mut imgs: Vec<std::path::PathBuf> = Vec::new();
        let mut said = Vec::new();
        // Parents: none, 0, 1, then 1 again (not the last tracked image), then 3.
        for (i, parent) in [None, Some(0), Some(1), Some(1), Some(3)].into_iter().enumerate() {
            r.expect_out(&format!("iteration {} checksum", 1 + 2 * i));
            let img = d.join(format!("track-{i}"));
            said.push(dump_delta(u, &r, &img, parent.map(|p: usize| imgs[p].as_path()), i < 4));
            imgs.push(img);
        }
        let (st, out1, err1) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err1}");
        for (i, err) in said.iter().enumerate().skip(1) {
            // About 10 MiB of the 16 MiB area is never changed.
            let tracked = err.contains("MiB found unchanged without reading it");
            if i == 3 {
                assert!(!tracked, "delta 3 is on top of an image older than the tracking's baseline, yet used it: {err}");
            } else {
                assert!(
                    tracked,
                    "delta {i} did not use dirty tracking (it needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN, Linux 6.7+): {err}"
                );
            }
        }
        let (st2, out2, err2) = restore(u, d, &imgs[4]).finish();
        assert_eq!(st2.code(), Some(0), "restored program failed; stderr: {err2}");
        assert_eq!(lines(&(out1 + &out2)), lines(&want), "output differs from an uninterrupted run");
        // A tracked leave-running delta restores as a second copy that ends as the program did.
        let (st3, out3, err3) = restore(u, d, &imgs[2]).finish();
        assert_eq!(st3.code(), Some(0), "restored copy failed; stderr: {err3}");
        let (copy, all) = (lines(&out3), lines(&want));
        assert!(!copy.is_empty() && all.ends_with(&copy), "the copy from delta 2 printed {copy:?}, not the end of {all:?}");
    });
}

/// `restore --track`: the restorer arms dirty tracking from the image, so a delta on top
/// of it finds the memory the program has not written since without reading it, and the
/// deltas restore exactly (the program checks all of its memory). Without `--track` the
/// same delta reads everything.
#[test]
fn a_delta_on_top_of_the_image_a_program_was_restored_from_uses_dirty_tracking() {
    let prog = program("wpedge");
    let args = ["16", "250"];
    let want = reference(&prog, &args, "");
    each_user("track-restored", |u, d| {
        let full = d.join("full");
        let out1 = launch_and_stop(u, d, &prog, &args, "iteration 1 checksum", &full, &[]);
        // Untracked: a copy restored without --track.
        let plain = restore(u, d, &full);
        plain.expect_out("iteration 2 checksum");
        let said = dump_delta(u, &plain, &d.join("untracked"), Some(&full), false);
        assert!(!said.contains("without reading it"), "a restore without --track tracked: {said}");
        let (st, _, err) = plain.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err}");
        let r = restore_with(u, None, d, &full, &["--track"]);
        r.expect_out("iteration 3 checksum");
        let (b, c) = (d.join("b"), d.join("c"));
        let said_b = dump_delta(u, &r, &b, Some(&full), true);
        r.expect_out("iteration 5 checksum");
        let said_c = dump_delta(u, &r, &c, Some(&b), false);
        let (st, out2, err2) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err2}");
        for (name, said) in [("the delta on the restored image", &said_b), ("the delta after it", &said_c)] {
            // About 10 MiB of the 16 MiB area is never changed.
            assert!(
                said.contains("MiB found unchanged without reading it"),
                "{name} did not use dirty tracking (it needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN, Linux 6.7+): {said}"
            );
        }
        let (st3, out3, err3) = restore(u, d, &c).finish();
        assert_eq!(st3.code(), Some(0), "restored program failed; stderr: {err3}");
        assert_eq!(lines(&(out1 + &out2 + &out3)), lines(&want), "output differs from an uninterrupted run");
        // The leave-running delta on the restored image restores as a copy that ends as the
        // program did.
        let (st4, out4, err4) = restore(u, d, &b).finish();
        assert_eq!(st4.code(), Some(0), "restored copy failed; stderr: {err4}");
        let (copy, all) = (lines(&out4), lines(&want));
        assert!(!copy.is_empty() && all.ends_with(&copy), "the copy from delta b printed {copy:?}, not the end of {all:?}");
    });
}

#[test]
fn a_self_contained_image_restores_without_the_program_file() {
    let orig = program("ticker");
    let args = ["150"];
    let want = reference(&orig, &args, "");
    each_user("self-contained", |u, d| {
        let mut sizes = Vec::new();
        for self_contained in [false, true] {
            // A copy of the program, removed once the image is taken.
            let prog = d.join(format!("ticker-{self_contained}"));
            std::fs::copy(&orig, &prog).unwrap();
            let img = d.join(format!("image-{self_contained}"));
            let out1 = launch_and_stop(u, d, &prog, &args, "READY", &img, if self_contained { &["--self-contained"] } else { &[] });
            std::fs::remove_file(&prog).unwrap();
            sizes.push(std::fs::metadata(&img).unwrap().len());
            let (st2, out2, err2) = restore(u, d, &img).finish();
            if self_contained {
                assert_eq!(st2.code(), Some(0), "the self-contained image did not restore; stderr: {err2}");
                assert_eq!(lines(&(out1 + &out2)), lines(&want), "output differs from an uninterrupted run");
            } else {
                assert_eq!(st2.code(), Some(125), "an image restored without its program file; stderr: {err2}");
                assert!(err2.contains(prog.to_str().unwrap()) && err2.contains("missing"), "{err2}");
            }
        }
        eprintln!("image {} bytes, self-contained {} bytes", sizes[0], sizes[1]);
        assert!(sizes[1] > sizes[0] + (256 << 10), "the self-contained image ({}) is not larger than the other ({})", sizes[1], sizes[0]);
    });
}

#[test]
fn restore_map_shares_the_image_pages_and_the_program_sees_anonymous_memory() {
    let prog = program("mapped");
    let args = ["8"];
    let input = "check\nwrite\ncheck\ndiscard\n";
    let want = reference(&prog, &args, input);
    each_user("map", |u, d| {
        let (one, two) = (d.join("one"), d.join("two"));
        let r = launch(u, d, &prog, &args);
        r.expect_out("READY");
        dump_ok(u, &r, &one, false);
        let (st, mut out, err) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err}");
        // Restored with --map: its memory is the image's pages, copy-on-write.
        let mut r = restore_with(u, None, d, &one, &["--map"]);
        r.send("check\n");
        r.expect_out("check ");
        r.send("write\n");
        r.expect_out("write ");
        assert!(
            r.err.wait_for(&format!("backing {}", one.display()), Duration::from_secs(10)),
            "the memory was not mapped from the image: {}",
            r.err.text()
        );
        // An area within one page window is copied: mremap could grow a mapping of it.
        assert!(r.err.text().contains("small anon"), "a small area was mapped from the image: {}", r.err.text());
        // A checkpoint copies those pages: the image it maps from can go.
        dump_ok(u, &r, &two, false);
        let (st, o, err) = r.finish();
        assert_eq!(st.code(), Some(EXIT_CHECKPOINTED), "stderr: {err}");
        out += &o;
        fs::remove_file(&one).unwrap();
        // Mapped again from the second image, discarded memory reads as zeros, also once
        // the image is deleted.
        let mut r = restore_with(u, None, d, &two, &["--map"]);
        r.send("check\n");
        r.expect_out("check ");
        fs::remove_file(&two).unwrap();
        r.send("discard\n");
        r.close_stdin();
        let (st, o, err) = r.finish();
        assert_eq!(st.code(), Some(0), "the program failed after the second restore; stderr: {err}");
        assert!(err.contains(&format!("backing {}", two.display())), "the memory was not mapped from the second image: {err}");
        out += &o;
        assert_eq!(lines(&out), lines(&want), "output differs from an uninterrupted run");
    });
}

/// Pages stored as their changes from the file mapped there or from zeros (the default)
/// make the image smaller than `--whole-pages` does and restore exactly, with userfaultfd
/// and without; so do they compressed (`--compress=all`, which the supervisor rebuilds).
/// A file such pages were stored against, changed since in its contents only (same size,
/// same time, same ELF build-id), makes either restore fail before the program runs.
#[test]
fn pages_stored_as_changes_restore_exactly_and_a_changed_base_file_is_caught() {
    let orig = program("ticker");
    let wrap = program("nouffd");
    let args = ["150"];
    let want = reference(&orig, &args, "");
    each_user("changes", |u, d| {
        // A copy of the program, changed below.
        let prog = d.join("ticker");
        std::fs::copy(&orig, &prog).unwrap();
        let records = |img: &std::path::Path| {
            let o = command(u, limitless()).args(["inspect", "--json"]).arg(img).output().unwrap();
            assert!(o.status.success(), "inspect failed: {}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let n = |k: &str| v["memory"]["records"][k].as_u64().unwrap();
            (n("changes") + n("compressed_changes"), n("compressed_changes"), std::fs::metadata(img).unwrap().len())
        };
        let (img, whole, packed) = (d.join("image"), d.join("whole"), d.join("packed"));
        let out1 = launch_and_stop(u, d, &prog, &args, "READY", &img, &[]);
        launch_and_stop(u, d, &prog, &args, "READY", &whole, &["--whole-pages"]);
        let packed_out1 = launch_and_stop(u, d, &prog, &args, "READY", &packed, &["--compress=all"]);
        let ((changes, _, size), (whole_changes, _, whole_size)) = (records(&img), records(&whole));
        let (_, packed_changes, packed_size) = records(&packed);
        eprintln!(
            "image {size} bytes with {changes} page records stored as changes; {whole_size} bytes with --whole-pages; \
             {packed_size} bytes with {packed_changes} compressed with --compress=all"
        );
        assert!(changes > 0, "no page record was stored as changes");
        assert_eq!(whole_changes, 0, "--whole-pages stored records as changes");
        assert!(size + (16 << 10) < whole_size, "storing changes saved too little: {size} vs {whole_size} bytes");
        assert!(packed_changes > 0, "--compress=all compressed no record of changes");
        assert!(packed_size < size, "compressed changes took more room: {packed_size} vs {size} bytes");
        for (img, out1) in [(&img, &out1), (&packed, &packed_out1)] {
            for wrapper in [None, Some(wrap.as_path())] {
                let (st, out2, err) = restore_via(u, wrapper, d, img).finish();
                assert_eq!(st.code(), Some(0), "restore of {img:?} failed (wrapper {wrapper:?}); stderr: {err}");
                assert_eq!(lines(&(out1.clone() + &out2)), lines(&want), "output of {img:?} differs (wrapper {wrapper:?})");
            }
        }
        // Flip every byte of the file pages the program's writable segment is mapped from,
        // keeping the file's size and time (and its build-id, in the first page).
        let (from, to) = writable_segment_pages(&prog);
        let mut bytes = std::fs::read(&prog).unwrap();
        assert!(from >= 4096, "the writable segment starts in the first page");
        bytes[from..to].iter_mut().for_each(|b| *b ^= 0xff);
        let mtime = std::fs::metadata(&prog).unwrap().modified().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&prog).unwrap();
        std::io::Write::write_all(&mut &f, &bytes).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        for img in [&img, &packed] {
            let (st, out2, err) = restore(u, d, img).finish();
            assert_eq!(st.code(), Some(125), "a restore of {img:?} against a changed file did not fail; stdout: {out2}; stderr: {err}");
            assert!(out2.is_empty(), "the program ran: {out2}");
            assert!(err.contains("does not rebuild"), "{err}");
        }
    });
}

/// The file range of whole pages that the writable `PT_LOAD` segment of the ELF file
/// `path` is mapped from.
fn writable_segment_pages(path: &std::path::Path) -> (usize, usize) {
    use limitless::engine::elf::{segments, PF_W, PT_LOAD};
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let s = segments(&f).expect("not a 64-bit ELF file").into_iter().find(|s| s.kind == PT_LOAD && s.flags & PF_W != 0);
    let s = s.expect("no writable PT_LOAD segment");
    (s.offset as usize & !4095, ((s.offset + s.file_size + 4095) & !4095).min(len) as usize)
}
