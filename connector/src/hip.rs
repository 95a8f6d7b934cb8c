//! HIP transfers (feature `rocm`). The HIP runtime (`libamdhip64`) is loaded at run time, the
//! first time a worker asks for the `hip` backend: `libamdhip64.so`, then `.so.7`, `.so.6`,
//! `.so.5` (or the file `KVTIER_HIP_LIBRARY` names), so one wheel serves every ROCm engine
//! image and builds on machines without ROCm (ADR 0016). CI resolves every symbol against
//! Debian's HIP 5.2 runtime; it has not run on AMD silicon here (no AMD GPU is reachable from
//! these machines).
//!
//! Same shape as the CUDA backend: the pool mapping (read-only) and the staging mapping are
//! registered once (`hipHostRegister`, the pool with `hipHostRegisterReadOnly`); copies run on
//! two streams of the copier's own (loads, saves), each batch after an event recorded on the
//! engine's stream and ending with an event the engine's stream or the commit thread waits
//! on. ROCm 7.1 added `hipMemcpyBatchAsync`: it is used when the loaded runtime has it (with
//! no attributes: ROCm 7.2 refuses them), else one `hipMemcpyAsync` per copy.

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use crate::transfer::{Copy, Done, Regions, Signal, Transfer, TransferError};

/// A HIP stream or event handle.
type Handle = *mut c_void;

/// `hipError_t` (a C enum): 0 is success.
type HipError = i32;
const HIP_SUCCESS: HipError = 0;
const HIP_ERROR_NOT_READY: HipError = 600;
const HIP_ERROR_HOST_MEMORY_ALREADY_REGISTERED: HipError = 712;

/// Flags and kinds from `hip_runtime_api.h` and `driver_types.h` (stable since ROCm 5).
const HOST_REGISTER_PORTABLE: u32 = 0x1;
const HOST_REGISTER_READ_ONLY: u32 = 0x08;
const STREAM_NON_BLOCKING: u32 = 0x1;
const EVENT_DISABLE_TIMING: u32 = 0x2;
const MEMCPY_HOST_TO_DEVICE: i32 = 1;
const MEMCPY_DEVICE_TO_HOST: i32 = 2;

/// `hipMemcpyBatchAsync` (ROCm >= 7.1).
type BatchFn = unsafe extern "C" fn(
    dsts: *mut *mut c_void,
    srcs: *mut *mut c_void,
    sizes: *mut usize,
    count: usize,
    attrs: *mut c_void,
    attrs_idxs: *mut usize,
    num_attrs: usize,
    fail_idx: *mut usize,
    stream: Handle,
) -> HipError;

/// The sonames tried, in order, when `KVTIER_HIP_LIBRARY` is not set.
pub const LIBRARIES: [&str; 4] =
    ["libamdhip64.so", "libamdhip64.so.7", "libamdhip64.so.6", "libamdhip64.so.5"];

/// Declares the runtime's entry points the backend calls, resolved all at once.
macro_rules! hip_api {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// The HIP runtime's entry points, resolved from the loaded library.
        #[allow(non_snake_case)]
        pub struct Hip {
            _lib: libloading::Library,
            /// Where it was loaded from.
            pub path: String,
            batch: Option<BatchFn>,
            $($name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        /// Every entry point the backend needs (`hipMemcpyBatchAsync` is optional).
        pub const SYMBOLS: &[&str] = &[$(stringify!($name)),*];

        impl Hip {
            /// Resolves every entry point in `lib`.
            #[allow(unsafe_code, non_snake_case)]
            fn resolve(lib: libloading::Library, path: String) -> Result<Self, String> {
                // SAFETY: each symbol is declared with the signature hip_runtime_api.h gives
                // it; the library outlives the pointers (it is kept in the same struct).
                unsafe {
                    $(
                        let $name = *lib
                            .get::<unsafe extern "C" fn($($arg),*) -> $ret>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                            .map_err(|e| format!("{path} lacks {}: {e}", stringify!($name)))?;
                    )*
                    let batch = lib.get::<BatchFn>(b"hipMemcpyBatchAsync\0").ok().map(|f| *f);
                    Ok(Self { _lib: lib, path, batch, $($name,)* })
                }
            }
        }
    };
}

hip_api! {
    hipInit: fn(u32) -> HipError;
    hipSetDevice: fn(i32) -> HipError;
    hipGetErrorName: fn(HipError) -> *const c_char;
    hipHostRegister: fn(*mut c_void, usize, u32) -> HipError;
    hipHostUnregister: fn(*mut c_void) -> HipError;
    hipStreamCreateWithFlags: fn(*mut Handle, u32) -> HipError;
    hipStreamDestroy: fn(Handle) -> HipError;
    hipStreamSynchronize: fn(Handle) -> HipError;
    hipStreamWaitEvent: fn(Handle, Handle, u32) -> HipError;
    hipEventCreateWithFlags: fn(*mut Handle, u32) -> HipError;
    hipEventRecord: fn(Handle, Handle) -> HipError;
    hipEventSynchronize: fn(Handle) -> HipError;
    hipEventQuery: fn(Handle) -> HipError;
    hipEventDestroy: fn(Handle) -> HipError;
    hipMemcpyAsync: fn(*mut c_void, *const c_void, usize, i32, Handle) -> HipError;
}

impl std::fmt::Debug for Hip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hip")
            .field("path", &self.path)
            .field("batch", &self.batch.is_some())
            .finish_non_exhaustive()
    }
}

