//! The lease keeper: a thread of its own (its database calls block) that keeps this node's
//! share of the partitions.
//!
//! Every round (an eighth of the lease time) it says the node is alive, lists the live nodes,
//! renews the leases it holds, and spreads the partitions over the live nodes by rendezvous
//! hashing. A partition this node should own is taken as soon as its lease is free (ran out,
//! or given back), at a new epoch, and the router is told ([`ClusterEvent::Gained`]) after the
//! store's fences hold it. One another live node should own is handed over: the router stops
//! taking work for it and says when nothing touches it any more ([`ClusterEvent::Release`]),
//! then the fences drop it and its lease is given back, so that its next owner takes it at
//! once. A lease the renewal finds taken over, or not renewed within the lease time (the
//! database could not be reached, or the node was paused), is lost: the fences drop it at once
//! (any commit touching it is refused) and the router is told ([`ClusterEvent::Lost`]).
//!
//! Asked to stop, it hands every partition over the same way and takes the node off the live
//! list, so that the others take its partitions at their next round.

use super::route::ClusterEvent;
use super::{SharedStatus, Status};
use crate::metrics as m;
use crate::router::Command;
use ordo_core::partition::assign;
use ordo_store_postgres::lease::{Fences, LeaseTable};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a handover waits for the router to drain a partition before it tries again next
/// round (the partition stays this node's meanwhile), at most: never more than a quarter of the
/// lease, since nothing is renewed while it waits.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

pub struct Keeper {
    pub table: LeaseTable,
    pub fences: Arc<Fences>,
    pub router: mpsc::Sender<Command>,
    pub lease: Duration,
    pub info: String,
    pub status: SharedStatus,
    pub stop: Arc<AtomicBool>,
}

