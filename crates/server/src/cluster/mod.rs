//! A node of a cluster: several `ordo serve --cluster` processes sharing one PostgreSQL
//! database (the system of record) and one NATS server (the traffic between nodes).
//!
//! Conversations hash into a fixed number of partitions (`ordo_core::partition`). Each
//! partition is owned by one live node at a time through its lease in the database, which
//! carries a fencing epoch that every commit checks in its own statement
//! (`ordo_store_postgres::lease`): a node that lost a lease can never commit for that partition
//! again. The pieces:
//!
//! - [`keeper`]: the lease keeper, a thread of its own. It says the node is alive, spreads the
//!   partitions over the live nodes by rendezvous hashing, takes the partitions this node
//!   should own once their leases are free, renews them, hands over (drained first) those
//!   another node should own, and tells the router who owns what.
//! - the router (see `route`): a frame about a conversation this node owns goes to its core
//!   as on one node; one about a conversation another node owns is forwarded to that node over
//!   NATS ([`wire`]), numbered in its connection's stream; answers and pushes come back the
//!   same way.
//! - [`remote`]: on the owner, every connection of another node is a session of its core, as
//!   a local one is, fed by the frames forwarded to it: the owner's hub pushes to it, and its
//!   frames go back to the connection's node.
//!
//! What keeps the contract across nodes: a send is answered `accepted` only after its owner's
//! commit; a frame lost between nodes is noticed by its number (the owner closes the
//! connection, and its client resends in order); a send unanswered for too long closes the
//! connection likewise; a connection whose sends to one partition went to two owners is closed
//! rather than have them overtake each other. NATS delivers at most once, and a lost push or
//! receipt shows up as a gap the device syncs, as on one node.

pub mod keeper;
pub mod remote;
pub mod route;
pub mod wire;

use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A node's cluster settings.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's id: unique in the cluster, stable across restarts if given.
    pub node_id: String,
    /// The NATS server the nodes talk through.
    pub nats: String,
    /// Subjects start with this (every node of a cluster uses the same).
    pub subject_prefix: String,
    /// The cluster's partition count (every node the same; fixed for the cluster's life).
    pub partitions: u32,
    /// How long a lease runs without renewal: a dead node's partitions are taken over within
    /// about this long.
    pub lease: Duration,
    /// How long a forwarded send may stay unanswered before its connection is closed.
    pub forward_timeout: Duration,
    /// Where other nodes' people reach this node (shown in the admin API).
    pub info: String,
}

/// What the admin API and metrics show of the cluster: the keeper's last round.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub node: String,
    pub partitions: u32,
    pub live_nodes: Vec<String>,
    /// Each partition's live lease: (node, epoch), or none while it moves.
    pub owners: Vec<Option<(String, u64)>>,
    pub takeovers: u64,
    pub handovers: u64,
    pub leases_lost: u64,
    pub renewals: u64,
}

pub type SharedStatus = Arc<RwLock<Status>>;

use crate::router::{Command, Router};
use crate::{Config, ServerError};
use ordo_store::Store;
use ordo_store_postgres::lease::{Fences, LeaseTable};
use std::sync::atomic::AtomicBool;
use tokio::sync::{mpsc, watch};

/// How long a starting node waits for NATS.
const NATS_WAIT: Duration = Duration::from_secs(10);
/// Messages to other nodes the router may have waiting for the publisher (and bytes: see
/// `route::PUBLISH_BYTES`).
const PUBLISH_QUEUE: usize = 65_536;

/// A node about to join: its lease table and fences (its store is opened with them).
pub struct Node {
    pub fences: Arc<Fences>,
    table: LeaseTable,
    node_id: String,
}

/// Opens the lease table for this node (generating its id if none was given), waiting, as
/// for the store, for a database that cannot be reached yet.
pub async fn open_node(cfg: &Config, url: &str) -> Result<Node, ServerError> {
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(|| format!("n-{:012x}", rand::random::<u64>() >> 16));
    let (u, id, parts) = (url.to_string(), node_id.clone(), cfg.partitions);
    let table = crate::wait_for_database(move || LeaseTable::open(&u, &id, parts)).await?;
    Ok(Node {
        fences: Fences::new(&node_id, cfg.partitions),
        table,
        node_id,
    })
}

