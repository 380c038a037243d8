//! NATS JetStream as a peer system of `ordo-bench` (`jetstream`), running the same workloads as
//! Ordo: pairs, fan-out to the consumers of one subject, and catch-up of a consumer that was
//! offline.
//!
//! How the system is configured:
//!
//! - One stream per run, on file storage, with the subjects `ordo_bench.<run>.>` and no limits;
//!   the server is a single node, so one replica. It is deleted at the end of the run (with its
//!   consumers).
//! - Every sender and every receiver has a connection of its own. A sender publishes with
//!   `jetstream::Context::publish` and has at most `window` publishes whose ack it has not had
//!   yet; accept latency runs from the publish call
//!   to the stream's publish ack.
//! - Every receiver is a durable pull consumer with explicit acks, filtered to its subject, created
//!   before anything is sent, and consumed with `Consumer::messages` (pull requests of 200
//!   messages); each message is acked as it arrives. Delivery latency runs from the send time
//!   stamped in the body to the message reaching the receiver.
//! - Durability as configured on this machine (`nats-server -js -sd /var/lib/nats-server`, no
//!   sync settings): the file store writes each message to its block file before the publish ack,
//!   but does not fsync per message; it syncs to disk periodically (every 2 minutes by default),
//!   so an acked message may live only in the operating system's page cache.
//!
//! No wait is unbounded: publish acks time out after 10 s, and receivers stop once nothing has
//! arrived for 10 s after the senders finished; the run reports what arrived (`lost` is the
//! deliveries expected minus those received).

use crate::payload::Clock;
use crate::report::{Latency, Outcome};
use crate::system::{self, Bodies, Inbox, Publish, Sent, Subscribe, System, Task, Until, IDLE};
use crate::{fail, run_tag, BenchError};
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::{ContextBuilder, PublishAckFuture};
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::Context;
use futures_util::StreamExt;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

const SYSTEM: &str = "jetstream";
/// The first token of every subject the bench uses.
const PREFIX: &str = "ordo_bench";

/// The catch-up receiver's durable consumer.
const INBOX_DURABLE: &str = "r";

impl System for JetStream {
    fn cpu_groups(&self) -> Vec<(&'static str, crate::cpu::Procs)> {
        vec![("server", crate::cpu::Procs::Named("nats-server"))]
    }

    type Receiver = Receiver;
    type Sender = Publisher;
    type Idle = ();

    fn name(&self) -> &'static str {
        SYSTEM
    }

    async fn pair_receivers(
        &mut self,
        n: usize,
        _body_bytes: usize,
    ) -> Result<Vec<Receiver>, BenchError> {
        self.receivers((0..n).map(|i| (format!("r{i}"), self.subject(&format!("pair.{i}")))))
            .await
    }

    async fn pair_sender(
        &mut self,
        i: usize,
        window: usize,
        bodies: Bodies,
    ) -> Result<Publisher, BenchError> {
        let subject = self.subject(&format!("pair.{i}"));
        Publisher::start(self, format!("s{i}"), subject, window, bodies).await
    }

    async fn group_receivers(
        &mut self,
        members: usize,
        _body_bytes: usize,
    ) -> Result<Vec<Receiver>, BenchError> {
        let subject = self.subject("group");
        self.receivers((0..members).map(|i| (format!("m{i}"), subject.clone())))
            .await
    }

    async fn group_sender(&mut self, bodies: Bodies) -> Result<Publisher, BenchError> {
        let subject = self.subject("group");
        Publisher::start(self, "s".into(), subject, 1, bodies).await
    }

    /// Creates the durable consumer without consuming: the stream keeps its messages.
    async fn offline_receiver(&mut self, _body_bytes: usize) -> Result<(), BenchError> {
        self.admin
            .create_consumer_on_stream(
                consumer_config(INBOX_DURABLE, &self.subject("inbox")),
                &self.stream,
            )
            .await
            .map_err(fail(&format!(
                "cannot create the durable consumer {INBOX_DURABLE}"
            )))?;
        Ok(())
    }

    async fn catchup_sender(
        &mut self,
        window: usize,
        bodies: Bodies,
    ) -> Result<Publisher, BenchError> {
        let subject = self.subject("inbox");
        Publisher::start(self, "s".into(), subject, window, bodies).await
    }

    /// A new connection that binds the durable consumer and pulls.
    async fn reconnect_receiver(&mut self, _body_bytes: usize) -> Result<Receiver, BenchError> {
        let js = self.connect(INBOX_DURABLE, 1).await?;
        let consumer: PullConsumer = js
            .get_consumer_from_stream(INBOX_DURABLE, &self.stream)
            .await
            .map_err(fail(&format!(
                "cannot bind the durable consumer {INBOX_DURABLE}"
            )))?;
        Ok(Receiver {
            id: INBOX_DURABLE.to_string(),
            consumer,
        })
    }

    /// Deletes the run's stream (and its consumers), whatever the run's `result`.
    async fn close(self, result: Result<Outcome, BenchError>) -> Result<Outcome, BenchError> {
        self.cleanup(result).await
    }
}