impl Hip {
    /// Loads the first of `candidates` that opens and resolves every entry point.
    ///
    /// # Errors
    /// What each candidate said, in one line.
    #[allow(unsafe_code)]
    pub fn load_from(candidates: &[&str]) -> Result<Self, String> {
        let mut why = Vec::new();
        for c in candidates {
            // SAFETY: loading the HIP runtime runs its initialisers, which have no
            // preconditions on the caller.
            match unsafe { libloading::Library::new(*c) } {
                Ok(lib) => match Self::resolve(lib, (*c).to_owned()) {
                    Ok(hip) => return Ok(hip),
                    Err(e) => why.push(e),
                },
                Err(e) => why.push(format!("{c}: {e}")),
            }
        }
        Err(format!("no usable HIP runtime (libamdhip64): {}", why.join("; ")))
    }

    /// Whether the runtime has `hipMemcpyBatchAsync` (ROCm >= 7.1).
    #[must_use]
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// The runtime's name for `e`.
    #[allow(unsafe_code)]
    fn name_of(&self, e: HipError) -> String {
        // SAFETY: hipGetErrorName returns a static string for any code (or null).
        let p = unsafe { (self.hipGetErrorName)(e) };
        if p.is_null() {
            format!("error {e}")
        } else {
            // SAFETY: a NUL-terminated static string from the runtime.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    fn check(&self, what: &str, r: HipError) -> Result<(), TransferError> {
        if r == HIP_SUCCESS {
            Ok(())
        } else {
            Err(TransferError::Runtime(format!("{what}: {}", self.name_of(r))))
        }
    }
}

/// The process's HIP runtime, loaded once: `KVTIER_HIP_LIBRARY` when set, else [`LIBRARIES`].
///
/// # Errors
/// Why none could be loaded (the same message every time).
pub fn runtime() -> Result<&'static Hip, TransferError> {
    static HIP: OnceLock<Result<Hip, String>> = OnceLock::new();
    HIP.get_or_init(|| match std::env::var("KVTIER_HIP_LIBRARY") {
        Ok(path) if !path.is_empty() => Hip::load_from(&[path.as_str()]),
        _ => Hip::load_from(&LIBRARIES),
    })
    .as_ref()
    .map_err(|e| TransferError::Runtime(e.clone()))
}

/// Registers `[ptr, ptr + len)` for DMA (a mapping already registered is fine); a read-only
/// mapping (the pool) with `hipHostRegisterReadOnly`.
///
/// # Safety
/// The range must be a live mapping.
#[allow(unsafe_code)]
unsafe fn register(
    hip: &Hip,
    ptr: *const u8,
    len: usize,
    read_only: bool,
) -> Result<(), TransferError> {
    let mut flags = HOST_REGISTER_PORTABLE;
    if read_only {
        flags |= HOST_REGISTER_READ_ONLY;
    }
    // SAFETY: the caller's contract.
    let r = unsafe { (hip.hipHostRegister)(ptr.cast_mut().cast::<c_void>(), len, flags) };
    if r == HIP_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
        return Ok(());
    }
    hip.check("hipHostRegister", r)
}

