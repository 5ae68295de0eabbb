//! The snapshot file: writing it, reading and verifying it, and mapping
//! its guest memory. The layout is in the module doc of [`super`].

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{
    mmap::MmapRegionBuilder, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use super::{
    invalid, Snapshot, SnapshotError, FORMAT_VERSION, MAX_MEMORY, MAX_REGIONS, MAX_STATE_LEN, PAGE,
};

const MAGIC: &[u8; 8] = b"KRUNSNAP";
/// Magic, version, zero, state length: the part of the prefix hashed.
const FIXED: usize = 24;
/// The whole prefix: FIXED and the SHA-256.
const PREFIX: usize = FIXED + 32;
/// Guest memory is copied and hashed this many bytes at a time.
const CHUNK: usize = 1 << 20;

/// A guest memory region: where it is in the guest, and how long. In the
/// file, regions follow each other in this order.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guest_addr: u64,
    pub len: u64,
}

/// What the JSON part of the file holds.
#[derive(Serialize, Deserialize)]
struct State {
    snapshot: Snapshot,
    regions: Vec<Region>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

fn align_up(n: u64) -> Option<u64> {
    Some(n.checked_add(PAGE - 1)? / PAGE * PAGE)
}

/// The prefix (magic, version, zero, state length), without its hash.
fn fixed(version: u32, state_len: u64) -> [u8; FIXED] {
    let mut p = [0u8; FIXED];
    p[..8].copy_from_slice(MAGIC);
    p[8..12].copy_from_slice(&version.to_le_bytes());
    p[16..24].copy_from_slice(&state_len.to_le_bytes());
    p
}

/// A snapshot file's bytes around raw `state` bytes and `memory`, with a
/// correct checksum: for tests and the fuzzer, to reach the checks that
/// come after the checksum's.
pub fn frame(version: u32, state: &[u8], memory: &[u8]) -> Vec<u8> {
    let fixed = fixed(version, state.len() as u64);
    let start = align_up((PREFIX + state.len()) as u64).unwrap_or(0) as usize;
    let mut out = vec![0u8; start];
    out[..FIXED].copy_from_slice(&fixed);
    out[PREFIX..PREFIX + state.len()].copy_from_slice(state);
    out.extend_from_slice(memory);
    let mut h = Sha256::new();
    h.update(fixed);
    h.update(state);
    let state_end = (PREFIX + state.len()) as u64;
    let mut blocks = Blocks::new(h, state_end);
    blocks.feed(&out[state_end as usize..]);
    let sum = blocks.finish();
    out[FIXED..PREFIX].copy_from_slice(&sum);
    out
}

/// The checksum over what follows the state: the file in blocks (its
/// pages; the first block starts where the state ends), each block that
/// is not all zeros hashed after its offset, then the file's length. A
/// zero block costs no hashing, and a reader that can skip a file's holes
/// (guest memory's zero pages, most of a template) does not read them:
/// the hash is the same whichever way the bytes arrive.
struct Blocks {
    hash: Sha256,
    /// The offset of the next byte.
    at: u64,
    /// The current block's bytes so far (it started at `at - len`).
    block: Vec<u8>,
}

impl Blocks {
    fn new(hash: Sha256, origin: u64) -> Blocks {
        Blocks {
            hash,
            at: origin,
            block: Vec::with_capacity(PAGE as usize),
        }
    }

    fn emit(hash: &mut Sha256, start: u64, block: &[u8]) {
        if !is_zero(block) {
            hash.update(start.to_le_bytes());
            hash.update(block);
        }
    }

    fn flush(&mut self) {
        let start = self.at - self.block.len() as u64;
        Blocks::emit(&mut self.hash, start, &self.block);
        self.block.clear();
    }

