//! HIP transfers (feature `rocm`), linked against the HIP runtime (`libamdhip64`) through the
//! `hip-sys` bindings. Built and linked in CI against Debian's HIP 5.2 packages; it has not
//! run on AMD silicon here (no AMD GPU is reachable from these machines).
//!
//! Same shape as the CUDA backend: the pool mapping (read-only) and the staging mapping are
//! registered once (`hipHostRegister`, the pool with `hipHostRegisterReadOnly`, which the 5.x
//! bindings lack and this module declares);
//! copies run on two streams of the copier's own (loads, saves), each batch after an event
//! recorded on the engine's stream and ending with an event the engine's stream or the commit
//! thread waits on. ROCm 7.1 added `hipMemcpyBatchAsync`, which the 5.x bindings lack: it is
//! looked up at run time in the loaded runtime and used when present (with no attributes:
//! ROCm 7.2 refuses them), else one `hipMemcpyAsync` per copy.

use std::ffi::c_void;

use hip_sys::hiprt;

use crate::transfer::{Copy, Done, Regions, Signal, Transfer, TransferError};

/// `hipMemcpyBatchAsync` (ROCm >= 7.1), declared by hand; the error code is read as a plain
/// integer so a code the 5.x bindings do not know cannot be misread.
type BatchFn = unsafe extern "C" fn(
    dsts: *mut *mut c_void,
    srcs: *mut *mut c_void,
    sizes: *mut usize,
    count: usize,
    attrs: *mut c_void,
    attrs_idxs: *mut usize,
    num_attrs: usize,
    fail_idx: *mut usize,
    stream: hiprt::hipStream_t,
) -> i32;

fn check(what: &str, r: hiprt::hipError_t) -> Result<(), TransferError> {
    if r == hiprt::hipError_t::hipSuccess {
        Ok(())
    } else {
        Err(TransferError::Runtime(format!("{what}: {r:?}")))
    }
}

/// `hipHostRegisterReadOnly` (hip_runtime_api.h; the 5.x bindings do not have it).
const HOST_REGISTER_READ_ONLY: u32 = 0x08;

/// Registers `[ptr, ptr + len)` for DMA (a mapping already registered is fine); a read-only
/// mapping (the pool) with `hipHostRegisterReadOnly`.
///
/// # Safety
/// The range must be a live mapping.
#[allow(unsafe_code)]
unsafe fn register(ptr: *const u8, len: usize, read_only: bool) -> Result<(), TransferError> {
    let mut flags = hiprt::hipHostRegisterPortable;
    if read_only {
        flags |= HOST_REGISTER_READ_ONLY;
    }
    // SAFETY: the caller's contract.
    let r = unsafe { hiprt::hipHostRegister(ptr.cast_mut().cast::<c_void>(), len, flags) };
    if r == hiprt::hipError_t::hipErrorHostMemoryAlreadyRegistered {
        return Ok(());
    }
    check("hipHostRegister", r)
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
            let _ = hiprt::hipHostUnregister(r.pool.0.cast_mut().cast());
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
        let _ = hiprt::hipHostUnregister(r.pool.0.cast_mut().cast());
        let _ = hiprt::hipHostUnregister(r.staging.0.cast());
    }
}

/// The end of one batch: a HIP event.
struct HipSignal {
    event: hiprt::hipEvent_t,
    device: i32,
}

// SAFETY: runtime handles may be used from any thread once the device is set there, which
// `wait` does; the event is only destroyed on drop, when no clone of its `Done` is left.
#[allow(unsafe_code)]
unsafe impl Send for HipSignal {}
// SAFETY: as above; the runtime synchronises its own calls on one event.
#[allow(unsafe_code)]
unsafe impl Sync for HipSignal {}

#[allow(unsafe_code)]
impl Signal for HipSignal {
    fn wait(&self) -> Result<(), TransferError> {
        // SAFETY: a live event of a live device.
        unsafe {
            check("hipSetDevice", hiprt::hipSetDevice(self.device))?;
            check("hipEventSynchronize", hiprt::hipEventSynchronize(self.event))
        }
    }

    fn is_done(&self) -> bool {
        // SAFETY: as in `wait`.
        unsafe { hiprt::hipEventQuery(self.event) != hiprt::hipError_t::hipErrorNotReady }
    }

