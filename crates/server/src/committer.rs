//! The commit pipeline: hands the core's batches to the store, and reports each back to the
//! router in the order the core took them.
//!
//! A store that commits one batch at a time gets them one after the other on the commit thread.
//! One that takes more at once ([`Store::commit_lanes`]) gets each begun on the commit thread,
//! in order ([`Store::begin_commit`]), and committed on a lane thread, so that the next batch's
//! writes go out while the one before is made durable; the store keeps them in order.
//!
//! A batch the store cannot make durable now (`Unreachable`) is given again, the same batch,
//! until it is answered otherwise, with backoff, and the router is told meanwhile
//! ([`Committed::Retrying`]) so that it refuses new sends. With lanes, the commit thread first
//! waits until every commit under way has answered, then gives the failed batches again one at
//! a time, in order, then goes back to lanes.

use crate::metrics as m;
use ordo_core::{Batch, CommitOutcome};
use ordo_store::{Store, StoreError};
use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What the commit thread reports to the router.
pub(crate) enum Committed {
    /// The commit of batch `id` answered.
    Done {
        id: u64,
        result: Result<CommitOutcome, StoreError>,
    },
    /// The store cannot be reached (why); the batch is tried again.
    Retrying(String),
}

/// The first wait before a commit or a read is tried again on a store that cannot be reached;
/// it doubles up to [`RETRY_MAX`].
pub(crate) const RETRY_FIRST: Duration = Duration::from_millis(100);
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(2);

/// What the commit thread is told.
enum Event {
    /// A batch the core took, to make durable after the ones before it.
    Batch(Batch),
    /// The router is gone: stop (the lanes stop after the commit they are in).
    Stop,
    /// A lane's commit answered.
    Answered {
        lane: usize,
        id: u64,
        result: Result<CommitOutcome, StoreError>,
    },
}

/// The router's end of the pipeline.
pub(crate) struct Committer {
    tx: Sender<Event>,
}

