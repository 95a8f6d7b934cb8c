//! Pipelined loads and asynchronous saves against a real node-agent. The copier is the host
//! backend's memcpy behind a gate the test opens batch by batch, standing in for a GPU's copy
//! engine (which these machines lack): a batch lands only when released, and the engine is
//! "ordered after" a batch without waiting, as a GPU stream waits on an event. That makes the
//! overlap observable: a layer is usable while later layers are still on the link, and a save
//! still copying holds its request's blocks.

mod common;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::cache::{chunk_bytes, prompt, scheduler, workers, Cache, BLOCKS, CHUNK, LAYERS};
use common::start_agent;
use kvtier_connector::transfer::{Copy, Done, HostSignal, Signal, Transfer, TransferError};
use kvtier_connector::{HostCopy, LoadJob, Step, WorkerCore};

/// A batch held until the test releases it; its id stands for a runtime event.
struct GateSignal {
    id: u64,
    inner: HostSignal,
}

impl Signal for GateSignal {
    fn wait(&self) -> Result<(), TransferError> {
        self.inner.wait()
    }
    fn is_done(&self) -> bool {
        self.inner.is_done()
    }
    fn event(&self) -> Option<u64> {
        Some(self.id)
    }
}

#[derive(Default)]
struct GateState {
    held: Vec<(u64, Vec<Copy>, bool, HostSignal)>,
    next: u64,
    /// `("load" | "save", batch id)` per submission, `("order", id)` per engine wait.
    log: Vec<(&'static str, u64)>,
}

#[derive(Clone, Default)]
struct Gate(Arc<Mutex<GateState>>);

impl Gate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the oldest held batch; its id.
    #[allow(unsafe_code)]
    fn release_one(&self) -> u64 {
        let (id, copies, to_kv, signal) = self.state().held.remove(0);
        for c in &copies {
            let (dst, src) = c.ends(to_kv);
            // SAFETY: the worker's addresses: its pool mapping and the test's live caches.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, c.len) };
        }
        signal.complete(Ok(()));
        id
    }

    fn release_all(&self) {
        while !self.state().held.is_empty() {
            self.release_one();
        }
    }

    fn log(&self) -> Vec<(&'static str, u64)> {
        self.state().log.clone()
    }
}

impl Transfer for Gate {
    fn submit(&mut self, copies: &[Copy], to_kv: bool) -> Result<Done, TransferError> {
        let mut st = self.state();
        let id = st.next;
        st.next += 1;
        let inner = HostSignal::default();
        st.held.push((id, copies.to_vec(), to_kv, inner.clone()));
        st.log.push((if to_kv { "load" } else { "save" }, id));
        Ok(Done::new(GateSignal { id, inner }))
    }

    fn order_engine_after(&mut self, done: &Done) -> Result<(), TransferError> {
        self.state().log.push(("order", done.event().unwrap_or(u64::MAX)));
        Ok(())
    }

    fn name(&self) -> &'static str {
        "gate"
    }
}

#[allow(unsafe_code)]
fn worker(socket: &std::path::Path, cache: &mut Cache, copier: Box<dyn Transfer>) -> WorkerCore {
    let mut w = WorkerCore::connect(socket, 0, copier).expect("worker");
    // SAFETY: the caches outlive the workers in every test.
    unsafe { w.register(&cache.descs(), BLOCKS, CHUNK / BLOCK_TOKENS, chunk_bytes(), None) }
        .expect("register");
    w
}

const BLOCK_TOKENS: usize = common::cache::BLOCK;

/// Both ranks compute and save a 300-token prompt (two chunks in blocks 0..16); returns the
/// prompt.
fn stored_prompt(socket: &std::path::Path, s: &mut kvtier_connector::SchedulerCore) -> Vec<u32> {
    let tokens = prompt(300, 5);
    let mut caches = [Cache::new(), Cache::new()];
    let blocks: Vec<u32> = (0..19).collect();
    for (rank, c) in caches.iter_mut().enumerate() {
        c.compute(rank, &blocks);
    }
    let mut ws = workers(socket, &mut caches);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let plan =
        s.build_plan(&[Step { req: "a".into(), block_ids: blocks, computed_after: 300 }], None);
    for w in &mut ws {
        assert_eq!(w.save(&plan).saved, 2);
    }
    s.finished("a").expect("finished");
    tokens
}

