//! Who holds which staging slot, and the pool slot its chunk will be committed into.
//!
//! A `Reserve` hands a client staging slots to write; each is paired with a pool slot the
//! index reserved for the same client at the same time, so a commit never has to evict and
//! never finds the pool full. A commit copies the staging slot into its pool slot and frees
//! the staging slot; a release, or the client going away, frees both. No client holds more
//! than its quota of the staging area, so one engine's burst of saves cannot starve the others.

use std::collections::HashMap;

use crate::index::ClientId;

/// The staging slots' owners.
#[derive(Debug)]
pub struct Staging {
    /// Per staging slot: the client that holds it and the pool slot paired with it.
    held: Vec<Option<(ClientId, u32)>>,
    free: Vec<u32>,
    by_client: HashMap<ClientId, u32>,
    quota: u32,
}

impl Staging {
    /// `slots` staging slots, none held; a client holds at most `quota` at once.
    #[must_use]
    pub fn new(slots: u32, quota: u32) -> Self {
        Self {
            held: vec![None; slots as usize],
            free: (0..slots).rev().collect(),
            by_client: HashMap::new(),
            quota: quota.max(1),
        }
    }

    /// How many more staging slots `client` could take now.
    #[must_use]
    pub fn room(&self, client: ClientId) -> u32 {
        let held = self.by_client.get(&client).copied().unwrap_or(0);
        self.quota.saturating_sub(held).min(self.free.len() as u32)
    }

    /// Staging slots for `pool_slots` (reserved to `client`), paired in order; as many as are
    /// free and within the client's quota. The pool slots left unpaired are returned second:
    /// the caller gives them back to the index.
    pub fn take(&mut self, client: ClientId, pool_slots: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
        let held = self.by_client.get(&client).copied().unwrap_or(0);
        let room = self.quota.saturating_sub(held) as usize;
        let n = pool_slots.len().min(room).min(self.free.len());
        let mut staged = Vec::with_capacity(n);
        let mut rest = pool_slots;
        let surplus = rest.split_off(n);
        for p in rest {
            let s = self.free.pop().expect("counted above");
            self.held[s as usize] = Some((client, p));
            staged.push(s);
        }
        if n > 0 {
            *self.by_client.entry(client).or_insert(0) += n as u32;
        }
        (staged, surplus)
    }

    /// The pool slot paired with staging slot `slot`, when `client` holds it.
    #[must_use]
    pub fn pool_slot(&self, client: ClientId, slot: u32) -> Option<u32> {
        match self.held.get(slot as usize) {
            Some(Some((c, p))) if *c == client => Some(*p),
            _ => None,
        }
    }

    /// Frees staging slot `slot` held by `client`; its paired pool slot, when it held it.
    pub fn free(&mut self, client: ClientId, slot: u32) -> Option<u32> {
        let p = self.pool_slot(client, slot)?;
        self.held[slot as usize] = None;
        self.free.push(slot);
        if let Some(n) = self.by_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.by_client.remove(&client);
            }
        }
        Some(p)
    }

    /// Frees every staging slot `client` holds (it went away); the index frees their pool
    /// slots with the client's other reservations.
    pub fn client_gone(&mut self, client: ClientId) {
        if self.by_client.remove(&client).is_none() {
            return;
        }
        for (s, h) in self.held.iter_mut().enumerate() {
            if matches!(h, Some((c, _)) if *c == client) {
                *h = None;
                self.free.push(s as u32);
            }
        }
    }

    /// Staging slots held by clients.
    #[must_use]
    pub fn in_use(&self) -> u32 {
        (self.held.len() - self.free.len()) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_pair_in_order_and_what_does_not_fit_comes_back() {
        let mut s = Staging::new(3, 8);
        let (staged, surplus) = s.take(1, vec![10, 11, 12, 13]);
        assert_eq!(staged.len(), 3);
        assert_eq!(surplus, vec![13]);
        assert_eq!(s.pool_slot(1, staged[1]), Some(11));
        assert_eq!(s.pool_slot(2, staged[1]), None, "another client's slot");
        assert_eq!(s.pool_slot(1, 99), None, "out of range");
        assert_eq!(s.free(1, staged[0]), Some(10));
        assert_eq!(s.free(1, staged[0]), None, "freed twice");
        assert_eq!(s.in_use(), 2);
        s.client_gone(1);
        assert_eq!(s.in_use(), 0);
        assert_eq!(s.take(2, vec![1, 2, 3]).0.len(), 3, "all free again");
    }

    #[test]
    fn one_client_holds_at_most_its_quota() {
        let mut s = Staging::new(8, 3);
        let (a, rest) = s.take(1, vec![0, 1, 2, 3, 4]);
        assert_eq!((a.len(), rest.len()), (3, 2));
        assert!(s.take(1, vec![5]).0.is_empty(), "over quota");
        assert_eq!(s.take(2, vec![5, 6]).0.len(), 2, "others are not starved");
        s.free(1, a[0]);
        assert_eq!(s.take(1, vec![7]).0.len(), 1);
    }
}