/// A node that joined: its keeper runs.
pub struct Joined {
    pub status: SharedStatus,
    stop: Arc<AtomicBool>,
    keeper: std::thread::JoinHandle<()>,
    /// The store as remote sessions read it, released once the router has ended.
    pub store: Arc<remote::StoreRef>,
}

impl Node {
    /// Joins the cluster: connects to NATS, makes `router` a node's router, and starts the
    /// dispatcher, the publisher and the lease keeper.
    pub async fn join(
        self,
        cfg: &Config,
        router: &mut Router,
        router_tx: mpsc::Sender<Command>,
        store: Arc<dyn Store>,
        stop: watch::Receiver<bool>,
    ) -> Result<Joined, ServerError> {
        let url = cfg.nats.clone().unwrap_or_default();
        let cc = ClusterConfig {
            node_id: self.node_id.clone(),
            nats: url.clone(),
            subject_prefix: cfg.subject_prefix.clone(),
            partitions: cfg.partitions,
            lease: Duration::from_millis(cfg.lease_ms),
            forward_timeout: Duration::from_secs(cfg.forward_timeout_secs),
            info: cfg.listen.to_string(),
        };
        let troubles = router_tx.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("ordo node {}", cc.node_id))
            .request_timeout(Some(remote::REQUEST_TIMEOUT))
            .event_callback(move |event| {
                let troubles = troubles.clone();
                async move {
                    let why = match event {
                        async_nats::Event::Disconnected => "disconnected from NATS".to_string(),
                        async_nats::Event::SlowConsumer(_) => {
                            "messages from other nodes were dropped (slow consumer)".to_string()
                        }
                        _ => return,
                    };
                    tracing::warn!(%why, "NATS");
                    let _ = troubles
                        .send(Command::Cluster(route::ClusterEvent::NatsTrouble(why)))
                        .await;
                }
            });
        let nats = tokio::time::timeout(NATS_WAIT, options.connect(url.as_str()))
            .await
            .map_err(|_| {
                ServerError::Cluster(format!(
                    "NATS at {url} did not answer within {} s; is nats-server running there?",
                    NATS_WAIT.as_secs()
                ))
            })?
            .map_err(|e| ServerError::Cluster(format!("cannot connect to NATS at {url}: {e}")))?;
        let subject = wire::node_subject(&cc.subject_prefix, &cc.node_id);
        let sub = nats
            .subscribe(subject.clone())
            .await
            .map_err(|e| ServerError::Cluster(format!("cannot subscribe to {subject}: {e}")))?;
        let (out_tx, out_rx) = mpsc::channel(PUBLISH_QUEUE);
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(remote::publisher(nats.clone(), out_rx, queued.clone()));
        router.set_cluster(route::ClusterState::new(
            &cc,
            nats.clone(),
            route::Outbox { tx: out_tx, queued },
        ));
        // A page goes back in one NATS message, which the server caps (1 MB by default).
        let max_payload = match nats.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        };
        let max_sync_bytes = cfg.max_sync_bytes.min(max_payload / 2).max(1024);
        let store = remote::StoreRef::new(store);
        let ctx = remote::Ctx {
            node: cc.node_id.as_str().into(),
            prefix: cc.subject_prefix.as_str().into(),
            nats,
            router: router_tx.clone(),
            store: store.clone(),
            outbound_queue: cfg.outbound_queue,
            outbound_bytes: cfg.outbound_bytes,
            max_sync_bytes,
        };
        tokio::spawn(remote::dispatch(ctx, sub, stop));
        let status = SharedStatus::default();
        let stop = Arc::new(AtomicBool::new(false));
        let keeper = keeper::Keeper {
            table: self.table,
            fences: self.fences,
            router: router_tx,
            lease: cc.lease,
            info: cc.info.clone(),
            status: status.clone(),
            stop: stop.clone(),
        };
        let keeper = std::thread::Builder::new()
            .name("ordo-leases".into())
            .spawn(move || keeper.run())
            .map_err(ServerError::Io)?;
        tracing::info!(node = %cc.node_id, partitions = cc.partitions, lease_ms = cfg.lease_ms, "joined the cluster");
        Ok(Joined {
            status,
            stop,
            keeper,
            store,
        })
    }
}

impl Joined {
    /// Hands every partition over and leaves the cluster (the router must still run).
    pub async fn leave(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let keeper = self.keeper;
        let _ = tokio::task::spawn_blocking(move || keeper.join()).await;
    }
}
