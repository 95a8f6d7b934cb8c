//! The task that runs the engine against the clock and tells each request's handler what
//! happened to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::warn;

use crate::clock::SimClock;
use crate::engine::{Counters, Engine, Event, Gauges, Submission};
use crate::sync::lock;

/// Output is sent to clients at most this often per request (real time), so a fast time
/// scale does not turn into one network write per simulated token.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Steps closer than this (real time) to the clock are run without sleeping.
const SLEEP_SLACK: Duration = Duration::from_micros(500);

/// What the engine task publishes for `/metrics` and for callers in the same process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Simulated time of the engine.
    pub time: f64,
    /// How far the engine ran behind the clock at worst, in simulated seconds (a machine
    /// too slow for the time scale shows here).
    pub max_lag: f64,
    /// Running totals.
    pub counters: Counters,
    /// Point-in-time figures.
    pub gauges: Gauges,
    /// Share of HBM blocks in use.
    pub kv_usage: f64,
}

/// What a request handler tells the engine task.
#[derive(Debug)]
pub(crate) enum Msg {
    Submit(Submission, mpsc::UnboundedSender<Update>),
    Abort(u64),
}

/// What the engine tells a request's handler.
#[derive(Debug)]
pub(crate) enum Update {
    First { cached: u64 },
    Tokens(u32),
    Done,
}

/// A request's delivery state in the driver.
#[derive(Debug)]
struct Slot {
    tx: mpsc::UnboundedSender<Update>,
    pending: u32,
    last_flush: Instant,
}

/// Runs the engine against the clock: a step that ends in the simulated future is waited
/// for, then its events are delivered; requests that arrive meanwhile join at the next step.
pub(crate) async fn drive(
    mut engine: Engine,
    clock: SimClock,
    snapshot: Arc<Mutex<Snapshot>>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let mut slots: HashMap<u64, Slot> = HashMap::new();
    let mut max_lag = 0.0f64;
    let mut last_publish = Instant::now();
    let publish = |engine: &Engine, max_lag: f64| {
        *lock(&snapshot) = Snapshot {
            time: engine.time(),
            max_lag,
            counters: engine.counters(),
            gauges: engine.gauges(),
            kv_usage: engine.kv_usage(),
        };
    };
    publish(&engine, 0.0);
    loop {
        // Take in what arrived.
        loop {
            let msg = if engine.is_idle() && slots.is_empty() {
                publish(&engine, max_lag);
                match rx.recv().await {
                    Some(m) => m,
                    None => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            };
            match msg {
                Msg::Submit(sub, tx) => {
                    if engine.is_idle() {
                        engine.advance_to(sub.arrival);
                    }
                    let id = sub.id;
                    match engine.submit(sub) {
                        Ok(()) => {
                            slots.insert(id, Slot { tx, pending: 0, last_flush: Instant::now() });
                        }
                        // Checked by the handler already; a refusal here only drops the
                        // request, which its handler reports.
                        Err(e) => warn!("refused after the check: {e}"),
                    }
                }
                Msg::Abort(id) => {
                    engine.abort(id);
                    slots.remove(&id);
                }
            }
        }

        let Some(step) = engine.step() else {
            // Nothing runnable: the waiting head has not arrived yet.
            match engine.next_arrival() {
                Some(t) if t > engine.time() => engine.advance_to(t),
                _ => {
                    // Blocked (cannot happen with a consistent engine); wait for news.
                    if let Some(Msg::Submit(sub, tx)) = rx.recv().await {
                        let id = sub.id;
                        if engine.submit(sub).is_ok() {
                            slots.insert(id, Slot { tx, pending: 0, last_flush: Instant::now() });
                        }
                    }
                }
            }
            continue;
        };
        let end = step.start + step.duration;
        let now = clock.now();
        max_lag = max_lag.max(now - end);
        let due = clock.instant(end);
        if due > Instant::now() + SLEEP_SLACK {
            tokio::time::sleep_until(due.into()).await;
        }
        let real_now = Instant::now();
        for ev in step.events {
            match ev {
                Event::FirstToken { id, hbm_hit_tokens, tier_hit_tokens } => {
                    if let Some(s) = slots.get_mut(&id) {
                        let cached = hbm_hit_tokens + tier_hit_tokens;
                        if s.tx.send(Update::First { cached }).is_err() {
                            engine.abort(id);
                            slots.remove(&id);
                        }
                    }
                }
                Event::Tokens { id, n } => {
                    if let Some(s) = slots.get_mut(&id) {
                        s.pending += n;
                        if real_now.duration_since(s.last_flush) >= FLUSH_EVERY || s.pending == n {
                            let ok = s.tx.send(Update::Tokens(s.pending)).is_ok();
                            s.pending = 0;
                            s.last_flush = real_now;
                            if !ok {
                                engine.abort(id);
                                slots.remove(&id);
                            }
                        }
                    }
                }
                Event::Finished { id } => {
                    if let Some(s) = slots.remove(&id) {
                        if s.pending > 0 {
                            let _ = s.tx.send(Update::Tokens(s.pending));
                        }
                        let _ = s.tx.send(Update::Done);
                    }
                }
            }
        }
        if real_now.duration_since(last_publish) >= Duration::from_millis(50) {
            publish(&engine, max_lag);
            last_publish = real_now;
        }
    }
}
