/**
 * The client as a state machine without I/O: frames, app calls and time in; effects out. It is
 * the Rust SDK's `ClientState`, rule for rule, and the conformance vectors (recorded from the
 * Rust state machine, replayed by this package's tests) hold the two to the same behaviour.
 *
 * Effects come out in the order they must be carried out, and the order is the safety
 * argument: a `persist` always comes before the `transmit` or `event` that depends on it. So a
 * message is stored before it is acknowledged (the ack is a later effect) and before the app
 * hears of it, and a pending message is in the outbox on disk before `send` returns its id. A
 * driver that carries effects out in order and crashes anywhere loses nothing: on restart the
 * store says what was done.
 */

import { defaultRetryPolicy, type RetryPolicy } from './backoff.js';
import { Outbox, sendFrame, stored, targetConv, type Pending, type Target } from './outbox.js';
import type { ClientFrame, ConvInfo, Message, ServerFrame } from './protocol.js';
import { ReorderBuffer } from './reorder.js';
import { SentMessages } from './sent.js';

export interface ClientConfig {
  retry: RetryPolicy;
  /** Acknowledge at most this long after storing a message... */
  ack_delay_ms: number;
  /** ...or as soon as this many stored messages are unacknowledged in a conversation. */
  ack_every: number;
  /** Messages held behind a hole per conversation. */
  reorder_capacity: number;
  /** `limit` of each `sync`. */
  sync_limit: number;
}

export function defaultConfig(): ClientConfig {
  return {
    retry: defaultRetryPolicy(),
    ack_delay_ms: 200,
    ack_every: 64,
    reorder_capacity: 4096,
    sync_limit: 500,
  };
}

/**
 * Where a message the app sent stands: `pending` (in the outbox), `sent` (durable on the
 * server with `seq`: one tick), `delivered` (every other member has it on a device: two
 * ticks), `read` (every other member read it), `failed` (given up; `reason` says why).
 */
export type Status =
  | { state: 'pending' }
  | { state: 'sent'; seq: number }
  | { state: 'delivered' }
  | { state: 'read' }
  | { state: 'failed'; reason: string };

/** What the app is told. */
export type Event =
  /**
   * The next message of a conversation, in seq order, each once. A system message (`from`
   * empty) with `event` set records a change of the group.
   */
  | { type: 'message'; message: Message }
  /** This user was removed from (or, with `left`, left) group `conv` at `seq`. */
  | { type: 'removed'; conv: string; seq: number; left: boolean }
  | { type: 'status'; cmid: string; conv: string | null; status: Status }
  /** A member's delivered/read position moved. */
  | { type: 'receipt'; conv: string; user: string; delivered: number; read: number }
  /** Seqs `from..=to` were removed by retention before this device got them. */
  | { type: 'history_gap'; conv: string; from: number; to: number }
  /** The conversation's history was reset on the server; it is being fetched again from 1. */
  | { type: 'epoch_reset'; conv: string; epoch: number }
  /** The server refused a frame other than a send. */
  | { type: 'server_error'; code: string; message: string }
  | { type: 'connected' }
  | { type: 'disconnected' }
  /**
   * A connection attempt failed. The client tries again with backoff unless the failure
   * cannot mend by itself (`permanent`: a refused token, a bad URL): then it stops.
   */
  | { type: 'connect_failed'; reason: string; unauthorized: boolean; permanent?: boolean };

/** A change to the local store. */
export type StoreOp =
  /** A message entered (or changed in) the outbox. */
  | { op: 'put_pending'; pending: Pending }
  /** A message left the outbox (accepted, or failed). */
  | { op: 'remove_pending'; cmid: string }
  /** Received messages, contiguous, and the conversation's new contiguous position. */
  | { op: 'put_messages'; conv: string; messages: Message[]; contiguous: number }
  /** The conversation's epoch and position (a reset drops the old epoch's messages). */
  | { op: 'set_conv'; conv: string; epoch: number | null; contiguous: number; reset: boolean }
  /** This device's read position. */
  | { op: 'set_read'; conv: string; seq: number }
  /** One of our messages got a seq, or its status moved. */
  | { op: 'put_sent'; conv: string; seq: number; cmid: string; status: Status };

export type Effect = { persist: StoreOp[] } | { transmit: ClientFrame } | { event: Event };

/** What the local store holds about one conversation, to restart from. */
export interface ConvSnapshot {
  conv: string;
  epoch: number | null;
  contiguous: number;
  read: number;
}

/** One of our sent messages whose status can still move. */
export interface SentSnapshot {
  conv: string;
  seq: number;
  cmid: string;
  status: Status;
}

