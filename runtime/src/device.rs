//! The CUDA device: one context, one compute stream, cached kernel functions, plain
//! allocations and host<->device copies. Kernels take raw addresses ([`DevPtr`]).

use crate::driver_probe::probe_driver;
use crate::error::RuntimeError;
use crate::kernel_source::{module_ptx, override_path};
use crate::profile::{ProfileLog, ProfileRow};
pub use cudarc;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// PTX of one kernel family embedded at build time (ops' build.rs makes these statics), with
/// the machine code ptxas made of it for some GPU architectures.
pub struct PtxModule {
    /// Module name; also the file stem looked up in `FTRT_KERNEL_DIR` (`<name>.cu`).
    pub name: &'static str,
    /// NVRTC virtual architecture of the PTX (`compute_80`, or `compute_90a` for Hopper-only
    /// kernels); an `FTRT_KERNEL_DIR` override compiles for the same one.
    pub arch: &'static str,
    /// PTX text (NUL-free), loaded with `cuModuleLoadData`.
    pub ptx: &'static str,
    /// The CUDA C the PTX was compiled from (for diagnostics).
    pub cuda_source: &'static str,
    /// (ptxas target, cubin) pairs made from exactly this PTX (`sm_80`, `sm_90`, `sm_90a`):
    /// loaded instead of the PTX on a GPU they run on, so the driver compiles nothing (its
    /// JIT of every module took ~20 s on a fresh H200 machine).
    pub cubins: &'static [(&'static str, &'static [u8])],
}

impl PtxModule {
    /// The cubin that runs on a GPU of compute capability `cc`, if one was embedded: the same
    /// major version at or below its minor (sm_80 runs on 8.x), sm_90a only on 9.0.
    pub fn cubin_for(&self, cc: (i32, i32)) -> Option<&'static [u8]> {
        self.cubins.iter().find_map(|&(target, bytes)| {
            let sm = target.strip_prefix("sm_")?;
            let (digits, arch_specific) = match sm.strip_suffix('a') {
                Some(d) => (d, true),
                None => (sm, false),
            };
            let v: i32 = digits.parse().ok()?;
            let (major, minor) = (v / 10, v % 10);
            let runs = if arch_specific {
                cc == (major, minor)
            } else {
                cc.0 == major && cc.1 >= minor
            };
            runs.then_some(bytes)
        })
    }
}

/// A typed raw device address (a view into the arena or any allocation).
/// `T` is the element type; the address is in bytes.
#[derive(Debug)]
#[repr(transparent)]
pub struct DevPtr<T> {
    pub addr: u64,
    _t: PhantomData<T>,
}

impl<T> Clone for DevPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevPtr<T> {}

impl<T> PartialEq for DevPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}
impl<T> Eq for DevPtr<T> {}

impl<T> DevPtr<T> {
    /// The pointer at byte address `addr`.
    pub const fn new(addr: u64) -> Self {
        Self {
            addr,
            _t: PhantomData,
        }
    }
    /// The null pointer (address 0).
    pub const fn null() -> Self {
        Self::new(0)
    }
    /// Whether this is the null pointer: a buffer the plan left out.
    pub const fn is_null(self) -> bool {
        self.addr == 0
    }
    /// The pointer `elems` elements of `T` further on.
    pub fn offset(self, elems: usize) -> Self {
        Self::new(self.addr + (elems * std::mem::size_of::<T>()) as u64)
    }
    /// The same address viewed as another element type.
    pub fn cast<U>(self) -> DevPtr<U> {
        DevPtr::new(self.addr)
    }
}

/// What the device reports at open.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    /// Free device memory when the device was opened.
    pub free_bytes: usize,
    /// `cuDriverGetVersion` encoding: 1000 * major + 10 * minor.
    pub driver_version: i32,
    pub sm_count: i32,
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const GIB: f64 = (1u64 << 30) as f64;
        write!(
            f,
            "GPU {}: {} (sm_{}{}, {} SMs), {:.1} GiB total, {:.1} GiB free, driver CUDA {}.{}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_count,
            self.total_bytes as f64 / GIB,
            self.free_bytes as f64 / GIB,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }
}

