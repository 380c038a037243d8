//! A cluster of real `ordo serve --cluster` nodes on one PostgreSQL schema and the machine's
//! NATS: devices on different nodes see one order; a dead owner's partitions are taken over and
//! seqs go on without a gap, under the same epoch; a node stopped with SIGTERM hands its
//! partitions over rather than let them run out.
//!
//! Without PostgreSQL or NATS the tests are skipped with the reason printed, except in CI
//! (`CI=true`), where they fail.

use ordo_protocol::ServerFrame;
use ordo_store_postgres::test_schema::TestSchema;
use ordo_testkit::device::{send_frame, Device, SendResult, Target};
use ordo_testkit::nodes::{nats_or_skip, NodeOptions, Nodes};
use ordo_testkit::ordo_exe;
use std::time::Duration;

const SECRET: &str = "cluster-test-secret-0123456789";
const PARTS: u32 = 16;

/// Starts `n` nodes on a fresh schema; `None` if PostgreSQL or NATS is missing (outside CI).
async fn cluster(test: &str, n: usize, lease_ms: u64) -> Option<(Nodes, TestSchema)> {
    let nats = nats_or_skip(test)?;
    // The synchronous PostgreSQL client runs a runtime of its own: off this one's workers.
    let schema = tokio::task::block_in_place(|| TestSchema::create(test))?;
    let opts = NodeOptions {
        exe: ordo_exe().expect("the ordo binary"),
        store: schema.uri(),
        nats,
        prefix: format!("t{:016x}", rand_suffix()),
        lease_ms,
        partitions: PARTS,
        secret: SECRET.into(),
        extra: Vec::new(),
    };
    let nodes = Nodes::start(n, opts).await.expect("start the nodes");
    Some((nodes, schema))
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()) << 40
}

