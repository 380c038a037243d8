//! Ordo's wire protocol: the frames a client and the server exchange over a WebSocket, their two
//! encodings (JSON in text frames, MessagePack in binary frames), the limits, and the validation
//! of identifiers. No I/O lives here, so every other layer (server, client SDK, simulation) shares
//! exactly one definition of what goes over the wire.
//!
//! `docs/protocol.md` is the normative description; the types here are its implementation.

pub mod codec;
pub mod error_code;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod tagged;

pub use codec::{decode_client, decode_server, encode, DecodeError, Encoded, Encoding};
pub use error_code::ErrorCode;
pub use frame::*;
pub use ids::{
    direct_conv_id, is_direct, validate_conv_id, validate_id, IdError, IdKind, DIRECT_PREFIX,
};
pub use limits::{Limits, MAX_CONVS_LIMIT};

/// The protocol version this crate speaks. Sent in `welcome`; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;