impl Committer {
    /// Starts the commit thread (and its lanes) over `store`; answers go to `done`.
    pub fn start(
        store: Arc<dyn Store>,
        done: UnboundedSender<Committed>,
    ) -> Result<Committer, StoreError> {
        let (tx, rx) = channel();
        let lanes = store.commit_lanes().max(1);
        let mut lane_txs = Vec::new();
        if lanes > 1 {
            for lane in 0..lanes {
                let (lane_tx, lane_rx) = channel::<Arc<Batch>>();
                let (store, answers) = (store.clone(), tx.clone());
                std::thread::Builder::new()
                    .name(format!("ordo-commit-{lane}"))
                    .spawn(move || run_lane(lane, store, lane_rx, answers))
                    .map_err(|e| {
                        StoreError::Unavailable(format!("cannot start a commit lane: {e}"))
                    })?;
                lane_txs.push(lane_tx);
            }
        }
        let pipeline = Pipeline {
            store,
            done,
            idle: (0..lane_txs.len()).collect(),
            lanes: lane_txs,
            queue: VecDeque::new(),
            waiting: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("ordo-commit".into())
            .spawn(move || pipeline.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the commit thread: {e}")))?;
        Ok(Committer { tx })
    }

    /// Hands the next batch over; `Err` if the commit thread is gone.
    pub fn send(&self, batch: Batch) -> Result<(), ()> {
        self.tx.send(Event::Batch(batch)).map_err(|_| ())
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // The lanes hold senders of the same channel: closing ours does not end it.
        let _ = self.tx.send(Event::Stop);
    }
}

/// A batch begun and not yet reported back.
struct Entry {
    batch: Arc<Batch>,
    result: Option<Result<CommitOutcome, StoreError>>,
}

/// The commit thread's state.
struct Pipeline {
    store: Arc<dyn Store>,
    done: UnboundedSender<Committed>,
    /// One sender per lane thread (none when the store takes one batch at a time).
    lanes: Vec<Sender<Arc<Batch>>>,
    /// Lanes with nothing to do.
    idle: Vec<usize>,
    /// Batches begun, oldest first.
    queue: VecDeque<Entry>,
    /// Batches handed over and not begun yet.
    waiting: VecDeque<Batch>,
}

impl Pipeline {
    fn run(mut self, rx: Receiver<Event>) {
        while let Ok(event) = rx.recv() {
            match event {
                Event::Batch(b) => self.waiting.push_back(b),
                Event::Stop => return,
                Event::Answered { lane, id, result } => {
                    self.idle.push(lane);
                    if let Some(e) = self.queue.iter_mut().find(|e| e.batch.id == id) {
                        if let Err(StoreError::Unreachable(why)) = &result {
                            metrics::counter!(m::STORE_RETRIES).increment(1);
                            if self.done.send(Committed::Retrying(why.clone())).is_err() {
                                return;
                            }
                        }
                        e.result = Some(result);
                    }
                }
            }
            if !self.report() || !self.begin() {
                return;
            }
        }
    }

    /// Reports the answered batches at the front, in order; after a batch the store could not
    /// make durable, once every lane has answered, gives the failed ones again one at a time.
    /// False once the router is gone or the store failed for good.
    fn report(&mut self) -> bool {
        while let Some(front) = self.queue.front() {
            match &front.result {
                None => return true,
                Some(Err(StoreError::Unreachable(_))) => {
                    if self.queue.iter().any(|e| e.result.is_none()) {
                        return true;
                    }
                    return self.recover();
                }
                Some(_) => {
                    let e = self.queue.pop_front().expect("front exists");
                    let result = e.result.expect("answered");
                    let fatal = result.is_err();
                    if self.tell(e.batch.id, result).is_err() || fatal {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Every batch begun has answered, some `Unreachable`: each is reported in order, those
    /// that failed given again alone until answered otherwise.
    fn recover(&mut self) -> bool {
        while let Some(e) = self.queue.pop_front() {
            let result = match e.result {
                Some(Err(StoreError::Unreachable(_))) | None => {
                    match commit_until_answered(&*self.store, &e.batch, &self.done) {
                        Some(r) => r,
                        None => return false,
                    }
                }
                Some(r) => r,
            };
            let fatal = result.is_err();
            if self.tell(e.batch.id, result).is_err() || fatal {
                return false;
            }
        }
        true
    }

    /// Begins the waiting batches while there is room: on an idle lane, or here when the store
    /// takes one at a time. Nothing new begins while a failed batch waits to be given again.
    fn begin(&mut self) -> bool {
        let failed = |q: &VecDeque<Entry>| q.iter().any(|e| matches!(e.result, Some(Err(_))));
        if self.lanes.is_empty() {
            while let Some(b) = self.waiting.pop_front() {
                let batch = Arc::new(b);
                let Some(result) = commit_until_answered(&*self.store, &batch, &self.done) else {
                    return false;
                };
                let fatal = result.is_err();
                if self.tell(batch.id, result).is_err() || fatal {
                    return false;
                }
            }
            return true;
        }
        while !failed(&self.queue) {
            let Some(lane) = self.idle.pop() else {
                break;
            };
            let Some(b) = self.waiting.pop_front() else {
                self.idle.push(lane);
                break;
            };
            let batch = Arc::new(b);
            self.store.begin_commit(&batch);
            self.queue.push_back(Entry {
                batch: batch.clone(),
                result: None,
            });
            if self.lanes[lane].send(batch).is_err() {
                return false;
            }
        }
        true
    }

    fn tell(
        &self,
        id: u64,
        result: Result<CommitOutcome, StoreError>,
    ) -> Result<(), tokio::sync::mpsc::error::SendError<Committed>> {
        self.done.send(Committed::Done { id, result })
    }
}

/// A lane: commits the batches it is given, each answered on the commit thread's channel.
fn run_lane(
    lane: usize,
    store: Arc<dyn Store>,
    batches: Receiver<Arc<Batch>>,
    answers: Sender<Event>,
) {
    while let Ok(batch) = batches.recv() {
        let id = batch.id;
        let result = commit_once(&*store, &batch);
        if answers.send(Event::Answered { lane, id, result }).is_err() {
            return;
        }
    }
}

/// One commit of `batch`, measured.
fn commit_once(store: &dyn Store, batch: &Arc<Batch>) -> Result<CommitOutcome, StoreError> {
    let started = Instant::now();
    let result = store.commit(batch.clone());
    if result.is_ok() && !batch.is_empty() {
        metrics::counter!(m::COMMITS).increment(1);
        metrics::histogram!(m::COMMIT_MESSAGES).record(batch.messages.len() as f64);
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
    }
    result
}

/// Commits `batch`, giving it again with backoff while the store cannot be reached (the router
/// is told); `None` if the router is gone meanwhile.
fn commit_until_answered(
    store: &dyn Store,
    batch: &Arc<Batch>,
    done: &UnboundedSender<Committed>,
) -> Option<Result<CommitOutcome, StoreError>> {
    let mut wait = RETRY_FIRST;
    loop {
        match commit_once(store, batch) {
            // Nothing of it took effect, or what did is read back when it is given again.
            Err(StoreError::Unreachable(why)) => {
                metrics::counter!(m::STORE_RETRIES).increment(1);
                done.send(Committed::Retrying(why)).ok()?;
                std::thread::sleep(wait);
                wait = (wait * 2).min(RETRY_MAX);
            }
            result => return Some(result),
        }
    }
}
