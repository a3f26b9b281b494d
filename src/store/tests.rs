use super::*;

#[tokio::test]
async fn embedded_store_creates_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    store.create(Kind::Node, "node-1", b"x".to_vec()).await.unwrap();
    assert!(path.is_file());
}

#[tokio::test]
async fn embedded_data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store.create(Kind::Volume, "vol-1", b"one".to_vec()).await.unwrap();
        store.update(Kind::Volume, "vol-1", b"two".to_vec(), 1).await.unwrap();
        store.put(Kind::Node, "node-1", b"beat".to_vec()).await.unwrap();
        store.create(Kind::Volume, "vol-gone", b"x".to_vec()).await.unwrap();
        store.delete(Kind::Volume, "vol-gone", Some(1)).await.unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.list(Kind::Volume).await.unwrap(), vec![("vol-1".to_string(), Versioned { version: 2, value: b"two".to_vec() })]);
    assert_eq!(store.get(Kind::Node, "node-1").await.unwrap(), Some(Versioned { version: 1, value: b"beat".to_vec() }));
    // Versions carry on from where they were.
    assert_eq!(store.update(Kind::Volume, "vol-1", b"three".to_vec(), 2).await.unwrap(), 3);
}

#[tokio::test]
async fn embedded_second_open_of_an_open_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let first = EmbeddedStore::open(&path).unwrap();
    first.create(Kind::Volume, "vol-1", b"one".to_vec()).await.unwrap();

    let err = match EmbeddedStore::open(&path) {
        Ok(_) => panic!("a second open of {} succeeded while the first is open", path.display()),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Backend(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("already open"), "{msg}");

    // The refused open changed nothing, and the file is free once the first closes.
    assert_eq!(first.get(Kind::Volume, "vol-1").await.unwrap().map(|v| v.value), Some(b"one".to_vec()));
    drop(first);
    let again = EmbeddedStore::open(&path).unwrap();
    assert_eq!(again.get(Kind::Volume, "vol-1").await.unwrap().unwrap().version, 1);
}

#[tokio::test]
async fn embedded_open_of_a_file_that_is_not_a_store_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = EmbeddedStore::open(&path).err().expect("garbage opened as a store");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn kind_names() {
    let names: Vec<_> = Kind::ALL.iter().map(Kind::as_str).collect();
    assert_eq!(names, ["volumes", "snapshots", "nodes", "exports", "groupsnapshots"]);
}

#[test]
fn errors_map_to_grpc_codes() {
    use tonic::Code;
    let cases = [
        (StoreError::Conflict { kind: "volumes", id: "vol-1".into(), expected: 1, actual: 2 }, Code::Aborted),
        (StoreError::NotFound { kind: "volumes", id: "vol-1".into() }, Code::NotFound),
        (
            StoreError::AlreadyExists { kind: "volumes", id: "vol-1".into(), existing: Versioned { version: 1, value: vec![] } },
            Code::AlreadyExists,
        ),
        (StoreError::Backend("disk on fire".into()), Code::Unavailable),
    ];
    for (err, code) in cases {
        let text = err.to_string();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), code, "{text}");
        assert_eq!(status.message(), text);
    }
}

#[test]
fn conflict_message_says_what_to_do() {
    let err = StoreError::Conflict { kind: "volumes", id: "vol-1".into(), expected: 1, actual: 2 };
    assert_eq!(err.to_string(), "volumes \"vol-1\" changed since it was read (version 1 expected, 2 found); read it again");
}