    fn event(&self) -> Option<u64> {
        Some(self.event as u64)
    }
}

#[allow(unsafe_code)]
impl Drop for HipSignal {
    fn drop(&mut self) {
        // SAFETY: the event is ours; the runtime frees it once recorded work is done.
        unsafe {
            let _ = hiprt::hipEventDestroy(self.event);
        }
    }
}

/// Copies through the HIP runtime on the copier's streams, ordered against the engine's.
pub struct HipCopy {
    device: i32,
    /// The registered mappings.
    regions: Regions,
    engine: u64,
    loads: hiprt::hipStream_t,
    saves: hiprt::hipStream_t,
    batch: Option<(libloading::Library, BatchFn)>,
}

// SAFETY: the handles are runtime objects usable from any thread; the worker uses the copier
// from one thread at a time (it sits behind the worker's lock).
#[allow(unsafe_code)]
unsafe impl Send for HipCopy {}

impl std::fmt::Debug for HipCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HipCopy")
            .field("device", &self.device)
            .field("engine", &self.engine)
            .field("batch", &self.batch.is_some())
            .finish_non_exhaustive()
    }
}

#[allow(unsafe_code)]
impl HipCopy {
    /// Uses device `ordinal`, registers the agent's `regions` for DMA and makes the copy
    /// streams.
    ///
    /// # Errors
    /// When the runtime finds no device or refuses the registration.
    ///
    /// # Safety
    /// Both regions must be live mappings for as long as the copier runs.
    pub unsafe fn new(ordinal: i32, regions: Regions) -> Result<Self, TransferError> {
        // SAFETY: plain runtime calls with valid arguments.
        unsafe {
            check("hipInit", hiprt::hipInit(0))?;
            check("hipSetDevice", hiprt::hipSetDevice(ordinal))?;
            register_regions(regions)?;
            let mut loads: hiprt::hipStream_t = std::ptr::null_mut();
            check(
                "hipStreamCreateWithFlags",
                hiprt::hipStreamCreateWithFlags(&mut loads, hiprt::hipStreamNonBlocking),
            )?;
            let mut saves: hiprt::hipStream_t = std::ptr::null_mut();
            check(
                "hipStreamCreateWithFlags",
                hiprt::hipStreamCreateWithFlags(&mut saves, hiprt::hipStreamNonBlocking),
            )?;
            // The library is already loaded (linked); this only finds the newer entry point.
            let batch = libloading::Library::new("libamdhip64.so").ok().and_then(|lib| {
                let f = *lib.get::<BatchFn>(b"hipMemcpyBatchAsync\0").ok()?;
                Some((lib, f))
            });
            Ok(Self { device: ordinal, regions, engine: 0, loads, saves, batch })
        }
    }

    fn event() -> Result<hiprt::hipEvent_t, TransferError> {
        let mut ev: hiprt::hipEvent_t = std::ptr::null_mut();
        // SAFETY: a plain runtime call.
        check("hipEventCreateWithFlags", unsafe {
            hiprt::hipEventCreateWithFlags(&mut ev, hiprt::hipEventDisableTiming)
        })?;
        Ok(ev)
    }

