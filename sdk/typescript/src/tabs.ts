/**
 * Several browser tabs of one app on one device's store. Two clients on one store would each
 * connect, each store what arrives and each hand it to their tab; instead, the tabs elect one
 * leader with the Web Locks API (`navigator.locks`), and only the leader runs a `Client`. The
 * others follow over a `BroadcastChannel`: their sends go to the leader (and resolve once it
 * has the message in the outbox on disk), and the leader passes every event on to them. When
 * the leading tab closes or crashes, its lock is released and a follower takes over on the
 * same store, carrying on where the outbox and positions stand.
 *
 * Each tab hands every message to its app once: a tab remembers the highest seq it handed per
 * conversation and drops anything at or below it (a new leader hands out again what the old
 * one had not recorded as taken).
 */

import { Client, ClientError, type ClientOptions, type ConnectionState } from './client.js';
import type { Pending, Target } from './outbox.js';
import type { Event } from './state.js';
import type { LocalStore } from './store.js';

type Msg =
  | { kind: 'send'; id: string; target: Target; body: string; replyTo?: number }
  | { kind: 'sent'; id: string; cmid?: string; error?: string }
  | { kind: 'read'; conv: string; seq: number }
  | { kind: 'event'; event: Event }
  | { kind: 'state'; connection: ConnectionState; pending: Pending[]; user: string | null }
  | { kind: 'hello' };

/** How long a follower waits for the leader to take a send. */
const SEND_TIMEOUT_MS = 15_000;

/** A `Client` shared by the tabs of one browser profile: see the module doc. */
export class TabClient {
  readonly store: LocalStore;
  user: string | null = null;
  private client: Client | null = null;
  private readonly channel: BroadcastChannel;
  private conn: ConnectionState;
  private outbox: Pending[] = [];
  private readonly events: Event[] = [];
  private waiters: ((e: Event | null) => void)[] = [];
  private readonly handed = new Map<string, number>();
  private readonly requests = new Map<string, { resolve: (c: string) => void; reject: (e: Error) => void }>();
  private closed = false;
  private release: (() => void) | null = null;

  private constructor(
    private readonly opts: ClientOptions,
    readonly name: string,
  ) {
    this.store = opts.store;
    this.channel = new BroadcastChannel(`ordo-client:${name}`);
    this.channel.onmessage = (ev: MessageEvent<Msg>) => this.onMessage(ev.data);
    const first = (Array.isArray(opts.url) ? opts.url[0] : opts.url.split(',')[0]) ?? '';
    this.conn = { state: 'connecting', url: first.trim() };
  }

  /**
   * Joins the tabs sharing store `name` (use the store's name: one per user and device). This
   * tab leads at once if no other does, and otherwise follows until the leader goes.
   */
  static async open(name: string, opts: ClientOptions): Promise<TabClient> {
    const locks = (globalThis as any).navigator?.locks;
    if (locks === undefined || typeof BroadcastChannel === 'undefined') {
      throw new ClientError('tabs need the Web Locks API and BroadcastChannel (a browser page)');
    }
    const t = new TabClient(opts, name);
    let led!: () => void;
    let failed!: (e: unknown) => void;
    const leads = new Promise<void>((resolve, reject) => {
      led = resolve;
      failed = reject;
    });
    void locks
      .request(`ordo-client:${name}`, { ifAvailable: true }, async (lock: unknown) => {
        if (lock === null) return;
        await t.lead(led, failed);
      })
      .then(() => {
        if (t.client === null && !t.closed) {
          // Another tab leads: follow, and queue for the lock behind it.
          led();
          t.channel.postMessage({ kind: 'hello' } satisfies Msg);
          return locks.request(`ordo-client:${name}`, async () => {
            if (!t.closed) await t.lead(() => {}, (e) => t.stopped(e));
          });
        }
        return undefined;
      })
      .catch((e: unknown) => failed(e));
    await leads;
    return t;
  }

  /** Whether this tab runs the client. */
  isLeader(): boolean {
    return this.client !== null;
  }

  /** Holds the lock: runs the client until this tab closes. */
  private async lead(ready: () => void, fail: (e: unknown) => void): Promise<void> {
    let client: Client;
    try {
      client = await Client.open(this.opts);
    } catch (e) {
      fail(e);
      return;
    }
    this.client = client;
    this.user = client.user;
    ready();
    this.broadcastState();
    // Requests a follower made of the old leader that it never answered are lost with it:
    // they were rejected by their timeout, and the follower's app was told.
    await new Promise<void>((resolve) => {
      this.release = resolve;
      void (async () => {
        try {
          for (;;) {
            const e = await client.nextEvent();
            if (e === null) break;
            this.user = client.user;
            this.deliver(e);
            this.channel.postMessage({ kind: 'event', event: e } satisfies Msg);
            if (e.type !== 'message') this.broadcastState();
          }
        } catch (err) {
          // Recording a message as taken failed (the store went away): this tab cannot lead.
          const reason = `this tab's client failed: ${(err as Error).message}`;
          const e: Event = { type: 'connect_failed', reason, unauthorized: false, permanent: true };
          this.deliver(e);
          this.channel.postMessage({ kind: 'event', event: e } satisfies Msg);
          await client.close().catch(() => {});
        } finally {
          // The client stopped (or failed): this tab no longer answers for it, and the lock
          // goes to the next tab.
          if (this.client === client) this.client = null;
          resolve();
        }
      })();
    });
  }

