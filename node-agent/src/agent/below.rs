//! Moving chunks between DRAM and the tiers below it: writing them through (or back, at
//! eviction) to NVMe and the remote tier, retrying the remote writes that were dropped, and
//! bringing chunks back into DRAM from NVMe or the remote tier, checked.

use std::sync::atomic::{AtomicU64, Ordering};

use kvtier_api::agent;
use kvtier_api::chunk::ChunkKey;
use kvtier_api::residency::ConversationKey;
use tracing::warn;

use super::{Agent, Published};
use crate::index::{Index, AGENT};
use crate::nvme::NvmeTier;
use crate::remote::Fetched;

impl Agent {
    /// Records what the index evicted from DRAM and returns it (for write-back).
    pub(super) fn note_dram_evictions(&self, ix: &mut Index) -> Vec<crate::index::Evicted> {
        let gone = ix.take_evicted();
        if !gone.is_empty() {
            let mut r = self.residency();
            for e in &gone {
                r.change(e.conversation, agent::Tier::Dram, false);
            }
        }
        gone
    }

    /// Writes chunks DRAM just evicted to the tiers that lack them: the remote tier when
    /// their write at commit was dropped, and NVMe in write-back mode. Called before the
    /// slots' new owner hears of them, so their bytes are still the evicted chunks'.
    pub(super) fn write_back(&self, gone: &[crate::index::Evicted]) {
        self.retry_remote(gone);
        if !self.write_back || gone.is_empty() {
            return;
        }
        if let Some(mut t) = self.nvme() {
            self.write_back_into(&mut t, gone);
        }
    }