    /// The next bytes of the file.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (PAGE - self.at % PAGE) as usize;
            let (head, rest) = bytes.split_at(room.min(bytes.len()));
            if self.block.is_empty() && head.len() == PAGE as usize {
                Blocks::emit(&mut self.hash, self.at, head);
                self.at += PAGE;
            } else {
                self.block.extend_from_slice(head);
                self.at += head.len() as u64;
                if self.at.is_multiple_of(PAGE) {
                    self.flush();
                }
            }
            bytes = rest;
        }
    }

    /// The next page of the file, whose zeroness the caller has just
    /// checked (the writer, which skips zero pages too): not checked
    /// again.
    fn page(&mut self, page: &[u8], zero: bool) {
        if self.block.is_empty() && self.at.is_multiple_of(PAGE) && page.len() == PAGE as usize {
            if !zero {
                self.hash.update(self.at.to_le_bytes());
                self.hash.update(page);
            }
            self.at += PAGE;
        } else {
            self.feed(page);
        }
    }

    /// The file's bytes from here up to `to` are zeros (a hole).
    fn zeros_to(&mut self, to: u64) {
        while self.at < to {
            let end = ((self.at / PAGE + 1) * PAGE).min(to);
            if self.block.is_empty() && self.at.is_multiple_of(PAGE) && end - self.at == PAGE {
                // Whole zero pages, up to the page `to` is in: nothing to
                // hash.
                self.at = (to / PAGE * PAGE).max(self.at + PAGE);
                continue;
            }
            self.block
                .resize(self.block.len() + (end - self.at) as usize, 0);
            self.at = end;
            if self.at.is_multiple_of(PAGE) {
                self.flush();
            }
        }
    }

    /// The checksum, the file having ended here.
    fn finish(mut self) -> [u8; 32] {
        if !self.block.is_empty() {
            self.flush();
        }
        self.hash.update(self.at.to_le_bytes());
        self.hash.finalize().into()
    }
}

/// Whether `bytes` are all zeros.
fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u128.
        unsafe { bytes.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl Snapshot {
    /// Writes this snapshot and the guest memory `mem` to a new file at
    /// `path` (mode 0600; an existing file or a symlink there is an
    /// error: the caller writes to a fresh name and renames it into
    /// place, so that a file once written is never changed while clones
    /// map it).
    pub fn write(&self, path: &Path, mem: &GuestMemoryMmap<()>) -> Result<(), SnapshotError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("creating the snapshot", path))?;
        let written = self.write_to(&file, path, mem);
        if written.is_err() {
            // A partial file is no snapshot: leave nothing behind.
            let _ = std::fs::remove_file(path);
        }
        written
    }

    /// Writes this snapshot and `mem` into `file`, new and empty (a VMM
    /// in its jail gets it open from its parent, which created it under a
    /// fresh name and renames it into place once it is whole); `path`
    /// only names it in errors. On an error the file holds no snapshot.
    pub fn write_to(
        &self,
        file: &File,
        path: &Path,
        mem: &GuestMemoryMmap<()>,
    ) -> Result<(), SnapshotError> {
        self.validate()?;
        let regions: Vec<Region> = mem
            .iter()
            .map(|r| Region {
                guest_addr: r.start_addr().0,
                len: r.len(),
            })
            .collect();
        check_regions(&regions, self.header.memory_size)?;
        let state = State {
            snapshot: self.clone(),
            regions,
        };
        let json = serde_json::to_vec(&state).map_err(SnapshotError::State)?;
        if json.len() as u64 > MAX_STATE_LEN {
            return invalid(format!("{} bytes of state", json.len()));
        }
        write_body(file, &json, mem, &state.regions, path)
    }

    /// Reads the snapshot at `path`, verifying it whole (checksum, format,
    /// every length and count) before anything is returned. The memory
    /// stays in the file: [`Loaded::map_memory`].
    pub fn read(path: &Path) -> Result<Loaded, SnapshotError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("opening the snapshot", path))?;
        Snapshot::open(file, path, Verify::Whole)
    }

    /// Reads the snapshot in `file` (`path` names it in errors). With
    /// [`Verify::Whole`] as [`Snapshot::read`]; with
    /// [`Verify::ShapeOnly`] every length, count and field is checked as
    /// well but the checksum is not computed, sparing a pass over the
    /// guest memory: only for a file verified whole before and known not
    /// to have changed since (the template manager's stamp).
    pub fn open(file: File, path: &Path, verify: Verify) -> Result<Loaded, SnapshotError> {
        let len = file
            .metadata()
            .map_err(io("reading the snapshot's size", path))?
            .len();
        let (snapshot, regions, memory_offset) =
            read_verified(&mut &file, len, verify, Some(&file)).map_err(|e| match e {
                SnapshotError::Io { what, source, .. } => SnapshotError::Io {
                    what,
                    path: path.to_path_buf(),
                    source,
                },
                e => e,
            })?;
        Ok(Loaded {
            snapshot,
            regions,
            file,
            memory_offset,
            path: path.to_path_buf(),
        })
    }

    /// Reads and verifies a snapshot from `r`, which holds `file_len`
    /// bytes; returns it, its memory regions and where the memory starts.
    pub fn read_from<R: Read>(
        r: &mut R,
        file_len: u64,
    ) -> Result<(Snapshot, Vec<Region>, u64), SnapshotError> {
        read_verified(r, file_len, Verify::Whole, None)
    }
}

