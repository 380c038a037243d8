/**
 * The Ordo client SDK for browsers and Node.js.
 *
 * Half of Ordo's promise lives on the client: the outbox that resends a message with the same
 * client message id until the server accepts it, the reorder buffer that hands the app each
 * seq once and in order, and the rule that a message is stored before it is acknowledged.
 * `ClientState` holds those rules without I/O (the same rules as the Rust SDK, held to it by
 * the conformance vectors); `Client` puts them to work on a WebSocket and a local store:
 * `IndexedDbStore` in a browser, `SqliteStore` (from `ordo-client/sqlite`) in Node.
 */

export { Client, ClientError, checkUrl, endpoint, tokenIdentity, WS_PATH } from './client.js';
export type { ClientOptions, ConnectionState, WebSocketFactory, WebSocketLike } from './client.js';
export { ClientState, defaultConfig, emptySnapshot } from './state.js';
export type {
  ClientConfig,
  ClientSnapshot,
  ConvSnapshot,
  Effect,
  Event,
  SentSnapshot,
  Status,
  StoreOp,
} from './state.js';
export { defaultRetryPolicy, delayMs, mayRetry, reconnectPolicy } from './backoff.js';
export type { RetryPolicy } from './backoff.js';
export { Outbox } from './outbox.js';
export type { Pending, Target } from './outbox.js';
export { ReorderBuffer } from './reorder.js';
export type { Offer } from './reorder.js';
export { MemoryStore, StoreError } from './store.js';
export type { ConvRow, LocalStore } from './store.js';
export { IndexedDbStore } from './indexeddb-store.js';
export { TabClient } from './tabs.js';
export { decodeServerFrame, directConvId, encodeClientFrame, FrameError, readServerFrame } from './protocol.js';
export type { ClientFrame, ConvEvent, ConvInfo, Message, ServerFrame } from './protocol.js';
