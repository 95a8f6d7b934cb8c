//! The study's runs ([`Protocol`]) and how the wait before a turn is taken from a trace
//! ([`Timing`]), as kv-cache-tester names them.

use super::ReplayOptions;
use crate::trace::Turn;

/// How the wait before a turn is taken from the trace (kv-cache-tester's
/// `--timing-strategy`). Each falls back to `original` where the trace lacks the timings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Timing {
    /// The client's own pause (`think_time`): requests go as fast as the server answers.
    #[default]
    ThinkOnly,
    /// The recorded gap between request starts (`t[N] − t[N−1]`), the original server's
    /// time included.
    Original,
    /// `api_time × api_time_scale + think_time`: a server faster or slower than the original.
    ApiScaled,
}

impl Timing {
    /// Seconds to wait before `turn`, which follows `prev`.
    #[must_use]
    pub fn delay(self, prev: &Turn, turn: &Turn, api_time_scale: f64) -> f64 {
        let original = (turn.t - prev.t).max(0.0);
        match (self, turn.think_time, prev.api_time) {
            (Timing::ThinkOnly, Some(think), _) => think.max(0.0),
            (Timing::ApiScaled, Some(think), Some(api)) => {
                (api * api_time_scale).max(0.0) + think.max(0.0)
            }
            _ => original,
        }
    }
}

/// The study's runs (kv-cache-tester's `trace_replay_tester.py` as the study ran it), every
/// replay parameter they set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// `--start-users 4 --max-users 32 --max-ttft 60 --test-duration 1200 --max-context
    /// 100000 --warm-prefix-pct 0.5 --timing-strategy think-only --recycle`.
    StudyStress,
    /// `--max-users 8 --max-context 32000 --max-ttft 30`, 10 minutes (the rest as the
    /// tester's defaults: one starting user, warm prefix 0.5, think-only, no recycling).
    StudyLowLoad,
}

impl Protocol {
    /// Its name in reports.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Protocol::StudyStress => "study-stress",
            Protocol::StudyLowLoad => "study-low-load",
        }
    }

    /// `opts` with every parameter the protocol sets (the endpoint, model, seed, time scale,
    /// API and reporting are left as they are).
    #[must_use]
    pub fn apply(self, opts: ReplayOptions) -> ReplayOptions {
        // The tester's defaults for what neither run set.
        let tester = ReplayOptions {
            start_users: 1,
            ramp_up: 0.0,
            ttft_percentile: 0.95,
            max_delay: 60.0,
            period: 30.0,
            warm_prefix_pct: 0.5,
            timing: Timing::ThinkOnly,
            api_time_scale: 1.0,
            advance: (0.0, 0.0),
            recycle: false,
            ..opts
        };
        match self {
            Protocol::StudyStress => ReplayOptions {
                start_users: 4,
                max_users: 32,
                max_ttft: 60.0,
                duration: 1200.0,
                max_context: 100_000,
                recycle: true,
                ..tester
            },
            Protocol::StudyLowLoad => ReplayOptions {
                max_users: 8,
                max_context: 32_000,
                max_ttft: 30.0,
                duration: 600.0,
                ..tester
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(t: f64, think: Option<f64>, api: Option<f64>) -> Turn {
        Turn {
            t,
            streamed: true,
            model: "m".into(),
            input: 100,
            output: 10,
            hash_ids: vec![1],
            think_time: think,
            api_time: api,
        }
    }

    #[test]
    fn timing_strategies_take_the_testers_delays() {
        let prev = turn(10.0, None, Some(4.0));
        let next = turn(20.0, Some(6.0), Some(3.0));
        assert_eq!(Timing::ThinkOnly.delay(&prev, &next, 1.0), 6.0);
        assert_eq!(Timing::Original.delay(&prev, &next, 1.0), 10.0);
        assert_eq!(Timing::ApiScaled.delay(&prev, &next, 0.5), 4.0 * 0.5 + 6.0);
        // Without the timings, every strategy falls back to the recorded gap.
        let bare = turn(25.0, None, None);
        assert_eq!(Timing::ThinkOnly.delay(&next, &bare, 1.0), 5.0);
        assert_eq!(Timing::ApiScaled.delay(&bare, &bare, 1.0), 0.0);
    }

    #[test]
    fn the_study_protocols_set_every_parameter_of_its_runs() {
        let mine = ReplayOptions {
            endpoint: "http://e".into(),
            seed: 7,
            time_scale: 50.0,
            start_users: 9,
            warm_prefix_pct: 0.0,
            ..ReplayOptions::default()
        };
        let s = Protocol::StudyStress.apply(mine.clone());
        assert_eq!((s.start_users, s.max_users, s.max_ttft), (4, 32, 60.0));
        assert_eq!((s.duration, s.max_context, s.warm_prefix_pct), (1200.0, 100_000, 0.5));
        assert!(s.recycle && s.timing == Timing::ThinkOnly && s.advance == (0.0, 0.0));
        assert_eq!((s.endpoint.as_str(), s.seed, s.time_scale), ("http://e", 7, 50.0));
        let l = Protocol::StudyLowLoad.apply(mine);
        assert_eq!((l.start_users, l.max_users, l.max_ttft), (1, 8, 30.0));
        assert_eq!((l.duration, l.max_context, l.recycle), (600.0, 32_000, false));
    }
}
