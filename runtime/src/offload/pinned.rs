//! Page-locked host memory for activation offload, pinned at the speed of all cores: an
//! anonymous mapping with transparent huge pages, its pages first touched by every core at
//! once, then registered with the driver (`cuMemHostRegister`). `cuMemHostAlloc` pins at
//! ~2 GiB/s on the H200 machine (one thread faults and zeroes 4 KiB pages); this path pins at
//! ~22 GiB/s there with 16 threads and frees 8x faster, and the copies run at the same
//! 54-55 GB/s (`benches/pin_probe.cu`, benches/RESULTS.md session 16). The 105 GiB a
//! 524,288-token 8B step offloads took ~50 s of its setup.

use crate::device::Gpu;
use crate::error::RuntimeError;
use cudarc::driver::{sys, CudaContext};
use memmap2::MmapMut;
use std::sync::Arc;

/// One write per base page faults the page in (with transparent huge pages, its whole 2 MiB
/// page: the later writes in it are no-ops).
const PAGE: usize = 4096;
/// The mapping's length and the threads' shares are whole huge pages.
const HUGE_PAGE: usize = 2 << 20;
/// Touching threads at most (16 reached 22 GiB/s on the 16-core machine, 8 15 GiB/s).
const MAX_TOUCH_THREADS: usize = 16;

/// Page-locked host memory of `bytes` bytes (zeroed), unregistered and unmapped on drop.
pub struct PinnedHostBuffer {
    ctx: Arc<CudaContext>,
    /// The registered mapping (`None` for 0 bytes).
    map: Option<MmapMut>,
    /// The mapping's start, taken once from `as_mut_ptr`: the GPU's copies write through it
    /// while the buffer is shared (`&self`), which a pointer derived from `&MmapMut` would not
    /// license.
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer is plain host memory owned by this value.
unsafe impl Send for PinnedHostBuffer {}
unsafe impl Sync for PinnedHostBuffer {}

impl PinnedHostBuffer {
    /// Maps, faults in and pins `bytes` of host memory.
    pub fn new(gpu: &Gpu, bytes: usize) -> Result<Self, RuntimeError> {
        let ctx = gpu.context().clone();
        if bytes == 0 {
            let (map, ptr) = (None, std::ptr::null_mut());
            return Ok(Self {
                ctx,
                map,
                ptr,
                bytes,
            });
        }
        let len = bytes.next_multiple_of(HUGE_PAGE);
        // Touching more than the host has would summon the kernel's OOM killer: refuse first.
        check_host_room(len, available_host_memory())?;
        let mut map = MmapMut::map_anon(len).map_err(|e| {
            RuntimeError::Io(format!(
                "mapping {} of host memory for offload: {e}",
                gib(len as u64)
            ))
        })?;
        // A hint: where the kernel has no transparent huge pages, the pages stay 4 KiB. A
        // child process (ftrt runs python3 to fetch models) must not share the pinned pages
        // copy-on-write: the parent's next write would move it off the pages the GPU copies.
        #[cfg(target_os = "linux")]
        {
            let _ = map.advise(memmap2::Advice::HugePage);
            map.advise(memmap2::Advice::DontFork).map_err(|e| {
                RuntimeError::Io(format!("keeping pinned memory out of child processes: {e}"))
            })?;
        }
        first_touch(&mut map);
        ctx.bind_to_thread()?;
        let ptr = map.as_mut_ptr();
        // SAFETY: `len` bytes of this process's memory from `ptr`, mapped until Drop, which
        // unregisters them first.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, 0) }.result()?;
        Ok(Self {
            ctx,
            map: Some(map),
            ptr,
            bytes,
        })
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Host address of byte `offset`.
    pub fn ptr_at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.bytes);
        self.ptr.wrapping_add(offset)
    }
}

