//! A mutation fuzzer for the byte codecs that face untrusted input (the router's request
//! parser, the node-agent's frames, the connector's step plans), on the stable toolchain.
//!
//! From a corpus of valid inputs it derives inputs by mutation (bit flips, bytes that matter
//! to the codecs, inserted, deleted, repeated and spliced runs, truncation), runs the target's
//! check on each for a time budget, and keeps inputs the target accepts as further seeds, so
//! that mutations reach past the first layer of validation. It is not coverage-guided. A check
//! that panics fails the run; the input is saved under `target/fuzz-failures/` and its path
//! is in the panic message, with the seed that reproduces the run.
//!
//! The budget is `KVTIER_FUZZ_SECONDS` (default 2 s, what CI spends per target); the seed is
//! `KVTIER_FUZZ_SEED` (default: from the clock, printed).

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Inputs checked.
    pub execs: u64,
    /// Inputs the target accepted.
    pub accepted: u64,
    /// Time spent.
    pub elapsed: Duration,
    /// The run's seed.
    pub seed: u64,
}

/// Whether the target accepted an input (accepted inputs become seeds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Decoded or parsed.
    Accepted,
    /// Refused with an error.
    Refused,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that mean something to JSON or to the length-prefixed codecs.
const INTERESTING: &[u8] = b"\"{}[],:\\ 0-1e.tfn\x00\xff\x7f\x80\x01";

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a run: deep nesting, long arrays, repeated fields.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let run = input[i..i + n].to_vec();
                let times = 1 + rng.below(16);
                for _ in 0..times {
                    input.splice(i..i, run.iter().copied());
                }
            }
            5 if !corpus.is_empty() => {
                // Splice in a run of another input.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let j = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - j).min(256));
                    let i = rng.below(len + 1);
                    input.splice(i..i, other[j..j + n].iter().copied());
                }
            }
            6 if len > 0 => input.truncate(rng.below(len)),
            _ if len >= 4 => {
                // A little-endian word set to an edge value (a length, a count).
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, 0xff, 0xffff, u32::MAX, u32::MAX / 2, 1 << 20][rng.below(7)];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => input.push(rng.next() as u8),
        }
    }
}

fn budget() -> Duration {
    std::env::var("KVTIER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs_f64)
}

fn seed() -> u64 {
    std::env::var("KVTIER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    })
}

/// Fuzzes `check` from `seeds` for the budget; `name` names the target in reports and in the
/// saved failures.
///
/// # Panics
/// When `check` panics on an input (after saving it).
pub fn run(name: &str, seeds: &[Vec<u8>], mut check: impl FnMut(&[u8]) -> Verdict) -> Report {
    let seed = seed();
    let mut rng = Rng(seed);
    let mut corpus: Vec<Vec<u8>> = seeds.to_vec();
    let (start, budget) = (Instant::now(), budget());
    let (mut execs, mut accepted) = (0u64, 0u64);
    let mut input = Vec::new();
    while start.elapsed() < budget {
        for _ in 0..64 {
            input.clear();
            if !corpus.is_empty() {
                input.extend_from_slice(&corpus[rng.below(corpus.len())]);
            }
            mutate(&mut rng, &mut input, &corpus);
            input.truncate(1 << 20);
            match catch_unwind(AssertUnwindSafe(|| check(&input))) {
                Ok(Verdict::Accepted) => {
                    accepted += 1;
                    if corpus.len() < 4096 {
                        corpus.push(input.clone());
                    } else {
                        let i = rng.below(corpus.len());
                        corpus[i] = input.clone();
                    }
                }
                Ok(Verdict::Refused) => {}
                Err(panic) => {
                    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../target/fuzz-failures");
                    let _ = std::fs::create_dir_all(&dir);
                    let path = dir.join(format!("{name}-{seed}-{execs}.bin"));
                    let _ = std::fs::write(&path, &input);
                    eprintln!(
                        "fuzz {name}: the check panicked on {} (KVTIER_FUZZ_SEED={seed})",
                        path.display()
                    );
                    resume_unwind(panic);
                }
            }
            execs += 1;
        }
    }
    let report = Report { execs, accepted, elapsed: start.elapsed(), seed };
    eprintln!(
        "fuzz {name}: {execs} inputs in {:.1} s ({:.0}/s), {accepted} accepted, seed {seed}",
        report.elapsed.as_secs_f64(),
        execs as f64 / report.elapsed.as_secs_f64().max(1e-9),
    );
    report
}