/// How much of a snapshot [`Snapshot::open`] verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// The checksum over the whole file, and the shape.
    Whole,
    /// The shape (lengths, counts, every field) but not the checksum.
    ShapeOnly,
}

/// `sparse`: the file `r` reads, if it is one, whose holes the checksum
/// then skips.
fn read_verified<R: Read>(
    r: &mut R,
    file_len: u64,
    verify: Verify,
    sparse: Option<&File>,
) -> Result<(Snapshot, Vec<Region>, u64), SnapshotError> {
    {
        let read = |e: std::io::Error, what: &str| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SnapshotError::Truncated { what: what.into() },
            _ => SnapshotError::Io {
                what: "reading the snapshot",
                path: PathBuf::new(),
                source: e,
            },
        };
        let mut prefix = [0u8; PREFIX];
        r.read_exact(&mut prefix[..8])
            .map_err(|e| read(e, "no magic"))?;
        if &prefix[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        r.read_exact(&mut prefix[8..])
            .map_err(|e| read(e, "the header ends early"))?;
        let word = |at: usize| u32::from_le_bytes(prefix[at..at + 4].try_into().unwrap_or([0; 4]));
        let version = word(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        if word(12) != 0 {
            return invalid("a reserved header field is not zero".into());
        }
        let state_len = u64::from_le_bytes(prefix[16..24].try_into().unwrap_or([0; 8]));
        if state_len > MAX_STATE_LEN {
            return invalid(format!(
                "{state_len} bytes of state (at most {MAX_STATE_LEN})"
            ));
        }
        let state_end = PREFIX as u64 + state_len;
        if state_end > file_len {
            return Err(SnapshotError::Truncated {
                what: format!("{file_len} bytes, the state alone ends at {state_end}"),
            });
        }
        // Bounded by MAX_STATE_LEN and by the file's size.
        let mut state = vec![0u8; state_len as usize];
        r.read_exact(&mut state)
            .map_err(|e| read(e, "the state ends early"))?;
        let mut hash = Sha256::new();
        hash.update(&prefix[..FIXED]);
        hash.update(&state);
        let mut blocks = Blocks::new(hash, state_end);
        match (verify, sparse) {
            (Verify::Whole, Some(f)) => hash_sparse(f, file_len, &mut blocks),
            (Verify::Whole, None) => hash_rest(r, &mut blocks),
            (Verify::ShapeOnly, _) => {
                blocks.at = file_len;
                Ok(())
            }
        }
        .map_err(|e| read(e, "while hashing"))?;
        let rest = blocks.at - state_end;
        if state_end + rest != file_len {
            return Err(SnapshotError::Truncated {
                what: format!(
                    "{} bytes where the file's size says {file_len}",
                    state_end + rest
                ),
            });
        }
        let parsed = serde_json::from_slice::<State>(&state);
        let memory_offset = align_up(state_end).unwrap_or(u64::MAX);
        // The size the state asks for: a file shorter than that is called
        // truncated (the likelier story than a corrupt one), checksum or
        // not.
        let plausible = parsed
            .as_ref()
            .ok()
            .filter(|s| s.snapshot.validate().is_ok());
        if let Some(State { snapshot, .. }) = plausible {
            let expected = memory_offset.saturating_add(snapshot.header.memory_size);
            if expected > file_len {
                return Err(SnapshotError::Truncated {
                    what: format!("{file_len} bytes, the memory needs the file to be {expected}"),
                });
            }
        }
        if verify == Verify::Whole && blocks.finish().as_slice() != &prefix[FIXED..] {
            return Err(SnapshotError::Checksum);
        }
        let State { snapshot, regions } = parsed.map_err(SnapshotError::State)?;
        snapshot.validate()?;
        check_regions(&regions, snapshot.header.memory_size)?;
        let expected = memory_offset.saturating_add(snapshot.header.memory_size);
        if expected != file_len {
            return invalid(format!(
                "{file_len} bytes, the memory needs the file to be {expected}"
            ));
        }
        Ok((snapshot, regions, memory_offset))
    }
}

/// Writes everything after the file is created: the prefix, the state,
/// the memory, and last the checksum.
fn write_body(
    file: &File,
    json: &[u8],
    mem: &GuestMemoryMmap<()>,
    regions: &[Region],
    path: &Path,
) -> Result<(), SnapshotError> {
    let fixed = fixed(FORMAT_VERSION, json.len() as u64);
    let mut hash = Sha256::new();
    hash.update(fixed);
    file.write_all_at(&fixed, 0)
        .and_then(|()| file.write_all_at(json, PREFIX as u64))
        .map_err(io("writing the snapshot", path))?;
    hash.update(json);
    let state_end = (PREFIX + json.len()) as u64;
    let start = align_up(state_end).unwrap_or(u64::MAX);
    let mut blocks = Blocks::new(hash, state_end);
    blocks.zeros_to(start);
    let end = write_memory(file, mem, regions, start, &mut blocks)
        .map_err(io("writing guest memory to the snapshot", path))?;
    file.set_len(end)
        .map_err(io("writing the snapshot", path))?;
    file.write_all_at(&blocks.finish(), FIXED as u64)
        .map_err(io("writing the snapshot", path))
}

/// Feeds what is left of `r` to `blocks`.
fn hash_rest<R: Read>(r: &mut R, blocks: &mut Blocks) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        blocks.feed(&buf[..n]);
    }
}

