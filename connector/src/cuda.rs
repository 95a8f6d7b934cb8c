//! CUDA transfers (feature `cuda`). The driver library is loaded at run time (cudarc's
//! dynamic loading), so one build serves CPU-only machines, where [`CudaCopy::new`] says no
//! driver is present, and NVIDIA nodes.
//!
//! The pool mapping is registered once (`cuMemHostRegister`), so copies are DMA between HBM
//! and the pool with no bounce buffer. Copies run on the engine's current stream, so a load
//! lands before the forward pass that reads it and a save reads what the forward pass wrote;
//! both wait for the stream before returning (a save is committed to the agent only once its
//! bytes are in the pool). With CUDA 12.8 and later, a plan's copies go in one
//! `cuMemcpyBatchAsync`; otherwise one `cuMemcpyAsync` each.

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::transfer::{Copy, Transfer, TransferError};

fn check(what: &str, r: sys::CUresult) -> Result<(), TransferError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(TransferError::Runtime(format!("{what}: {r:?}")))
    }
}

/// Copies through the CUDA driver on the engine's stream.
#[derive(Debug)]
pub struct CudaCopy {
    stream: u64,
    batch: bool,
}

#[allow(unsafe_code)]
impl CudaCopy {
    /// Attaches to device `ordinal` (the engine's context when it has one) and registers the
    /// pool mapping `[pool, pool + len)` for DMA.
    ///
    /// # Errors
    /// When no CUDA driver is installed, or the driver refuses.
    ///
    /// # Safety
    /// `[pool, pool + len)` must be a live mapping for as long as the copier runs.
    pub unsafe fn new(ordinal: i32, pool: *mut u8, len: usize) -> Result<Self, TransferError> {
        // SAFETY: probing only opens the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(TransferError::Runtime("no CUDA driver (libcuda) on this node".into()));
        }
        // SAFETY: plain driver calls with valid arguments; the context is the engine's own
        // primary context, which it keeps for the life of the process.
        unsafe {
            check("cuInit", sys::cuInit(0))?;
            let mut current: sys::CUcontext = std::ptr::null_mut();
            check("cuCtxGetCurrent", sys::cuCtxGetCurrent(&mut current))?;
            if current.is_null() {
                let mut dev: sys::CUdevice = 0;
                check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal))?;
                let mut ctx: sys::CUcontext = std::ptr::null_mut();
                check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
                check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx))?;
            }
            let r = sys::cuMemHostRegister_v2(
                pool.cast::<c_void>(),
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            );
            if r != sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
                check("cuMemHostRegister", r)?;
            }
            let batch = sys::culib().get::<*const c_void>(b"cuMemcpyBatchAsync\0").is_ok();
            Ok(Self { stream: 0, batch })
        }
    }

    /// Whether copies go as one batch.
    #[must_use]
    pub fn batched(&self) -> bool {
        self.batch
    }

    fn run(&mut self, copies: &[Copy], to_device: bool) -> Result<(), TransferError> {
        if copies.is_empty() {
            return Ok(());
        }
        let stream = self.stream as sys::CUstream;
        // SAFETY: every address is a registered pool address or a device address of the
        // engine's KV cache (the worker's contract), lengths within both.
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
                )?;
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
            }
            check("cuStreamSynchronize", sys::cuStreamSynchronize(stream))
        }
    }
}

impl Transfer for CudaCopy {
    fn load(&mut self, copies: &[Copy]) -> Result<(), TransferError> {
        self.run(copies, true)
    }

    fn save(&mut self, copies: &[Copy]) -> Result<(), TransferError> {
        self.run(copies, false)
    }

    fn set_stream(&mut self, stream: u64) {
        self.stream = stream;
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn without_a_driver_it_says_so() {
        // SAFETY: the probe does not touch `pool` when no driver is present; on a machine with
        // one, a 4 KiB heap buffer is registered and lives to the end of the test.
        let mut buf = vec![0u8; 4096];
        match unsafe { CudaCopy::new(0, buf.as_mut_ptr(), buf.len()) } {
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
            Ok(c) => assert_eq!(c.name(), "cuda"),
        }
    }
}
