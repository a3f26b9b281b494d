//! What a reconcile found and did: the node's start-up reconcile of its pool
//! (`volume::Pool::open`) and each pass of the controller's reconciler
//! (`controller::Manager::reconcile_once`) answer the same report, for the
//! log and for tests. Each list names what it holds in the pass's own terms:
//! the pool's entries are `volumes/<id>` or `snapshots/<id>`, the
//! controller's are record IDs, or `<node>/<id>` for an image on a node.

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReconcileReport {
    /// Left unfinished and found complete, now Available (the pool: a create
    /// whose image and record were both in place; the controller: a record
    /// stuck in Creating whose node held the image whole).
    pub finished: Vec<String>,
    /// Left unfinished and undone (the pool).
    pub rolled_back: Vec<String>,
    /// Left unfinished and given up: the record is now Error (the controller:
    /// a record stuck in Creating whose node had nothing).
    pub failed: Vec<String>,
    /// Deletions left unfinished, now done (the pool).
    pub deleted: Vec<String>,
    /// Error records past their time, removed (the controller).
    pub expired: Vec<String>,
    /// Images without a record, moved to the pool's `orphaned/` folder.
    pub quarantined: Vec<String>,
    /// Volumes and snapshots left as they are and marked broken (the pool).
    pub broken: Vec<String>,
    /// Records a crash had emptied or torn, written again from the pool's
    /// journal (the pool).
    pub restored: Vec<String>,
    /// Nodes whose quarantine the circuit breaker held, with how many images
    /// it would have moved (the controller).
    pub breaker_held: Vec<(String, usize)>,
}

impl ReconcileReport {
    /// True when the reconcile found nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == ReconcileReport::default()
    }
}