    /// Queues for the remote tier the evicted chunks whose write at commit was dropped (a full
    /// queue, a store that was down): their last chance to leave the node.
    fn retry_remote(&self, gone: &[crate::index::Evicted]) {
        let Some(remote) = &self.remote else { return };
        for e in gone.iter().filter(|e| remote.take_missed(e.key)) {
            let bytes = &self.pool.slot(e.slot)[..e.len as usize];
            if remote.put(e.key, bytes, e.checksum, e.conversation) {
                remote.stats().retried.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// [`Agent::write_back`] into a tier the caller has locked.
    fn write_back_into(&self, t: &mut NvmeTier, gone: &[crate::index::Evicted]) {
        for e in gone {
            match t.write(e.key, self.pool.slot(e.slot), e.len, e.checksum, e.conversation) {
                Ok(true) => self.residency().change(e.conversation, agent::Tier::Nvme, true),
                Ok(false) => {}
                Err(err) => warn!("NVMe write-back of an evicted chunk failed (it is lost): {err}"),
            }
        }
        self.note_nvme_evictions(t);
    }

    /// Records what the NVMe tier dropped.
    fn note_nvme_evictions(&self, t: &mut NvmeTier) {
        let gone = t.take_evicted();
        if !gone.is_empty() {
            let mut r = self.residency();
            for (_, conv) in gone {
                r.change(conv, agent::Tier::Nvme, false);
            }
        }
    }

    /// Writes chunks just committed to the tiers below DRAM: new ones to the remote tier's
    /// queue, all of them through to NVMe (unless NVMe is written back). Each was pinned by
    /// the agent at its commit, under the same lock, so its slot holds its bytes until here.
    pub(super) fn publish(&self, chunks: &[Published]) {
        if chunks.is_empty() {
            return;
        }
        if let Some(remote) = &self.remote {
            for c in chunks.iter().filter(|c| c.new) {
                let bytes = &self.pool.slot(c.slot)[..c.len as usize];
                remote.put(c.key, bytes, c.sum, c.conversation);
            }
        }
        let keys: Vec<_> = chunks.iter().map(|c| c.key).collect();
        if self.write_back {
            self.index().unpin(AGENT, &keys);
            return;
        }
        let pending: Vec<crate::nvme::Pending<'_>> = chunks
            .iter()
            .map(|c| crate::nvme::Pending {
                key: c.key,
                data: self.pool.slot(c.slot),
                len: c.len,
                checksum: c.sum,
                conversation: c.conversation,
            })
            .collect();
        if let Some(mut t) = self.nvme() {
            let before: Vec<bool> = pending.iter().map(|p| t.contains(&p.key)).collect();
            match t.write_batch(&pending) {
                Ok(_) => {
                    let mut r = self.residency();
                    for (p, was) in pending.iter().zip(before) {
                        if !was && t.contains(&p.key) {
                            r.change(p.conversation, agent::Tier::Nvme, true);
                        }
                    }
                }
                Err(e) => warn!(
                    "NVMe write of {} chunks failed (they stay in DRAM only): {e}",
                    pending.len()
                ),
            }
            self.note_nvme_evictions(&mut t);
        }
        self.index().unpin(AGENT, &keys);
    }

    /// Brings every chunk of `conversation` that only NVMe holds into DRAM (ahead of its
    /// next turn); returns how many are in DRAM afterwards. Blocking: NVMe reads.
    pub fn prefetch_conversation(&self, conversation: ConversationKey) -> u32 {
        let keys = match self.nvme() {
            Some(t) if conversation.0 != 0 => t.keys_of(conversation),
            _ => return 0,
        };
        // Never more than the pool holds: past that a prefetch evicts its own chunks.
        let budget = self.pool.slots() as usize;
        for k in keys.iter().take(budget) {
            self.load(*k);
        }
        let ix = self.index();
        keys.iter().filter(|k| ix.get(k).is_some()).count() as u32
    }

    /// Brings what the remote tier holds of `keys` into DRAM slots (fetched in pipelines,
    /// each checked); returns how many are in DRAM afterwards.
    pub(super) fn load_remote(&self, keys: &[ChunkKey]) -> usize {
        let Some(remote) = &self.remote else { return 0 };
        if keys.is_empty() {
            return 0;
        }
        // Never more than the pool holds: past that a prefetch evicts its own chunks. Each
        // chunk goes into the pool as it arrives: at most one batch of fetched chunks is held
        // outside it.
        let keys = &keys[..keys.len().min(self.pool.slots() as usize)];
        let held = AtomicU64::new(0);
        remote.fetch_each(keys, |i, f| {
            if f.is_some_and(|f| self.install(keys[i], &f)) {
                held.fetch_add(1, Ordering::Relaxed);
            }
        });
        held.into_inner() as usize
    }

    /// Puts a chunk fetched from the remote tier into a DRAM slot; true when DRAM holds it.
    fn install(&self, key: ChunkKey, f: &Fetched) -> bool {
        let (slot, gone) = {
            let mut ix = self.index();
            if ix.get(&key).is_some() {
                return true;
            }
            let slot = ix.reserve(AGENT, 1, self.now()).pop();
            (slot, self.note_dram_evictions(&mut ix))
        };
        self.write_back(&gone);
        let Some(slot) = slot else { return false };
        // The slot is reserved to the agent: no one else writes or reads it.
        self.pool.write_slot(slot, f.bytes());
        let mut ix = self.index();
        match ix.commit(AGENT, key, slot, f.len, f.checksum, f.conversation, |_, _, _| true) {
            Ok(new) => {
                // Asked for by a lookup: a use (as for a chunk back from NVMe).
                ix.touch(key);
                if new {
                    self.residency().change(f.conversation, agent::Tier::Dram, true);
                    self.counters.remote_promotions.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                warn!("a chunk from the remote tier could not be committed: {e}");
                false
            }
        }
    }

    /// Brings `key` from NVMe into a DRAM slot; true when it is in DRAM afterwards.
    pub(super) fn load(&self, key: kvtier_api::chunk::ChunkKey) -> bool {
        if self.index().get(&key).is_some() {
            return true;
        }
        let Some(mut tier) = self.nvme() else { return false };
        if !tier.contains(&key) {
            return false;
        }
        let conv = tier.conversation_of(&key).unwrap_or(ConversationKey(0));
        let (slot, gone) = {
            let mut ix = self.index();
            let slot = ix.reserve(AGENT, 1, self.now()).pop();
            (slot, self.note_dram_evictions(&mut ix))
        };
        self.retry_remote(&gone);
        if self.write_back {
            // The tier is locked here; write the evicted chunks back through it.
            self.write_back_into(&mut tier, &gone);
        }
        let Some(slot) = slot else { return false };
        let loaded = match tier.read(key) {
            Ok((bytes, len, sum)) => {
                // The slot is reserved to the agent: no one else writes or reads it.
                self.pool.write_slot(slot, bytes);
                Some((len, sum))
            }
            Err(e) => {
                warn!("NVMe read: {e}");
                None
            }
        };
        self.note_nvme_evictions(&mut tier);
        drop(tier);
        let mut ix = self.index();
        match loaded {
            // Verified against its checksum by the read.
            Some((len, sum)) => match ix.commit(AGENT, key, slot, len, sum, conv, |_, _, _| true) {
                Ok(new) => {
                    // Brought back because a lookup or a returning conversation asked for
                    // it: that is a use, so S3-FIFO keeps it out of the one-hit queue's
                    // evictions instead of dropping it before the load.
                    ix.touch(key);
                    if new {
                        self.residency().change(conv, agent::Tier::Dram, true);
                        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                    }
                    true
                }
                Err(_) => false,
            },
            None => {
                ix.release(AGENT, &[slot]);
                false
            }
        }
    }
}
