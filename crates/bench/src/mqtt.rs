//! Mosquitto (MQTT 3.1.1) as a peer system of `ordo-bench`, at QoS 1 (`mqtt-qos1`) and QoS 2
//! (`mqtt-qos2`), running the same workloads as Ordo: pairs, fan-out to the subscribers of one
//! topic, and catch-up of a subscriber that was offline.
//!
//! How the system is configured:
//!
//! - Every client, sending or receiving, has a persistent session (clean session off) under a
//!   client id fixed for the run, and subscribers subscribe with the QoS the senders publish
//!   with, so the broker keeps a subscriber's messages while it is offline.
//! - A sender has at most `window` publishes unconfirmed: the client's own in-flight limit is set
//!   to the window, and the bench bounds it again itself. Accept latency runs from the publish
//!   call to the broker's confirmation, PUBACK at
//!   QoS 1 and PUBCOMP at QoS 2; Mosquitto confirms a connection's publishes in order, so
//!   confirmations are matched to sends first in, first out. Delivery latency runs from the send
//!   time stamped in the body to the PUBLISH reaching the subscriber.
//! - Durability as configured on this machine (`persistence true`): Mosquitto saves its in-memory
//!   state to disk periodically (`autosave_interval`, 30 minutes by default) and at shutdown, not
//!   per message, so a confirmed message lives in memory only until the next save.
//! - Mosquitto's per-client limits apply as configured: by default 20 QoS 1/2 messages in flight
//!   to a subscriber and `max_queued_messages` 1000 queued behind those. The broker drops messages
//!   beyond the queue, for an offline subscriber as for one that is not keeping up; they show as
//!   `lost` (deliveries expected minus those received). The same in-flight limit (20) applies to
//!   a publisher's QoS 2 messages awaiting PUBREL: beyond it Mosquitto still answers PUBREC and
//!   PUBCOMP to an MQTT 3.1.1 client but discards the message, so QoS 2 runs with a window above
//!   20 lose messages that were confirmed. The clients set TCP_NODELAY; the broker's own sockets
//!   only do with `set_tcp_nodelay true` (off by default), so its confirmations can wait on
//!   Nagle's algorithm.
//!
//! Every run uses fresh topics and client ids, and at the end reconnects each client with a clean
//! session so that the broker drops their sessions. No wait is unbounded: receivers stop once
//! nothing has arrived for 10 s after the senders finished, and the run reports what arrived.

use crate::payload::Clock;
use crate::report::{Latency, Outcome};
use crate::system::{
    self, Bodies, Inbox, Publish, Sent, Subscribe, System, Task, Until, IDLE, SETUP_CONCURRENCY,
};
use crate::{fail, run_tag, BenchError};
use futures_util::StreamExt;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, SubscribeReasonCode,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{timeout, Instant};

/// How long a client gets to send its DISCONNECT.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Mosquitto at one QoS, with this run's client ids and topics: pair i is receiver
/// `ordo-bench-<tag>-r<i>` subscribed to `ordo-bench/<tag>/pair/<i>` and sender
/// `ordo-bench-<tag>-s<i>` publishing there; a fan-out group is the topic
/// `ordo-bench/<tag>/group`; catch-up uses `ordo-bench/<tag>/inbox`.
pub struct Mqtt {
    broker: Broker,
    tag: String,
    /// Every client id this run used, whose sessions are dropped at the end.
    ids: Vec<String>,
}

impl Mqtt {
    pub fn new(addr: &str, qos: u8) -> Result<Self, BenchError> {
        Ok(Mqtt {
            broker: Broker::new(addr, qos)?,
            tag: run_tag(),
            ids: Vec::new(),
        })
    }

    fn id(&mut self, who: &str) -> String {
        let id = format!("ordo-bench-{}-{who}", self.tag);
        self.ids.push(id.clone());
        id
    }

    fn topic(&self, leaf: &str) -> String {
        format!("ordo-bench/{}/{leaf}", self.tag)
    }

    /// The catch-up receiver's client id (persistent session) and topic.
    fn inbox(&self) -> (String, String) {
        (format!("ordo-bench-{}-r", self.tag), self.topic("inbox"))
    }
}

impl System for Mqtt {
    fn cpu_groups(&self) -> Vec<(&'static str, crate::cpu::Procs)> {
        vec![("server", crate::cpu::Procs::Named("mosquitto"))]
    }

    type Receiver = Conn;
    type Sender = Publisher;
    type Idle = ();

