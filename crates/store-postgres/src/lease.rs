//! Leases of a cluster's partitions, held in the database that is the cluster's system of
//! record, and the fence every commit passes through.
//!
//! A cluster splits conversations into a fixed number of partitions (see
//! `ordo_core::partition`); each partition is owned by one node at a time through its row in
//! `ordo_leases` (schema step 8): the node holding it, a fencing *epoch*, and when the lease
//! runs out, by the database's clock (so that the nodes' clocks never need to agree). Nodes say
//! they are alive in `ordo_nodes`.
//!
//! - **Taking a partition** ([`LeaseTable::acquire`]) is allowed only once its lease ran out or
//!   was given back, and moves the epoch on by one.
//! - **Every commit is fenced**: the commit statement locks the lease rows of the partitions
//!   its batch writes to (`FOR SHARE`) and is refused whole (OR003, reported as
//!   [`StoreError::Fenced`]) unless this node still holds each of them at the epoch it took it
//!   with ([`Fences`]). A takeover's update waits for a commit holding that lock, and a commit
//!   waiting for a takeover's lock sees the moved epoch: either the commit comes first, and the
//!   new owner, which reads the conversations only after its takeover, sees it, or it is
//!   refused. So a node that lost a lease (paused past it, cut off from the others, slow)
//!   never commits for that partition again, whatever it believes.
//! - **Renewing** ([`LeaseTable::renew`]) pushes the end of the leases a node still holds at
//!   their epochs, and says which those are; [`LeaseTable::release`] gives one back at once
//!   (a node handing a partition over, or stopping).
//!
//! The lease time bounds only how long a partition stays without an owner when its node dies;
//! safety never depends on it, nor on any clock.

use crate::pool::Pool;
use crate::{db, i, u};
use ordo_core::partition::partition_of;
use ordo_core::Batch;
use ordo_store::StoreError;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

/// Most partitions a cluster may have: enough to spread over many nodes and database shards,
/// few enough that every node reads the whole lease table each round.
pub const MAX_PARTITIONS: u32 = 4096;

/// `ordo_fenced` (schema step 8): the commit writes to a partition this node does not hold
/// at the epoch it took it with.
pub(crate) const FENCED: &str = "OR003";

/// The partitions this node holds and at which epochs: what each commit is fenced with.
/// Shared by the lease keeper (which takes and gives back leases) and the store (which checks
/// every batch against it).
pub struct Fences {
    node: String,
    partitions: u32,
    held: RwLock<HashMap<u32, u64>>,
}

impl Fences {
    pub fn new(node: &str, partitions: u32) -> Arc<Fences> {
        Arc::new(Fences {
            node: node.to_string(),
            partitions: partitions.clamp(1, MAX_PARTITIONS),
            held: RwLock::new(HashMap::new()),
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// This node took `part` at `epoch`.
    pub fn hold(&self, part: u32, epoch: u64) {
        self.held
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(part, epoch);
    }

    /// This node no longer holds `part` (gave it back, or lost it).
    pub fn forget(&self, part: u32) {
        self.held
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&part);
    }

    /// The epoch `part` is held at, if this node holds it.
    pub fn epoch(&self, part: u32) -> Option<u64> {
        self.held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&part)
            .copied()
    }

    /// Every partition held, with its epoch, in partition order.
    pub fn held(&self) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = self
            .held
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, e)| (*p, *e))
            .collect();
        v.sort_unstable();
        v
    }

    /// The partition of `conv`.
    pub fn partition(&self, conv: &str) -> u32 {
        partition_of(conv, self.partitions)
    }

    /// The partitions `batch` writes to, each with the epoch it is held at: what its commit
    /// checks. A partition this node does not hold is refused before anything is sent.
    pub(crate) fn of_batch(&self, b: &Batch) -> Result<(Vec<i32>, Vec<i64>), StoreError> {
        let mut parts = BTreeSet::new();
        let convs = b
            .messages
            .iter()
            .map(|m| m.conv.as_str())
            .chain(b.convs.iter().map(|c| c.id.as_str()))
            .chain(b.positions.iter().map(|p| p.id.as_str()))
            .chain(b.cursors.iter().map(|c| c.conv.as_str()))
            .chain(b.trim_below.iter().map(|(c, _)| c.as_str()))
            .chain(b.trim_before_ms.iter().map(|(c, _)| c.as_str()));
        for conv in convs {
            parts.insert(self.partition(conv));
        }
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        let mut epochs = Vec::with_capacity(parts.len());
        for p in &parts {
            match held.get(p) {
                Some(e) => epochs.push(i(*e)),
                None => {
                    return Err(StoreError::Fenced {
                        lease: format!("partition {p}"),
                        detail: format!(
                            "node {} does not hold its lease; its batch {} was not written",
                            self.node, b.id
                        ),
                    })
                }
            }
        }
        Ok((parts.into_iter().map(|p| p as i32).collect(), epochs))
    }
}

