// Rust's standard library: threads taking turns with std::sync::Mutex and Condvar (futex
// based, no pthread mutex), an mpsc channel, a HashMap with its random hasher keys, a
// thread-local, Instant, and a panic caught with catch_unwind after the restore.
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

thread_local! {
    static MINE: Cell<u64> = const { Cell::new(0) };
}

fn main() {
    println!("READY");
    let started = Instant::now();
    let state = Arc::new((Mutex::new((0usize, 0u64)), Condvar::new()));
    let (tx, rx) = mpsc::channel();
    let workers: Vec<_> = (0..4)
        .map(|id| {
            let (state, tx) = (Arc::clone(&state), tx.clone());
            std::thread::spawn(move || {
                for i in 0..150u64 {
                    let (m, cv) = &*state;
                    let mut g = cv.wait_while(m.lock().unwrap(), |s| s.0 != id).unwrap();
                    g.1 += id as u64 * i;
                    g.0 = (g.0 + 1) % 4;
                    cv.notify_all();
                    drop(g);
                    MINE.with(|c| c.set(c.get() + i));
                    tx.send((id, i)).unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                }
                MINE.with(|c| c.get())
            })
        })
        .collect();
    drop(tx);
    let mut seen: HashMap<usize, u64> = HashMap::new();
    for (id, i) in rx {
        *seen.entry(id).or_default() += i;
    }
    let mine: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    std::panic::set_hook(Box::new(|_| {}));
    let caught = std::panic::catch_unwind(|| {
        let v: Vec<u32> = Vec::new();
        v[3]
    })
    .is_err();
    let mut keys: Vec<_> = seen.iter().collect();
    keys.sort();
    let total = state.0.lock().unwrap().1;
    println!("total {total} seen {keys:?} thread-locals {mine:?} panic caught {caught} clock went forward {}", started.elapsed() > Duration::ZERO);
}