    /// Queues `copies` on `stream`.
    ///
    /// # Safety
    /// Every address is a registered pool address or a device address of the engine's KV
    /// cache (the worker's contract), lengths within both.
    unsafe fn enqueue(
        &self,
        stream: hiprt::hipStream_t,
        copies: &[Copy],
        to_device: bool,
    ) -> Result<(), TransferError> {
        // SAFETY: the caller's contract.
        unsafe {
            if let Some((_, batch)) = &self.batch {
                let (mut dst, mut src): (Vec<*mut c_void>, Vec<*mut c_void>) = copies
                    .iter()
                    .map(|c| {
                        let (d, s) = c.ends(to_device);
                        (d as *mut c_void, s as *mut c_void)
                    })
                    .unzip();
                let mut sizes: Vec<usize> = copies.iter().map(|c| c.len).collect();
                let mut fail = usize::MAX;
                let r = batch(
                    dst.as_mut_ptr(),
                    src.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    copies.len(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    0,
                    &mut fail,
                    stream,
                );
                if r != 0 {
                    return Err(TransferError::Runtime(format!(
                        "hipMemcpyBatchAsync: error {r} at copy {fail}"
                    )));
                }
            } else {
                let kind = if to_device {
                    hiprt::hipMemcpyKind::hipMemcpyHostToDevice
                } else {
                    hiprt::hipMemcpyKind::hipMemcpyDeviceToHost
                };
                for c in copies {
                    let (d, s) = c.ends(to_device);
                    check(
                        "hipMemcpyAsync",
                        hiprt::hipMemcpyAsync(
                            d as *mut c_void,
                            s as *const c_void,
                            c.len,
                            kind,
                            stream,
                        ),
                    )?;
                }
            }
            Ok(())
        }
    }
}

#[allow(unsafe_code)]
impl Transfer for HipCopy {
    fn submit(&mut self, copies: &[Copy], to_kv: bool) -> Result<Done, TransferError> {
        if copies.is_empty() {
            return Ok(Done::ready());
        }
        let side = if to_kv { self.loads } else { self.saves };
        let engine = self.engine as hiprt::hipStream_t;
        let ready = Self::event()?;
        // SAFETY: live handles; the copies follow the worker's contract (see `enqueue`).
        unsafe {
            let queued = check("hipEventRecord", hiprt::hipEventRecord(ready, engine))
                .and_then(|()| {
                    check("hipStreamWaitEvent", hiprt::hipStreamWaitEvent(side, ready, 0))
                })
                .and_then(|()| self.enqueue(side, copies, to_kv));
            let _ = hiprt::hipEventDestroy(ready);
            if let Err(e) = queued {
                // Copies queued before the failure still run: let them finish before the
                // caller recomputes those blocks or hands the slots back.
                let _ = hiprt::hipStreamSynchronize(side);
                return Err(e);
            }
            let done = Self::event()?;
            if let Err(e) = check("hipEventRecord", hiprt::hipEventRecord(done, side)) {
                let _ = hiprt::hipStreamSynchronize(side);
                let _ = hiprt::hipEventDestroy(done);
                return Err(e);
            }
            Ok(Done::new(HipSignal { event: done, device: self.device }))
        }
    }

    fn order_engine_after(&mut self, done: &Done) -> Result<(), TransferError> {
        match done.event() {
            // SAFETY: a live event and the engine's stream.
            Some(ev) => check("hipStreamWaitEvent", unsafe {
                hiprt::hipStreamWaitEvent(
                    self.engine as hiprt::hipStream_t,
                    ev as hiprt::hipEvent_t,
                    0,
                )
            }),
            None => done.wait(),
        }
    }

    fn set_stream(&mut self, stream: u64) {
        self.engine = stream;
    }

    unsafe fn attach(&mut self, regions: Regions) -> Result<(), TransferError> {
        // SAFETY: the caller hands live mappings and no batch is in flight on the old ones.
        unsafe {
            check("hipSetDevice", hiprt::hipSetDevice(self.device))?;
            register_regions(regions)?;
            unregister_regions(self.regions);
        }
        self.regions = regions;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "hip"
    }
}

#[allow(unsafe_code)]
impl Drop for HipCopy {
    fn drop(&mut self) {
        // SAFETY: our streams, released once their queued work is done; the pool mapping is
        // still mapped (the worker drops its copier before its connection).
        unsafe {
            let _ = hiprt::hipStreamSynchronize(self.loads);
            let _ = hiprt::hipStreamSynchronize(self.saves);
            let _ = hiprt::hipStreamDestroy(self.loads);
            let _ = hiprt::hipStreamDestroy(self.saves);
            unregister_regions(self.regions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn without_a_device_the_runtime_says_so() {
        // Linked against the real runtime; on a machine without an AMD GPU it reports no
        // device instead of crashing.
        let pool = vec![0u8; 4096];
        let mut staging = vec![0u8; 4096];
        let regions = Regions {
            pool: (pool.as_ptr(), pool.len()),
            staging: (staging.as_mut_ptr(), staging.len()),
        };
        // SAFETY: both buffers outlive the copier.
        match unsafe { HipCopy::new(0, regions) } {
            Err(e) => assert!(e.to_string().starts_with("hip"), "{e}"),
            Ok(c) => assert_eq!(c.name(), "hip"),
        }
    }
}