/// One partition's lease as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub part: u32,
    /// The node holding it (or that held it last); `None` if never taken or given back.
    pub node: Option<String>,
    pub epoch: u64,
    /// Whether it has not run out yet, by the database's clock.
    pub live: bool,
}

/// A node's view of the lease table: its own connection to the database.
pub struct LeaseTable {
    pool: Pool,
    node: String,
    partitions: u32,
}

impl LeaseTable {
    /// Opens the table for node `node` of a cluster of `partitions` partitions: makes the
    /// schema current and a lease row for every partition. A database whose cluster was made
    /// with another number of partitions is refused (conversations would move between owners
    /// without a takeover).
    pub fn open(url: &str, node: &str, partitions: u32) -> Result<LeaseTable, StoreError> {
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(StoreError::Unavailable(format!(
                "a cluster has 1 to {MAX_PARTITIONS} partitions, not {partitions}"
            )));
        }
        if node.is_empty() || node.len() > 128 {
            return Err(StoreError::Unavailable(
                "a node id is 1 to 128 bytes long".into(),
            ));
        }
        let pool = Pool::new(url)?;
        let mut c = pool.get()?;
        crate::apply_schema(&mut c, url)?;
        let (client, _) = c.split();
        let mut tx = client
            .transaction()
            .map_err(db("starting the lease table"))?;
        let stored: Option<i64> = tx
            .query_opt(
                "INSERT INTO ordo_state (key, value) VALUES ('partitions', $1)
                 ON CONFLICT (key) DO UPDATE SET value = ordo_state.value RETURNING value",
                &[&i(u64::from(partitions))],
            )
            .map_err(db("reading the cluster's partition count"))?
            .map(|r| r.get(0));
        if let Some(found) = stored.filter(|f| *f != i(u64::from(partitions))) {
            return Err(StoreError::Unavailable(format!(
                "this database's cluster has {found} partitions, not {partitions}: start every node with --partitions {found}"
            )));
        }
        tx.execute(
            "INSERT INTO ordo_leases (part) SELECT generate_series(0, $1 - 1)
             ON CONFLICT (part) DO NOTHING",
            &[&(partitions as i32)],
        )
        .map_err(db("making the lease rows"))?;
        tx.commit().map_err(db("making the lease rows"))?;
        drop(c);
        Ok(LeaseTable {
            pool,
            node: node.to_string(),
            partitions,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Says this node is alive (with `info`: where it is reached, for people), and returns
    /// the nodes heard from within `live_ms`, this one included, in id order.
    pub fn heartbeat(&self, info: &str, live_ms: u64) -> Result<Vec<String>, StoreError> {
        let mut c = self.pool.get()?;
        let (client, _) = c.split();
        client
            .execute(
                "INSERT INTO ordo_nodes (id, seen, info) VALUES ($1, now(), $2)
                 ON CONFLICT (id) DO UPDATE SET seen = now(), info = EXCLUDED.info",
                &[&self.node, &info],
            )
            .map_err(db("saying this node is alive"))?;
        let rows = client
            .query(
                "SELECT id FROM ordo_nodes
                 WHERE seen > now() - $1 * interval '1 millisecond' ORDER BY id",
                &[&(live_ms as f64)],
            )
            .map_err(db("listing the live nodes"))?;
        // Nodes gone for a day are forgotten.
        client
            .execute(
                "DELETE FROM ordo_nodes WHERE seen < now() - interval '1 day'",
                &[],
            )
            .map_err(db("forgetting old nodes"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// This node leaves the cluster: the others stop counting it as live at once.
    pub fn leave(&self) -> Result<(), StoreError> {
        let mut c = self.pool.get()?;
        let (client, _) = c.split();
        client
            .execute("DELETE FROM ordo_nodes WHERE id = $1", &[&self.node])
            .map_err(db("leaving the cluster"))?;
        Ok(())
    }

    /// Every partition's lease, in partition order.
    pub fn table(&self) -> Result<Vec<LeaseRow>, StoreError> {
        let mut c = self.pool.get()?;
        let (client, _) = c.split();
        let rows = client
            .query(
                "SELECT part, node, epoch, expires > now() FROM ordo_leases
                 WHERE part < $1 ORDER BY part",
                &[&(self.partitions as i32)],
            )
            .map_err(db("reading the lease table"))?;
        Ok(rows
            .iter()
            .map(|r| LeaseRow {
                part: r.get::<_, i32>(0) as u32,
                node: r.get(1),
                epoch: u(r.get(2)),
                live: r.get(3),
            })
            .collect())
    }

    /// Takes partition `part` for `lease_ms`, if its lease ran out or was given back (or this
    /// node holds it already: a node that restarted takes its partitions again, at a new
    /// epoch). Returns the new epoch, or `None` if another node holds it.
    pub fn acquire(&self, part: u32, lease_ms: u64) -> Result<Option<u64>, StoreError> {
        let mut c = self.pool.get()?;
        let (client, _) = c.split();
        let row = client
            .query_opt(
                "UPDATE ordo_leases
                 SET node = $2, epoch = epoch + 1,
                   expires = now() + $3 * interval '1 millisecond'
                 WHERE part = $1 AND (node IS NULL OR node = $2 OR expires <= now())
                 RETURNING epoch",
                &[&(part as i32), &self.node, &(lease_ms as f64)],
            )
            .map_err(db("taking a partition's lease"))?;
        Ok(row.map(|r| u(r.get(0))))
    }

    /// Pushes the end of the leases in `held` (partition, epoch) to `lease_ms` from now;
    /// returns the partitions this node still holds at those epochs (the others were taken
    /// over).
    pub fn renew(&self, held: &[(u32, u64)], lease_ms: u64) -> Result<Vec<u32>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = held.iter().map(|(p, _)| *p as i32).collect();
        let epochs: Vec<i64> = held.iter().map(|(_, e)| i(*e)).collect();
        let mut c = self.pool.get()?;
        let (client, _) = c.split();
        let rows = client
            .query(
                "UPDATE ordo_leases AS l SET expires = now() + $3 * interval '1 millisecond'
                 FROM UNNEST($1::int4[], $2::int8[]) AS h(part, epoch)
                 WHERE l.part = h.part AND l.epoch = h.epoch AND l.node = $4
                 RETURNING l.part",
                &[&parts, &epochs, &(lease_ms as f64), &self.node],
            )
            .map_err(db("renewing this node's leases"))?;
        Ok(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect())
    }

    /// Gives partition `part`, held at `epoch`, back at once, so that its next owner need not
    /// wait for it to run out.
    pub fn release(&self, part: u32, epoch: u64) -> Result<(), StoreError> {
        let mut c = self.pool.get()?;
        let (client, _) = c.split();
        client
            .execute(
                "UPDATE ordo_leases SET expires = '-infinity'
                 WHERE part = $1 AND epoch = $2 AND node = $3",
                &[&(part as i32), &i(epoch), &self.node],
            )
            .map_err(db("giving a partition's lease back"))?;
        Ok(())
    }
}