/// A durable pull consumer of `subject` with explicit acks.
fn consumer_config(durable: &str, subject: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(durable.to_string()),
        filter_subject: subject.to_string(),
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    }
}

/// The NATS server and this run's stream: pair i is the subject `ordo_bench.<tag>.pair.<i>`
/// (consumer `r<i>`, sender `s<i>`), a fan-out group `ordo_bench.<tag>.group`, catch-up
/// `ordo_bench.<tag>.inbox`.
pub struct JetStream {
    url: String,
    tag: String,
    stream: String,
    admin: Context,
}

impl JetStream {
    /// Connects and creates the run's stream.
    pub async fn open(url: &str) -> Result<Self, BenchError> {
        let tag = run_tag();
        let mut server = JetStream {
            url: url.to_string(),
            stream: format!("ORDO_BENCH_{tag}"),
            tag,
            admin: ContextBuilder::new().build(connect_client(url, "admin").await?),
        };
        server.admin.set_timeout(IDLE);
        server
            .admin
            .create_stream(stream::Config {
                name: server.stream.clone(),
                subjects: vec![format!("{PREFIX}.{}.>", server.tag)],
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                BenchError(format!(
                    "cannot create the JetStream stream {} on {url}: {e} (is JetStream enabled, \
                     nats-server -js?)",
                    server.stream
                ))
            })?;
        Ok(server)
    }

    /// Deletes the run's stream (and its consumers), whatever the run's `result`, and passes the
    /// result on.
    async fn cleanup(&self, result: Result<Outcome, BenchError>) -> Result<Outcome, BenchError> {
        if let Err(e) = self.admin.delete_stream(&self.stream).await {
            if result.is_ok() {
                eprintln!(
                    "ordo-bench: could not delete the JetStream stream {} on {}: {e}; delete it \
                     with `nats stream rm {}`",
                    self.stream, self.url, self.stream
                );
            }
        }
        result
    }

    fn subject(&self, leaf: &str) -> String {
        format!("{PREFIX}.{}.{leaf}", self.tag)
    }

    /// A JetStream context on a connection of its own, for `window` publishes awaiting acks.
    async fn connect(&self, name: &str, window: usize) -> Result<Context, BenchError> {
        let client = connect_client(&self.url, name).await?;
        Ok(ContextBuilder::new()
            .timeout(IDLE)
            .max_ack_inflight(window.max(1))
            .backpressure_on_inflight(true)
            .build(client))
    }

