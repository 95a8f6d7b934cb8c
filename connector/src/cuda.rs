//! CUDA transfers (feature `cuda`). The driver library is loaded at run time (cudarc's
//! dynamic loading), so one build serves CPU-only machines, where [`CudaCopy::new`] says no
//! driver is present, and NVIDIA nodes.
//!
//! The pool mapping (read-only: the agent sealed it) and the staging mapping are registered
//! once (`cuMemHostRegister`, the pool with `CU_MEMHOSTREGISTER_READ_ONLY`), so loads are DMA
//! from the pool and saves DMA into the staging area, with no bounce buffer. Copies run on two streams of the copier's own, one per
//! direction, so loads and saves share no queue with each other or with the engine's
//! kernels. Each batch starts after the engine's work queued so far (an event recorded on the
//! engine's stream) and ends with an event of its own, which the engine's stream waits on
//! (a layer's loads before its attention) or the commit thread waits for (a save before its
//! chunks are committed). With CUDA 12.8 and later, a batch's copies go in one
//! `cuMemcpyBatchAsync`; otherwise one `cuMemcpyAsync` each.

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::transfer::{Copy, Done, Regions, Signal, Transfer, TransferError};

fn check(what: &str, r: sys::CUresult) -> Result<(), TransferError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(TransferError::Runtime(format!("{what}: {r:?}")))
    }
}

/// Registers `[ptr, ptr + len)` for DMA (a mapping already registered is fine); a read-only
/// mapping (the pool) with `CU_MEMHOSTREGISTER_READ_ONLY`, which the driver needs for memory
/// the CPU maps read-only.
///
/// # Safety
/// The range must be a live mapping; a context must be current.
#[allow(unsafe_code)]
unsafe fn register(ptr: *const u8, len: usize, read_only: bool) -> Result<(), TransferError> {
    let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
    if read_only {
        flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
    }
    // SAFETY: the caller's contract.
    let r = unsafe { sys::cuMemHostRegister_v2(ptr.cast_mut().cast::<c_void>(), len, flags) };
    if r == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
        return Ok(());
    }
    if read_only && r == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED {
        return Err(TransferError::Runtime(
            "cuMemHostRegister: this device cannot register read-only host memory \
             (CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED is 0), which loading from \
             the node-agent's sealed pool needs (ADR 0014)"
                .into(),
        ));
    }
    check("cuMemHostRegister", r)
}

/// Registers both regions; on failure neither stays registered.
///
/// # Safety
/// As [`register`].
#[allow(unsafe_code)]
unsafe fn register_regions(r: Regions) -> Result<(), TransferError> {
    // SAFETY: the caller's contract.
    unsafe {
        register(r.pool.0, r.pool.1, true)?;
        if let Err(e) = register(r.staging.0, r.staging.1, false) {
            let _ = sys::cuMemHostUnregister(r.pool.0.cast_mut().cast());
            return Err(e);
        }
    }
    Ok(())
}

/// Releases both regions' registrations.
///
/// # Safety
/// Both must still be mapped, and no batch in flight on them.
#[allow(unsafe_code)]
unsafe fn unregister_regions(r: Regions) {
    // SAFETY: the caller's contract.
    unsafe {
        let _ = sys::cuMemHostUnregister(r.pool.0.cast_mut().cast());
        let _ = sys::cuMemHostUnregister(r.staging.0.cast());
    }
}

/// The end of one batch: a CUDA event.
struct CudaSignal {
    event: sys::CUevent,
    ctx: sys::CUcontext,
}

// SAFETY: driver handles may be used from any thread once the context is current there, which
// `wait` makes it; the event is only destroyed on drop, when no clone of its `Done` is left.
#[allow(unsafe_code)]
unsafe impl Send for CudaSignal {}
// SAFETY: as above; the driver synchronises its own calls on one event.
#[allow(unsafe_code)]
unsafe impl Sync for CudaSignal {}

#[allow(unsafe_code)]
impl Signal for CudaSignal {
    fn wait(&self) -> Result<(), TransferError> {
        // SAFETY: the context and the event are live (the engine keeps its primary context for
        // the life of the process; the event lives as long as `self`).
        unsafe {
            check("cuCtxSetCurrent", sys::cuCtxSetCurrent(self.ctx))?;
            check("cuEventSynchronize", sys::cuEventSynchronize(self.event))
        }
    }

