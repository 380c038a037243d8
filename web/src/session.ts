/**
 * One signed-in device: its IndexedDB store, the SDK client on it, and the loop that takes the
 * client's events. The session keeps what the screens need beyond the store: the last status
 * heard of each of our messages, messages that failed, notices, and who the peer of each
 * direct conversation is; and it tells the screen when something changed (`onChange`).
 *
 * Where the browser has Web Locks and BroadcastChannel, the tabs of one device share one
 * client (`TabClient`: one tab connects, the others follow); elsewhere each tab runs its own.
 */

import {
  Client,
  IndexedDbStore,
  TabClient,
  directConvId,
  tokenIdentity,
  type ConnectionState,
  type ConvRow,
  type Event,
  type Message,
  type Pending,
  type Target,
} from 'ordo-client';
import { DevicePrefs, type Failed } from './prefs';
import type { MarkState } from './status';

/** What changed, so a screen redraws no more than it must. */
export interface Change {
  /** Conversations whose messages, statuses or notices moved (all of them: `null`). */
  convs: Set<string> | null;
  /** The connection's state moved. */
  connection: boolean;
}

/** An event the screen shows once (a server error). */
export type Alert = { code: string; message: string };

/** What the app uses of a client: a `Client`, or a `TabClient` (the same calls). */
export type AppClient = Pick<
  Client,
  'store' | 'user' | 'send' | 'markRead' | 'nextEvent' | 'connection' | 'pending' | 'close'
>;

/** The id rule of the protocol (users, devices, conversations). */
export const ID_RE = /^[A-Za-z0-9._@:-]{1,128}$/;

export class Session {
  /** Last state heard in a `status` event, by cmid. */
  readonly heard = new Map<string, MarkState>();
  readonly prefs: DevicePrefs;
  onChange: (c: Change) => void = () => {};
  onAlert: (a: Alert) => void = () => {};
  /** The connection's state the last time it was looked at, and when it was first seen. */
  private conn: { state: ConnectionState; since: number } | null = null;
  private closed = false;

  /** Each conversation's stored and read positions, as last read from the store. */
  private rows = new Map<string, ConvRow>();
  /** Read positions given to the client (stored a moment later, with no event). */
  private readonly askedRead = new Map<string, number>();

  private constructor(
    readonly client: AppClient,
    readonly store: IndexedDbStore,
    readonly user: string,
    readonly device: string,
    readonly url: string,
  ) {
    this.prefs = new DevicePrefs(store.name);
  }

  /**
   * Opens the device's store (`ordo:<user>:<device>`) and its client. Throws with a message for
   * the user if the token names no user and device, or the URL cannot work.
   */
  static async open(token: string, url: string): Promise<Session> {
    const id = tokenIdentity(token);
    if (id === null) {
      throw new Error(
        'this token names no user and device (expected an Ordo token from `ordo token` or a JWT with `sub` and `device`)',
      );
    }
    const store = await IndexedDbStore.open(`ordo:${id.user}:${id.device}`);
    const opts = { url, token, store };
    const tabs = typeof BroadcastChannel !== 'undefined' && 'locks' in navigator;
    let client: AppClient;
    try {
      client = tabs ? await TabClient.open(store.name, opts) : await Client.open(opts);
    } catch (e) {
      await store.close();
      throw e;
    }
    const s = new Session(client, store, id.user, id.device, url);
    void s.run();
    return s;
  }

  /** Our user id: the server's word once it said it, the token's before. */
  me(): string {
    return this.client.user ?? this.user;
  }

  private async run(): Promise<void> {
    for (;;) {
      let e: Event | null;
      try {
        e = await this.client.nextEvent();
      } catch (err) {
        this.onAlert({ code: 'client', message: (err as Error).message });
        return;
      }
      if (e === null) break;
      try {
        await this.take(e);
      } catch (err) {
        console.error('ordo: handling an event failed', err);
      }
    }
    if (!this.closed) this.onChange({ convs: null, connection: true });
  }