impl Drop for PinnedHostBuffer {
    fn drop(&mut self) {
        if self.map.is_some() {
            self.ctx.record_err(self.ctx.bind_to_thread());
            // SAFETY: registered in new(), unregistered once; the mapping goes after.
            let unregistered = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) }.result();
            self.ctx.record_err(unregistered);
        }
    }
}

/// Err when `len` bytes exceed the `available` host memory (None: not known, not checked).
fn check_host_room(len: usize, available: Option<u64>) -> Result<(), RuntimeError> {
    match available {
        Some(avail) if len as u64 > avail => Err(RuntimeError::DoesNotFit(format!(
            "pinning {} of host memory for offload, but only {} is available (MemAvailable, \
             or the cgroup's limit): free host memory, or offload less (a shorter sequence or \
             --max-seq-length, a smaller batch, or no --offload-residuals)",
            gib(len as u64),
            gib(avail)
        ))),
        _ => Ok(()),
    }
}

/// Bytes as GiB text ("4.00 GiB").
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Memory this machine can give a new run: `MemAvailable` of /proc/meminfo, lowered by a cgroup
/// v2 limit when one is set. None when neither can be read (the check is then skipped).
pub fn available_host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut avail = meminfo_bytes(&meminfo, "MemAvailable")?;
    if let Ok(limit) = std::fs::read_to_string("/sys/fs/cgroup/memory.max") {
        if let Ok(limit) = limit.trim().parse::<u64>() {
            let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
                .ok()
                .and_then(|u| u.trim().parse::<u64>().ok())
                .unwrap_or(0);
            avail = avail.min(limit.saturating_sub(used));
        }
    }
    Some(avail)
}

/// The bytes of /proc/meminfo's line `key` ("MemAvailable:   123456 kB").
fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    let value = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Writes a zero to the first byte of every base page of `buf` (fresh anonymous pages are
/// zero already), split over up to [`MAX_TOUCH_THREADS`] threads in whole huge pages, so that
/// the kernel faults the pages in on every core instead of inside the driver's registration.
fn first_touch(buf: &mut [u8]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.clamp(1, MAX_TOUCH_THREADS);
    let share = buf.len().div_ceil(threads).next_multiple_of(HUGE_PAGE);
    std::thread::scope(|s| {
        for part in buf.chunks_mut(share) {
            s.spawn(move || {
                for i in (0..part.len()).step_by(PAGE) {
                    part[i] = 0;
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_the_host_has_is_refused_with_both_sizes() {
        let gib = 1usize << 30;
        assert!(check_host_room(4 * gib, Some(4 * gib as u64)).is_ok());
        assert!(check_host_room(4 * gib, None).is_ok());
        let e = check_host_room(4 * gib + 1, Some(3 * gib as u64)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("4.00 GiB") && msg.contains("3.00 GiB"),
            "{msg}"
        );
    }

    /// On Linux the available memory parses, and lies between 0 and MemTotal.
    #[cfg(target_os = "linux")]
    #[test]
    fn available_host_memory_is_read_and_within_the_total() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total = meminfo_bytes(&meminfo, "MemTotal").expect("MemTotal in /proc/meminfo");
        let avail = available_host_memory().expect("MemAvailable in /proc/meminfo");
        assert!(avail > 0 && avail <= total, "{avail} of {total} bytes");
    }

    /// Shares start on huge-page boundaries, so every base page's first byte is written and
    /// nothing else, for lengths around the share and page sizes.
    #[test]
    fn first_touch_writes_each_page_start_and_nothing_else() {
        for len in [
            1,
            PAGE - 1,
            PAGE + 1,
            3 * HUGE_PAGE + 5 * PAGE + 7,
            17 * HUGE_PAGE,
        ] {
            let mut buf: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
            first_touch(&mut buf);
            for (i, &b) in buf.iter().enumerate() {
                let want = if i % PAGE == 0 {
                    0
                } else {
                    (i % 251) as u8 | 1
                };
                assert_eq!(b, want, "len {len}, byte {i}");
            }
        }
    }
}
