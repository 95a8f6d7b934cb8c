//! Locks that outlive a panicking holder: the simulator's state stays usable (its figures are
//! plain counters, never left half-updated in a way later readers could trip on).

use std::sync::{Mutex, MutexGuard};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