  private async take(e: Event): Promise<void> {
    switch (e.type) {
      case 'message':
        await this.learnPeer(e.message);
        this.onChange({ convs: new Set([e.message.conv]), connection: false });
        return;
      case 'status': {
        this.heard.set(e.cmid, e.status.state);
        let conv = e.conv;
        if (e.status.state === 'failed') {
          const p = this.lastPending.get(e.cmid);
          conv = conv ?? (p === undefined ? null : await this.convOf(p.target));
          if (conv !== null) {
            this.prefs.addFailed({ cmid: e.cmid, conv, body: p?.body ?? '', reason: e.status.reason });
          }
        }
        this.onChange({ convs: conv === null ? null : new Set([conv]), connection: false });
        return;
      }
      case 'receipt':
        this.onChange({ convs: new Set([e.conv]), connection: false });
        return;
      case 'history_gap':
        this.prefs.addNotice(e.conv, { kind: 'history_gap', from: e.from, to: e.to });
        this.onChange({ convs: new Set([e.conv]), connection: false });
        return;
      case 'epoch_reset':
        this.prefs.addNotice(e.conv, { kind: 'epoch_reset', epoch: e.epoch });
        this.onChange({ convs: new Set([e.conv]), connection: false });
        return;
      case 'removed':
        this.prefs.addNotice(e.conv, { kind: 'removed', seq: e.seq, left: e.left });
        this.onChange({ convs: new Set([e.conv]), connection: false });
        return;
      case 'server_error':
        this.onAlert({ code: e.code, message: e.message });
        return;
      case 'connected':
      case 'disconnected':
      case 'connect_failed':
        this.onChange({ convs: null, connection: true });
        return;
    }
  }

  /** A direct conversation's peer, from a message someone else sent in it. */
  private async learnPeer(m: Message): Promise<void> {
    if (!m.conv.startsWith('d_') || m.from === '' || m.from === this.me()) return;
    if (this.prefs.peers()[m.conv] === m.from) return;
    if ((await directConvId(this.me(), m.from)) === m.conv) this.prefs.setPeer(m.conv, m.from);
  }

  /** The outbox as last looked at, by cmid: a failed message's body is gone from it after. */
  private readonly lastPending = new Map<string, Pending>();

  /** The outbox, in send order (and remembered, see `lastPending`). */
  pending(): Pending[] {
    const list = this.client.pending();
    for (const p of list) {
      this.lastPending.set(p.cmid, p);
      if (!this.heard.has(p.cmid)) this.heard.set(p.cmid, 'pending');
    }
    return list;
  }

  /** The conversation a target names. */
  async convOf(t: Target): Promise<string> {
    return 'conv' in t ? t.conv : directConvId(this.me(), t.user);
  }

  /** Where a message to `conv` goes: a direct conversation by its peer, so that the first
   * message creates it and every message of it shares one place in the outbox's order. */
  targetOf(conv: string): Target {
    const peer = this.prefs.peers()[conv];
    return conv.startsWith('d_') && peer !== undefined ? { user: peer } : { conv };
  }

  async send(conv: string, body: string, replyTo?: number): Promise<string> {
    const opts = replyTo === undefined ? {} : { replyTo };
    const cmid = await this.client.send(this.targetOf(conv), body, opts);
    this.heard.set(cmid, this.heard.get(cmid) ?? 'pending');
    this.pending();
    return cmid;
  }

  /** Opens (remembers) the direct conversation with `other`; its id. */
  async openDirect(other: string): Promise<string> {
    const conv = await directConvId(this.me(), other);
    this.prefs.setPeer(conv, other);
    this.prefs.addOpened(conv);
    return conv;
  }

  failed(conv: string): Failed[] {
    return this.prefs.failed().filter((f) => f.conv === conv);
  }

  /** The connection's state, and when (page clock, ms) it was first seen in that state. */
  connection(): { state: ConnectionState; since: number } {
    const st = this.client.connection();
    if (this.conn === null || this.conn.state !== st) this.conn = { state: st, since: Date.now() };
    return this.conn;
  }

  /**
   * Whether we are out of group `conv`: removed (or left) at a seq, with nothing after it (a
   * member added again gets the messages after). The server refuses such a member everything.
   */
  isRemoved(conv: string): boolean {
    const at = this.prefs
      .notices(conv)
      .reduce((max, n) => (n.kind === 'removed' ? Math.max(max, n.seq) : max), 0);
    return at > 0 && (this.rows.get(conv)?.contiguous ?? 0) <= at;
  }

  /** The store's conversations (and kept, for `markRead` and `isRemoved`). */
  async conversations(): Promise<ConvRow[]> {
    const rows = await this.store.conversations();
    this.rows = new Map(rows.map((r) => [r.conv, r]));
    return rows;
  }

  /**
   * Marks `conv` read up to what is stored (as of the last `conversations()`), if the page is
   * visible and we are a member.
   */
  /** The user saw `conv` up to `seen` (only what is stored counts, and only on a shown page). */
  markRead(conv: string, seen: number): void {
    if (document.visibilityState !== 'visible' || this.isRemoved(conv)) return;
    const row = this.rows.get(conv);
    if (row === undefined) return;
    const upTo = Math.min(row.contiguous, seen);
    if (upTo <= this.readPosition(conv)) return;
    this.client.markRead(conv, upTo);
    this.askedRead.set(conv, upTo);
  }

  /** This device's read position in `conv`: as stored, or as asked for since. */
  readPosition(conv: string): number {
    return Math.max(this.rows.get(conv)?.read ?? 0, this.askedRead.get(conv) ?? 0);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.client.close();
    await this.store.close();
  }
}