/// lseek(2) of `file` to `at` with `whence` (SEEK_DATA, SEEK_HOLE): where
/// it lands.
fn seek(file: &File, at: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: lseek on a descriptor `file` keeps open; reads go by offset
    // (pread), so moving its position is harmless.
    let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Holes of a snapshot's guest memory at least this long are mapped
/// anonymous, not from the file ([`Loaded::map_memory`]); shorter ones
/// stay in the file's mapping. This bounds the mappings a VMM makes: at
/// most two per this many bytes of guest memory (a 4 GiB VM: 4,096; the
/// default `vm.max_map_count` is 65,530).
const ANON_HOLE: u64 = 2 << 20;

/// The holes of `file` from offset `start` to `end` that are at least
/// [`ANON_HOLE`] long, each cut inward to whole pages, as (offset,
/// length). A file system that cannot say where its holes are, or whose
/// answers make no progress, has none from there on.
fn big_holes(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut holes = Vec::new();
    let mut at = start;
    while at < end {
        let Ok(hole) = seek(file, at, libc::SEEK_HOLE) else {
            break;
        };
        if hole < at || hole >= end {
            break;
        }
        let data = match seek(file, hole, libc::SEEK_DATA) {
            Ok(d) => d.min(end),
            // No data from here on.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(_) => break,
        };
        if data <= hole {
            break;
        }
        if let Some(from) = align_up(hole) {
            let to = data / PAGE * PAGE;
            if to > from && to - from >= ANON_HOLE {
                holes.push((from, to - from));
            }
        }
        at = data;
    }
    holes
}

/// Feeds `file` from `blocks`' offset to `len` to `blocks`, reading only
/// its data (SEEK_DATA, SEEK_HOLE); holes are zeros. A file system that
/// cannot say where its holes are is read whole.
fn hash_sparse(file: &File, len: u64, blocks: &mut Blocks) -> std::io::Result<()> {
    let seek = |at: u64, whence| seek(file, at, whence);
    let mut buf = vec![0u8; CHUNK];
    while blocks.at < len {
        let (data, hole) = match seek(blocks.at, libc::SEEK_DATA) {
            Ok(d) => (d.clamp(blocks.at, len), seek(d, libc::SEEK_HOLE)?.min(len)),
            // No data from here on.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (len, len),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (blocks.at, len),
            Err(e) => return Err(e),
        };
        // A file system whose answers make no progress is read to the end.
        let hole = if hole > data { hole } else { len };
        blocks.zeros_to(data);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(CHUNK);
            file.read_exact_at(&mut buf[..n], at)?;
            blocks.feed(&buf[..n]);
            at += n as u64;
        }
    }
    Ok(())
}

