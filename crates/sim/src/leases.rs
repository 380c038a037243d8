//! A model of a cluster's partition ownership, explored exhaustively: three server processes
//! of two node ids (an old process of node A, paused, and the one its supervisor started in
//! its place with the same `--node-id`, beside node B), one partition, two conversations in it,
//! and every interleaving (up to a depth) of leases running out, takeovers, renewals, reads,
//! commits that start and end (with a takeover able to fall between), and crashes. It checks that the stored histories never fork: no commit
//! ever meets a seq another node committed, and each conversation's seqs stay 1, 2, 3, ...
//! however stale a node's belief that it owns the partition.
//!
//! The model follows the rules as the PostgreSQL store and the lease keeper run them
//! (`crates/store-postgres/src/lease.rs`, `crates/server/src/cluster/keeper.rs`):
//!
//! - a takeover is allowed once the lease ran out or was given back (or by the node holding
//!   it), moves the epoch on by one, and waits while a commit holds the lease row locked;
//! - a commit locks the lease row at its start if, and only if, its node holds it at the epoch
//!   the node took it with, and is refused otherwise (the node then stops and forgets, as the
//!   server does on a fenced commit);
//! - a node reads a conversation's state only after it took the partition, and forgets what it
//!   held when it takes it.
//!
//! [`Sabotage`] switches one of those off, so that a test can show the exploration finds the
//! fork each one prevents.

use std::collections::HashMap;

/// Server processes in the model, and the node id each runs as.
const NODES: usize = 3;
const ID: [usize; NODES] = [0, 0, 1];
/// Conversations in the one partition.
const CONVS: usize = 2;

