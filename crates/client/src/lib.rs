//! The Ordo client SDK.
//!
//! Half of Ordo's promise lives on the client: the outbox that resends a message with the same
//! client message id until the server accepts it, the reorder buffer that hands the app only
//! contiguous seqs, each once, and the rule that a message is stored before it is acknowledged.
//! These rules are written here without I/O ([`state`]), so that a simulation can drive them; a
//! local store ([`store`]) and a tokio driver ([`driver`]) put them to work.

pub mod backoff;
pub mod driver;
pub mod outbox;
pub mod reorder;
pub mod state;
pub mod store;

pub use backoff::RetryPolicy;
pub use driver::{token_identity, Client, ClientError, ClientOptions};
pub use ordo_protocol::{direct_conv_id, Message};
pub use outbox::{Outbox, Pending, Target};
pub use reorder::{Offer, ReorderBuffer};
pub use state::{
    ClientConfig, ClientSnapshot, ClientState, ConvSnapshot, Effect, Event, SentSnapshot, Status,
    StoreOp,
};
pub use store::{LocalStore, LocalStoreError};