/** Everything the state machine restarts from. */
export interface ClientSnapshot {
  outbox: Pending[];
  convs: ConvSnapshot[];
  sent: SentSnapshot[];
}

export function emptySnapshot(): ClientSnapshot {
  return { outbox: [], convs: [], sent: [] };
}

interface ConvState {
  epoch: number | null;
  reorder: ReorderBuffer;
  /** A `sync` is outstanding. */
  syncing: boolean;
  /** Highest seq acknowledged to the server (by `ack` or by a `sync`'s `after`). */
  acked: number;
  read: number;
  /** Read position the server is known to have. */
  read_sent: number;
  members: string[];
  /** `members` came from an overview (not guessed): statuses may be derived from them. */
  members_known: boolean;
  /** user -> [delivered, read], from receipts and overviews. */
  positions: Map<string, [number, number]>;
  /** For a group too large to list its members: the lowest [delivered, read] of the others. */
  others: [number, number] | null;
}

const MASK64 = (1n << 64n) - 1n;

export class ClientState {
  private readonly cfg: ClientConfig;
  private readonly device: string;
  /** Our own user id, once the server said it. */
  private user: string | null = null;
  private isOnline = false;
  private readonly box: Outbox;
  private readonly convs = new Map<string, ConvState>();
  /** Per conversation, our messages not yet read by everyone. */
  private readonly sent = new Map<string, SentMessages>();
  private readonly effects: Effect[] = [];
  /** A `convs` request is outstanding. */
  private overviewPending = false;
  private rng: bigint;
  private ackDue: number | null = null;

  /**
   * `seed` drives jitter and client message ids: random in production, fixed in a test. The
   * same seed gives the same ids and delays as the Rust SDK.
   */
  constructor(cfg: ClientConfig, device: string, seed: bigint, snap: ClientSnapshot) {
    this.cfg = cfg;
    this.device = device;
    this.rng = (seed & MASK64) | 1n;
    for (const c of snap.convs) {
      this.convs.set(c.conv, this.newConv(c.epoch, c.contiguous, c.read));
    }
    for (const s of snap.sent) this.sentOf(s.conv).put(s.seq, s.cmid, s.status);
    this.box = new Outbox(cfg.retry, snap.outbox);
  }

  private newConv(epoch: number | null, contiguous: number, read: number): ConvState {
    return {
      epoch,
      reorder: new ReorderBuffer(contiguous, this.cfg.reorder_capacity),
      syncing: false,
      acked: 0,
      read,
      read_sent: 0,
      members: [],
      members_known: false,
      positions: new Map(),
      others: null,
    };
  }

  private sentOf(conv: string): SentMessages {
    let m = this.sent.get(conv);
    if (m === undefined) {
      m = new SentMessages();
      this.sent.set(conv, m);
    }
    return m;
  }

  pollEffect(): Effect | undefined {
    return this.effects.shift();
  }

  isConnected(): boolean {
    return this.isOnline;
  }

  outbox(): Outbox {
    return this.box;
  }

  /** Our user id, once the server's `welcome` said it. */
  userId(): string | null {
    return this.user;
  }

  /** Highest seq of `conv` stored without a hole. */
  contiguous(conv: string): number {
    return this.convs.get(conv)?.reorder.contiguous() ?? 0;
  }

  /** This device's read position in `conv`. */
  readPosition(conv: string): number {
    return this.convs.get(conv)?.read ?? 0;
  }

  /** When `tick` should be called next. */
  nextDeadline(): number | null {
    const outbox = this.isOnline ? this.box.nextDue() : null;
    if (outbox !== null && this.ackDue !== null) return Math.min(outbox, this.ackDue);
    return outbox ?? this.ackDue;
  }

  private nextU64(): bigint {
    // xorshift64*
    let x = this.rng;
    x ^= x >> 12n;
    x = (x ^ (x << 25n)) & MASK64;
    x ^= x >> 27n;
    this.rng = x;
    return (x * 0x2545f4914f6cdd1dn) & MASK64;
  }

  private unit(): number {
    return Number(this.nextU64() >> 11n) / 2 ** 53;
  }

  private conv(conv: string): ConvState {
    let c = this.convs.get(conv);
    if (c === undefined) {
      c = this.newConv(null, 0, 0);
      this.convs.set(conv, c);
    }
    return c;
  }

  // ----- app calls -----