/// A rule of the real system switched off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    None,
    /// Commits are fenced by the node's name only, not its epoch.
    FenceWithoutEpoch,
    /// A takeover does not move the epoch.
    SameEpoch,
    /// A takeover does not wait for a commit holding the lease row.
    TakeoverIgnoresLocks,
    /// A node keeps what it held of the conversations when it takes the partition again.
    KeepStateOnTakeover,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Lease {
    node: Option<usize>,
    epoch: u64,
    live: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Node {
    /// The epoch it believes it holds the partition at.
    belief: Option<u64>,
    /// Per conversation, the last seq it knows to be stored (loaded, or its own commits).
    known: [Option<u64>; CONVS],
    /// A commit under way: (conversation, seq, epoch checked); it holds the row lock.
    committing: Option<(usize, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    lease: Lease,
    nodes: [Node; NODES],
    /// Each conversation's stored seqs, in commit order, with the node that wrote each.
    history: [Vec<(u64, usize)>; CONVS],
}

/// One step.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// The lease runs out (its holder did not renew it in time: paused, cut off, slow).
    Expire,
    Acquire(usize),
    Renew(usize),
    Load(usize, usize),
    Begin(usize, usize),
    End(usize),
    Crash(usize),
}

/// What the exploration found: the number of states seen, and the first fork with the steps
/// that led to it.
#[derive(Debug)]
pub struct Explored {
    pub states: usize,
    pub fork: Option<(String, Vec<String>)>,
}

impl State {
    fn new() -> Self {
        let node = Node {
            belief: None,
            known: [None; CONVS],
            committing: None,
        };
        State {
            lease: Lease {
                node: None,
                epoch: 0,
                live: false,
            },
            nodes: [node.clone(), node.clone(), node],
            history: [Vec::new(), Vec::new()],
        }
    }

    fn steps(&self) -> Vec<Step> {
        let mut v = vec![Step::Expire];
        for n in 0..NODES {
            v.push(Step::Acquire(n));
            v.push(Step::Renew(n));
            for c in 0..CONVS {
                v.push(Step::Load(n, c));
                v.push(Step::Begin(n, c));
            }
            v.push(Step::End(n));
            v.push(Step::Crash(n));
        }
        v
    }

    fn locked_by_other(&self, n: usize) -> bool {
        (0..NODES).any(|o| o != n && self.nodes[o].committing.is_some())
    }

    /// Applies `step`; `None` if it cannot happen now, `Err` if it forks a history.
    fn apply(&self, step: Step, sabotage: Sabotage) -> Option<Result<State, String>> {
        let mut s = self.clone();
        match step {
            Step::Expire => {
                if !s.lease.live {
                    return None;
                }
                s.lease.live = false;
            }
            Step::Acquire(n) => {
                let l = &s.lease;
                let free = l.node.is_none() || l.node == Some(ID[n]) || !l.live;
                let waits = sabotage != Sabotage::TakeoverIgnoresLocks && s.locked_by_other(n);
                if !free || waits || s.nodes[n].belief.is_some() {
                    return None;
                }
                if sabotage != Sabotage::SameEpoch {
                    s.lease.epoch += 1;
                }
                s.lease.node = Some(ID[n]);
                s.lease.live = true;
                s.nodes[n].belief = Some(s.lease.epoch);
                if sabotage != Sabotage::KeepStateOnTakeover {
                    s.nodes[n].known = [None; CONVS];
                }
            }
            Step::Renew(n) => {
                let b = s.nodes[n].belief?;
                if s.lease.node == Some(ID[n]) && s.lease.epoch == b {
                    if s.lease.live {
                        return None;
                    }
                    s.lease.live = true;
                } else {
                    // The renewal finds the lease taken over: lost (nothing in flight: the
                    // node forgets the partition).
                    if s.nodes[n].committing.is_some() {
                        return None;
                    }
                    s.nodes[n].belief = None;
                    s.nodes[n].known = [None; CONVS];
                }
            }
            // A read of the conversation's state: by its owner, or by any node (an overview of
            // a user's conversations reads them all).
            Step::Load(n, c) => {
                if s.nodes[n].known[c].is_some() {
                    return None;
                }
                s.nodes[n].known[c] = Some(s.history[c].last().map_or(0, |e| e.0));
            }
            Step::Begin(n, c) => {
                let node = &s.nodes[n];
                let (b, known) = (node.belief?, node.known[c]?);
                if node.committing.is_some() {
                    return None;
                }
                let fenced = match sabotage {
                    Sabotage::FenceWithoutEpoch => s.lease.node == Some(ID[n]),
                    _ => s.lease.node == Some(ID[n]) && s.lease.epoch == b,
                };
                if fenced {
                    s.nodes[n].committing = Some((c, known + 1));
                } else {
                    // Refused: the node stops and starts over, knowing nothing.
                    s.nodes[n] = Node {
                        belief: None,
                        known: [None; CONVS],
                        committing: None,
                    };
                }
            }
            Step::End(n) => {
                let (c, seq) = s.nodes[n].committing.take()?;
                if let Some(&(_, by)) = s.history[c].iter().find(|e| e.0 == seq) {
                    return Some(Err(format!(
                        "process {n} committed seq {seq} of conversation {c}, which process {by} had committed: the history forked"
                    )));
                }
                let last = s.history[c].last().map_or(0, |e| e.0);
                if seq != last + 1 {
                    return Some(Err(format!(
                        "process {n} committed seq {seq} of conversation {c} after seq {last}: a gap"
                    )));
                }
                s.history[c].push((seq, n));
                s.nodes[n].known[c] = Some(seq);
            }
            Step::Crash(n) => {
                if s.nodes[n] == State::new().nodes[n] {
                    return None;
                }
                // A commit under way dies with its connection: nothing of it is stored.
                s.nodes[n] = Node {
                    belief: None,
                    known: [None; CONVS],
                    committing: None,
                };
            }
        }
        Some(Ok(s))
    }
}

/// Explores every interleaving of up to `depth` steps from the start (each state once).
pub fn explore(depth: usize, sabotage: Sabotage) -> Explored {
    let mut seen: HashMap<State, usize> = HashMap::new();
    let mut path = Vec::new();
    let fork = dfs(&State::new(), depth, sabotage, &mut seen, &mut path);
    Explored {
        states: seen.len(),
        fork,
    }
}

fn dfs(
    s: &State,
    depth: usize,
    sabotage: Sabotage,
    seen: &mut HashMap<State, usize>,
    path: &mut Vec<String>,
) -> Option<(String, Vec<String>)> {
    // A state already explored with as many steps left or more holds nothing new.
    if depth == 0 || seen.get(s).is_some_and(|d| *d >= depth) {
        return None;
    }
    seen.insert(s.clone(), depth);
    for step in s.steps() {
        match s.apply(step, sabotage) {
            None => {}
            Some(Err(why)) => {
                path.push(format!("{step:?}"));
                return Some((why, path.clone()));
            }
            Some(Ok(next)) => {
                path.push(format!("{step:?}"));
                if let Some(f) = dfs(&next, depth - 1, sabotage, seen, path) {
                    return Some(f);
                }
                path.pop();
            }
        }
    }
    None
}
