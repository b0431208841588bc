//! The PostgreSQL harness itself: a private cluster on a free loopback port, a database per
//! test from a template, and an immediate stop and restart that keeps what was committed.

use gridsense_tests::postgres::Postgres;

#[test]
fn a_private_cluster_serves_template_copies_and_survives_an_immediate_stop() {
    let mut pg = Postgres::start_durable().expect("start PostgreSQL");
    assert!(pg.addr().ip().is_loopback());
    assert_ne!(pg.addr().port(), 5432, "never the system cluster's port");
    pg.psql("postgres", "CREATE DATABASE tpl").expect("template");
    pg.psql("tpl", "CREATE TABLE t (x int); INSERT INTO t VALUES (1)").expect("fill template");
    let url = pg.database(Some("tpl")).expect("copy");
    let db = url.rsplit('/').next().expect("db name").to_owned();
    assert_eq!(pg.psql(&db, "SELECT sum(x) FROM t").expect("query"), "1");
    pg.psql(&db, "INSERT INTO t VALUES (2)").expect("insert");
    pg.stop_immediate().expect("stop");
    assert!(pg.psql(&db, "SELECT 1").is_err(), "stopped");
    pg.restart().expect("restart");
    assert_eq!(pg.psql(&db, "SELECT sum(x) FROM t").expect("after recovery"), "3");
    let other = pg.database(None).expect("empty db");
    assert_ne!(other, url);
}
