//! Giving the host backing of guest pages back: a guest-physical range is
//! checked against guest RAM, rounded inward to whole pages, and its host
//! mapping `madvise(MADV_DONTNEED)`ed. Guest RAM is anonymous private
//! memory (`crate::memory`): the pages go back to the host and read as
//! zeros when the guest touches them again.

use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion, MemoryRegionAddress};

use super::BALLOON_PAGE;
use crate::virtio::Mem;

/// Why a range the guest sent was not released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRange {
    #[error("range {addr:#x}+{len:#x} overflows the address space")]
    Overflow { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not inside one region of guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    #[error("madvise failed on range {addr:#x}+{len:#x}: errno {errno}")]
    Madvise { addr: u64, len: u64, errno: i32 },
}

/// Releases the whole pages of `[addr, addr + len)`; returns how many
/// bytes that was (0 for a range holding no whole page, or empty).
/// The range must lie inside one region of guest RAM.
pub fn release_range(mem: &Mem, addr: u64, len: u64) -> Result<u64, BadRange> {
    if len == 0 {
        return Ok(0);
    }
    let end = addr
        .checked_add(len)
        .ok_or(BadRange::Overflow { addr, len })?;
    let outside = BadRange::OutsideRam { addr, len };
    let region = mem.find_region(GuestAddress(addr)).ok_or(outside)?;
    let region_end = region
        .start_addr()
        .0
        .checked_add(region.len())
        .ok_or(outside)?;
    if end > region_end {
        return Err(outside);
    }
    // Inward: only pages the range covers entirely.
    let first = addr.next_multiple_of(BALLOON_PAGE);
    let last = end - end % BALLOON_PAGE;
    if first >= last {
        return Ok(0);
    }
    let offset = MemoryRegionAddress(first - region.start_addr().0);
    let host = region.get_host_address(offset).map_err(|_| outside)?;
    let bytes = last - first;
    // SAFETY: [host, host + bytes) lies inside the region's own mapping
    // (checked above against the region's bounds), which guest memory
    // owns and keeps mapped; host is page aligned (the mapping is, and
    // so is the offset). MADV_DONTNEED on anonymous private memory only
    // drops its contents, which are the guest's: it reads zeros next.
    // Nothing in this process holds a reference into guest memory (it is
    // only accessed through volatile copies).
    let rc = unsafe {
        libc::madvise(
            host.cast::<libc::c_void>(),
            bytes as usize,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(BadRange::Madvise { addr, len, errno });
    }
    Ok(bytes)
}

/// At most one warning about hostile input every [`LogLimit::PERIOD`],
/// with the count of the ones left unsaid.
pub(super) struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    const PERIOD: Duration = Duration::from_secs(10);

    pub(super) fn new() -> LogLimit {
        LogLimit {
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `e` if the last warning is old enough.
    pub(super) fn warn(&mut self, what: &str, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::PERIOD)
        {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(suppressed, "virtio-balloon: {what} skipped: {e}");
    }
}