/// One plain device allocation (`cuMemAlloc`, never managed memory), freed on drop.
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    addr: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// `bytes` of uninitialised device memory in `ctx` (none for 0 bytes).
    pub(crate) fn alloc_in(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, RuntimeError> {
        ctx.bind_to_thread()?;
        let addr = if bytes == 0 {
            0
        } else {
            // SAFETY: plain allocation; freed by Drop.
            unsafe { result::malloc_sync(bytes) }?
        };
        Ok(Self {
            ctx: ctx.clone(),
            addr,
            bytes,
        })
    }

    /// The start of the allocation as a typed pointer.
    pub fn ptr<T>(&self) -> DevPtr<T> {
        DevPtr::new(self.addr)
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.addr != 0 {
            self.ctx.record_err(self.ctx.bind_to_thread());
            // SAFETY: addr came from cuMemAlloc in this context and is freed once.
            self.ctx.record_err(unsafe { result::free_sync(self.addr) });
        }
    }
}

/// One CUDA device: its primary context, one compute stream and a cache of loaded modules
/// and function handles. cudarc's per-slice event tracking is disabled: the runtime orders
/// work itself with streams and events.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Module name -> function name -> handle (looked up without allocating).
    functions: Mutex<HashMap<&'static str, HashMap<String, CudaFunction>>>,
    /// The open profile, if any ([`Gpu::profile_begin`]), and whether one is open: read
    /// without the lock at every launch, so an unprofiled launch takes no lock.
    profile: Mutex<Option<ProfileLog>>,
    profiling: AtomicBool,
}