    fn name(&self) -> &'static str {
        self.broker.system
    }

    async fn pair_receivers(
        &mut self,
        n: usize,
        body_bytes: usize,
    ) -> Result<Vec<Conn>, BenchError> {
        let who: Vec<(String, String)> = (0..n)
            .map(|i| (self.id(&format!("r{i}")), self.topic(&format!("pair/{i}"))))
            .collect();
        self.broker.subscribers(who, body_bytes).await
    }

    async fn pair_sender(
        &mut self,
        i: usize,
        window: usize,
        bodies: Bodies,
    ) -> Result<Publisher, BenchError> {
        let (id, topic) = (self.id(&format!("s{i}")), self.topic(&format!("pair/{i}")));
        Publisher::start(&self.broker, id, topic, window, bodies).await
    }

    async fn group_receivers(
        &mut self,
        members: usize,
        body_bytes: usize,
    ) -> Result<Vec<Conn>, BenchError> {
        let topic = self.topic("group");
        let who: Vec<(String, String)> = (0..members)
            .map(|i| (self.id(&format!("m{i}")), topic.clone()))
            .collect();
        self.broker.subscribers(who, body_bytes).await
    }

    async fn group_sender(&mut self, bodies: Bodies) -> Result<Publisher, BenchError> {
        let (id, topic) = (self.id("s"), self.topic("group"));
        Publisher::start(&self.broker, id, topic, 1, bodies).await
    }

    /// Subscribes with a persistent session, then disconnects: the broker queues for it.
    async fn offline_receiver(&mut self, body_bytes: usize) -> Result<(), BenchError> {
        let (device, topic) = self.inbox();
        self.ids.push(device.clone());
        let mut subs = self
            .broker
            .subscribers([(device, topic)], body_bytes)
            .await?;
        if let Some(mut offline) = subs.pop() {
            close(&offline.client, &mut offline.events).await;
        }
        Ok(())
    }

    async fn catchup_sender(
        &mut self,
        window: usize,
        bodies: Bodies,
    ) -> Result<Publisher, BenchError> {
        let (id, topic) = (self.id("s"), self.topic("inbox"));
        Publisher::start(&self.broker, id, topic, window, bodies).await
    }

    /// Reconnects the persistent session, which must have been kept.
    async fn reconnect_receiver(&mut self, body_bytes: usize) -> Result<Conn, BenchError> {
        let (device, _) = self.inbox();
        let (client, events, session_present) =
            self.broker.connect(&device, false, 1, body_bytes).await?;
        if !session_present {
            return Err(BenchError(format!(
                "Mosquitto at {} did not keep the session of {device} while it was offline \
                 (is `persistent_client_expiration` set very short?)",
                self.broker.addr
            )));
        }
        Ok(Conn {
            id: device,
            client,
            events,
        })
    }

    async fn close(self, result: Result<Outcome, BenchError>) -> Result<Outcome, BenchError> {
        self.broker.cleanup(result, self.ids).await
    }
}

/// The broker and the QoS of one run.
struct Broker {
    addr: String,
    host: String,
    port: u16,
    qos: QoS,
    system: &'static str,
}

impl Broker {
    fn new(addr: &str, qos: u8) -> Result<Self, BenchError> {
        let (qos, system) = match qos {
            1 => (QoS::AtLeastOnce, "mqtt-qos1"),
            2 => (QoS::ExactlyOnce, "mqtt-qos2"),
            other => return Err(BenchError(format!("MQTT QoS must be 1 or 2, not {other}"))),
        };
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .ok_or_else(|| {
                BenchError(format!(
                    "--mqtt must be host:port (like 127.0.0.1:1883), not {addr:?}"
                ))
            })?;
        Ok(Broker {
            addr: addr.to_string(),
            host: host.to_string(),
            port,
            qos,
            system,
        })
    }