#[test]
fn each_layer_is_usable_once_its_own_stage_lands() {
    let (_dir, socket, _rt) = start_agent(32, "stages");
    let mut s = scheduler(&socket);
    let tokens = stored_prompt(&socket, &mut s);
    let mut reference = Cache::new();
    reference.compute(0, &(0..19).collect::<Vec<_>>());

    let gate = Gate::default();
    let mut cache = Cache::new();
    let mut w = worker(&socket, &mut cache, Box::new(gate.clone()));
    assert_eq!(w.layers_per_stage(), 1, "one tensor per layer: a stage per layer");
    let mut b = tokens.clone();
    b.extend(prompt(20, 9));
    assert_eq!(s.lookup("b", &b, 0).expect("lookup"), Some(256));
    let b_blocks: Vec<u32> = (20..40).collect();
    s.after_alloc("b", &b_blocks, 256).expect("alloc");
    let plan = s.build_plan(
        &[Step { req: "b".into(), block_ids: b_blocks.clone(), computed_after: 320 }],
        Some(Vec::new()),
    );
    assert_eq!(plan.loads.len(), 2);

    assert!(w.start_load(&plan), "stages queued");
    assert_eq!(gate.log(), vec![("load", 0), ("load", 1)], "one batch per layer, both chunks");
    // Layer 0's attention: the engine waits for stage 0 only.
    w.wait_layer(Some(0));
    w.wait_layer(Some(0));
    assert_eq!(gate.log()[2..], [("order", 0)], "waited once, for stage 0");
    assert_eq!(gate.release_one(), 0);
    let layer_landed = |c: &Cache, layer: usize| {
        (0..16).all(|i| {
            c.page(layer, 0, 20 + i) == reference.page(layer, 0, i)
                && c.page(layer, 1, 20 + i) == reference.page(layer, 1, i)
        })
    };
    assert!(layer_landed(&cache, 0), "layer 0 is there for its attention");
    assert!(!layer_landed(&cache, 1), "layer 1 is still on the link meanwhile");
    w.wait_layer(Some(1));
    assert_eq!(gate.log()[3..], [("order", 1)]);
    gate.release_all();
    assert!(w.finish_load().is_empty(), "no load errors");
    assert_eq!(gate.log().len(), 4, "nothing more to wait for after the forward pass");
    for layer in 0..LAYERS {
        assert!(layer_landed(&cache, layer), "layer {layer} bit-identical");
    }
    let r = w.load_report();
    assert_eq!((r.loaded, r.failed_blocks), (2, 0));
    assert_eq!(r.bytes, 2 * chunk_bytes() as u64, "two whole chunks");
}

#[test]
fn a_layer_vllm_never_waits_for_still_orders_the_next_step() {
    let (_dir, socket, _rt) = start_agent(32, "unwaited");
    let mut s = scheduler(&socket);
    let tokens = stored_prompt(&socket, &mut s);
    let gate = Gate::default();
    let mut cache = Cache::new();
    let mut w = worker(&socket, &mut cache, Box::new(gate.clone()));
    w.set_layerwise(false);
    assert_eq!(w.layers_per_stage(), LAYERS, "not pipelined: one stage");
    let mut b = tokens.clone();
    b.push(1);
    assert_eq!(s.lookup("b", &b, 0).expect("lookup"), Some(256));
    s.after_alloc("b", &(20..40).collect::<Vec<_>>(), 256).expect("alloc");
    let plan = s.build_plan(&[], Some(Vec::new()));
    w.start_load(&plan);
    gate.release_all();
    // No wait_for_layer_load (a full CUDA graph skips it): the end of the step orders the
    // engine after every stage, so the next step cannot race the copies.
    assert!(w.finish_load().is_empty());
    assert_eq!(gate.log(), vec![("load", 0), ("order", 0)]);
}

