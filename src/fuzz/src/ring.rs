//! The driver's side of a split virtqueue (virtio spec 2.7): descriptor
//! table, available ring and used ring at addresses the caller picks in
//! guest memory, written and read as a guest driver would.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory as the devices see it.
pub type Mem = GuestMemoryMmap<()>;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One split queue, from the driver's side.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// How far the driver read the used ring.
    used_seen: u16,
}

impl Ring {
    /// A queue of `size` entries with its three parts at the given
    /// addresses, over whatever guest memory holds there.
    pub fn at(size: u16, desc: u64, avail: u64, used: u64) -> Ring {
        Ring {
            size,
            desc,
            avail,
            used,
            used_seen: 0,
        }
    }

    /// The same, with the rings zeroed (nothing available, nothing used).
    pub fn new(mem: &Mem, size: u16, desc: u64, avail: u64, used: u64) -> Ring {
        let ring = Ring::at(size, desc, avail, used);
        let n = usize::from(size);
        let _ = mem.write_slice(&vec![0; 16 * n], GuestAddress(desc));
        let _ = mem.write_slice(&vec![0; 6 + 2 * n], GuestAddress(avail));
        let _ = mem.write_slice(&vec![0; 6 + 8 * n], GuestAddress(used));
        ring
    }

    /// The device's side of this queue, set up and ready as a transport
    /// hands it over (the caller checks `is_valid` if it needs to).
    pub fn device_queue(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).expect("a power-of-two maximum size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` of the table.
    pub fn set_desc(&self, mem: &Mem, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let at = self
            .desc
            .wrapping_add(16 * u64::from(index % self.size.max(1)));
        let _ = mem.write_slice(&raw, GuestAddress(at));
    }

    /// Lays out a chain of (address, length, device-writable) buffers from
    /// descriptor `first` on (NEXT links added) and makes it available.
    /// Returns its head.
    pub fn post(&mut self, mem: &Mem, first: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        let size = self.size.max(1);
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (first.wrapping_add(i as u16)) % size;
            let next = (index + 1) % size;
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.set_desc(mem, index, addr, len, flags, next);
        }
        let head = first % size;
        self.make_avail(mem, head);
        head
    }

    /// Puts `head` on the available ring and publishes it (after whatever
    /// index the ring holds now: the guest may have written it anyhow).
    pub fn make_avail(&mut self, mem: &Mem, head: u16) {
        let idx = mem
            .read_obj::<u16>(GuestAddress(self.avail.wrapping_add(2)))
            .map_or(0, u16::from_le);
        let slot = self
            .avail
            .wrapping_add(4 + 2 * u64::from(idx % self.size.max(1)));
        let _ = mem.write_obj(head.to_le(), GuestAddress(slot));
        let _ = mem.write_obj(
            idx.wrapping_add(1).to_le(),
            GuestAddress(self.avail.wrapping_add(2)),
        );
    }

    /// The next used element the device published: (head, length).
    pub fn next_used(&mut self, mem: &Mem) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).ok()?;
        if u16::from_le(idx) == self.used_seen {
            return None;
        }
        let slot = self.used + 4 + 8 * u64::from(self.used_seen % self.size.max(1));
        let id: u32 = mem.read_obj(GuestAddress(slot)).ok()?;
        let len: u32 = mem.read_obj(GuestAddress(slot + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }
}
