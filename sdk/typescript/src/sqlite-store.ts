/**
 * The Node.js local store, one SQLite file per device (through `better-sqlite3`, version 12 on
 * Node 20, an optional peer dependency: `npm install better-sqlite3@12`).
 *
 * Each `persist` effect is one transaction in WAL mode with `synchronous = FULL`, so it is on
 * disk before the client carries out the next effect: a message is in the outbox before `send`
 * resolves and stored before it is acknowledged, across a crash of the process. Only one
 * process may use a file at a time (an exclusive lock, taken at open).
 */

import { createRequire } from 'node:module';
import type { Message } from './protocol.js';
import type { ClientSnapshot, SentSnapshot, StoreOp } from './state.js';
import { emptyConvRow, nextConvRow, sortSnapshot, StoreError, type ConvRow, type LocalStore } from './store.js';

type Database = import('better-sqlite3').Database;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS outbox (ord INTEGER PRIMARY KEY, cmid TEXT NOT NULL UNIQUE, pending TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (conv TEXT NOT NULL, seq INTEGER NOT NULL, message TEXT NOT NULL, PRIMARY KEY (conv, seq));
CREATE TABLE IF NOT EXISTS convs (conv TEXT PRIMARY KEY, row TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sent (conv TEXT NOT NULL, seq INTEGER NOT NULL, sent TEXT NOT NULL, PRIMARY KEY (conv, seq));
`;

function parse<T>(text: string, what: string, path: string): T {
  try {
    return JSON.parse(text) as T;
  } catch (e) {
    throw new StoreError(`${path}: a stored ${what} is not valid JSON (${(e as Error).message}); the file is damaged`);
  }
}

export class SqliteStore implements LocalStore {
  private constructor(
    private readonly db: Database,
    readonly path: string,
  ) {}

  /** Opens (or creates) the store file at `path`. */
  static async open(path: string): Promise<SqliteStore> {
    let Sqlite: typeof import('better-sqlite3');
    try {
      Sqlite = createRequire(import.meta.url)('better-sqlite3');
    } catch (e) {
      throw new StoreError(
        `the SQLite store needs the better-sqlite3 package: npm install better-sqlite3@12 (${(e as Error).message})`,
      );
    }
    let db: Database;
    try {
      db = new Sqlite(path);
    } catch (e) {
      const msg = (e as Error).message;
      const hint = /bindings|\.node\b|NODE_MODULE_VERSION/.test(msg)
        ? 'better-sqlite3 is installed but its native part is not built for this Node.js: reinstall it (npm rebuild better-sqlite3)'
        : 'check the path and its permissions';
      throw new StoreError(`cannot open the client store ${path}: ${msg}; ${hint}`);
    }
    try {
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = FULL');
      db.pragma('locking_mode = EXCLUSIVE');
      db.exec(SCHEMA);
      // Take the lock now: a second process on the same file fails here, not later.
      db.exec('BEGIN EXCLUSIVE; COMMIT;');
    } catch (e) {
      db.close();
      const busy = (e as { code?: string }).code?.startsWith('SQLITE_BUSY') === true;
      const hint = busy ? 'another client is using it (one process per store file)' : 'the file may be damaged';
      throw new StoreError(`cannot open the client store ${path}: ${(e as Error).message}; ${hint}`);
    }
    return new SqliteStore(db, path);
  }

  private row(conv: string): ConvRow {
    const r = this.db.prepare('SELECT row FROM convs WHERE conv = ?').get(conv) as { row: string } | undefined;
    return r === undefined ? emptyConvRow(conv) : parse<ConvRow>(r.row, 'conversation', this.path);
  }

  private putRow(r: ConvRow): void {
    this.db.prepare('INSERT OR REPLACE INTO convs (conv, row) VALUES (?, ?)').run(r.conv, JSON.stringify(r));
  }

  async apply(ops: StoreOp[]): Promise<void> {
    const run = this.db.transaction((list: StoreOp[]) => {
      for (const op of list) {
        switch (op.op) {
          case 'put_pending': {
            const existing = this.db.prepare('SELECT ord FROM outbox WHERE cmid = ?').get(op.pending.cmid) as
              | { ord: number }
              | undefined;
            const text = JSON.stringify(op.pending);
            if (existing !== undefined) {
              this.db.prepare('UPDATE outbox SET pending = ? WHERE ord = ?').run(text, existing.ord);
            } else {
              this.db
                .prepare('INSERT INTO outbox (ord, cmid, pending) VALUES ((SELECT COALESCE(MAX(ord), 0) + 1 FROM outbox), ?, ?)')
                .run(op.pending.cmid, text);
            }
            break;
          }
          case 'remove_pending':
            this.db.prepare('DELETE FROM outbox WHERE cmid = ?').run(op.cmid);
            break;
          case 'put_messages': {
            const put = this.db.prepare('INSERT OR REPLACE INTO messages (conv, seq, message) VALUES (?, ?, ?)');
            for (const m of op.messages) put.run(op.conv, m.seq, JSON.stringify(m));
            this.putRow(nextConvRow(this.row(op.conv), op));
            break;
          }
          case 'set_conv':
            if (op.reset) this.db.prepare('DELETE FROM messages WHERE conv = ?').run(op.conv);
            this.putRow(nextConvRow(this.row(op.conv), op));
            break;
          case 'set_read':
            this.putRow(nextConvRow(this.row(op.conv), op));
            break;
          case 'put_sent':
            if (op.status.state === 'read') {
              this.db.prepare('DELETE FROM sent WHERE conv = ? AND seq = ?').run(op.conv, op.seq);
            } else {
              const s: SentSnapshot = { conv: op.conv, seq: op.seq, cmid: op.cmid, status: op.status };
              this.db
                .prepare('INSERT OR REPLACE INTO sent (conv, seq, sent) VALUES (?, ?, ?)')
                .run(op.conv, op.seq, JSON.stringify(s));
            }
            break;
        }
      }
    });
    try {
      run(ops);
    } catch (e) {
      if (e instanceof StoreError) throw e;
      throw new StoreError(`writing to the client store ${this.path} failed: ${(e as Error).message}`);
    }
  }

  async snapshot(): Promise<ClientSnapshot> {
    const outbox = (this.db.prepare('SELECT pending FROM outbox ORDER BY ord').all() as { pending: string }[]).map(
      (r) => parse<ClientSnapshot['outbox'][number]>(r.pending, 'outbox entry', this.path),
    );
    const convs = (await this.conversations()).map(({ conv, epoch, contiguous, read }) => ({ conv, epoch, contiguous, read }));
    return sortSnapshot({ outbox, convs, sent: await this.sentStatuses() });
  }

  async setHanded(conv: string, seq: number): Promise<void> {
    const r = this.row(conv);
    this.putRow({ ...r, handed: Math.max(r.handed, seq) });
  }

  private messages(sql: string, ...args: unknown[]): Message[] {
    return (this.db.prepare(sql).all(...args) as { message: string }[]).map((r) =>
      parse<Message>(r.message, 'message', this.path),
    );
  }

  async unhanded(): Promise<Message[]> {
    const out: Message[] = [];
    for (const r of await this.conversations()) {
      if (r.handed < r.contiguous) {
        out.push(
          ...this.messages(
            'SELECT message FROM messages WHERE conv = ? AND seq > ? AND seq <= ? ORDER BY seq',
            r.conv,
            r.handed,
            r.contiguous,
          ),
        );
      }
    }
    return out;
  }

  async history(conv: string, after: number, limit: number): Promise<Message[]> {
    return this.messages('SELECT message FROM messages WHERE conv = ? AND seq > ? ORDER BY seq LIMIT ?', conv, after, limit);
  }

  async latest(conv: string, limit: number, before?: number): Promise<Message[]> {
    return this.messages(
      'SELECT message FROM messages WHERE conv = ? AND seq < ? ORDER BY seq DESC LIMIT ?',
      conv,
      before ?? Number.MAX_SAFE_INTEGER,
      limit,
    ).reverse();
  }

  async conversations(): Promise<ConvRow[]> {
    return (this.db.prepare('SELECT row FROM convs ORDER BY conv').all() as { row: string }[]).map((r) =>
      parse<ConvRow>(r.row, 'conversation', this.path),
    );
  }

  async sentStatuses(): Promise<SentSnapshot[]> {
    return (this.db.prepare('SELECT sent FROM sent ORDER BY conv, seq').all() as { sent: string }[]).map((r) =>
      parse<SentSnapshot>(r.sent, 'sent message', this.path),
    );
  }

  async close(): Promise<void> {
    this.db.close();
  }
}