#[test]
fn a_request_whose_load_failed_saves_nothing_that_step() {
    let (_dir, socket, _rt) = start_agent(32, "failsave");
    let mut s = scheduler(&socket);
    let mut cache = Cache::new();
    let mut w = worker(&socket, &mut cache, Box::new(HostCopy::new()));
    let tokens = prompt(300, 3);
    assert_eq!(s.lookup("x", &tokens, 0).expect("lookup"), Some(0));
    let blocks: Vec<u32> = (0..19).collect();
    cache.compute(0, &blocks);
    let mut plan =
        s.build_plan(&[Step { req: "x".into(), block_ids: blocks, computed_after: 300 }], None);
    let pool = kvtier_node_agent::Client::connect(&socket, "probe").expect("attach").pool_id();
    plan.loads.push(LoadJob {
        req: "x".into(),
        block_ids: vec![30, 31],
        from: 0,
        pool,
        slots: vec![vec![9999, 9998]],
    });
    assert_eq!(w.load(&plan), vec![30, 31], "a slot outside the pool");
    let r = w.load_report();
    assert_eq!((r.loaded, r.failed_blocks, r.bytes), (0, 2, 0), "counted as failed blocks");
    let r = w.save(&plan);
    assert_eq!((r.saved, r.skipped), (0, 2), "KV computed on blocks that did not load");
    // The next step is clean again.
    let r = w.save(&plan);
    assert_eq!((r.saved, r.skipped), (2, 0));
    // A step that fails a load and never reaches wait_for_save: the next step's saves go on.
    assert_eq!(w.load(&plan), vec![30, 31]);
    let mut next = plan.clone();
    next.loads.clear();
    assert!(w.load(&next).is_empty());
    let r = w.save(&next);
    assert_eq!((r.saved, r.skipped), (2, 0), "only the failed step's saves are skipped");
}

#[test]
fn saves_commit_on_their_own_and_hold_their_blocks_until_copied() {
    let (_dir, socket, _rt) = start_agent(32, "async");
    let mut s = scheduler(&socket);
    let gate = Gate::default();
    let mut cache = Cache::new();
    let mut w = worker(&socket, &mut cache, Box::new(gate.clone()));
    let tokens = prompt(300, 4);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    assert_eq!(s.lookup("short", &prompt(40, 4), 0).expect("lookup"), Some(0));
    let blocks: Vec<u32> = (0..19).collect();
    cache.compute(0, &blocks);
    let plan = s.build_plan(
        &[
            Step { req: "a".into(), block_ids: blocks, computed_after: 300 },
            Step { req: "short".into(), block_ids: vec![30, 31, 32], computed_after: 40 },
        ],
        Some(vec!["p".into()]),
    );
    assert_eq!(plan.saves.len(), 2);
    w.start_save(&plan);
    assert_eq!(gate.log(), vec![("save", 0)], "the step's chunks in one batch");

    // vLLM finishes both requests; the scheduler keeps the blocks of the one with saves.
    assert!(s.finished("a").expect("finished"));
    assert!(!s.finished("short").expect("finished"));
    let finished = vec!["a".to_string(), "short".to_string()];
    assert!(w.finished_sending(&finished).is_empty(), "a's copies are still running");
    // A preempted request's blocks may be reused at once: the engine waits for its saves
    // first; saves of other requests do not hold it.
    w.order_after_saves(Some(&["p".to_string()]));
    assert_eq!(gate.log().len(), 1);
    w.order_after_saves(Some(&["a".to_string()]));
    assert_eq!(gate.log()[1..], [("order", 0)]);

    // Once copied, the chunks are committed without the engine stepping again.
    gate.release_all();
    let keys: Vec<_> = plan.saves.iter().map(|j| j.keys[0][0]).collect();
    let mut probe = kvtier_node_agent::Client::connect(&socket, "probe").expect("attach");
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe.lookup(&keys).expect("lookup").prefix < 2 {
        assert!(Instant::now() < deadline, "the saves were never committed");
        std::thread::sleep(Duration::from_millis(5));
    }
    w.flush_saves();
    assert_eq!(w.finished_sending(&[]), vec!["a".to_string()], "now its blocks may go");
    assert!(w.finished_sending(&finished).is_empty(), "reported once");
    let r = w.save_report();
    assert_eq!((r.saved, r.skipped, r.bytes), (2, 0, 2 * chunk_bytes() as u64));
}

