//! The behaviour every Store implementation must show, run by each
//! implementation's test (tests/store.rs for the embedded store,
//! tests/kube_store.rs for the custom-resource store on a real API server).
//!
//! `behaviour_suite` needs an empty store and panics on the first failure.
//! IDs are lowercase DNS labels so that a custom-resource store can use them
//! as object names.

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use cinderblock::store::{create_json, get_json, list_json, put_json, update_json, Change, Kind, Store, StoreError, Versioned};

fn v(version: u64, value: &[u8]) -> Versioned {
    Versioned { version, value: value.to_vec() }
}

/// Runs every check in turn against `store`, which must start empty.
pub async fn behaviour_suite(store: &dyn Store) {
    for kind in Kind::all() {
        let found = store.list(kind).await.expect("list");
        assert!(
            found.is_empty(),
            "behaviour_suite needs an empty store, but {} holds {:?}",
            kind.as_str(),
            found.iter().map(|(id, _)| id).collect::<Vec<_>>()
        );
    }
    create_then_get(store).await;
    create_existing_gives_already_exists(store).await;
    update_with_version(store).await;
    update_stale_gives_conflict(store).await;
    missing_ids(store).await;
    delete_with_version(store).await;
    list_ordered_and_per_kind(store).await;
    put_upserts(store).await;
    concurrent_updates_one_wins(store).await;
    concurrent_creates_one_wins(store).await;
    json_helpers(store).await;
    pages_by_key(store).await;
    the_feed_tells_every_write(store).await;
    liveness_is_kept_apart_from_records(store).await;
}

async fn create_then_get(s: &dyn Store) {
    assert_eq!(s.create(Kind::Volume, "vol-get", b"hello".to_vec()).await.unwrap(), 1);
    assert_eq!(s.get(Kind::Volume, "vol-get").await.unwrap(), Some(v(1, b"hello")));
    // Same id, other kind: not there.
    assert_eq!(s.get(Kind::Snapshot, "vol-get").await.unwrap(), None);
    assert_eq!(s.get(Kind::Volume, "vol-never").await.unwrap(), None);
    // An empty value is a value.
    assert_eq!(s.create(Kind::Volume, "vol-empty", Vec::new()).await.unwrap(), 1);
    assert_eq!(s.get(Kind::Volume, "vol-empty").await.unwrap(), Some(v(1, b"")));
    cleanup(s, Kind::Volume, &["vol-get", "vol-empty"]).await;
}

