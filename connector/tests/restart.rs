//! The node-agent restarts under running engines (its pod is upgraded or killed): the
//! connector attaches to the new agent on its own, and nothing learnt from the old pool (slots,
//! pins) is ever applied to the new one.

mod common;

use common::cache::{prompt, scheduler, workers, Cache};
use common::{serve_agent, start_agent_with};
use kvtier_connector::Step;

#[test]
fn a_restarted_agent_is_found_again_and_nothing_of_the_old_pool_is_used() {
    let (_dir, socket, old_rt, old_agent) = start_agent_with(32, "restart");
    let mut s = scheduler(&socket);
    let mut caches = [Cache::new(), Cache::new()];
    let first: Vec<u32> = (0..19).collect();
    for (rank, c) in caches.iter_mut().enumerate() {
        c.compute(rank, &first);
    }
    let reference = [caches[0].page(1, 1, 3).to_vec(), caches[1].page(0, 0, 9).to_vec()];
    let mut ws = workers(&socket, &mut caches);
    let tokens = prompt(300, 8);
    assert_eq!(s.lookup("a", &tokens, 0).expect("lookup"), Some(0));
    let plan =
        s.build_plan(&[Step { req: "a".into(), block_ids: first, computed_after: 300 }], None);
    for w in &mut ws {
        assert_eq!(w.save(&plan).saved, 2);
    }
    s.finished("a").expect("finished");

    // Two requests find the prompt in the old pool; their loads are planned there.
    let mut b = tokens.clone();
    b.push(1);
    assert_eq!(s.lookup("b", &b, 0).expect("lookup"), Some(256));
    s.after_alloc("b", &(20..40).collect::<Vec<_>>(), 256).expect("alloc");
    let plan_b = s.build_plan(&[], Some(Vec::new()));
    assert_eq!(s.lookup("c", &b, 0).expect("lookup"), Some(256));
    s.after_alloc("c", &(20..40).collect::<Vec<_>>(), 256).expect("alloc");

    // The agent restarts: a new process, a new (empty) pool on the same socket.
    drop(old_rt);
    let (_new_rt, new_agent) = serve_agent(&socket, 32);
    assert_ne!(new_agent.pool_id(), old_agent.pool_id());

    // B's loads run on the workers' mapping of the old pool, which still holds the pinned
    // chunks as they were: the right bytes.
    for w in &mut ws {
        assert!(w.load(&plan_b).is_empty(), "no load errors");
    }
    assert_eq!(caches[0].page(1, 1, 23), &reference[0][..]);
    assert_eq!(caches[1].page(0, 0, 29), &reference[1][..]);

    // The scheduler finds its connection broken at its next call, and is on the new pool at
    // the one after (which is empty).
    assert!(s.lookup("d", &b, 0).is_err(), "the call that finds the old agent gone");
    assert_eq!(s.lookup("d", &b, 0).expect("attached again"), Some(0));
    // C's loads name the old pool; built now, they reach workers that move to the new one.
    let plan_c = s.build_plan(&[], Some(Vec::new()));
    assert!(plan_c.loads.iter().all(|j| j.pool == old_agent.pool_id()));
    s.finished("c").expect("no unpin is sent to a pool that never had the pins");

    // The workers' first save finds the connection broken and is skipped; the next attaches
    // to the new pool and lands there.
    let plan_d = s.build_plan(
        &[Step { req: "d".into(), block_ids: (0..19).collect(), computed_after: 301 }],
        Some(Vec::new()),
    );
    assert_eq!(plan_d.saves.len(), 2);
    for w in &mut ws {
        let r = w.save(&plan_d);
        assert_eq!((r.saved, r.skipped), (0, 2), "the old agent is gone");
        let r = w.save(&plan_d);
        assert_eq!((r.saved, r.skipped), (2, 0), "saved into the new pool");
    }
    assert_eq!(s.lookup("e", &b, 0).expect("lookup"), Some(256), "the new pool has it");

    // C's slots are in the old pool: refused, never copied from the new one's same slots.
    for w in &mut ws {
        assert_eq!(w.load(&plan_c).len(), 16, "both chunks are load errors");
    }
}