#[test]
fn chunks_that_failed_to_load_are_saved_again_once_recomputed() {
    let (_dir, socket, _rt) = start_agent(32, "resave");
    let mut s = scheduler(&socket);
    let tokens = stored_prompt(&socket, &mut s);
    let mut cache = Cache::new();
    let mut w = worker(&socket, &mut cache, Box::new(HostCopy::new()));
    let mut long = tokens.clone();
    long.extend(prompt(20, 4));
    // Two requests load the same two chunks; one of b's loads names slots outside the pool.
    for (req, blocks) in [("b", 20..40u32), ("c", 0..20)] {
        assert_eq!(s.lookup(req, &long, 0).expect("lookup"), Some(256));
        s.after_alloc(req, &blocks.collect::<Vec<_>>(), 256).expect("alloc");
    }
    let steps = |computed| {
        [("b", 20..40u32), ("c", 0..20)].map(|(req, blocks)| Step {
            req: req.into(),
            block_ids: blocks.collect(),
            computed_after: computed,
        })
    };
    let mut plan = s.build_plan(&steps(320), None);
    assert!(plan.saves.is_empty(), "both chunks are in the pool already");
    let bad = plan.loads.iter_mut().find(|j| j.req == "b").expect("b loads");
    bad.slots = vec![vec![9999, 9998]];
    let failed = w.load(&plan);
    assert_eq!(failed, (20..28).collect::<Vec<_>>(), "b's first chunk");
    assert_eq!(w.save(&plan), Default::default(), "nothing to save this step");

    // vLLM hands the failed blocks to the scheduler side and recomputes b from block 20.
    assert_eq!(s.load_failed(&failed), vec!["b".to_owned()]);
    assert!(s.load_failed(&[1000]).is_empty(), "blocks of no load");
    let plan = s.build_plan(&steps(320), None);
    let saved: Vec<(&str, u32)> =
        plan.saves.iter().map(|j| (j.req.as_str(), j.block_ids[0])).collect();
    assert_eq!(saved, vec![("b", 20), ("b", 28)], "b's chunks from the failed one on; c none");
    assert!(w.load(&plan).is_empty());
    cache.compute(0, &(20..40).collect::<Vec<_>>());
    let r = w.save(&plan);
    assert_eq!((r.saved, r.skipped), (2, 0));
    assert!(s.build_plan(&steps(320), None).saves.is_empty(), "saved once");
}

/// Request `req` (the stored prompt and 300 tokens more: four chunks, two of them stored) is
/// allocated blocks 0..38 and its loads planned; returns the steps that build its plans.
fn loading_request(
    s: &mut kvtier_connector::SchedulerCore,
    tokens: &[u32],
    req: &str,
) -> impl Fn(usize) -> Vec<Step> {
    let mut long = tokens.to_vec();
    long.extend(prompt(300, 8));
    assert_eq!(s.lookup(req, &long, 0).expect("lookup"), Some(256));
    s.after_alloc(req, &(0..38).collect::<Vec<_>>(), 256).expect("alloc");
    let req = req.to_owned();
    move |computed| {
        vec![Step { req: req.clone(), block_ids: (0..38).collect(), computed_after: computed }]
    }
}

fn first_blocks(plan: &kvtier_connector::Plan) -> Vec<u32> {
    plan.saves.iter().map(|j| j.block_ids[0]).collect()
}