impl Keeper {
    fn send(&self, e: ClusterEvent) -> bool {
        self.router.blocking_send(Command::Cluster(e)).is_ok()
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// Runs until asked to stop (then hands everything over) or the router is gone.
    pub fn run(self) {
        let round = self.lease / 8;
        let mut renewed = Instant::now();
        let mut status = Status {
            node: self.fences.node().to_string(),
            partitions: self.fences.partitions(),
            ..Status::default()
        };
        let mut last_view = None;
        while !self.stop.load(Ordering::Acquire) {
            if self.router.is_closed() {
                // The node stopped (a failed commit): nothing more is committed here, so its
                // partitions go back at once rather than when their leases run out.
                self.router_gone(&mut status);
                break;
            }
            let started = Instant::now();
            match self.round(&mut status, &mut last_view) {
                Ok(()) => renewed = started,
                Err(e) => {
                    tracing::warn!(error = %e, "lease round failed");
                    // Not renewed within the lease time: the leases may be another's now.
                    if renewed.elapsed() >= self.lease {
                        for (part, _) in self.fences.held() {
                            self.lose(part, &mut status, "not renewed within the lease time");
                        }
                    }
                }
            }
            *self.status.write().unwrap_or_else(|p| p.into_inner()) = status.clone();
            std::thread::sleep(round.saturating_sub(started.elapsed()));
        }
        if !self.router.is_closed() {
            self.hand_everything_over(&mut status);
        }
        *self.status.write().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// The router is gone: every lease goes back without a drain (a commit still on its way
    /// holds its lease rows locked, and a takeover waits for it), and the node leaves.
    fn router_gone(&self, status: &mut Status) {
        if let Err(e) = self.table.leave() {
            tracing::warn!(error = %e, "could not take this node off the live list");
        }
        for (part, epoch) in self.fences.held() {
            self.fences.forget(part);
            match self.table.release(part, epoch) {
                Ok(()) => status.handovers += 1,
                Err(e) => {
                    tracing::warn!(part, error = %e, "could not give a lease back; it runs out")
                }
            }
        }
        metrics::gauge!(m::CLUSTER_PARTITIONS_HELD).set(0.0);
    }

    fn lose(&self, part: u32, status: &mut Status, why: &str) {
        self.fences.forget(part);
        status.leases_lost += 1;
        metrics::counter!(m::CLUSTER_LEASES_LOST).increment(1);
        tracing::error!(part, why, "lost the lease of a partition");
        self.send(ClusterEvent::Lost { part });
    }

    fn round(
        &self,
        status: &mut Status,
        last_view: &mut Option<Vec<Option<Arc<str>>>>,
    ) -> Result<(), ordo_store::StoreError> {
        let me = self.fences.node().to_string();
        let lease_ms = self.lease_ms();
        let live = self.table.heartbeat(&self.info, lease_ms)?;
        let held = self.fences.held();
        let kept: HashSet<u32> = self.table.renew(&held, lease_ms)?.into_iter().collect();
        status.renewals += 1;
        metrics::counter!(m::CLUSTER_RENEWALS).increment(1);
        for (part, _) in &held {
            if !kept.contains(part) {
                self.lose(*part, status, "another node took it over");
            }
        }
        let owners = assign(self.fences.partitions(), &live);
        let mut leaving = Vec::new();
        for (part, owner) in owners.iter().enumerate() {
            let part = part as u32;
            let target = owner.map(|i| live[i].as_str());
            let mine = self.fences.epoch(part);
            match (target == Some(me.as_str()), mine) {
                (true, None) => {
                    if let Some(epoch) = self.table.acquire(part, lease_ms)? {
                        self.fences.hold(part, epoch);
                        if !self.send(ClusterEvent::Gained { part, epoch }) {
                            // The node is stopping: the partition goes back at once.
                            self.fences.forget(part);
                            self.table.release(part, epoch)?;
                            return Ok(());
                        }
                        status.takeovers += 1;
                        metrics::counter!(m::CLUSTER_TAKEOVERS).increment(1);
                        tracing::info!(part, epoch, "took a partition");
                    }
                }
                (false, Some(epoch)) if target.is_some() => leaving.push((part, epoch)),
                _ => {}
            }
        }
        if !leaving.is_empty() {
            self.hand_over(&leaving, status)?;
        }
        let table = self.table.table()?;
        status.live_nodes = live.clone();
        status.owners = table
            .iter()
            .map(|r| {
                r.live
                    .then(|| (r.node.clone().unwrap_or_default(), r.epoch))
            })
            .collect();
        let view: Vec<Option<Arc<str>>> = table
            .iter()
            .map(|r| r.node.as_deref().filter(|_| r.live).map(Arc::from))
            .collect();
        metrics::gauge!(m::CLUSTER_PARTITIONS_HELD).set(self.fences.held().len() as f64);
        if last_view.as_ref() != Some(&view) || status.renewals.is_multiple_of(8) {
            self.send(ClusterEvent::View {
                owners: view.clone(),
                live: live.iter().map(|n| Arc::from(n.as_str())).collect(),
            });
            *last_view = Some(view);
        }
        Ok(())
    }

    /// Hands `parts` over: the router drains each, then the fences drop it and its lease is
    /// given back. One the router does not drain in time stays this node's until next round.
    fn hand_over(
        &self,
        parts: &[(u32, u64)],
        status: &mut Status,
    ) -> Result<(), ordo_store::StoreError> {
        let mut waiting = Vec::new();
        for (part, epoch) in parts {
            let (done, drained) = std::sync::mpsc::channel();
            if self.send(ClusterEvent::Release { part: *part, done }) {
                waiting.push((*part, *epoch, drained));
            } else {
                // No router: nothing to drain (see `router_gone`).
                self.fences.forget(*part);
                self.table.release(*part, *epoch)?;
                status.handovers += 1;
            }
        }
        let until = Instant::now() + DRAIN_WAIT.min(self.lease / 4);
        for (part, epoch, drained) in waiting {
            let left = until.saturating_duration_since(Instant::now());
            if drained.recv_timeout(left).is_err() {
                tracing::warn!(part, "partition not drained in time; handing it over later");
                self.send(ClusterEvent::Keep { part, epoch });
                continue;
            }
            self.fences.forget(part);
            self.table.release(part, epoch)?;
            status.handovers += 1;
            metrics::counter!(m::CLUSTER_HANDOVERS).increment(1);
            tracing::info!(part, epoch, "handed a partition over");
        }
        Ok(())
    }

    /// Stopping: every partition handed over, and the node off the live list.
    fn hand_everything_over(&self, status: &mut Status) {
        if let Err(e) = self.table.leave() {
            tracing::warn!(error = %e, "could not take this node off the live list");
        }
        let held = self.fences.held();
        if let Err(e) = self.hand_over(&held, status) {
            tracing::warn!(error = %e, "could not give every lease back; the others take them once they run out");
        }
        metrics::gauge!(m::CLUSTER_PARTITIONS_HELD).set(self.fences.held().len() as f64);
    }
}