  /**
   * Queues a message. Returns its client message id at once; the message is in the outbox
   * (first effect: persist) and its status is `pending`.
   */
  send(target: Target, body: string, replyTo: number | null, now: number): string {
    const a = this.nextU64();
    const b = this.nextU64() & 0xffffffffn;
    // Ids are at most 128 bytes: keep the device part short.
    const prefix = Array.from(this.device).slice(0, 32).join('');
    const cmid = `${prefix}-${a.toString(16).padStart(16, '0')}${b.toString(16).padStart(8, '0')}`;
    const p: Pending = { cmid, target, body, reply_to: replyTo, attempts: 0, due_ms: 0 };
    this.box.push(p);
    this.effects.push({ persist: [{ op: 'put_pending', pending: stored(p) }] });
    this.event({ type: 'status', cmid, conv: targetConv(target), status: { state: 'pending' } });
    this.flushOutbox(now);
    return cmid;
  }

  /** The app showed the user everything up to `seq` of `conv`. */
  markRead(conv: string, seq: number): void {
    const connected = this.isOnline;
    const c = this.conv(conv);
    seq = Math.min(seq, c.reorder.contiguous());
    if (seq <= c.read) return;
    c.read = seq;
    const send = connected && seq > c.read_sent;
    if (send) c.read_sent = seq;
    this.effects.push({ persist: [{ op: 'set_read', conv, seq }] });
    if (send) this.transmit({ type: 'read', conv, seq });
  }

  // ----- connection -----

  /**
   * The WebSocket is up: resend the outbox in order, then ask for the overview (which leads
   * to a `sync` of every conversation that moved while we were away).
   */
  connected(now: number): void {
    this.isOnline = true;
    this.event({ type: 'connected' });
    this.box.allDueNow();
    this.flushOutbox(now);
    this.requestOverview();
  }

  private requestOverview(): void {
    if (this.isOnline && !this.overviewPending) {
      this.overviewPending = true;
      this.transmit({ type: 'convs' });
    }
  }

  disconnected(): void {
    if (!this.isOnline) return;
    this.isOnline = false;
    this.overviewPending = false;
    for (const c of this.convs.values()) {
      c.syncing = false;
      c.read_sent = 0;
    }
    this.ackDue = null;
    this.event({ type: 'disconnected' });
  }

  /** Timers: resends that are due, and the batched ack. */
  tick(now: number): void {
    if (this.isOnline) this.flushOutbox(now);
    if (this.ackDue !== null && this.ackDue <= now) this.flushAcks();
  }

  // ----- frames -----

  frame(f: ServerFrame, now: number): void {
    switch (f.type) {
      case 'welcome':
        this.user = f.user;
        return;
      case 'accepted':
        this.onAccepted(f.cmid, f.conv, f.seq);
        // Anything held back behind it may go now.
        this.flushOutbox(now);
        return;
      case 'rejected': {
        if (f.retryable) {
          this.box.retryLater(f.cmid, now, f.retry_after_ms);
          return;
        }
        const p = this.box.reject(f.cmid);
        if (p !== undefined) {
          this.effects.push({ persist: [{ op: 'remove_pending', cmid: p.cmid }] });
          this.event({
            type: 'status',
            cmid: f.cmid,
            conv: targetConv(p.target),
            status: { state: 'failed', reason: `${f.code}: ${f.message}` },
          });
        }
        return;
      }
      case 'msg': {
        const { type: _t, ...m } = f;
        this.onMessage(m, now);
        return;
      }
      case 'notify':
        if (f.max_seq > this.contiguous(f.conv)) this.startSync(f.conv);
        return;
      case 'synced':
        this.onSynced(f.conv, f.epoch, f.messages, f.has_more, f.first_seq, f.max_seq, now);
        return;
      case 'receipt':
        this.onReceipt(f.conv, f.user, f.delivered, f.read);
        return;
      case 'convs': {
        const last = f.conversations.length > 0 ? f.conversations[f.conversations.length - 1] : undefined;
        for (const info of f.conversations) this.onConvInfo(info);
        if (last !== undefined && f.has_more && this.isOnline) {
          this.transmit({ type: 'convs', after: last.conv });
        } else {
          this.overviewPending = false;
        }
        return;
      }
      case 'error': {
        if (f.request === 'convs') {
          // The overview failed: the next reason to ask asks again.
          this.overviewPending = false;
        } else if (f.request === 'sync') {
          // That sync failed: the next notify, push or overview asks again.
          if (f.conv !== undefined) {
            const c = this.convs.get(f.conv);
            if (c !== undefined) c.syncing = false;
          }
        } else if (f.request === undefined) {
          // Not tied to a request (an older server): any sync may have failed.
          for (const c of this.convs.values()) c.syncing = false;
        }
        this.event({ type: 'server_error', code: f.code, message: f.message });
        return;
      }
      case 'pong':
        return;
    }
  }

