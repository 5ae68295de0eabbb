//! A workload that holds memory and counts, for the `checkpoint` scenario
//! of hack/bench: what a checkpoint must carry is this process's memory,
//! and a restore is seen to work when the count goes on from where it
//! stood. Nothing but std and nix, so that it links statically and runs
//! in a busybox container; hack/build builds it (static, as guest-init)
//! into target/dist/tools/memhold.
//!
//! ```text
//! memhold MIB [DIR]
//! ```
//!
//! Fills MIB MiB of its own anonymous memory with pseudo-random words
//! (xorshift64*, seeded from /dev/urandom): no page is zero and none
//! compresses, so neither a VM snapshot's zero-page holes nor CRIU has
//! anything to skip. Then, every 50 ms, writes the next number (1 first,
//! once the memory is filled) into `DIR/count` (default DIR: `/`), whole:
//! `DIR/count.new` renamed over it. On SIGUSR1 it checks every word of
//! the memory against the generator run again from the seed and writes
//! `ok COUNT` or `bad COUNT: N of M pages differ, the first at offset X`
//! into `DIR/verify` (whole, the same way).
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Words of a 4 KiB page.
const PAGE_WORDS: usize = 4096 / 8;

/// xorshift64*: fast, and its output does not compress.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: memhold MIB [DIR]");
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/".into()));

    // SIGUSR1 is read from a signalfd (blocked first: as PID 1 of its
    // namespace a handler-less signal would be dropped).
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block().expect("blocking SIGUSR1");
    let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .expect("creating the signalfd");

    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .expect("reading /dev/urandom");
    // xorshift never leaves zero, so never start there.
    let seed = u64::from_le_bytes(seed) | 1;
    let mut mem = vec![0u64; mib << 17];
    let mut rng = Rng(seed);
    for w in mem.iter_mut() {
        *w = rng.next();
    }

    let mut count: u64 = 0;
    loop {
        count += 1;
        write_whole(&dir, "count", &format!("{count}\n"));
        while let Ok(Some(_)) = sfd.read_signal() {
            write_whole(&dir, "verify", &format!("{}\n", verify(&mem, seed, count)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `mem` still holds what the generator from `seed` wrote.
fn verify(mem: &[u64], seed: u64, count: u64) -> String {
    let mut rng = Rng(seed);
    let (mut bad, mut first) = (0usize, None);
    for (i, page) in mem.chunks(PAGE_WORDS).enumerate() {
        let mut same = true;
        for w in page {
            same &= *w == rng.next();
        }
        if !same {
            bad += 1;
            first.get_or_insert(i * 4096);
        }
    }
    match first {
        None => format!("ok {count}"),
        Some(at) => format!(
            "bad {count}: {bad} of {} pages differ, the first at offset {at:#x}",
            mem.len().div_ceil(PAGE_WORDS)
        ),
    }
}

/// `dir/name` holds `text`, replaced whole (a rename), so that a reader
/// never sees half of it.
fn write_whole(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.new"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
        .unwrap_or_else(|e| panic!("writing {}: {e}", dir.join(name).display()));
}
