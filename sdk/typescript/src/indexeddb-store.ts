/**
 * The browser's local store, on IndexedDB: one database per device holding the outbox,
 * received messages, each conversation's position and epoch, and our sent messages whose
 * status can still move.
 *
 * Each `persist` effect is one read-write transaction with `strict` durability (flushed to
 * disk before it completes), so a message is in the outbox before `send` resolves and stored
 * before it is acknowledged, across a reload, a crash of the tab or of the browser. Several
 * tabs may open the same database; the `Tabs` coordination (see `tabs.ts`) makes sure only one
 * of them runs a client on it at a time.
 */

import type { Pending } from './outbox.js';
import type { Message } from './protocol.js';
import type { ClientSnapshot, SentSnapshot, StoreOp } from './state.js';
import {
  emptyConvRow,
  nextConvRow,
  sortSnapshot,
  StoreError,
  type ConvRow,
  type LocalStore,
} from './store.js';

const VERSION = 1;
const OUTBOX = 'outbox';
const MESSAGES = 'messages';
const CONVS = 'convs';
const SENT = 'sent';
const ALL = [OUTBOX, MESSAGES, CONVS, SENT];

/** An outbox row: the pending message and its place in the outbox. */
interface OutboxRow {
  order: number;
  pending: Pending;
  cmid: string;
}

function req<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error ?? new Error('IndexedDB request failed'));
  });
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error ?? new Error('IndexedDB transaction failed'));
    tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
  });
}

function wrap(what: string, e: unknown): StoreError {
  const msg = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return new StoreError(`IndexedDB ${what} failed: ${msg}`);
}

const MAX_SEQ = Number.MAX_SAFE_INTEGER;

export class IndexedDbStore implements LocalStore {
  private constructor(
    private readonly db: IDBDatabase,
    readonly name: string,
  ) {}

  /** Opens (or creates) the database `name`: use one per user and device. */
  static async open(name: string, factory?: IDBFactory): Promise<IndexedDbStore> {
    const idb = factory ?? (globalThis as any).indexedDB;
    if (idb === undefined) throw new StoreError('IndexedDB is not available here; in Node use ordo-client/sqlite');
    const open = idb.open(name, VERSION) as IDBOpenDBRequest;
    open.onupgradeneeded = () => {
      const db = open.result;
      const outbox = db.createObjectStore(OUTBOX, { keyPath: 'cmid' });
      outbox.createIndex('order', 'order', { unique: true });
      db.createObjectStore(MESSAGES, { keyPath: ['conv', 'seq'] });
      db.createObjectStore(CONVS, { keyPath: 'conv' });
      db.createObjectStore(SENT, { keyPath: ['conv', 'seq'] });
    };
    const blocked = new Promise<never>((_, reject) => {
      open.onblocked = () =>
        reject(new StoreError(`IndexedDB ${name} is held open by an older version of the app in another tab; close it`));
    });
    try {
      const db = await Promise.race([req(open), blocked]);
      return new IndexedDbStore(db, name);
    } catch (e) {
      if (e instanceof StoreError) throw e;
      throw wrap(`opening ${name}`, e);
    }
  }

  private tx(mode: IDBTransactionMode, stores: string[] = ALL): IDBTransaction {
    return mode === 'readwrite'
      ? this.db.transaction(stores, mode, { durability: 'strict' })
      : this.db.transaction(stores, mode);
  }

  async apply(ops: StoreOp[]): Promise<void> {
    try {
      const tx = this.tx('readwrite');
      const finished = done(tx);
      const outbox = tx.objectStore(OUTBOX);
      const messages = tx.objectStore(MESSAGES);
      const convs = tx.objectStore(CONVS);
      const sent = tx.objectStore(SENT);
      const row = async (conv: string): Promise<ConvRow> =>
        ((await req(convs.get(conv))) as ConvRow | undefined) ?? emptyConvRow(conv);
      for (const op of ops) {
        switch (op.op) {
          case 'put_pending': {
            const existing = (await req(outbox.get(op.pending.cmid))) as OutboxRow | undefined;
            let order = existing?.order;
            if (order === undefined) {
              const last = await req(outbox.index('order').openCursor(null, 'prev'));
              order = last === null ? 1 : (last.value as OutboxRow).order + 1;
            }
            outbox.put({ order, pending: op.pending, cmid: op.pending.cmid } satisfies OutboxRow);
            break;
          }
          case 'remove_pending':
            outbox.delete(op.cmid);
            break;
          case 'put_messages': {
            for (const m of op.messages) messages.put(m);
            convs.put(nextConvRow(await row(op.conv), op));
            break;
          }
          case 'set_conv': {
            if (op.reset) messages.delete(IDBKeyRange.bound([op.conv, 0], [op.conv, MAX_SEQ]));
            convs.put(nextConvRow(await row(op.conv), op));
            break;
          }
          case 'set_read':
            convs.put(nextConvRow(await row(op.conv), op));
            break;
          case 'put_sent': {
            const s: SentSnapshot = { conv: op.conv, seq: op.seq, cmid: op.cmid, status: op.status };
            if (op.status.state === 'read') sent.delete([op.conv, op.seq]);
            else sent.put(s);
            break;
          }
        }
      }
      await finished;
    } catch (e) {
      throw wrap('write', e);
    }
  }