    /// Creates each (durable name, subject) consumer on a connection of its own,
    /// [`system::SETUP_CONCURRENCY`] at a time.
    async fn receivers(
        &self,
        who: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<Receiver>, BenchError> {
        system::set_up(who, |(id, subject)| async move {
            let js = self.connect(&id, 1).await?;
            let consumer = js
                .create_consumer_on_stream(consumer_config(&id, &subject), &self.stream)
                .await
                .map_err(fail(&format!("cannot create the durable consumer {id}")))?;
            Ok(Receiver { id, consumer })
        })
        .await
    }
}

async fn connect_client(url: &str, name: &str) -> Result<async_nats::Client, BenchError> {
    async_nats::ConnectOptions::new()
        .name(format!("ordo-bench {name}"))
        .connect(url)
        .await
        .map_err(|e| {
            BenchError(format!(
                "cannot connect to NATS at {url}: {e} (is nats-server running?)"
            ))
        })
}

/// A durable pull consumer, bound on its receiver's connection.
pub struct Receiver {
    id: String,
    consumer: PullConsumer,
}

impl Subscribe for Receiver {
    /// Consumes, acking each message, until told to stop ([`Until`]); failed pulls and acks
    /// count as the inbox's `errors`.
    fn receive(self, until: Until) -> Task<Inbox> {
        let Receiver { id, consumer } = self;
        Task::spawn(async move {
            let mut messages = match consumer.messages().await {
                Ok(m) => m,
                Err(e) => {
                    return Inbox::failed(format!("consumer {id}: cannot start pulling: {e}"))
                }
            };
            let mut rx = until.start();
            while let Some(next) = rx.next(messages.next()).await {
                match next {
                    Some(Ok(m)) => {
                        rx.arrived(&m.payload);
                        if m.ack().await.is_err() {
                            rx.inbox.errors += 1;
                        }
                    }
                    Some(Err(_)) => rx.inbox.errors += 1,
                    None => break,
                }
            }
            rx.inbox
        })
    }
}

/// A publish whose ack is awaited: its send stamp, the ack, and its place in the window.
type Pending = (u64, PublishAckFuture, OwnedSemaphorePermit);

/// A sender with at most `window` publishes awaiting their ack. The acks are awaited in order in
/// a task of their own, which times each against its send stamp.
pub struct Publisher {
    id: String,
    js: Context,
    subject: String,
    bodies: Bodies,
    permits: Arc<Semaphore>,
    pending: mpsc::UnboundedSender<Pending>,
    sent: u64,
    error: Option<String>,
    confirmer: Task<(u64, Latency, Option<String>)>,
}

impl Publisher {
    async fn start(
        server: &JetStream,
        id: String,
        subject: String,
        window: usize,
        bodies: Bodies,
    ) -> Result<Self, BenchError> {
        let js = server.connect(&id, window).await?;
        let permits = Arc::new(Semaphore::new(window));
        let (pending, pending_rx) = mpsc::unbounded_channel();
        let confirmer = Task::spawn(confirm(pending_rx, permits.clone(), bodies.clock));
        Ok(Publisher {
            id,
            js,
            subject,
            bodies,
            permits,
            pending,
            sent: 0,
            error: None,
            confirmer,
        })
    }
}

impl Publish for Publisher {
    /// `None` once publishing failed.
    async fn send(&mut self) -> Option<u64> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let (stamp, body) = self.bodies.stamped();
        match self.js.publish(self.subject.clone(), body.into()).await {
            Ok(ack) => {
                self.pending.send((stamp, ack, permit)).ok()?;
                self.sent += 1;
                Some(stamp)
            }
            Err(e) => {
                self.error = Some(e.to_string());
                None
            }
        }
    }

    /// Waits for the acks still due.
    async fn finish(self) -> Result<Sent, BenchError> {
        drop(self.pending);
        let (accepted, accept, error) = self.confirmer.join().await?;
        if let Some(e) = self.error.or(error) {
            return Err(BenchError(format!(
                "JetStream did not take a message of sender {} on {}: {e}",
                self.id, self.subject
            )));
        }
        Ok(Sent {
            sent: self.sent,
            accepted,
            accept,
        })
    }
}

/// Awaits each publish's ack in order and times it; on a failed ack (each waits at most
/// [`IDLE`]) closes the window, so the sender stops.
async fn confirm(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    permits: Arc<Semaphore>,
    clock: Clock,
) -> (u64, Latency, Option<String>) {
    let (mut accepted, mut latency) = (0, Latency::default());
    while let Some((stamp, ack, permit)) = pending.recv().await {
        if let Err(e) = ack.await {
            permits.close();
            return (accepted, latency, Some(e.to_string()));
        }
        latency.record_micros(clock.now_us().saturating_sub(stamp));
        accepted += 1;
        drop(permit);
    }
    (accepted, latency, None)
}