/// Sends until accepted, reconnecting to `node` whenever the connection is closed (the node
/// closes it while the conversation moves, and its client resends); the seq it got.
async fn send_until_accepted(
    nodes: &Nodes,
    node: usize,
    dev: &mut Device,
    target: &Target,
    cmid: &str,
) -> u64 {
    for _ in 0..40 {
        dev.send(&send_frame(target, cmid, cmid)).await;
        loop {
            match dev.wire.recv_timeout(Duration::from_secs(15)).await {
                Ok(ServerFrame::Accepted { cmid: c, seq, .. }) if *c == *cmid => return seq,
                Ok(ServerFrame::Rejected { cmid: c, .. }) if *c == *cmid => break,
                Ok(_) => continue,
                // Closed (the conversation moved) or no answer: reconnect and resend.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let (user, device) = (dev.user.clone(), dev.device.clone());
                    *dev = Device::connect(&nodes.nodes[node], &user, &device).await;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{cmid} was never accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_on_different_nodes_see_one_order() {
    let Some((nodes, _schema)) = cluster("cluster_one_order", 3, 2000).await else {
        return;
    };
    let users: Vec<String> = (0..3).map(|i| format!("u{i}")).collect();
    // Created through node 0, whichever node owns the group.
    nodes
        .admin(0)
        .expect("admin")
        .create_group("g", &users)
        .await
        .expect("create the group");
    let mut devs = Vec::new();
    for (i, u) in users.iter().enumerate() {
        devs.push(Device::connect(&nodes.nodes[i], u, "d").await);
    }
    let g = Target::conv("g");
    let mut sent: Vec<Vec<String>> = vec![Vec::new(); 3];
    for round in 0..10 {
        for (i, d) in devs.iter_mut().enumerate() {
            let cmid = format!("{}-{round}", d.user);
            d.send(&send_frame(&g, &cmid, &cmid)).await;
            loop {
                match d.wire.recv_timeout(Duration::from_secs(15)).await {
                    Ok(ServerFrame::Accepted { cmid: c, .. }) if *c == *cmid => break,
                    Ok(_) => continue,
                    Err(e) => {
                        for n in &nodes.nodes {
                            eprintln!("---- node log\n{}", n.log_tail());
                        }
                        panic!("{cmid}: {e}");
                    }
                }
            }
            sent[i].push(cmid);
        }
    }
    // A direct conversation across nodes too.
    let direct = devs[0].send_one(&Target::to("u2"), "dm-1", "dm-1").await;
    assert!(
        matches!(direct, SendResult::Accepted { seq: 1, .. }),
        "{direct:?}"
    );
    let mut histories = Vec::new();
    for d in devs.iter_mut() {
        let msgs = d.sync_all("g", 0).await;
        histories.push(msgs);
    }
    let seqs: Vec<u64> = histories[0].iter().map(|m| m.seq).collect();
    let events = seqs.len() - 30;
    assert_eq!(
        seqs,
        (1..=(30 + events) as u64).collect::<Vec<_>>(),
        "gap-free"
    );
    for h in &histories[1..] {
        let a: Vec<(u64, &str)> = histories[0]
            .iter()
            .map(|m| (m.seq, m.cmid.as_str()))
            .collect();
        let b: Vec<(u64, &str)> = h.iter().map(|m| (m.seq, m.cmid.as_str())).collect();
        assert_eq!(a, b, "every device sees the same order");
    }
    for (i, mine) in sent.iter().enumerate() {
        let order: Vec<&str> = histories[0]
            .iter()
            .filter(|m| m.from == users[i])
            .map(|m| m.cmid.as_str())
            .collect();
        assert_eq!(order, mine.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let dm = devs[2]
        .sync_all(&ordo_protocol::direct_conv_id("u0", "u2"), 0)
        .await;
    assert_eq!(
        dm.iter().map(|m| m.cmid.as_str()).collect::<Vec<_>>(),
        ["dm-1"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_owners_partitions_are_taken_over_and_seqs_go_on() {
    let Some((mut nodes, _schema)) = cluster("cluster_takeover", 3, 1500).await else {
        return;
    };
    nodes
        .admin(0)
        .expect("admin")
        .create_group("g", &["a".to_string(), "b".to_string()])
        .await
        .expect("create the group");
    let owner = nodes
        .owner_of(0, "g")
        .await
        .expect("owners")
        .expect("owned");
    let dead = Nodes::index(&owner).expect("a node id");
    let (na, nb) = match dead {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let mut a = Device::connect(&nodes.nodes[na], "a", "d").await;
    let mut b = Device::connect(&nodes.nodes[nb], "b", "d").await;
    let g = Target::conv("g");
    let mut seqs = Vec::new();
    for i in 0..5 {
        match a.send_one(&g, &format!("m{i}"), "before").await {
            SendResult::Accepted { seq, .. } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    let before = b.sync("g", 0, None).await;

    tokio::task::block_in_place(|| nodes.nodes[dead].kill9()).expect("SIGKILL the owner");
    let took = nodes
        .settled(na, Some(&owner), Duration::from_secs(20))
        .await
        .expect("the others take the dead node's partitions");
    eprintln!("takeover after {} ms", took.as_millis());

    // A resend of a message the dead owner accepted gets the same seq from the new one.
    assert_eq!(
        send_until_accepted(&nodes, na, &mut a, &g, "m4").await,
        seqs[4]
    );
    for i in 5..10 {
        seqs.push(send_until_accepted(&nodes, na, &mut a, &g, &format!("m{i}")).await);
    }
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + 10).collect::<Vec<_>>(),
        "seqs go on without a gap across owners"
    );
    b = Device::connect(&nodes.nodes[nb], "b", "d").await;
    let after = b.sync("g", 0, None).await;
    assert_eq!(
        after.epoch, before.epoch,
        "an ordinary failover keeps the epoch"
    );
    let cmids: Vec<&str> = after.messages.iter().map(|m| m.cmid.as_str()).collect();
    let sent: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        cmids
            .iter()
            .filter(|c| c.starts_with('m'))
            .copied()
            .collect::<Vec<_>>(),
        sent.iter().map(String::as_str).collect::<Vec<_>>(),
        "each message once, in order"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_partitions_over_before_the_lease_runs_out() {
    // A lease far longer than the test: only a handover can move the partitions in time.
    let Some((mut nodes, schema)) = cluster("cluster_sigterm", 2, 60_000).await else {
        return;
    };
    let status = tokio::task::block_in_place(|| nodes.nodes[1].sigterm()).expect("SIGTERM");
    assert!(status.success(), "node1 stopped cleanly: {status:?}");
    let live: i64 = tokio::task::block_in_place(|| {
        let mut db = postgres::Client::connect(&schema.url(), postgres::NoTls).expect("connect");
        db.query_one(
            "SELECT count(*) FROM ordo_leases WHERE node = 'node1' AND expires > now()",
            &[],
        )
        .expect("count")
        .get(0)
    });
    assert_eq!(live, 0, "node1 gave its leases back");
    nodes
        .settled(0, Some("node1"), Duration::from_secs(20))
        .await
        .expect("node0 takes node1's partitions without waiting for the lease");
}

#[test]
fn a_short_chaos_run_on_three_nodes_finds_no_violation() {
    let Some(nats) = nats_or_skip("cluster_chaos") else {
        return;
    };
    let Some(schema) = TestSchema::create("cluster_chaos") else {
        return;
    };
    let url = schema.uri();
    let report = ordo_testkit::check::passing(
        std::path::Path::new(env!("CARGO_BIN_EXE_ordo")),
        &[
            "--nodes",
            "3",
            "--store",
            &url,
            "--nats",
            &nats,
            "--duration",
            "20",
            "--kill-every",
            "4",
        ],
        &[],
    );
    let faults = ["node_kills", "node_pauses", "node_stops", "nats_cuts"]
        .iter()
        .map(|f| report[f].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(faults >= 2, "too few node faults in the run:\n{report:#}");
}