#[test]
fn saves_after_loads_wait_until_every_rank_reports_them_landed() {
    let (_dir, socket, _rt) = start_agent(64, "confirm");
    let mut s = scheduler(&socket);
    let tokens = stored_prompt(&socket, &mut s);
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let steps = loading_request(&mut s, &tokens, "b");

    // The step that loads chunks 0-1 computes chunks 2-3: their saves wait.
    let plan = s.build_plan(&steps(600), None);
    assert_eq!(plan.loads.len(), 2);
    assert!(plan.saves.is_empty(), "held back until the loads are known to have landed");
    for (rank, w) in ws.iter_mut().enumerate() {
        assert!(w.load(&plan).is_empty());
        caches[rank].compute(rank, &(16..38).collect::<Vec<_>>());
        assert_eq!(w.take_landed(), vec!["b".to_owned()]);
        assert!(w.take_landed().is_empty(), "reported once");
    }
    // Async scheduling: the next step is planned before the reports arrive.
    assert!(s.build_plan(&steps(601), None).saves.is_empty());
    s.loads_landed(&[("b".into(), 1)]);
    assert!(s.build_plan(&steps(602), None).saves.is_empty(), "one rank of two");
    s.loads_landed(&[("b".into(), 2)]);
    let plan = s.build_plan(&steps(603), None);
    assert_eq!(first_blocks(&plan), vec![16, 24], "chunks 2 and 3, computed steps ago");
    for w in &mut ws {
        assert_eq!(w.save(&plan).saved, 2);
    }
}

#[test]
fn a_load_that_failed_on_one_rank_saves_nothing_either_rank_computed_on_it() {
    let (_dir, socket, _rt) = start_agent(64, "partial");
    let mut s = scheduler(&socket);
    let tokens = stored_prompt(&socket, &mut s);
    let mut caches = [Cache::new(), Cache::new()];
    let mut ws = workers(&socket, &mut caches);
    let steps = loading_request(&mut s, &tokens, "b");
    let mut plan = s.build_plan(&steps(600), None);
    assert!(plan.saves.is_empty(), "chunks 2-3 are computed on the loads: not saved yet");
    // Rank 0's slots of the first chunk are outside the pool; rank 1's load lands.
    plan.loads[0].slots[0] = vec![9999, 9998];
    let failed = ws[0].load(&plan);
    assert_eq!(failed, (0..8).collect::<Vec<_>>());
    assert!(ws[1].load(&plan).is_empty());
    assert!(ws[0].take_landed().is_empty());
    assert_eq!(ws[1].take_landed(), vec!["b".to_owned()]);
    // Rank 1's KV of chunks 2-3 was computed on rank 0's missing blocks (the layers mix the
    // ranks): no plan asked either rank to save it. vLLM sends the union of the failed blocks
    // and the reports; the request is recomputed from block 0 and saved from chunk 0 on.
    // Async scheduling: the next step is planned before the outcome is known.
    assert!(s.build_plan(&steps(601), None).saves.is_empty());
    assert_eq!(s.load_failed(&failed), vec!["b".to_owned()]);
    s.loads_landed(&[("b".into(), 1)]);
    let plan = s.build_plan(&steps(600), None);
    assert_eq!(first_blocks(&plan), vec![0, 8, 16, 24]);
}

#[test]
fn an_engine_that_never_reports_loads_gets_its_saves_after_a_grace() {
    let (_dir, socket, _rt) = start_agent(64, "grace");
    let mut s = scheduler(&socket);
    let tokens = stored_prompt(&socket, &mut s);
    let steps = loading_request(&mut s, &tokens, "b");
    for i in 0..kvtier_connector::scheduler::CONFIRM_GRACE {
        assert!(s.build_plan(&steps(600 + i as usize), None).saves.is_empty(), "plan {i}");
    }
    let plan = s.build_plan(&steps(700), None);
    assert_eq!(first_blocks(&plan), vec![16, 24], "no longer held back");
}
