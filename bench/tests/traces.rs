//! Trace files as they are published: parsing, the shared set's shape, bad files.

use std::path::{Path, PathBuf};

use kvtier_bench::demo;
use kvtier_bench::trace::{self, Step};

/// The shared trace set when this checkout has it, else the traces shipped in the repo.
fn trace_dir() -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces");
    if shared.is_dir() {
        shared
    } else {
        eprintln!("{} not found: using the shipped traces", shared.display());
        Path::new(env!("CARGO_MANIFEST_DIR")).join("traces")
    }
}

/// The set, read once for all tests of this file (parsing 239 files takes seconds in debug).
fn traces() -> &'static [trace::Trace] {
    static SET: std::sync::OnceLock<Vec<trace::Trace>> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let (good, bad) = trace::load_dir(&trace_dir()).expect("trace folder");
        assert!(bad.is_empty(), "unreadable traces: {bad:?}");
        good
    })
}

#[test]
fn every_published_trace_parses_and_holds_together() {
    let good = traces();
    assert!(good.len() >= 8);
    let mut subagents = 0;
    for t in good {
        assert_eq!(t.block_size, 64, "{}", t.id);
        assert!(t.first_input() > 0);
        for turn in t.root.all_turns() {
            assert_eq!(turn.hash_ids.len() as u64, turn.input / 64, "{}", t.id);
        }
        subagents += t.root.steps.iter().filter(|s| matches!(s, Step::Subagent(_))).count();
    }
    if good.len() == 239 {
        // The shared set: 17,455 requests, 22 subagents (counted from the files).
        let requests: usize = good.iter().map(|t| t.root.all_turns().len()).sum();
        assert_eq!(requests, 17_455);
        assert_eq!(subagents, 22);
    }
}

#[test]
fn reuse_is_mostly_extending_the_previous_prefix() {
    // The set's headline: about 95% of each request's blocks were seen before.
    let good = traces();
    let (mut hits, mut blocks) = (0u64, 0u64);
    for t in good {
        let mut seen = std::collections::HashSet::new();
        for turn in t.root.turns() {
            hits += trace::known_prefix(&seen, turn) as u64;
            blocks += turn.hash_ids.len() as u64;
            seen.extend(turn.hash_ids.iter().copied());
        }
    }
    let rate = hits as f64 / blocks as f64;
    assert!(rate > 0.85 && rate < 0.995, "reuse {rate}");
}

#[test]
fn the_shipped_traces_parse() {
    assert_eq!(demo::shipped_traces().len(), demo::SHIPPED.len());
}

#[test]
fn a_bad_file_is_named_with_its_reason_and_the_rest_still_load() {
    let dir = std::env::temp_dir().join(format!("kvtier-bad-traces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/trace_0012.json"),
    )
    .expect("shipped trace");
    std::fs::write(dir.join("a_good.json"), &good).expect("write");
    std::fs::write(dir.join("b_truncated.json"), &good[..good.len() / 2]).expect("write");
    std::fs::write(
        dir.join("c_inconsistent.json"),
        r#"{"id":"x","block_size":64,"requests":[{"t":0,"type":"s","in":640,"out":1,"hash_ids":[1,2]}]}"#,
    )
    .expect("write");
    std::fs::write(dir.join("d_not_a_trace.json"), "[1, 2, 3]").expect("write");
    std::fs::write(dir.join("notes.txt"), "ignored: not .json").expect("write");
    let (ok, bad) = trace::load_dir(&dir).expect("folder");
    assert_eq!(ok.len(), 1);
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert!(
        bad[0].path.ends_with("b_truncated.json") && bad[0].reason.contains("not a trace"),
        "{}",
        bad[0]
    );
    assert!(bad[1].reason.contains("2 hash_ids for 640 tokens"), "{}", bad[1]);
    assert!(bad[2].to_string().contains("d_not_a_trace.json"), "{}", bad[2]);
    std::fs::remove_dir_all(&dir).ok();
}