impl Gpu {
    /// Opens GPU `ordinal`. Without a driver or GPU this is one clear error, never a panic.
    pub fn open(ordinal: usize) -> Result<Gpu, RuntimeError> {
        let driver_version = probe_driver(ordinal)?;
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: the runtime never uses CudaSlice; it orders streams with explicit events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let (free_bytes, total_bytes) = ctx.mem_get_info()?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name()?,
            compute_capability: ctx.compute_capability()?,
            total_bytes,
            free_bytes,
            driver_version,
            sm_count: ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        };
        Ok(Gpu {
            ctx,
            stream,
            info,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            profile: Mutex::new(None),
            profiling: AtomicBool::new(false),
        })
    }

    /// Device name, compute capability, memory, driver version, SM count.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The compute stream every kernel and GEMM is launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context (for creating more streams and events).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Loads `module` once per `Gpu` (cached by name) and returns the cached handle of the
    /// function `name`. If `FTRT_KERNEL_DIR` holds `<module.name>.cu`, that source is compiled
    /// with NVRTC (for `module.arch`, includes from `FTRT_CUDA_INCLUDE`) instead of using `module.ptx`.
    pub fn function(
        &self,
        module: &'static PtxModule,
        name: &str,
    ) -> Result<CudaFunction, RuntimeError> {
        self.profile_mark(name)?;
        let mut functions = self.functions.lock().expect("function cache poisoned");
        if let Some(f) = functions.get(module.name).and_then(|m| m.get(name)) {
            return Ok(f.clone());
        }
        let loaded = self.module(module)?;
        let f = loaded.load_function(name).map_err(|e| {
            RuntimeError::Module(format!("function {name} in module {}: {e}", module.name))
        })?;
        functions
            .entry(module.name)
            .or_default()
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// [`Gpu::function`], opted in to `smem` bytes of dynamic shared memory where that is past
    /// the default 48 KiB (a function attribute: idempotent, host-side only).
    pub fn function_with_smem(
        &self,
        module: &'static PtxModule,
        name: &str,
        smem: u32,
    ) -> Result<CudaFunction, RuntimeError> {
        let f = self.function(module, name)?;
        if smem > 48 * 1024 {
            self.ctx.bind_to_thread()?;
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )?;
        }
        Ok(f)
    }

    fn module(&self, module: &'static PtxModule) -> Result<Arc<CudaModule>, RuntimeError> {
        let mut modules = self.modules.lock().expect("module cache poisoned");
        if let Some(m) = modules.get(module.name) {
            return Ok(m.clone());
        }
        let source = override_path(module);
        let cubin = match source {
            Some(_) => None,
            None => module.cubin_for(self.info.compute_capability),
        };
        // A cubin the driver refuses falls back to the PTX (JIT-compiled by the driver).
        let from_cubin =
            cubin.and_then(|c| self.ctx.load_module(Ptx::from_binary(c.to_vec())).ok());
        let m = match from_cubin {
            Some(m) => m,
            None => self
                .ctx
                .load_module(module_ptx(module, source.as_deref())?)
                .map_err(|e| RuntimeError::Module(format!("loading {}: {e}", module.name)))?,
        };
        modules.insert(module.name, m.clone());
        Ok(m)
    }

    /// Opens a profile: from now on each launch (and each labelled GEMM or copy) records an
    /// event on the compute stream, until [`Gpu::profile_end`]. Not while capturing a graph.
    pub fn profile_begin(&self) {
        *self.profile.lock().expect("profile poisoned") = Some(ProfileLog::default());
        self.profiling.store(true, Ordering::Release);
    }

    /// Whether a profile is open (graph capture must wait until it closes).
    pub fn profiling(&self) -> bool {
        self.profiling.load(Ordering::Acquire)
    }

    /// Charges the compute stream's work from here to the next mark to `label` (a no-op
    /// without an open profile, which takes no lock).
    pub fn profile_mark(&self, label: &str) -> Result<(), RuntimeError> {
        if !self.profiling() {
            return Ok(());
        }
        match self.profile.lock().expect("profile poisoned").as_mut() {
            Some(log) => log.mark(&self.stream, label),
            None => Ok(()),
        }
    }

    /// Closes the open profile, waits for the stream and returns GPU time per label.
    pub fn profile_end(&self) -> Result<Vec<ProfileRow>, RuntimeError> {
        self.profiling.store(false, Ordering::Release);
        let log = self.profile.lock().expect("profile poisoned").take();
        log.ok_or_else(|| {
            RuntimeError::InvalidArgument("profile_end without profile_begin".into())
        })?
        .finish(&self.stream)
    }

    /// Waits until all work on the compute stream is done.
    pub fn synchronize(&self) -> Result<(), RuntimeError> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// Allocates `bytes` of device memory (`cuMemAlloc`; 256-byte aligned by the driver).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, RuntimeError> {
        DeviceBuffer::alloc_in(&self.ctx, bytes)
    }

    /// Copies `src` to `dst` (ordered on the compute stream) and waits for the copy.
    pub fn upload<T: bytemuck::Pod>(&self, dst: DevPtr<T>, src: &[T]) -> Result<(), RuntimeError> {
        if src.is_empty() {
            return Ok(());
        }
        self.profile_mark("copy (host to device, waited)")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: dst holds src.len() elements (caller's contract); we wait before returning,
        // so src outlives the copy.
        unsafe { result::memcpy_htod_async(dst.addr, src, self.stream.cu_stream()) }?;
        self.synchronize()
    }

    /// Copies `dst.len()` elements from `src` (ordered on the compute stream) and waits.
    pub fn download<T: bytemuck::Pod>(
        &self,
        src: DevPtr<T>,
        dst: &mut [T],
    ) -> Result<(), RuntimeError> {
        if dst.is_empty() {
            return Ok(());
        }
        self.profile_mark("copy (device to host, waited)")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: src holds dst.len() elements (caller's contract); we wait before returning.
        unsafe { result::memcpy_dtoh_async(dst, src.addr, self.stream.cu_stream()) }?;
        self.synchronize()
    }

    /// Zeroes `bytes` bytes at `dst`, asynchronously on the compute stream.
    pub fn memset_zero(&self, dst: DevPtr<u8>, bytes: usize) -> Result<(), RuntimeError> {
        self.profile_mark("memset")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: caller guarantees [dst, dst+bytes) is device memory.
        unsafe { result::memset_d8_async(dst.addr, 0, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Sets `count` 32-bit words at `dst` to `value` (e.g. `f32::to_bits`), asynchronously on
    /// the compute stream.
    pub fn fill_u32(&self, dst: DevPtr<u8>, value: u32, count: usize) -> Result<(), RuntimeError> {
        self.profile_mark("memset")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: caller guarantees [dst, dst + 4 count) is device memory, 4-byte aligned.
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(dst.addr, value, count, self.stream.cu_stream())
        }
        .result()?;
        Ok(())
    }

    /// Launches `f` on the compute stream as a grid of `grid_x` blocks of `block_x` threads in
    /// thread-block clusters of `cluster_x` blocks along x (compute capability 9.0 and later;
    /// `grid_x` a multiple of `cluster_x`, which is at most 8), with `shared_bytes` of dynamic
    /// shared memory. cudarc's launch builder has no cluster attribute, hence this raw
    /// `cuLaunchKernelEx`.
    ///
    /// # Safety
    /// `args` holds one pointer per kernel parameter, in order, each to a live value of the
    /// parameter's type, and the kernel's memory accesses are valid for that grid.
    pub unsafe fn launch_clustered(
        &self,
        f: &CudaFunction,
        (grid_x, block_x, cluster_x): (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<(), RuntimeError> {
        if cluster_x == 0 || cluster_x > 8 || !grid_x.is_multiple_of(cluster_x) {
            return Err(RuntimeError::InvalidArgument(format!(
                "a clustered launch needs 1..=8 blocks a cluster dividing the grid: {grid_x} \
                 blocks in clusters of {cluster_x}"
            )));
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: zeroed is a valid bit pattern for this plain-data union.
        let mut cluster: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        cluster.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        cluster.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
            x: cluster_x,
            y: 1,
            z: 1,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: grid_x,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block_x,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut cluster,
            numAttrs: 1,
        };
        // SAFETY: the config and its attribute outlive the call; the caller vouches for args.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        Ok(())
    }

    /// Copies `bytes` bytes device-to-device, asynchronously on the compute stream.
    pub fn copy_d2d(
        &self,
        dst: DevPtr<u8>,
        src: DevPtr<u8>,
        bytes: usize,
    ) -> Result<(), RuntimeError> {
        self.profile_mark("copy (device to device)")?;
        self.ctx.bind_to_thread()?;
        // SAFETY: caller guarantees both ranges are device memory of `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst.addr, src.addr, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devptr_offset_and_cast() {
        let p = DevPtr::<u16>::new(1024);
        assert_eq!(p.offset(3).addr, 1030);
        assert_eq!(p.cast::<f32>().offset(2).addr, 1032);
        assert_eq!(DevPtr::<f32>::null().addr, 0);
        assert!(DevPtr::<f32>::null().is_null());
        assert!(!p.is_null() && !DevPtr::<u8>::new(1).is_null());
        assert_eq!(std::mem::size_of::<DevPtr<f64>>(), 8);
    }

    #[test]
    fn cubins_are_picked_by_compute_capability() {
        static M: PtxModule = PtxModule {
            name: "m",
            arch: "compute_80",
            ptx: "",
            cuda_source: "",
            cubins: &[("sm_80", b"a"), ("sm_90", b"h"), ("sm_90a", b"x")],
        };
        let pick = |cc| M.cubin_for(cc).map(|b| b[0]);
        assert_eq!(pick((8, 0)), Some(b'a'));
        assert_eq!(pick((8, 9)), Some(b'a'));
        assert_eq!(pick((9, 0)), Some(b'h'));
        assert_eq!(pick((7, 5)), None);
        assert_eq!(pick((10, 0)), None);
        static H: PtxModule = PtxModule {
            name: "h",
            arch: "compute_90a",
            ptx: "",
            cuda_source: "",
            cubins: &[("sm_90a", b"x")],
        };
        assert_eq!(H.cubin_for((9, 0)), Some(&b"x"[..]));
        assert_eq!(H.cubin_for((9, 1)), None);
    }

    #[test]
    fn open_without_gpu_is_one_line() {
        if let Err(e) = Gpu::open(0) {
            let line = e.to_string();
            assert!(!line.is_empty() && !line.contains('\n'), "{line}");
        }
    }
}