    /// Connects as `id` (a persistent session unless `clean`) with at most `window` publishes
    /// in flight, and waits for the CONNACK; also says whether the broker had kept a session.
    async fn connect(
        &self,
        id: &str,
        clean: bool,
        window: usize,
        body_bytes: usize,
    ) -> Result<(AsyncClient, EventLoop, bool), BenchError> {
        let max_packet = (body_bytes + 64 * 1024).max(1 << 20);
        let mut options = MqttOptions::new(id, self.host.as_str(), self.port);
        options
            .set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(60))
            .set_inflight(window.clamp(1, u16::MAX as usize) as u16)
            .set_max_packet_size(max_packet, max_packet);
        // Room for every publish the window allows, plus subscribe and disconnect.
        let (client, mut events) = AsyncClient::new(options, window + 8);
        events.network_options.set_tcp_nodelay(true);
        events
            .network_options
            .set_connection_timeout(IDLE.as_secs());
        match events.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                Ok((client, events, ack.session_present))
            }
            Ok(other) => Err(BenchError(format!(
                "Mosquitto at {} answered the CONNECT of {id} with {other:?}",
                self.addr
            ))),
            Err(e) => Err(BenchError(format!(
                "cannot connect to Mosquitto at {} as {id}: {e} (is mosquitto running and \
                 listening there? are its open files exhausted?)",
                self.addr
            ))),
        }
    }

    /// Connects and subscribes each (client id, topic), [`SETUP_CONCURRENCY`] at a time, each
    /// with a persistent session, and waits for every SUBACK.
    async fn subscribers(
        &self,
        who: impl IntoIterator<Item = (String, String)>,
        body_bytes: usize,
    ) -> Result<Vec<Conn>, BenchError> {
        system::set_up(who, |(id, topic)| self.subscriber(id, topic, body_bytes)).await
    }

    async fn subscriber(
        &self,
        id: String,
        topic: String,
        body_bytes: usize,
    ) -> Result<Conn, BenchError> {
        let (client, mut events, _) = self.connect(&id, false, 1, body_bytes).await?;
        client
            .subscribe(topic.as_str(), self.qos)
            .await
            .map_err(fail(&format!("cannot subscribe {id} to {topic}")))?;
        let deadline = Instant::now() + IDLE;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::SubAck(ack)))) => {
                    return match ack.return_codes.first() {
                        Some(SubscribeReasonCode::Success(granted)) if *granted == self.qos => {
                            Ok(Conn { id, client, events })
                        }
                        other => Err(BenchError(format!(
                            "Mosquitto at {} answered the subscription of {id} to {topic} at \
                             {:?} with {other:?} (does its ACL allow it?)",
                            self.addr, self.qos
                        ))),
                    };
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(BenchError(format!(
                        "lost the connection to Mosquitto at {} while subscribing {id}: {e}",
                        self.addr
                    )))
                }
                Err(_) => {
                    return Err(BenchError(format!(
                        "Mosquitto at {} did not confirm the subscription of {id} within {} s",
                        self.addr,
                        IDLE.as_secs()
                    )))
                }
            }
        }
    }

    /// Drops the persistent sessions of `ids` (reconnecting each with a clean session), whatever
    /// the run's `result`, and passes the result on.
    async fn cleanup(
        &self,
        result: Result<Outcome, BenchError>,
        ids: Vec<String>,
    ) -> Result<Outcome, BenchError> {
        let failed = AtomicU64::new(0);
        futures_util::stream::iter(ids)
            .for_each_concurrent(SETUP_CONCURRENCY, |id| {
                let failed = &failed;
                async move {
                    match self.connect(&id, true, 1, 0).await {
                        Ok((client, mut events, _)) => close(&client, &mut events).await,
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .await;
        let failed = failed.into_inner();
        if failed > 0 && result.is_ok() {
            eprintln!(
                "ordo-bench: could not drop {failed} MQTT session(s) of this run on {}; Mosquitto \
                 keeps them until they expire",
                self.addr
            );
        }
        result
    }
}

/// Disconnects cleanly (sends DISCONNECT), giving up after [`CLOSE_TIMEOUT`].
async fn close(client: &AsyncClient, events: &mut EventLoop) {
    let _ = timeout(CLOSE_TIMEOUT, async {
        if client.disconnect().await.is_err() {
            return;
        }
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A connected, subscribed client.
pub struct Conn {
    id: String,
    client: AsyncClient,
    events: EventLoop,
}

impl Subscribe for Conn {
    /// Receives until told to stop ([`Until`]), then disconnects cleanly.
    fn receive(self, until: Until) -> Task<Inbox> {
        let Conn {
            id,
            client,
            mut events,
        } = self;
        Task::spawn(async move {
            let mut rx = until.start();
            while let Some(event) = rx.next(events.poll()).await {
                match event {
                    Ok(Event::Incoming(Incoming::Publish(p))) => rx.arrived(&p.payload),
                    Ok(_) => {}
                    Err(e) => {
                        rx.fail(format!(
                            "subscriber {id} lost its connection to Mosquitto: {e}"
                        ));
                        break;
                    }
                }
            }
            close(&client, &mut events).await;
            rx.inbox
        })
    }
}

/// A sending client with at most `window` publishes unconfirmed. Its event loop runs in a task
/// of its own, which times each confirmation against the send stamps, first in, first out.
pub struct Publisher {
    id: String,
    addr: String,
    client: AsyncClient,
    topic: String,
    qos: QoS,
    bodies: Bodies,
    window: usize,
    flow: Arc<Flow>,
    stamps: mpsc::UnboundedSender<u64>,
    sent: u64,
    stop: oneshot::Sender<()>,
    confirmer: Task<(Latency, Option<String>)>,
}

impl Publisher {
    async fn start(
        broker: &Broker,
        id: String,
        topic: String,
        window: usize,
        bodies: Bodies,
    ) -> Result<Self, BenchError> {
        let (client, events, _) = broker.connect(&id, false, window, bodies.bytes).await?;
        let flow = Arc::new(Flow {
            permits: Semaphore::new(window),
            accepted: AtomicU64::new(0),
        });
        let (stamps, stamps_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let confirmer = Task::spawn(confirm(
            client.clone(),
            events,
            broker.qos,
            flow.clone(),
            stamps_rx,
            bodies.clock,
            stop_rx,
        ));
        Ok(Publisher {
            id,
            addr: broker.addr.clone(),
            client,
            topic,
            qos: broker.qos,
            bodies,
            window,
            flow,
            stamps,
            sent: 0,
            stop,
            confirmer,
        })
    }
}

impl Publish for Publisher {
    /// `None` once the connection is gone.
    async fn send(&mut self) -> Option<u64> {
        self.flow.permits.acquire().await.ok()?.forget();
        let (stamp, body) = self.bodies.stamped();
        self.stamps.send(stamp).ok()?;
        self.client
            .publish(self.topic.as_str(), self.qos, false, body)
            .await
            .ok()?;
        self.sent += 1;
        Some(stamp)
    }

    /// Waits for the confirmations still due (until none came for [`IDLE`]), then disconnects.
    async fn finish(self) -> Result<Sent, BenchError> {
        let all = self.window.min(u32::MAX as usize) as u32;
        let mut seen = self.flow.accepted.load(Ordering::Relaxed);
        while seen < self.sent {
            match timeout(IDLE, self.flow.permits.acquire_many(all)).await {
                Ok(_) => break,
                Err(_) => {
                    let now = self.flow.accepted.load(Ordering::Relaxed);
                    if now == seen {
                        break;
                    }
                    seen = now;
                }
            }
        }
        let _ = self.stop.send(());
        let (accept, error) = self.confirmer.join().await?;
        if let Some(e) = error {
            return Err(BenchError(format!(
                "sender {} lost its connection to Mosquitto at {}: {e}",
                self.id, self.addr
            )));
        }
        Ok(Sent {
            sent: self.sent,
            accepted: self.flow.accepted.load(Ordering::Relaxed),
            accept,
        })
    }
}

/// A sender's window: places free for publishes, and how many were confirmed.
struct Flow {
    permits: Semaphore,
    accepted: AtomicU64,
}

/// A publisher's event loop: each PUBACK (QoS 1) or PUBCOMP (QoS 2) confirms the oldest
/// unconfirmed publish, whose stamp gives the accept latency, and frees a place in the window.
/// Runs until `stop` (then disconnects) or until the connection fails; either way it then closes
/// the window, so the sender stops.
async fn confirm(
    client: AsyncClient,
    mut events: EventLoop,
    qos: QoS,
    flow: Arc<Flow>,
    mut stamps: mpsc::UnboundedReceiver<u64>,
    clock: Clock,
    mut stop: oneshot::Receiver<()>,
) -> (Latency, Option<String>) {
    let mut latency = Latency::default();
    let mut error = None;
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Incoming::PubAck(_))) if qos == QoS::AtLeastOnce => {}
                Ok(Event::Incoming(Incoming::PubComp(_))) if qos == QoS::ExactlyOnce => {}
                Ok(_) => continue,
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            },
            _ = &mut stop => {
                close(&client, &mut events).await;
                break;
            }
        }
        if let Ok(stamp) = stamps.try_recv() {
            latency.record_micros(clock.now_us().saturating_sub(stamp));
        }
        flow.accepted.fetch_add(1, Ordering::Relaxed);
        flow.permits.add_permits(1);
    }
    flow.permits.close();
    (latency, error)
}