  private onAccepted(cmid: string, conv: string, seq: number): void {
    if (this.box.accepted(cmid) === undefined) return; // an answer to a resend we already had
    const status: Status = { state: 'sent', seq };
    this.sentOf(conv).put(seq, cmid, status);
    this.effects.push({
      persist: [
        { op: 'remove_pending', cmid },
        { op: 'put_sent', conv, seq, cmid, status },
      ],
    });
    this.event({ type: 'status', cmid, conv, status });
    // A receipt may have arrived before the accept.
    this.updateStatuses(conv);
  }

  private onMessage(m: Message, now: number): void {
    const conv = m.conv;
    let removed: boolean | null = null;
    if (this.user !== null && m.event !== undefined) {
      if (m.event.kind === 'removed' && m.event.users.includes(this.user)) removed = false;
      if (m.event.kind === 'left' && m.event.users.includes(this.user)) removed = true;
    }
    if (removed !== null) {
      const seq = m.seq;
      // Handed over if it is next; a gap before it is not synced (it cannot be).
      const offer = this.conv(conv).reorder.offer(m);
      if (offer.kind === 'ready') this.storeAndHand(conv, offer.messages, now);
      this.event({ type: 'removed', conv, seq, left: removed });
      return;
    }
    const offer = this.conv(conv).reorder.offer(m);
    if (offer.kind === 'gap') this.startSync(conv);
    else if (offer.kind === 'ready') this.storeAndHand(conv, offer.messages, now);
  }

  private storeAndHand(conv: string, ready: Message[], now: number): void {
    if (ready.length === 0) return;
    const contiguous = this.contiguous(conv);
    this.effects.push({ persist: [{ op: 'put_messages', conv, messages: ready, contiguous }] });
    for (const m of ready) this.event({ type: 'message', message: m });
    const c = this.conv(conv);
    if (contiguous - c.acked >= this.cfg.ack_every) this.flushAcks();
    else if (this.ackDue === null) this.ackDue = now + this.cfg.ack_delay_ms;
  }

  private onSynced(
    conv: string,
    epoch: number,
    messages: Message[],
    hasMore: boolean,
    firstSeq: number,
    maxSeq: number,
    now: number,
  ): void {
    let c = this.conv(conv);
    c.syncing = false;
    if (c.epoch !== null && c.epoch !== epoch) {
      // History was reset: what we hold belongs to another history. Start over.
      c.epoch = epoch;
      c.reorder.reset(0);
      c.acked = 0;
      c.read = 0;
      this.persistConv(conv, epoch, 0, true);
      this.event({ type: 'epoch_reset', conv, epoch });
      this.startSync(conv);
      return;
    }
    if (c.epoch === null) {
      c.epoch = epoch;
      this.persistConv(conv, epoch, c.reorder.contiguous(), false);
    }
    c = this.conv(conv);
    const { gap, ready } = c.reorder.skipTo(firstSeq);
    if (gap !== null) {
      this.persistConv(conv, epoch, gap[1], false);
      this.event({ type: 'history_gap', conv, from: gap[0], to: gap[1] });
    }
    for (const m of messages) {
      const offer = this.conv(conv).reorder.offer(m);
      if (offer.kind === 'ready') ready.push(...offer.messages);
    }
    // `skipTo` may have released buffered messages after the gap; hand them on with the
    // page, as one stored run.
    ready.sort((x, y) => x.seq - y.seq);
    this.storeAndHand(conv, ready, now);
    if (hasMore || this.contiguous(conv) < maxSeq) this.startSync(conv);
  }

  private onConvInfo(info: ConvInfo): void {
    const connected = this.isOnline;
    const c = this.conv(info.conv);
    c.members = info.members.map((m) => m.user);
    c.members_known = true;
    // A group too large to list its members comes with the aggregates only.
    c.others =
      info.members.length === 0 && info.member_count > 1
        ? [info.others_delivered, info.others_read]
        : null;
    for (const m of info.members) {
      // A receipt may be newer than the overview: positions only move forward.
      const p = c.positions.get(m.user) ?? [0, 0];
      c.positions.set(m.user, [Math.max(p[0], m.delivered), Math.max(p[1], m.read)]);
    }
    // The server may hold an older delivered position than what we stored (our last ack was
    // lost with the connection): acknowledge again soon.
    const ackAgain = c.reorder.contiguous() > info.delivered;
    c.acked = info.delivered;
    c.read_sent = info.read;
    const resendRead = connected && c.read > info.read;
    const read = c.read;
    if (resendRead) c.read_sent = read;
    const behind =
      c.epoch !== null && c.epoch !== info.epoch
        ? true // the sync answer will reset it
        : info.max_seq > c.reorder.contiguous();
    if (resendRead) this.transmit({ type: 'read', conv: info.conv, seq: read });
    if (behind) this.startSync(info.conv);
    else if (ackAgain && this.ackDue === null) this.ackDue = 0;
    this.updateStatuses(info.conv);
  }

