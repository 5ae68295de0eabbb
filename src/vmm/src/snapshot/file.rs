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
    h.update(&out[PREFIX..]);
    let sum = h.finalize();
    out[FIXED..PREFIX].copy_from_slice(&sum);
    out
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
    pub fn open(mut file: File, path: &Path, verify: Verify) -> Result<Loaded, SnapshotError> {
        let len = file
            .metadata()
            .map_err(io("reading the snapshot's size", path))?
            .len();
        let (snapshot, regions, memory_offset) =
            read_verified(&mut file, len, verify).map_err(|e| match e {
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
        read_verified(r, file_len, Verify::Whole)
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

fn read_verified<R: Read>(
    r: &mut R,
    file_len: u64,
    verify: Verify,
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
        let rest = match verify {
            Verify::Whole => hash_rest(r, &mut hash).map_err(|e| read(e, "while hashing"))?,
            Verify::ShapeOnly => file_len - state_end,
        };
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
        if verify == Verify::Whole && hash.finalize().as_slice() != &prefix[FIXED..] {
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
    let start = align_up((PREFIX + json.len()) as u64).unwrap_or(u64::MAX);
    hash.update(vec![0u8; (start as usize) - PREFIX - json.len()]);
    let end = write_memory(file, mem, regions, start, &mut hash)
        .map_err(io("writing guest memory to the snapshot", path))?;
    file.set_len(end)
        .map_err(io("writing the snapshot", path))?;
    file.write_all_at(&hash.finalize(), FIXED as u64)
        .map_err(io("writing the snapshot", path))
}

/// Hashes what is left of `r`; returns how many bytes that was.
fn hash_rest<R: Read>(r: &mut R, hash: &mut Sha256) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        total += n as u64;
    }
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
    hash: &mut Sha256,
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
            hash.update(&*chunk);
            write_nonzero_pages(file, chunk, at)?;
            done += n as u64;
            at += n as u64;
        }
    }
    Ok(at)
}

/// Writes `chunk` at `at`, skipping its all-zero pages (runs of others in
/// one write).
fn write_nonzero_pages(file: &File, chunk: &[u8], at: u64) -> std::io::Result<()> {
    let page = PAGE as usize;
    let mut run: Option<usize> = None;
    for (i, p) in chunk.chunks(page).enumerate() {
        let zero = p.iter().all(|&b| b == 0);
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
