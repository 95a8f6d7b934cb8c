//! Simulated time against real time.

use std::time::{Duration, Instant};

/// Maps simulated seconds to real time: `scale` simulated seconds pass per real second.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    origin: Instant,
    scale: f64,
}

impl SimClock {
    /// A clock at simulated time 0 now.
    #[must_use]
    pub fn new(scale: f64) -> Self {
        Self { origin: Instant::now(), scale }
    }

    /// Current simulated time.
    #[must_use]
    pub fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.scale
    }

    /// The real instant of simulated time `t`.
    #[must_use]
    pub fn instant(&self, t: f64) -> Instant {
        self.origin + Duration::from_secs_f64((t / self.scale).max(0.0))
    }

    /// Simulated seconds per real second.
    #[must_use]
    pub fn scale(&self) -> f64 {
        self.scale
    }
}