  private broadcastState(): void {
    const c = this.client;
    if (c === null) return;
    this.conn = c.connection();
    this.outbox = c.pending();
    this.channel.postMessage({ kind: 'state', connection: this.conn, pending: this.outbox, user: c.user } satisfies Msg);
  }

  private onMessage(m: Msg): void {
    if (this.closed) return;
    const c = this.client;
    switch (m.kind) {
      case 'send':
        if (c === null) return;
        c.send(m.target, m.body, m.replyTo === undefined ? {} : { replyTo: m.replyTo }).then(
          (cmid) => this.channel.postMessage({ kind: 'sent', id: m.id, cmid } satisfies Msg),
          (e: Error) => this.channel.postMessage({ kind: 'sent', id: m.id, error: e.message } satisfies Msg),
        );
        return;
      case 'sent': {
        const r = this.requests.get(m.id);
        if (r === undefined) return;
        this.requests.delete(m.id);
        if (m.cmid !== undefined) r.resolve(m.cmid);
        else r.reject(new ClientError(m.error ?? 'the leading tab refused the send'));
        return;
      }
      case 'read':
        c?.markRead(m.conv, m.seq);
        return;
      case 'event':
        if (c === null) this.deliver(m.event);
        return;
      case 'state':
        if (c === null) {
          this.conn = m.connection;
          this.outbox = m.pending;
          this.user = m.user;
        }
        return;
      case 'hello':
        this.broadcastState();
        return;
    }
  }

  /** This tab could not take over from the last leader: its app is told, and it stops. */
  private stopped(e: unknown): void {
    const reason = `this tab could not take over the connection: ${(e as Error).message ?? String(e)}`;
    this.conn = { state: 'stopped', reason, unauthorized: false };
    this.deliver({ type: 'connect_failed', reason, unauthorized: false, permanent: true });
    void this.close();
  }

  /** Hands `e` to this tab's app, a message only if this tab has not handed it yet. */
  private deliver(e: Event): void {
    if (e.type === 'message') {
      const seen = this.handed.get(e.message.conv) ?? 0;
      if (e.message.seq <= seen) return;
      this.handed.set(e.message.conv, e.message.seq);
    }
    if (e.type === 'epoch_reset') this.handed.delete(e.conv);
    const w = this.waiters.shift();
    if (w !== undefined) w(e);
    else this.events.push(e);
  }

  /** As `Client.nextEvent`, for this tab. */
  async nextEvent(): Promise<Event | null> {
    const e = this.events.shift();
    if (e !== undefined) return e;
    if (this.closed) return null;
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  connection(): ConnectionState {
    return this.client?.connection() ?? this.conn;
  }

  pending(): Pending[] {
    return this.client?.pending() ?? this.outbox;
  }

  /**
   * As `Client.send`: resolves once the leading tab has the message in the outbox on disk.
   * Rejects if no tab took it within 15 s (the leader went away with the request).
   */
  send(target: Target, body: string, opts: { replyTo?: number } = {}): Promise<string> {
    if (this.closed) return Promise.reject(new ClientError('the client is closed'));
    if (this.client !== null) return this.client.send(target, body, opts);
    const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.requests.delete(id)) {
          reject(new ClientError('no tab took the message within 15 s; check the outbox before sending it again'));
        }
      }, SEND_TIMEOUT_MS);
      this.requests.set(id, {
        resolve: (c) => {
          clearTimeout(timer);
          resolve(c);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      const m: Msg = { kind: 'send', id, target, body };
      if (opts.replyTo !== undefined) m.replyTo = opts.replyTo;
      this.channel.postMessage(m);
    });
  }

  markRead(conv: string, seq: number): void {
    if (this.client !== null) this.client.markRead(conv, seq);
    else this.channel.postMessage({ kind: 'read', conv, seq } satisfies Msg);
  }

  /** Leaves the tabs: a leader closes its client and hands the lock to the next tab. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const c = this.client;
    this.client = null;
    if (c !== null) await c.close();
    this.release?.();
    this.channel.close();
    for (const w of this.waiters.splice(0)) w(null);
    for (const r of this.requests.values()) r.reject(new ClientError('the client is closed'));
    this.requests.clear();
  }
}
