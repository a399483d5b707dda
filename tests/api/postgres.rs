//! The PostgreSQL store, against a real server (the store itself is being built: issue 12).

use offload::store::postgres::schema::{migrate, version, SCHEMA_VERSION};

use crate::pg::Postgres;

#[actix_web::test]
async fn instances_starting_together_migrate_the_schema_once() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(pg.connect(&url).await);
    }
    // Three migrations at once, as three instances starting together would run them.
    let runs = clients.into_iter().map(|mut c| async move { migrate(&mut c).await.map(|()| c) });
    let done = futures::future::join_all(runs).await;
    let clients: Vec<_> = done.into_iter().map(|r| r.expect("every migration succeeds")).collect();
    assert_eq!(version(&clients[0]).await.unwrap(), SCHEMA_VERSION);
    let tables: i64 = clients[0]
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'offload_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 6, "jobs, payloads, results, webhooks, idempotency, schema");
    let rows: i64 = clients[0].query_one("SELECT count(*) FROM offload_schema", &[]).await.unwrap().get(0);
    assert_eq!(rows, 1, "one version row");
    // Migrating again changes nothing.
    let mut again = pg.connect(&url).await;
    migrate(&mut again).await.unwrap();
    assert_eq!(version(&again).await.unwrap(), SCHEMA_VERSION);
}

#[actix_web::test]
async fn a_database_from_a_newer_release_is_refused() {
    let pg = Postgres::get();
    let url = pg.fresh_database().await;
    let mut client = pg.connect(&url).await;
    migrate(&mut client).await.unwrap();
    client.execute("UPDATE offload_schema SET version = $1", &[&(SCHEMA_VERSION + 1)]).await.unwrap();
    let err = migrate(&mut client).await.unwrap_err();
    assert!(err.contains("newer than this binary"), "{err}");
    assert_eq!(version(&client).await.unwrap(), SCHEMA_VERSION + 1, "left as it was");
}
