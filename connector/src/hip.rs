//! HIP transfers (feature `rocm`), linked against the HIP runtime (`libamdhip64`) through the
//! `hip-sys` bindings. Built and linked in CI against Debian's HIP 5.2 packages; it has not
//! run on AMD silicon here (no AMD GPU is reachable from these machines).
//!
//! Same shape as the CUDA backend: the pool mapping is registered once (`hipHostRegister`),
//! copies run on the engine's current stream and are waited for before returning. ROCm 7.1
//! added `hipMemcpyBatchAsync`, which the 5.x bindings lack: it is looked up at run time in the
//! loaded runtime and used when present (with no attributes: ROCm 7.2 refuses them), else one
//! `hipMemcpyAsync` per copy.

use std::ffi::c_void;

use hip_sys::hiprt;

use crate::transfer::{Copy, Transfer, TransferError};

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

/// Copies through the HIP runtime on the engine's stream.
pub struct HipCopy {
    stream: u64,
    batch: Option<(libloading::Library, BatchFn)>,
}

impl std::fmt::Debug for HipCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HipCopy")
            .field("stream", &self.stream)
            .field("batch", &self.batch.is_some())
            .finish()
    }
}

#[allow(unsafe_code)]
impl HipCopy {
    /// Uses device `ordinal` and registers the pool mapping `[pool, pool + len)` for DMA.
    ///
    /// # Errors
    /// When the runtime finds no device or refuses the registration.
    ///
    /// # Safety
    /// `[pool, pool + len)` must be a live mapping for as long as the copier runs.
    pub unsafe fn new(ordinal: i32, pool: *mut u8, len: usize) -> Result<Self, TransferError> {
        // SAFETY: plain runtime calls with valid arguments.
        unsafe {
            check("hipInit", hiprt::hipInit(0))?;
            check("hipSetDevice", hiprt::hipSetDevice(ordinal))?;
            let r =
                hiprt::hipHostRegister(pool.cast::<c_void>(), len, hiprt::hipHostRegisterPortable);
            if r != hiprt::hipError_t::hipErrorHostMemoryAlreadyRegistered {
                check("hipHostRegister", r)?;
            }
            // The library is already loaded (linked); this only finds the newer entry point.
            let batch = libloading::Library::new("libamdhip64.so").ok().and_then(|lib| {
                let f = *lib.get::<BatchFn>(b"hipMemcpyBatchAsync\0").ok()?;
                Some((lib, f))
            });
            Ok(Self { stream: 0, batch })
        }
    }

    fn run(&mut self, copies: &[Copy], to_device: bool) -> Result<(), TransferError> {
        if copies.is_empty() {
            return Ok(());
        }
        let stream = self.stream as hiprt::hipStream_t;
        // SAFETY: every address is a registered pool address or a device address of the
        // engine's KV cache (the worker's contract), lengths within both.
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
            check("hipStreamSynchronize", hiprt::hipStreamSynchronize(stream))
        }
    }
}

impl Transfer for HipCopy {
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
        "hip"
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
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` outlives the copier.
        match unsafe { HipCopy::new(0, buf.as_mut_ptr(), buf.len()) } {
            Err(e) => assert!(e.to_string().starts_with("hip"), "{e}"),
            Ok(c) => assert_eq!(c.name(), "hip"),
        }
    }
}