/// Regions in ascending order, page-aligned, not overlapping, adding up to
/// `memory_size`.
fn check_regions(regions: &[Region], memory_size: u64) -> Result<(), SnapshotError> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return invalid(format!("{} memory regions", regions.len()));
    }
    let mut next = 0u64;
    let mut total = 0u64;
    for r in regions {
        let end = r.guest_addr.checked_add(r.len);
        if r.len == 0
            || !r.len.is_multiple_of(PAGE)
            || !r.guest_addr.is_multiple_of(PAGE)
            || r.guest_addr < next
        {
            return invalid(format!("memory region {r:?}"));
        }
        let Some(end) = end else {
            return invalid(format!("memory region {r:?}"));
        };
        next = end;
        total = total.saturating_add(r.len);
    }
    if total != memory_size || total > MAX_MEMORY {
        return invalid(format!(
            "memory regions of {total:#x} bytes, the header says {memory_size:#x}"
        ));
    }
    Ok(())
}

/// Writes the regions of `mem` from `start` on, hashing every byte and
/// leaving all-zero pages as holes; returns the end of the memory.
fn write_memory(
    file: &File,
    mem: &GuestMemoryMmap<()>,
    regions: &[Region],
    start: u64,
    blocks: &mut Blocks,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = start;
    for r in regions {
        let mut done = 0u64;
        while done < r.len {
            let n = (r.len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(r.guest_addr + done))
                .map_err(std::io::Error::other)?;
            write_nonzero_pages(file, chunk, at, blocks)?;
            done += n as u64;
            at += n as u64;
        }
    }
    Ok(at)
}

