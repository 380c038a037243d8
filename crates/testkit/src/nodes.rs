//! The nodes of a cluster as child processes: `ordo serve --cluster` several times over, on one
//! PostgreSQL database and one NATS server, sharing a token secret; and what tests ask of a
//! cluster (each partition's owner, as a node's admin API reports it).
//!
//! NATS is the machine's (`ORDO_TEST_NATS`, by default `nats://127.0.0.1:4222`): without it a
//! test is skipped with the reason printed, except in CI (`CI=true`), where it fails.

use crate::{Admin, HarnessError, ServerOptions, ServerProcess};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The NATS server tests use.
pub fn nats_url() -> String {
    std::env::var("ORDO_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The NATS URL if a server answers there; `None` (after printing that `test` is skipped)
/// outside CI, a panic in CI.
pub fn nats_or_skip(test: &str) -> Option<String> {
    let url = nats_url();
    let addr = url.trim_start_matches("nats://").to_string();
    let up = std::net::ToSocketAddrs::to_socket_addrs(&addr.as_str())
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if up {
        return Some(url);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("NATS is needed in CI and does not answer at {url}");
    }
    eprintln!("SKIPPED {test}: no NATS at {url}; set ORDO_TEST_NATS to one to run this");
    None
}

/// How to start the nodes.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub exe: PathBuf,
    /// The PostgreSQL database every node shares (a `postgres://` URL).
    pub store: String,
    pub nats: String,
    /// Subjects of this cluster start with this (unique per run, so runs never hear each
    /// other).
    pub prefix: String,
    pub lease_ms: u64,
    pub partitions: u32,
    pub secret: String,
    /// More `ordo serve` flags for every node.
    pub extra: Vec<String>,
}

/// A cluster's nodes, `node0`, `node1`, ...
pub struct Nodes {
    pub nodes: Vec<ServerProcess>,
    pub opts: NodeOptions,
}

impl Nodes {
    /// Starts `n` nodes and waits until every partition has a live owner.
    pub async fn start(n: usize, opts: NodeOptions) -> Result<Nodes, HarnessError> {
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut o = ServerOptions::new(opts.exe.clone());
            o.secret = Some(opts.secret.clone());
            o.extra = [
                "--cluster",
                "--store",
                &opts.store,
                "--nats",
                &opts.nats,
                "--node-id",
                &format!("node{i}"),
                "--subject-prefix",
                &opts.prefix,
                "--lease-ms",
                &opts.lease_ms.to_string(),
                "--partitions",
                &opts.partitions.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(opts.extra.iter().cloned())
            .collect();
            let node = tokio::task::spawn_blocking(move || ServerProcess::start(o))
                .await
                .map_err(|e| HarnessError::Start(e.to_string()))??;
            nodes.push(node);
        }
        let nodes = Nodes { nodes, opts };
        let all: Vec<usize> = (0..n).collect();
        nodes.at_rest(&all, Duration::from_secs(30)).await?;
        Ok(nodes)
    }

    /// Node `i`'s admin API.
    pub fn admin(&self, i: usize) -> Result<Admin, HarnessError> {
        let n = &self.nodes[i];
        Admin::new(&n.http_url(), n.admin_key())
    }

    /// Each partition's live owner as node `via` last saw it (`None` while it moves).
    pub async fn owners(&self, via: usize) -> Result<Vec<Option<String>>, HarnessError> {
        Ok(self.status(via).await?.0)
    }

    /// Node `via`'s view: each partition's live owner, and the live nodes.
    async fn status(&self, via: usize) -> Result<(Vec<Option<String>>, Vec<String>), HarnessError> {
        let reply = self.admin(via)?.get("/v1/admin/cluster").await?;
        reply.success("read the cluster's status")?;
        let v: serde_json::Value = serde_json::from_str(&reply.body)
            .map_err(|e| HarnessError::Request(format!("cluster status: {e}")))?;
        let owners = v["owners"]
            .as_array()
            .ok_or_else(|| HarnessError::Request(format!("no owners in {}", reply.body)))?;
        let live = v["live_nodes"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok((
            owners
                .iter()
                .map(|o| o.get(0).and_then(|n| n.as_str()).map(str::to_string))
                .collect(),
            live,
        ))
    }

    /// The node owning `conv`'s partition, by node `via`'s view.
    pub async fn owner_of(&self, via: usize, conv: &str) -> Result<Option<String>, HarnessError> {
        let part = ordo_core::partition::partition_of(conv, self.opts.partitions) as usize;
        Ok(self.owners(via).await?.get(part).cloned().flatten())
    }

    /// Waits until, by node `via`'s view, every partition has a live owner and none is `not`;
    /// returns how long that took.
    pub async fn settled(
        &self,
        via: usize,
        not: Option<&str>,
        timeout: Duration,
    ) -> Result<Duration, HarnessError> {
        let started = Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < timeout {
            if let Ok((owners, _)) = self.status(via).await {
                if owners
                    .iter()
                    .all(|o| o.as_deref().is_some_and(|n| Some(n) != not))
                {
                    return Ok(started.elapsed());
                }
                last = owners;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(HarnessError::Request(format!(
            "after {} s, partitions still without an owner (or owned by {not:?}): {:?}",
            timeout.as_secs(),
            last.iter()
                .enumerate()
                .filter(|(_, o)| o.is_none() || o.as_deref() == not)
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        )))
    }

    /// Waits until every node in `running` sees every partition owned where rendezvous hashing
    /// over the live nodes puts it (the cluster is at rest: nothing moves any more).
    pub async fn at_rest(&self, running: &[usize], timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        let mut last = String::new();
        'wait: while started.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for &i in running {
                let (owners, live) = match self.status(i).await {
                    Ok(s) => s,
                    Err(e) => {
                        last = e.to_string();
                        continue 'wait;
                    }
                };
                for (p, o) in owners.iter().enumerate() {
                    let want = ordo_core::partition::owner(p as u32, &live);
                    if o.as_deref() != want {
                        last = format!("node{i} sees partition {p} at {o:?}, not yet at {want:?}");
                        continue 'wait;
                    }
                }
            }
            return Ok(());
        }
        Err(HarnessError::Request(format!(
            "the cluster did not come to rest in {} s: {last}",
            timeout.as_secs()
        )))
    }

    /// The index of node `id` (`node<i>`).
    pub fn index(id: &str) -> Option<usize> {
        id.strip_prefix("node")?.parse().ok()
    }
}
