//! The emulator's check of the order between its queues and the host ([`Queue`]).
//!
//! The emulator runs every copy and launch at once, in the order the host issues them. A GPU runs
//! its queues concurrently, ordered only by events, so the same program can read a buffer before
//! a copy on another queue has filled it. Each access to device or pinned memory is therefore
//! recorded with its agent (the host or a queue) and that agent's vector clock, and an access that
//! conflicts with an earlier one of another agent (the same bytes, one of them a write) is an
//! error unless events order the two. A run the check passes has no conflicting pair left
//! unordered, so every order a GPU may choose gives the emulator's result.
//!
//! Issuing work orders it after what the host did before (a queue's clock takes the host's at
//! each operation); `record` snapshots a queue's clock, `wait` merges a snapshot into a queue's,
//! `host_wait` and `synchronize` into the host's.
use std::collections::HashMap;
use std::rc::Weak;

use crate::gpu::Queue;

/// The agents: the host, then one per queue.
const AGENTS: usize = 4;
const HOST: usize = 0;
const NAMES: [&str; AGENTS] = ["the host", "the compute queue", "the upload queue", "the download queue"];

/// One counter per agent: how many of its operations are known to have happened.
pub type Clock = [u64; AGENTS];

fn agent(q: Queue) -> usize {
    match q {
        Queue::Compute => 1,
        Queue::Upload => 2,
        Queue::Download => 3,
    }
}

fn join(into: &mut Clock, other: &Clock) {
    for (a, b) in into.iter_mut().zip(other) {
        *a = (*a).max(*b);
    }
}

/// Bytes `lo..hi` of the memory `key` identifies, accessed by one operation.
pub struct Span {
    pub key: usize,
    pub lo: usize,
    pub hi: usize,
    pub write: bool,
}

/// An access remembered: by whom, at which of its operations, what it was.
struct Access {
    lo: usize,
    hi: usize,
    agent: usize,
    epoch: u64,
    write: bool,
    what: &'static str,
}

/// The accesses to one allocation, with a handle that says whether it is still alive (the key, an
/// address, may be reused by a later allocation).
struct Memory {
    alive: Weak<dyn std::any::Any>,
    seen: Vec<Access>,
}

/// The clocks and the accesses remembered.
#[derive(Default)]
pub struct Order {
    clocks: [Clock; AGENTS],
    memory: HashMap<usize, Memory>,
    /// The number of allocations at the last sweep of dead ones.
    swept: usize,
}

impl Order {
    /// Starts an operation of agent `a`: after everything the host did before issuing it.
    fn step(&mut self, a: usize) -> Clock {
        if a != HOST {
            let host = self.clocks[HOST];
            join(&mut self.clocks[a], &host);
        }
        self.clocks[a][a] += 1;
        self.clocks[a]
    }

    /// A new allocation at `key`: what an earlier, freed one there saw is forgotten.
    pub fn fresh(&mut self, key: usize, alive: Weak<dyn std::any::Any>) {
        if self.memory.len() > 2 * self.swept + 64 {
            self.memory.retain(|_, m| m.alive.strong_count() > 0);
            self.swept = self.memory.len();
        }
        self.memory.insert(key, Memory { alive, seen: Vec::new() });
    }

    /// One operation `what` of `q` (or of the host, for `None`) that accesses `spans`: an error
    /// naming the first earlier access of another agent it conflicts with and is not ordered after.
    pub fn access(&mut self, q: Option<Queue>, what: &'static str, spans: &[Span]) -> Result<(), String> {
        let a = q.map_or(HOST, agent);
        let clock = self.step(a);
        for s in spans {
            let Some(m) = self.memory.get(&s.key) else { continue };
            let unordered = m.seen.iter().find(|r| r.agent != a && (r.write || s.write) && r.lo < s.hi && s.lo < r.hi && clock[r.agent] < r.epoch);
            if let Some(r) = unordered {
                return Err(format!(
                    "unordered access: {what} ({}) {} bytes {}..{} of a buffer that {} ({}) {} (bytes {}..{}), and no event orders the two: \
                     record an event after the one and wait for it before the other",
                    NAMES[a],
                    if s.write { "writes" } else { "reads" },
                    s.lo,
                    s.hi,
                    r.what,
                    NAMES[r.agent],
                    if r.write { "wrote" } else { "read" },
                    r.lo,
                    r.hi,
                ));
            }
        }
        for s in spans {
            let Some(m) = self.memory.get_mut(&s.key) else { continue };
            // Forgotten: what a write covers (every overlapping access is ordered before it now),
            // and this agent's earlier reads a read covers (a conflict with them is one with it).
            m.seen.retain(|r| !(s.lo <= r.lo && r.hi <= s.hi && (s.write || (r.agent == a && !r.write))));
            m.seen.push(Access { lo: s.lo, hi: s.hi, agent: a, epoch: clock[a], write: s.write, what });
        }
        Ok(())
    }

    /// An event after the work issued on `q` so far.
    pub fn record(&mut self, q: Queue) -> Clock {
        self.step(agent(q))
    }

    /// Work issued on `q` from now on is ordered after `e`.
    pub fn wait(&mut self, q: Queue, e: &Clock) {
        let a = agent(q);
        self.step(a);
        join(&mut self.clocks[a], e);
    }

    /// The host is ordered after `e`.
    pub fn host_wait(&mut self, e: &Clock) {
        join(&mut self.clocks[HOST], e);
    }

    /// The host is ordered after all work issued so far.
    pub fn synchronize(&mut self) {
        for a in 1..AGENTS {
            let c = self.clocks[a];
            join(&mut self.clocks[HOST], &c);
        }
    }
}
