//! The Ordo client SDK.
//!
//! Half of Ordo's promise lives on the client: the outbox that resends a message with the same
//! client message id until the server accepts it, the reorder buffer that hands the app only
//! contiguous seqs, each once, and the rule that a message is stored before it is acknowledged.
//! These rules are written here without I/O ([`state`]), so that a simulation can drive them; a
//! local store ([`store`]) and a tokio driver ([`driver`]) put them to work. An in-memory
//! reference store ([`memory_store`]) stands in for the local store in the tests and in the
//! simulation.
//!
//! The connection is the driver's business: it reconnects by itself, with backoff and jitter,
//! and says why it is not connected ([`ConnectError`], through [`Client::connection`] after an
//! `Event::ConnectFailed` or `Event::Disconnected`). Errors that retrying cannot mend (a URL that
//! is not `ws://` or `wss://`, a token the server refuses, a certificate that does not verify)
//! stop it instead; see the [`driver`] module.
//!
//! ```no_run
//! use ordo_client::{Client, ClientOptions, Connection, Event, Status, Target};
//!
//! # async fn demo(token: String) -> Result<(), ordo_client::ClientError> {
//! // One store file per device; reopening it carries on where the last run stopped.
//! let mut client = Client::open(ClientOptions::new(
//!     "ws://127.0.0.1:7400",
//!     token,
//!     "alice-phone.redb",
//! ))
//! .await?;
//!
//! // Returns at once, with the message safely in the outbox (optimistic UI: show it as
//! // pending). The SDK resends it until the server accepts it, exactly once.
//! let cmid = client.send(Target::User("bob".into()), "hi bob").await?;
//!
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         // Every message of every conversation, once each, in seq order.
//!         Event::Message(m) => {
//!             println!("{} #{} {}: {}", m.conv, m.seq, m.from, m.body);
//!             client.mark_read(&m.conv, m.seq)?;
//!         }
//!         // Pending -> Sent(seq) -> Delivered -> Read, or Failed(reason).
//!         Event::Status { cmid: c, status, .. } if c == cmid => {
//!             if status == Status::Read {
//!                 break;
//!             }
//!         }
//!         Event::HistoryGap { conv, from, to } => println!("{conv}: {from}..={to} removed"),
//!         // Why the connection failed or dropped, and when the next attempt is.
//!         Event::ConnectFailed { .. } | Event::Disconnected => match client.connection() {
//!             Connection::Retrying { cause, retry_in, .. } => {
//!                 eprintln!("{cause}; retrying in {:.1} s", retry_in.as_secs_f32())
//!             }
//!             Connection::Stopped(cause) => eprintln!("{cause}"), // next_event returns None
//!             _ => {}
//!         },
//!         _ => {}
//!     }
//! }
//! client.close().await;
//! # Ok(())
//! # }
//! ```

pub mod backoff;
pub mod driver;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod memory_store;
pub mod outbox;
pub mod reorder;
mod sent;
pub mod state;
pub mod store;
pub mod tls;

pub use backoff::RetryPolicy;
pub use driver::{
    endpoint, token_identity, Client, ClientError, ClientOptions, ConnectError, Connection, WS_PATH,
};
#[cfg(feature = "fault-injection")]
pub use fault::Faults;
pub use memory_store::MemoryStore;
pub use ordo_protocol::{direct_conv_id, Message};
pub use outbox::{Outbox, Pending, Target};
pub use reorder::{Offer, ReorderBuffer};
pub use state::{
    ClientConfig, ClientSnapshot, ClientState, ConvSnapshot, Effect, Event, SentSnapshot, Status,
    StoreOp,
};
pub use store::{LocalStore, LocalStoreError};
