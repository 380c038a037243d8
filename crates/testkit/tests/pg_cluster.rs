//! The test kit's PostgreSQL of its own: a committed row survives a SIGKILL of the primary and
//! the failover to a standby, and writes go on on the new primary. Skipped with the reason
//! printed where the PostgreSQL server binaries are missing, except in CI (`CI=true`).

use ordo_testkit::pg_cluster::{bin_dir, PgCluster};

#[test]
fn a_committed_row_survives_failovers() {
    if let Err(why) = bin_dir() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}");
        }
        eprintln!("SKIPPED a_committed_row_survives_failovers: {why}");
        return;
    }
    let mut c = PgCluster::start(2).expect("start a primary and two standbys");
    let mut db = postgres::Client::connect(&c.url(), postgres::NoTls).expect("connect");
    db.batch_execute("CREATE TABLE t (n int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .expect("write");
    for n in 2..=4 {
        let before = c.primary().to_string();
        let f = c.fail_primary().expect("fail over");
        assert_ne!(f.primary, before, "a standby took over");
        let mut db = postgres::Client::connect(&c.url(), postgres::NoTls).expect("reconnect");
        db.execute("INSERT INTO t VALUES ($1)", &[&n])
            .expect("write on the new primary");
        let count: i64 = db.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
        assert_eq!(count, n as i64);
    }
}
