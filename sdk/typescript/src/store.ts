/**
 * The client's local store: the outbox, received messages, each conversation's position and
 * epoch, and our sent messages whose status can still move.
 *
 * Every `persist` effect of the state machine is applied as one atomic, durable write before
 * the client carries out the next effect: that is what makes "stored before acknowledged" and
 * "in the outbox before `send` resolves" true across a crash. Three stores keep this promise:
 * `IndexedDbStore` in browsers, `SqliteStore` in Node (`ordo-client/sqlite`), and
 * `MemoryStore` here, which keeps nothing across a restart of the process and is the
 * reference the other two are tested against.
 */

import type { Pending } from './outbox.js';
import type { Message } from './protocol.js';
import type { ClientSnapshot, SentSnapshot, StoreOp } from './state.js';

/** What the store holds about one conversation. */
export interface ConvRow {
  conv: string;
  epoch: number | null;
  /** Every seq up to this one is stored. */
  contiguous: number;
  /** This device's read position. */
  read: number;
  /** Highest seq the app has taken as an event; stored messages above it are handed again. */
  handed: number;
}

/** A local store the client can run on. Every method may reject with a `StoreError`. */
export interface LocalStore {
  /** What the state machine restarts from. */
  snapshot(): Promise<ClientSnapshot>;
  /** Applies the operations of one `persist` effect atomically and durably. */
  apply(ops: StoreOp[]): Promise<void>;
  /** Records that the app took every message of `conv` up to `seq`. */
  setHanded(conv: string, seq: number): Promise<void>;
  /** Stored messages the app has not taken yet, per conversation in seq order. */
  unhanded(): Promise<Message[]>;
  /** Local history of `conv`: messages with seq > `after`, oldest first, at most `limit`. */
  history(conv: string, after: number, limit: number): Promise<Message[]>;
  /** The newest `limit` messages of `conv` stored with seq < `before`, oldest first. */
  latest(conv: string, limit: number, before?: number): Promise<Message[]>;
  /** Every conversation the store knows, by id. */
  conversations(): Promise<ConvRow[]>;
  /** Our sent messages whose status can still move (not read by everyone yet). */
  sentStatuses(): Promise<SentSnapshot[]>;
  close(): Promise<void>;
}

/** The local store failed, or holds something that does not add up. */
export class StoreError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StoreError';
  }
}

/** One conversation row after `op`, the rules every store applies in the same way. */
export function nextConvRow(row: ConvRow, op: StoreOp): ConvRow {
  const r = { ...row };
  switch (op.op) {
    case 'put_messages':
      r.contiguous = Math.max(r.contiguous, op.contiguous);
      break;
    case 'set_conv':
      r.epoch = op.epoch;
      if (op.reset) {
        r.contiguous = op.contiguous;
        r.read = 0;
        r.handed = 0;
      } else {
        r.contiguous = Math.max(r.contiguous, op.contiguous);
      }
      break;
    case 'set_read':
      r.read = Math.max(r.read, op.seq);
      break;
    default:
      break;
  }
  return r;
}

export function emptyConvRow(conv: string): ConvRow {
  return { conv, epoch: null, contiguous: 0, read: 0, handed: 0 };
}

function byConv<T extends { conv: string }>(a: T, b: T): number {
  return a.conv < b.conv ? -1 : a.conv > b.conv ? 1 : 0;
}

export function sortSnapshot(s: ClientSnapshot): ClientSnapshot {
  return {
    outbox: s.outbox,
    convs: [...s.convs].sort(byConv),
    sent: [...s.sent].sort((a, b) => byConv(a, b) || a.seq - b.seq),
  };
}

/**
 * The in-memory reference store: plain maps, nothing on disk. Where a real store would take
 * any write, this one takes the strict side and refuses writes that break the store's rules (a
 * stored run that skips or repeats a seq, a cmid back in the outbox after it left, a message
 * recorded under two seqs), so that the tests notice a state machine that asks for them.
 */
export class MemoryStore implements LocalStore {
  readonly outbox: Pending[] = [];
  readonly messages = new Map<string, Map<number, Message>>();
  readonly convs = new Map<string, ConvRow>();
  /** Our sent messages by conv and seq, with their last status (read ones included). */
  readonly sent = new Map<string, Map<number, SentSnapshot>>();
  private readonly accepted = new Map<string, string>();
  private readonly removed = new Set<string>();
  private readonly byCmid = new Map<string, string>();

  contiguous(conv: string): number {
    return this.convs.get(conv)?.contiguous ?? 0;
  }

  message(conv: string, seq: number): Message | undefined {
    return this.messages.get(conv)?.get(seq);
  }

  private row(conv: string): ConvRow {
    return this.convs.get(conv) ?? emptyConvRow(conv);
  }