  async snapshot(): Promise<ClientSnapshot> {
    try {
      const tx = this.tx('readonly');
      const outbox = (await req(tx.objectStore(OUTBOX).index('order').getAll())) as OutboxRow[];
      const convs = (await req(tx.objectStore(CONVS).getAll())) as ConvRow[];
      const sent = (await req(tx.objectStore(SENT).getAll())) as SentSnapshot[];
      return sortSnapshot({
        outbox: outbox.map((r) => r.pending),
        convs: convs.map(({ conv, epoch, contiguous, read }) => ({ conv, epoch, contiguous, read })),
        sent,
      });
    } catch (e) {
      throw wrap('read', e);
    }
  }

  async setHanded(conv: string, seq: number): Promise<void> {
    try {
      const tx = this.tx('readwrite', [CONVS]);
      const finished = done(tx);
      const convs = tx.objectStore(CONVS);
      const r = ((await req(convs.get(conv))) as ConvRow | undefined) ?? emptyConvRow(conv);
      convs.put({ ...r, handed: Math.max(r.handed, seq) });
      await finished;
    } catch (e) {
      throw wrap('write', e);
    }
  }

  private async range(conv: string, from: number, to: number, limit?: number): Promise<Message[]> {
    if (from > to) return [];
    const tx = this.tx('readonly', [MESSAGES]);
    return (await req(
      tx.objectStore(MESSAGES).getAll(IDBKeyRange.bound([conv, from], [conv, to]), limit),
    )) as Message[];
  }

  async unhanded(): Promise<Message[]> {
    try {
      const out: Message[] = [];
      for (const r of await this.conversations()) {
        if (r.handed < r.contiguous) out.push(...(await this.range(r.conv, r.handed + 1, r.contiguous)));
      }
      return out;
    } catch (e) {
      throw wrap('read', e);
    }
  }

  async history(conv: string, after: number, limit: number): Promise<Message[]> {
    try {
      return await this.range(conv, after + 1, MAX_SEQ, limit);
    } catch (e) {
      throw wrap('read', e);
    }
  }

  async latest(conv: string, limit: number, before?: number): Promise<Message[]> {
    try {
      const tx = this.tx('readonly', [MESSAGES]);
      const upper = before === undefined ? MAX_SEQ : before - 1;
      if (upper < 0 || limit <= 0) return [];
      const out: Message[] = [];
      await new Promise<void>((resolve, reject) => {
        const c = tx.objectStore(MESSAGES).openCursor(IDBKeyRange.bound([conv, 0], [conv, upper]), 'prev');
        c.onerror = () => reject(c.error);
        c.onsuccess = () => {
          const cur = c.result;
          if (cur === null || out.length >= limit) return resolve();
          out.push(cur.value as Message);
          cur.continue();
        };
      });
      return out.reverse();
    } catch (e) {
      throw wrap('read', e);
    }
  }

  async conversations(): Promise<ConvRow[]> {
    try {
      const tx = this.tx('readonly', [CONVS]);
      const rows = (await req(tx.objectStore(CONVS).getAll())) as ConvRow[];
      return rows.sort((a, b) => (a.conv < b.conv ? -1 : a.conv > b.conv ? 1 : 0));
    } catch (e) {
      throw wrap('read', e);
    }
  }

  async sentStatuses(): Promise<SentSnapshot[]> {
    return (await this.snapshot()).sent;
  }

  async close(): Promise<void> {
    this.db.close();
  }
}