/// Registers both regions; on failure neither stays registered.
///
/// # Safety
/// As [`register`].
#[allow(unsafe_code)]
unsafe fn register_regions(hip: &Hip, r: Regions) -> Result<(), TransferError> {
    // SAFETY: the caller's contract.
    unsafe {
        register(hip, r.pool.0, r.pool.1, true)?;
        if let Err(e) = register(hip, r.staging.0, r.staging.1, false) {
            let _ = (hip.hipHostUnregister)(r.pool.0.cast_mut().cast());
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
unsafe fn unregister_regions(hip: &Hip, r: Regions) {
    // SAFETY: the caller's contract.
    unsafe {
        let _ = (hip.hipHostUnregister)(r.pool.0.cast_mut().cast());
        let _ = (hip.hipHostUnregister)(r.staging.0.cast());
    }
}

/// The end of one batch: a HIP event.
struct HipSignal {
    hip: &'static Hip,
    event: Handle,
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
        let hip = self.hip;
        // SAFETY: a live event of a live device.
        unsafe {
            hip.check("hipSetDevice", (hip.hipSetDevice)(self.device))?;
            hip.check("hipEventSynchronize", (hip.hipEventSynchronize)(self.event))
        }
    }

    fn is_done(&self) -> bool {
        // SAFETY: as in `wait`.
        unsafe { (self.hip.hipEventQuery)(self.event) != HIP_ERROR_NOT_READY }
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
            let _ = (self.hip.hipEventDestroy)(self.event);
        }
    }
}

/// Copies through the HIP runtime on the copier's streams, ordered against the engine's.
pub struct HipCopy {
    hip: &'static Hip,
    device: i32,
    /// The registered mappings.
    regions: Regions,
    engine: u64,
    loads: Handle,
    saves: Handle,
}

// SAFETY: the handles are runtime objects usable from any thread; the worker uses the copier
// from one thread at a time (it sits behind the worker's lock).
#[allow(unsafe_code)]
unsafe impl Send for HipCopy {}

impl std::fmt::Debug for HipCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HipCopy")
            .field("runtime", &self.hip.path)
            .field("device", &self.device)
            .field("engine", &self.engine)
            .field("batch", &self.hip.has_batch())
            .finish_non_exhaustive()
    }
}

#[allow(unsafe_code)]
impl HipCopy {
    /// Loads the runtime (once per process), uses device `ordinal`, registers the agent's
    /// `regions` for DMA and makes the copy streams.
    ///
    /// # Errors
    /// When no HIP runtime loads, it finds no device, or it refuses the registration.
    ///
    /// # Safety
    /// Both regions must be live mappings for as long as the copier runs.
    pub unsafe fn new(ordinal: i32, regions: Regions) -> Result<Self, TransferError> {
        let hip = runtime()?;
        // SAFETY: plain runtime calls with valid arguments.
        unsafe {
            hip.check("hipInit", (hip.hipInit)(0))?;
            hip.check("hipSetDevice", (hip.hipSetDevice)(ordinal))?;
            register_regions(hip, regions)?;
            let mut loads: Handle = std::ptr::null_mut();
            hip.check(
                "hipStreamCreateWithFlags",
                (hip.hipStreamCreateWithFlags)(&mut loads, STREAM_NON_BLOCKING),
            )?;
            let mut saves: Handle = std::ptr::null_mut();
            hip.check(
                "hipStreamCreateWithFlags",
                (hip.hipStreamCreateWithFlags)(&mut saves, STREAM_NON_BLOCKING),
            )?;
            Ok(Self { hip, device: ordinal, regions, engine: 0, loads, saves })
        }
    }

    fn event(&self) -> Result<Handle, TransferError> {
        let mut ev: Handle = std::ptr::null_mut();
        // SAFETY: a plain runtime call.
        let r = unsafe { (self.hip.hipEventCreateWithFlags)(&mut ev, EVENT_DISABLE_TIMING) };
        self.hip.check("hipEventCreateWithFlags", r)?;
        Ok(ev)
    }