    fn is_done(&self) -> bool {
        // SAFETY: as in `wait`; querying needs no current context.
        unsafe { sys::cuEventQuery(self.event) != sys::CUresult::CUDA_ERROR_NOT_READY }
    }

    fn event(&self) -> Option<u64> {
        Some(self.event as u64)
    }
}

#[allow(unsafe_code)]
impl Drop for CudaSignal {
    fn drop(&mut self) {
        // SAFETY: the event is ours; destroying it while recorded work is pending is allowed
        // (the driver frees it once the work is done).
        unsafe {
            let _ = sys::cuEventDestroy_v2(self.event);
        }
    }
}

/// Copies through the CUDA driver on the copier's streams, ordered against the engine's.
#[derive(Debug)]
pub struct CudaCopy {
    ctx: sys::CUcontext,
    /// The registered mappings.
    regions: Regions,
    engine: u64,
    loads: sys::CUstream,
    saves: sys::CUstream,
    batch: bool,
}

// SAFETY: the handles are driver objects usable from any thread with the context current; the
// worker uses the copier from one thread at a time (it sits behind the worker's lock).
#[allow(unsafe_code)]
unsafe impl Send for CudaCopy {}

#[allow(unsafe_code)]
impl CudaCopy {
    /// Attaches to device `ordinal` (the engine's context when it has one), registers the
    /// agent's `regions` for DMA and makes the copy streams.
    ///
    /// # Errors
    /// When no CUDA driver is installed, or the driver refuses.
    ///
    /// # Safety
    /// Both regions must be live mappings for as long as the copier runs.
    pub unsafe fn new(ordinal: i32, regions: Regions) -> Result<Self, TransferError> {
        // SAFETY: probing only opens the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(TransferError::Runtime("no CUDA driver (libcuda) on this node".into()));
        }
        // SAFETY: plain driver calls with valid arguments; the context is the engine's own
        // primary context, which it keeps for the life of the process.
        unsafe {
            check("cuInit", sys::cuInit(0))?;
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            check("cuCtxGetCurrent", sys::cuCtxGetCurrent(&mut ctx))?;
            if ctx.is_null() {
                let mut dev: sys::CUdevice = 0;
                check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal))?;
                check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
                check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx))?;
            }
            register_regions(regions)?;
            let flags = sys::CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32;
            let mut loads: sys::CUstream = std::ptr::null_mut();
            check("cuStreamCreate", sys::cuStreamCreate(&mut loads, flags))?;
            let mut saves: sys::CUstream = std::ptr::null_mut();
            check("cuStreamCreate", sys::cuStreamCreate(&mut saves, flags))?;
            let batch = sys::culib().get::<*const c_void>(b"cuMemcpyBatchAsync\0").is_ok();
            Ok(Self { ctx, regions, engine: 0, loads, saves, batch })
        }
    }

    /// Whether copies go as one batch.
    #[must_use]
    pub fn batched(&self) -> bool {
        self.batch
    }

    fn event(&self) -> Result<sys::CUevent, TransferError> {
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: a plain driver call; the context is current on this thread (set in `new`,
        // and the engine's thread keeps it).
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut ev, flags) })?;
        Ok(ev)
    }

    /// Queues `copies` on `stream`.
    ///
    /// # Safety
    /// Every address is a registered pool address or a device address of the engine's KV
    /// cache (the worker's contract), lengths within both.
    unsafe fn enqueue(
        &self,
        stream: sys::CUstream,
        copies: &[Copy],
        to_device: bool,
    ) -> Result<(), TransferError> {
        // SAFETY: the caller's contract.
        unsafe {
            if self.batch {
                let (mut dst, mut src): (Vec<u64>, Vec<u64>) =
                    copies.iter().map(|c| c.ends(to_device)).unzip();
                let mut sizes: Vec<usize> = copies.iter().map(|c| c.len).collect();
                let mut attrs: sys::CUmemcpyAttributes = std::mem::zeroed();
                attrs.srcAccessOrder =
                    sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
                let mut idx = [0usize];
                let mut fail = usize::MAX;
                check(
                    "cuMemcpyBatchAsync",
                    sys::cuMemcpyBatchAsync(
                        dst.as_mut_ptr(),
                        src.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        copies.len(),
                        &mut attrs,
                        idx.as_mut_ptr(),
                        1,
                        &mut fail,
                        stream,
                    ),
                )
            } else {
                for c in copies {
                    if to_device {
                        check(
                            "cuMemcpyHtoDAsync",
                            sys::cuMemcpyHtoDAsync_v2(c.kv, c.pool as *const c_void, c.len, stream),
                        )?;
                    } else {
                        check(
                            "cuMemcpyDtoHAsync",
                            sys::cuMemcpyDtoHAsync_v2(c.pool as *mut c_void, c.kv, c.len, stream),
                        )?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[allow(unsafe_code)]
impl Transfer for CudaCopy {
    fn submit(&mut self, copies: &[Copy], to_kv: bool) -> Result<Done, TransferError> {
        if copies.is_empty() {
            return Ok(Done::ready());
        }
        let side = if to_kv { self.loads } else { self.saves };
        let engine = self.engine as sys::CUstream;
        let ready = self.event()?;
        // SAFETY: live handles; the copies follow the worker's contract (see `enqueue`).
        unsafe {
            let queued = check("cuEventRecord", sys::cuEventRecord(ready, engine))
                .and_then(|()| check("cuStreamWaitEvent", sys::cuStreamWaitEvent(side, ready, 0)))
                .and_then(|()| self.enqueue(side, copies, to_kv));
            let _ = sys::cuEventDestroy_v2(ready);
            if let Err(e) = queued {
                // Copies queued before the failure still run: let them finish before the
                // caller recomputes those blocks or hands the slots back.
                let _ = sys::cuStreamSynchronize(side);
                return Err(e);
            }
            let done = self.event()?;
            if let Err(e) = check("cuEventRecord", sys::cuEventRecord(done, side)) {
                let _ = sys::cuStreamSynchronize(side);
                let _ = sys::cuEventDestroy_v2(done);
                return Err(e);
            }
            Ok(Done::new(CudaSignal { event: done, ctx: self.ctx }))
        }
    }

    fn order_engine_after(&mut self, done: &Done) -> Result<(), TransferError> {
        match done.event() {
            // SAFETY: a live event of this context and the engine's stream.
            Some(ev) => check("cuStreamWaitEvent", unsafe {
                sys::cuStreamWaitEvent(self.engine as sys::CUstream, ev as sys::CUevent, 0)
            }),
            None => done.wait(),
        }
    }

    fn set_stream(&mut self, stream: u64) {
        self.engine = stream;
    }

    unsafe fn attach(&mut self, regions: Regions) -> Result<(), TransferError> {
        // SAFETY: the caller hands live mappings and no batch is in flight on the old ones;
        // the engine's context is made current first.
        unsafe {
            check("cuCtxSetCurrent", sys::cuCtxSetCurrent(self.ctx))?;
            register_regions(regions)?;
            unregister_regions(self.regions);
        }
        self.regions = regions;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
}

#[allow(unsafe_code)]
impl Drop for CudaCopy {
    fn drop(&mut self) {
        // SAFETY: our streams, released once their queued work is done; the mappings are
        // still mapped (the worker drops its copier before its connection).
        unsafe {
            let _ = sys::cuStreamSynchronize(self.loads);
            let _ = sys::cuStreamSynchronize(self.saves);
            let _ = sys::cuStreamDestroy_v2(self.loads);
            let _ = sys::cuStreamDestroy_v2(self.saves);
            unregister_regions(self.regions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn without_a_driver_it_says_so() {
        // SAFETY: the probe does not touch the regions when no driver is present; on a machine
        // with one, two 4 KiB heap buffers are registered and live to the end of the test.
        let pool = vec![0u8; 4096];
        let mut staging = vec![0u8; 4096];
        let regions = Regions {
            pool: (pool.as_ptr(), pool.len()),
            staging: (staging.as_mut_ptr(), staging.len()),
        };
        match unsafe { CudaCopy::new(0, regions) } {
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
            Ok(c) => assert_eq!(c.name(), "cuda"),
        }
    }
}
