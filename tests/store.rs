//! The embedded store (redb, one file) against the behaviour every store
//! must show; the custom-resource store runs the same suite in
//! tests/kube_store.rs.

mod store_suite;

use cinderblock::store::embedded::EmbeddedStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_behaviour_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
    store_suite::behaviour_suite(&store).await;
}