async fn create_existing_gives_already_exists(s: &dyn Store) {
    s.create(Kind::Volume, "vol-dup", b"first".to_vec()).await.unwrap();
    s.update(Kind::Volume, "vol-dup", b"second".to_vec(), 1).await.unwrap();
    match s.create(Kind::Volume, "vol-dup", b"third".to_vec()).await {
        Err(StoreError::AlreadyExists { kind, id, existing }) => {
            assert_eq!(kind, "volumes");
            assert_eq!(id, "vol-dup");
            assert_eq!(existing, v(2, b"second"));
        }
        other => panic!("create of an existing id: expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(s.get(Kind::Volume, "vol-dup").await.unwrap(), Some(v(2, b"second")));
    cleanup(s, Kind::Volume, &["vol-dup"]).await;
}

async fn update_with_version(s: &dyn Store) {
    s.create(Kind::Volume, "vol-upd", b"a".to_vec()).await.unwrap();
    assert_eq!(s.update(Kind::Volume, "vol-upd", b"b".to_vec(), 1).await.unwrap(), 2);
    assert_eq!(s.update(Kind::Volume, "vol-upd", b"c".to_vec(), 2).await.unwrap(), 3);
    assert_eq!(s.get(Kind::Volume, "vol-upd").await.unwrap(), Some(v(3, b"c")));
    cleanup(s, Kind::Volume, &["vol-upd"]).await;
}

async fn update_stale_gives_conflict(s: &dyn Store) {
    s.create(Kind::Volume, "vol-stale", b"a".to_vec()).await.unwrap();
    s.update(Kind::Volume, "vol-stale", b"b".to_vec(), 1).await.unwrap();
    for stale in [1, 3, 0] {
        match s.update(Kind::Volume, "vol-stale", b"lost".to_vec(), stale).await {
            Err(StoreError::Conflict { kind, id, expected, actual }) => {
                assert_eq!((kind, id.as_str()), ("volumes", "vol-stale"));
                assert_eq!((expected, actual), (stale, 2));
            }
            other => panic!("update with version {stale} of a version-2 record: expected Conflict, got {other:?}"),
        }
    }
    assert_eq!(s.get(Kind::Volume, "vol-stale").await.unwrap(), Some(v(2, b"b")));
    cleanup(s, Kind::Volume, &["vol-stale"]).await;
}

async fn missing_ids(s: &dyn Store) {
    match s.update(Kind::Volume, "vol-missing", b"x".to_vec(), 1).await {
        Err(StoreError::NotFound { kind, id }) => {
            assert_eq!((kind, id.as_str()), ("volumes", "vol-missing"));
        }
        other => panic!("update of a missing id: expected NotFound, got {other:?}"),
    }
    // Deleting what is not there is done, whatever version was expected.
    s.delete(Kind::Volume, "vol-missing", None).await.unwrap();
    s.delete(Kind::Volume, "vol-missing", Some(4)).await.unwrap();
    // Neither call created it.
    assert_eq!(s.get(Kind::Volume, "vol-missing").await.unwrap(), None);
}

async fn delete_with_version(s: &dyn Store) {
    s.create(Kind::Snapshot, "snap-del", b"a".to_vec()).await.unwrap();
    s.update(Kind::Snapshot, "snap-del", b"b".to_vec(), 1).await.unwrap();
    match s.delete(Kind::Snapshot, "snap-del", Some(1)).await {
        Err(StoreError::Conflict { kind, id, expected, actual }) => {
            assert_eq!((kind, id.as_str()), ("snapshots", "snap-del"));
            assert_eq!((expected, actual), (1, 2));
        }
        other => panic!("delete with a stale version: expected Conflict, got {other:?}"),
    }
    assert_eq!(s.get(Kind::Snapshot, "snap-del").await.unwrap(), Some(v(2, b"b")));
    s.delete(Kind::Snapshot, "snap-del", Some(2)).await.unwrap();
    assert_eq!(s.get(Kind::Snapshot, "snap-del").await.unwrap(), None);

    // Unconditional delete; then the id is free again and starts over at 1.
    s.create(Kind::Snapshot, "snap-del", b"c".to_vec()).await.unwrap();
    s.delete(Kind::Snapshot, "snap-del", None).await.unwrap();
    assert_eq!(s.get(Kind::Snapshot, "snap-del").await.unwrap(), None);
    assert_eq!(s.create(Kind::Snapshot, "snap-del", b"d".to_vec()).await.unwrap(), 1);
    cleanup(s, Kind::Snapshot, &["snap-del"]).await;
}

async fn list_ordered_and_per_kind(s: &dyn Store) {
    for id in ["vol-c", "vol-a", "vol-b"] {
        s.create(Kind::Volume, id, id.as_bytes().to_vec()).await.unwrap();
    }
    s.update(Kind::Volume, "vol-b", b"vol-b2".to_vec(), 1).await.unwrap();
    for id in ["node-2", "node-1"] {
        s.create(Kind::Node, id, id.as_bytes().to_vec()).await.unwrap();
    }
    s.create(Kind::Export, "vol-a", b"export".to_vec()).await.unwrap();

    assert_eq!(
        s.list(Kind::Volume).await.unwrap(),
        vec![("vol-a".to_string(), v(1, b"vol-a")), ("vol-b".to_string(), v(2, b"vol-b2")), ("vol-c".to_string(), v(1, b"vol-c")),]
    );
    assert_eq!(s.list(Kind::Node).await.unwrap(), vec![("node-1".to_string(), v(1, b"node-1")), ("node-2".to_string(), v(1, b"node-2")),]);
    assert_eq!(s.list(Kind::Export).await.unwrap(), vec![("vol-a".to_string(), v(1, b"export"))]);
    assert_eq!(s.list(Kind::Snapshot).await.unwrap(), vec![]);

    // Deleting in one kind leaves the same id in another alone.
    s.delete(Kind::Export, "vol-a", None).await.unwrap();
    assert_eq!(s.get(Kind::Volume, "vol-a").await.unwrap(), Some(v(1, b"vol-a")));

    cleanup(s, Kind::Volume, &["vol-a", "vol-b", "vol-c"]).await;
    cleanup(s, Kind::Node, &["node-1", "node-2"]).await;
}

async fn put_upserts(s: &dyn Store) {
    assert_eq!(s.put(Kind::Node, "node-put", b"beat-1".to_vec()).await.unwrap(), 1);
    assert_eq!(s.get(Kind::Node, "node-put").await.unwrap(), Some(v(1, b"beat-1")));
    assert_eq!(s.put(Kind::Node, "node-put", b"beat-2".to_vec()).await.unwrap(), 2);
    assert_eq!(s.get(Kind::Node, "node-put").await.unwrap(), Some(v(2, b"beat-2")));
    // A put moves the version on, so a reader holding the old one conflicts.
    assert!(matches!(
        s.update(Kind::Node, "node-put", b"late".to_vec(), 1).await,
        Err(StoreError::Conflict { expected: 1, actual: 2, .. })
    ));
    assert_eq!(s.update(Kind::Node, "node-put", b"beat-3".to_vec(), 2).await.unwrap(), 3);
    cleanup(s, Kind::Node, &["node-put"]).await;
}

async fn concurrent_updates_one_wins(s: &dyn Store) {
    const N: usize = 32;
    s.create(Kind::Volume, "vol-race", b"start".to_vec()).await.unwrap();
    let results = join_all((0..N).map(|i| s.update(Kind::Volume, "vol-race", format!("w{i}").into_bytes(), 1))).await;
    let winners: Vec<usize> = (0..N).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{N} updates from version 1: exactly one may win, got {results:?}");
    let winner = winners[0];
    assert_eq!(*results[winner].as_ref().unwrap(), 2);
    for (i, r) in results.iter().enumerate().filter(|&(i, _)| i != winner) {
        match r {
            Err(StoreError::Conflict { expected: 1, actual, .. }) if *actual != 1 => {}
            other => {
                panic!("update {i} lost the race: expected Conflict from version 1, got {other:?}")
            }
        }
    }
    assert_eq!(s.get(Kind::Volume, "vol-race").await.unwrap(), Some(v(2, format!("w{winner}").as_bytes())));
    cleanup(s, Kind::Volume, &["vol-race"]).await;
}

async fn concurrent_creates_one_wins(s: &dyn Store) {
    const N: usize = 64;
    let results = join_all((0..N).map(|i| s.create(Kind::Snapshot, "snap-race", format!("c{i}").into_bytes()))).await;
    let winners: Vec<usize> = (0..N).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{N} creates of one id: exactly one may win, got {results:?}");
    let winner = winners[0];
    let expected = v(1, format!("c{winner}").as_bytes());
    assert_eq!(*results[winner].as_ref().unwrap(), 1);
    for (i, r) in results.iter().enumerate().filter(|&(i, _)| i != winner) {
        match r {
            Err(StoreError::AlreadyExists { existing, .. }) if *existing == expected => {}
            other => panic!("create {i} lost the race: expected AlreadyExists carrying {expected:?}, got {other:?}"),
        }
    }
    assert_eq!(s.get(Kind::Snapshot, "snap-race").await.unwrap(), Some(expected));
    cleanup(s, Kind::Snapshot, &["snap-race"]).await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rec {
    name: String,
    size: u64,
}

async fn json_helpers(s: &dyn Store) {
    let a = Rec { name: "a".into(), size: 1 };
    let b = Rec { name: "b".into(), size: 2 };
    assert_eq!(create_json(s, Kind::Volume, "vol-json-a", &a).await.unwrap(), 1);
    assert_eq!(put_json(s, Kind::Volume, "vol-json-b", &b).await.unwrap(), 1);
    assert_eq!(get_json::<Rec>(s, Kind::Volume, "vol-json-a").await.unwrap(), Some((a.clone(), 1)));
    assert_eq!(get_json::<Rec>(s, Kind::Volume, "vol-json-none").await.unwrap(), None);

    let a2 = Rec { size: 10, ..a.clone() };
    assert_eq!(update_json(s, Kind::Volume, "vol-json-a", &a2, 1).await.unwrap(), 2);
    assert!(matches!(update_json(s, Kind::Volume, "vol-json-a", &a, 1).await, Err(StoreError::Conflict { expected: 1, actual: 2, .. })));
    assert_eq!(list_json::<Rec>(s, Kind::Volume).await.unwrap(), vec![(a2, 2), (b, 1)]);

    // A value that is not the record is a Backend error naming the record,
    // not a panic and not a silent None.
    s.create(Kind::Volume, "vol-json-bad", b"not json".to_vec()).await.unwrap();
    match get_json::<Rec>(s, Kind::Volume, "vol-json-bad").await {
        Err(StoreError::Backend(msg)) => assert!(msg.contains("vol-json-bad"), "{msg}"),
        other => panic!("get_json of a non-JSON value: expected Backend, got {other:?}"),
    }
    assert!(matches!(list_json::<Rec>(s, Kind::Volume).await, Err(StoreError::Backend(_))));
    cleanup(s, Kind::Volume, &["vol-json-a", "vol-json-b", "vol-json-bad"]).await;
}

async fn pages_by_key(s: &dyn Store) {
    let ids = ["vol-p1", "vol-p2", "vol-p3", "vol-p4", "vol-p5"];
    for id in ids.iter().rev() {
        s.create(Kind::Volume, id, id.as_bytes().to_vec()).await.unwrap();
    }
    let page = |after: Option<&'static str>, limit| async move {
        s.list_page(Kind::Volume, after, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, v)| {
                assert_eq!(v.value, id.as_bytes(), "{id} carries its value");
                id
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(page(None, 2).await, ["vol-p1", "vol-p2"]);
    assert_eq!(page(Some("vol-p2"), 2).await, ["vol-p3", "vol-p4"]);
    assert_eq!(page(Some("vol-p4"), 2).await, ["vol-p5"]);
    assert_eq!(page(Some("vol-p5"), 2).await, Vec::<String>::new());
    // A key that is not (or no longer) there still places the page.
    assert_eq!(page(Some("vol-p25"), 10).await, ["vol-p3", "vol-p4", "vol-p5"]);
    assert_eq!(page(None, 100).await, ids);
    assert_eq!(s.list_page(Kind::Snapshot, None, 10).await.unwrap(), vec![]);
    cleanup(s, Kind::Volume, &ids).await;
}

/// Waits for the change feed to show `want` for `id`, skipping others.
async fn feed_shows(feed: &mut tokio::sync::broadcast::Receiver<(u64, Change)>, last_seq: &mut u64, id: &str, want: Option<u64>) {
    let wait = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let (seq, change) = feed.recv().await.expect("the feed stays open");
            assert!(seq > *last_seq, "changes are numbered in order: {seq} after {last_seq}");
            *last_seq = seq;
            if let Change::Record { kind: Kind::Volume, id: got, value } = change {
                if got == id && value.as_ref().map(|v| v.version) == want {
                    return;
                }
            }
        }
    });
    wait.await.unwrap_or_else(|_| panic!("the change feed never showed {id} at version {want:?}"));
}

async fn the_feed_tells_every_write(s: &dyn Store) {
    let mut feed = s.changes();
    let before = s.change_seq();
    let mut seen = 0;
    s.create(Kind::Volume, "vol-feed", b"one".to_vec()).await.unwrap();
    feed_shows(&mut feed, &mut seen, "vol-feed", Some(1)).await;
    s.update(Kind::Volume, "vol-feed", b"two".to_vec(), 1).await.unwrap();
    feed_shows(&mut feed, &mut seen, "vol-feed", Some(2)).await;
    s.delete(Kind::Volume, "vol-feed", None).await.unwrap();
    feed_shows(&mut feed, &mut seen, "vol-feed", None).await;
    assert!(s.change_seq() > before, "the feed's number moves on with each change");
    assert!(s.change_seq() >= seen, "change_seq is the last change sent");
    // A refused write changes nothing, so it tells nothing.
    let seq = s.change_seq();
    assert!(s.update(Kind::Volume, "vol-feed", b"x".to_vec(), 1).await.is_err());
    assert_eq!(s.change_seq(), seq);
}

async fn liveness_is_kept_apart_from_records(s: &dyn Store) {
    // No record yet: the store asks the node to register (a watching
    // store learns of the renewal first, so the answer may take a moment).
    let mut asked = false;
    for _ in 0..300 {
        asked = s.renew_liveness("node-live").await.unwrap();
        if asked {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(asked, "a node without a record is asked for one");
    let live = || async {
        for _ in 0..300 {
            if s.liveness().await.unwrap().iter().any(|(n, at)| n == "node-live" && *at > 0) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    };
    assert!(live().await, "liveness shows the renewal");
    assert_eq!(s.list(Kind::Node).await.unwrap(), vec![], "liveness writes no node record");
    s.create(Kind::Node, "node-live", b"rec".to_vec()).await.unwrap();
    // The record may take a moment to reach a watching store's answer.
    let mut asked = true;
    for _ in 0..300 {
        asked = s.renew_liveness("node-live").await.unwrap();
        if !asked {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!asked, "a node with a record is not asked for it again");
    cleanup(s, Kind::Node, &["node-live"]).await;
}

/// Removes what a check made, so that each check starts from an empty store.
async fn cleanup(s: &dyn Store, kind: Kind, ids: &[&str]) {
    for id in ids {
        s.delete(kind, id, None).await.unwrap();
    }
    assert_eq!(s.list(kind).await.unwrap(), vec![], "{} left over", kind.as_str());
}