  private onReceipt(conv: string, user: string, delivered: number, read: number): void {
    const c = this.conv(conv);
    const p = c.positions.get(user) ?? [0, 0];
    c.positions.set(user, [Math.max(p[0], delivered), Math.max(p[1], read)]);
    // Members are learnt from the overview only: guessing them from receipts would call a
    // message delivered while a member we have not heard of still lacks it.
    if (!c.members_known || !c.members.includes(user)) this.requestOverview();
    this.event({ type: 'receipt', conv, user, delivered, read });
    this.updateStatuses(conv);
  }

  /** Moves our sent messages in `conv` to delivered / read once every other member got there. */
  private updateStatuses(conv: string): void {
    const me = this.user;
    if (me === null) return;
    const c = this.convs.get(conv);
    if (c === undefined) return;
    if (!c.members_known) {
      // A conversation new since the last overview: learn its members first.
      if ((this.sent.get(conv)?.size ?? 0) > 0) this.requestOverview();
      return;
    }
    let delivered: number;
    let read: number;
    if (c.others !== null) {
      [delivered, read] = c.others;
    } else {
      const others = c.members.filter((u) => u !== me);
      if (others.length === 0) return;
      const pos = (u: string): [number, number] => c.positions.get(u) ?? [0, 0];
      delivered = Math.min(...others.map((u) => pos(u)[0]));
      read = Math.min(...others.map((u) => pos(u)[1]));
    }
    const ops: StoreOp[] = [];
    const events: Event[] = [];
    const mine = this.sent.get(conv);
    if (mine !== undefined) {
      for (const { seq, cmid, status } of mine.advance(delivered, read)) {
        ops.push({ op: 'put_sent', conv, seq, cmid, status });
        events.push({ type: 'status', cmid, conv, status });
      }
      // Read is final: those are forgotten.
      if (mine.size === 0) this.sent.delete(conv);
    }
    if (ops.length > 0) this.effects.push({ persist: ops });
    for (const e of events) this.event(e);
  }

  // ----- helpers -----

  private startSync(conv: string): void {
    if (!this.isOnline) return;
    const c = this.conv(conv);
    if (c.syncing) return;
    c.syncing = true;
    const after = c.reorder.contiguous();
    // The sync's `after` acknowledges everything up to it.
    c.acked = Math.max(c.acked, after);
    this.transmit({ type: 'sync', conv, after, limit: this.cfg.sync_limit });
  }

  private flushAcks(): void {
    this.ackDue = null;
    if (!this.isOnline) return;
    const acks: { conv: string; seq: number }[] = [];
    for (const [conv, c] of this.convs) {
      const contiguous = c.reorder.contiguous();
      if (contiguous > c.acked) {
        c.acked = contiguous;
        acks.push({ conv, seq: contiguous });
      }
    }
    if (acks.length > 0) {
      acks.sort((x, y) => (x.conv < y.conv ? -1 : x.conv > y.conv ? 1 : 0));
      this.transmit({ type: 'ack', acks });
    }
  }

  private flushOutbox(now: number): void {
    if (!this.isOnline) return;
    const units: number[] = [];
    for (let i = 0; i < this.box.length; i++) units.push(this.unit());
    let next = 0;
    const { send, failed } = this.box.takeDue(now, () => units[next++] ?? 0.5);
    for (const p of send) this.transmit(sendFrame(p));
    for (const { pending: p, failure } of failed) {
      this.effects.push({ persist: [{ op: 'remove_pending', cmid: p.cmid }] });
      const reason =
        failure.kind === 'exhausted'
          ? `not accepted after ${failure.attempts} attempts`
          : `${failure.code}: ${failure.message}`;
      this.event({ type: 'status', cmid: p.cmid, conv: targetConv(p.target), status: { state: 'failed', reason } });
    }
  }

  /** Stores a conversation's epoch and contiguous position (`reset`: the old history goes). */
  private persistConv(conv: string, epoch: number, contiguous: number, reset: boolean): void {
    this.effects.push({ persist: [{ op: 'set_conv', conv, epoch, contiguous, reset }] });
  }

  private transmit(f: ClientFrame): void {
    this.effects.push({ transmit: f });
  }

  private event(e: Event): void {
    this.effects.push({ event: e });
  }
}