/// Writes `chunk` at `at`, skipping its all-zero pages (runs of others in
/// one write), and feeds it to the checksum's `blocks` (each page looked
/// at once).
fn write_nonzero_pages(
    file: &File,
    chunk: &[u8],
    at: u64,
    blocks: &mut Blocks,
) -> std::io::Result<()> {
    let page = PAGE as usize;
    let mut run: Option<usize> = None;
    for (i, p) in chunk.chunks(page).enumerate() {
        let zero = is_zero(p);
        blocks.page(p, zero);
        match (zero, run) {
            (false, None) => run = Some(i * page),
            (true, Some(s)) => {
                file.write_all_at(&chunk[s..i * page], at + s as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        file.write_all_at(&chunk[s..], at + s as u64)?;
    }
    Ok(())
}

/// A verified snapshot and its open file, from [`Snapshot::read`].
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: Snapshot,
    pub regions: Vec<Region>,
    file: File,
    memory_offset: u64,
    path: PathBuf,
}

impl Loaded {
    /// The guest memory as private copy-on-write mappings of the file: a
    /// clone reads the file's pages (shared through the page cache with
    /// every other clone) until it writes one, which becomes its own. The
    /// file must not change while mapped (MAP_PRIVATE shows later writes
    /// to pages not yet copied, and a file truncated under a mapping faults
    /// the VMM with SIGBUS): a template file is written once, under a
    /// fresh name, and never rewritten or truncated; it is removed only
    /// by unlinking, which mappings survive.
    ///
    /// The file's holes of at least [`ANON_HOLE`] (zero pages, most of a
    /// template) are mapped anonymous instead: what the guest never wrote
    /// there reads as the zero page, what it writes is its own, and the
    /// file is never touched. From the file, each first fault on a hole
    /// page, a write (copy-on-write reads the file's page first) as much
    /// as a capture's read of every page, would put a page into the file:
    /// on a tmpfs a page of the file itself, shared, never reclaimed and
    /// charged to the faulting container's host cgroup, so that a clone
    /// writing N MiB cost 2N and its first checkpoint grew the template
    /// to the VM's size, past the cgroup's limit (the VMM OOM-killed).
    pub fn map_memory(&self) -> Result<GuestMemoryMmap<()>, SnapshotError> {
        let mut out = Vec::with_capacity(self.regions.len());
        let mut offset = self.memory_offset;
        for r in &self.regions {
            let file = self
                .file
                .try_clone()
                .map_err(io("duplicating the snapshot's descriptor", &self.path))?;
            let mapping = MmapRegionBuilder::new(r.len as usize)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(file, offset))
                .build()
                .map_err(SnapshotError::Map)?;
            for (at, len) in big_holes(&self.file, offset, offset + r.len) {
                anonymous_over(&mapping, at - offset, len).map_err(io(
                    "mapping a hole of the guest memory anonymous",
                    &self.path,
                ))?;
            }
            let region =
                GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                    SnapshotError::Invalid {
                        what: format!("memory region {r:?}"),
                    }
                })?;
            out.push(region);
            offset += r.len;
        }
        GuestMemoryMmap::from_regions(out).map_err(|e| SnapshotError::Invalid {
            what: format!("memory regions: {e}"),
        })
    }

    /// The guest memory copied into fresh anonymous mappings: for a clone
    /// that must not depend on the file once started (checkpoint/restore,
    /// where the file may be removed).
    pub fn copy_memory(&self) -> Result<GuestMemoryMmap<()>, SnapshotError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .regions
            .iter()
            .map(|r| (GuestAddress(r.guest_addr), r.len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| SnapshotError::Invalid {
            what: format!("memory regions: {e}"),
        })?;
        let mut buf = vec![0u8; CHUNK];
        let mut offset = self.memory_offset;
        for r in &self.regions {
            let mut done = 0u64;
            while done < r.len {
                let n = (r.len - done).min(CHUNK as u64) as usize;
                self.file
                    .read_exact_at(&mut buf[..n], offset)
                    .map_err(io("reading guest memory from the snapshot", &self.path))?;
                mem.write_slice(&buf[..n], GuestAddress(r.guest_addr + done))
                    .map_err(|e| SnapshotError::Invalid {
                        what: format!("memory region {r:?}: {e}"),
                    })?;
                done += n as u64;
                offset += n as u64;
            }
        }
        Ok(mem)
    }
}

/// Replaces `len` bytes of `mapping` from `start` on (whole pages, within
/// it) with anonymous zero pages.
fn anonymous_over(
    mapping: &vm_memory::mmap::MmapRegion<()>,
    start: u64,
    len: u64,
) -> std::io::Result<()> {
    let inside = start
        .checked_add(len)
        .is_some_and(|end| end <= mapping.size() as u64);
    if !inside || !start.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: [start, start + len) is whole pages inside `mapping` (checked
    // above), a private mapping that this process just made and that
    // nothing references yet (no vCPU runs, no device has it); MAP_FIXED
    // replaces those pages, which read as zeros (a hole of the file),
    // with anonymous pages, which read as zeros too; the region's own
    // munmap at its drop covers them.
    let p = unsafe {
        libc::mmap(
            mapping.as_ptr().add(start as usize).cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