    /// Queues `copies` on `stream`.
    ///
    /// # Safety
    /// Every address is a registered pool address or a device address of the engine's KV
    /// cache (the worker's contract), lengths within both.
    unsafe fn enqueue(
        &self,
        stream: Handle,
        copies: &[Copy],
        to_device: bool,
    ) -> Result<(), TransferError> {
        let hip = self.hip;
        // SAFETY: the caller's contract.
        unsafe {
            if let Some(batch) = hip.batch {
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
                if r != HIP_SUCCESS {
                    return Err(TransferError::Runtime(format!(
                        "hipMemcpyBatchAsync: {} at copy {fail}",
                        hip.name_of(r)
                    )));
                }
            } else {
                let kind = if to_device { MEMCPY_HOST_TO_DEVICE } else { MEMCPY_DEVICE_TO_HOST };
                for c in copies {
                    let (d, s) = c.ends(to_device);
                    let r = (hip.hipMemcpyAsync)(
                        d as *mut c_void,
                        s as *const c_void,
                        c.len,
                        kind,
                        stream,
                    );
                    hip.check("hipMemcpyAsync", r)?;
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
        let hip = self.hip;
        let side = if to_kv { self.loads } else { self.saves };
        let engine = self.engine as Handle;
        let ready = self.event()?;
        // SAFETY: live handles; the copies follow the worker's contract (see `enqueue`).
        unsafe {
            let queued = hip
                .check("hipEventRecord", (hip.hipEventRecord)(ready, engine))
                .and_then(|()| {
                    hip.check("hipStreamWaitEvent", (hip.hipStreamWaitEvent)(side, ready, 0))
                })
                .and_then(|()| self.enqueue(side, copies, to_kv));
            let _ = (hip.hipEventDestroy)(ready);
            if let Err(e) = queued {
                // Copies queued before the failure still run: let them finish before the
                // caller recomputes those blocks or hands the slots back.
                let _ = (hip.hipStreamSynchronize)(side);
                return Err(e);
            }
            let done = self.event()?;
            if let Err(e) = hip.check("hipEventRecord", (hip.hipEventRecord)(done, side)) {
                let _ = (hip.hipStreamSynchronize)(side);
                let _ = (hip.hipEventDestroy)(done);
                return Err(e);
            }
            Ok(Done::new(HipSignal { hip, event: done, device: self.device }))
        }
    }

    fn order_engine_after(&mut self, done: &Done) -> Result<(), TransferError> {
        let hip = self.hip;
        match done.event() {
            // SAFETY: a live event and the engine's stream.
            Some(ev) => hip.check("hipStreamWaitEvent", unsafe {
                (hip.hipStreamWaitEvent)(self.engine as Handle, ev as Handle, 0)
            }),
            None => done.wait(),
        }
    }

    fn set_stream(&mut self, stream: u64) {
        self.engine = stream;
    }

    unsafe fn attach(&mut self, regions: Regions) -> Result<(), TransferError> {
        let hip = self.hip;
        // SAFETY: the caller hands live mappings and no batch is in flight on the old ones.
        unsafe {
            hip.check("hipSetDevice", (hip.hipSetDevice)(self.device))?;
            register_regions(hip, regions)?;
            unregister_regions(hip, self.regions);
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
        let hip = self.hip;
        // SAFETY: our streams, released once their queued work is done; the pool mapping is
        // still mapped (the worker drops its copier before its connection).
        unsafe {
            let _ = (hip.hipStreamSynchronize)(self.loads);
            let _ = (hip.hipStreamSynchronize)(self.saves);
            let _ = (hip.hipStreamDestroy)(self.loads);
            let _ = (hip.hipStreamDestroy)(self.saves);
            unregister_regions(hip, self.regions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's `libamdhip64` (ROCm 5.2; `.ci/run` installs `libamdhip64-dev`).
    fn installed() -> Option<Hip> {
        Hip::load_from(&LIBRARIES).ok()
    }

    #[test]
    fn every_symbol_the_backend_uses_resolves_in_the_installed_runtime() {
        let Some(hip) = installed() else {
            panic!(
                "no libamdhip64 here: install Debian's libamdhip64-dev (.ci/run does) to check \
                 the HIP backend's symbols"
            )
        };
        // ROCm 5.2 has no hipMemcpyBatchAsync (7.1 added it): one copy at a time there.
        assert!(!hip.has_batch(), "{hip:?}");
        assert!(hip.path.starts_with("libamdhip64.so"), "{}", hip.path);
        assert_eq!(hip.name_of(HIP_ERROR_NOT_READY), "hipErrorNotReady");
        assert_eq!(
            hip.name_of(HIP_ERROR_HOST_MEMORY_ALREADY_REGISTERED),
            "hipErrorHostMemoryAlreadyRegistered"
        );
        assert_eq!(SYMBOLS.len(), 15, "{SYMBOLS:?}");
    }

    #[test]
    fn without_the_runtime_the_backend_says_why_in_one_line() {
        let e = Hip::load_from(&["/nonexistent/libamdhip64.so", "libamdhip64-missing.so.9"])
            .expect_err("nothing to load");
        assert!(e.starts_with("no usable HIP runtime (libamdhip64): "), "{e}");
        assert!(e.contains("/nonexistent/libamdhip64.so") && e.contains(".so.9"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // A library that is not HIP names the first entry point it lacks.
        let e = Hip::load_from(&["libc.so.6"]).expect_err("not HIP");
        assert!(e.contains("libc.so.6 lacks hipInit"), "{e}");
    }

    #[test]
    #[allow(unsafe_code)]
    fn without_a_device_the_runtime_says_so() {
        // The real runtime on a machine without an AMD GPU reports no device instead of
        // crashing.
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