  /** `apply`, synchronously: throws a `StoreError` at the first write that breaks a rule. */
  applySync(ops: StoreOp[]): void {
    for (const op of ops) {
      switch (op.op) {
        case 'put_pending': {
          if (this.removed.has(op.pending.cmid)) {
            throw new StoreError(`${op.pending.cmid} went back into the outbox`);
          }
          const i = this.outbox.findIndex((p) => p.cmid === op.pending.cmid);
          if (i >= 0) this.outbox[i] = { ...op.pending };
          else this.outbox.push({ ...op.pending });
          break;
        }
        case 'remove_pending': {
          const i = this.outbox.findIndex((p) => p.cmid === op.cmid);
          if (i >= 0) this.outbox.splice(i, 1);
          this.removed.add(op.cmid);
          break;
        }
        case 'put_messages': {
          const row = this.row(op.conv);
          const last = op.messages[op.messages.length - 1];
          if (last === undefined) throw new StoreError(`an empty put_messages for ${op.conv}`);
          op.messages.forEach((m, i) => {
            const want = row.contiguous + 1 + i;
            if (m.conv !== op.conv || m.seq !== want) {
              throw new StoreError(
                `put_messages stores ${m.conv}/${m.seq} where ${op.conv}/${want} is next`,
              );
            }
          });
          if (op.contiguous !== last.seq) {
            throw new StoreError(
              `put_messages of ${op.conv} up to ${last.seq} says contiguous ${op.contiguous}`,
            );
          }
          let stored = this.messages.get(op.conv);
          if (stored === undefined) {
            stored = new Map();
            this.messages.set(op.conv, stored);
          }
          for (const m of op.messages) {
            const at = `${op.conv}/${m.seq}`;
            const key = `${m.from}\u0000${m.cmid}`;
            const prev = this.byCmid.get(key);
            if (prev !== undefined && prev !== at) {
              throw new StoreError(`${m.from}'s ${m.cmid} stored as ${prev} and again as ${at}`);
            }
            this.byCmid.set(key, at);
            stored.set(m.seq, m);
          }
          this.convs.set(op.conv, nextConvRow(row, op));
          break;
        }
        case 'set_conv': {
          if (op.reset) {
            this.messages.delete(op.conv);
            for (const [k, at] of this.byCmid) {
              if (at.startsWith(`${op.conv}/`)) this.byCmid.delete(k);
            }
          }
          this.convs.set(op.conv, nextConvRow(this.row(op.conv), op));
          break;
        }
        case 'set_read': {
          const row = this.row(op.conv);
          if (op.seq > row.contiguous) {
            throw new StoreError(
              `read position ${op.conv}/${op.seq} beyond what is stored (${row.contiguous})`,
            );
          }
          this.convs.set(op.conv, nextConvRow(row, op));
          break;
        }
        case 'put_sent': {
          const at = `${op.conv}/${op.seq}`;
          const prev = this.accepted.get(op.cmid);
          if (prev !== undefined && prev !== at) {
            throw new StoreError(`${op.cmid} accepted as ${prev} and as ${at}`);
          }
          this.accepted.set(op.cmid, at);
          let m = this.sent.get(op.conv);
          if (m === undefined) {
            m = new Map();
            this.sent.set(op.conv, m);
          }
          m.set(op.seq, { conv: op.conv, seq: op.seq, cmid: op.cmid, status: op.status });
          break;
        }
      }
    }
  }

  async apply(ops: StoreOp[]): Promise<void> {
    this.applySync(ops);
  }

  snapshotSync(): ClientSnapshot {
    const sent: SentSnapshot[] = [];
    for (const m of this.sent.values()) {
      for (const s of m.values()) if (s.status.state !== 'read') sent.push(s);
    }
    return sortSnapshot({
      outbox: this.outbox.map((p) => ({ ...p })),
      convs: [...this.convs.values()].map(({ conv, epoch, contiguous, read }) => ({
        conv,
        epoch,
        contiguous,
        read,
      })),
      sent,
    });
  }

  async snapshot(): Promise<ClientSnapshot> {
    return this.snapshotSync();
  }

  async setHanded(conv: string, seq: number): Promise<void> {
    const row = this.row(conv);
    this.convs.set(conv, { ...row, handed: Math.max(row.handed, seq) });
  }

  async unhanded(): Promise<Message[]> {
    const out: Message[] = [];
    for (const row of [...this.convs.values()].sort(byConv)) {
      for (let s = row.handed + 1; s <= row.contiguous; s++) {
        const m = this.message(row.conv, s);
        if (m !== undefined) out.push(m);
      }
    }
    return out;
  }

  async history(conv: string, after: number, limit: number): Promise<Message[]> {
    const m = this.messages.get(conv);
    if (m === undefined) return [];
    return [...m.keys()]
      .filter((s) => s > after)
      .sort((a, b) => a - b)
      .slice(0, limit)
      .map((s) => m.get(s)!);
  }

  async latest(conv: string, limit: number, before?: number): Promise<Message[]> {
    const m = this.messages.get(conv);
    if (m === undefined) return [];
    const seqs = [...m.keys()].filter((s) => before === undefined || s < before).sort((a, b) => a - b);
    return seqs.slice(Math.max(0, seqs.length - limit)).map((s) => m.get(s)!);
  }

  async conversations(): Promise<ConvRow[]> {
    return [...this.convs.values()].sort(byConv).map((r) => ({ ...r }));
  }

  async sentStatuses(): Promise<SentSnapshot[]> {
    return this.snapshotSync().sent;
  }

  async close(): Promise<void> {}
}

