/**
 * The client: the state machine (`state.ts`) put to work on a WebSocket, a local store and
 * timers. Everything the app or the network does is one input to the state machine, and inputs
 * are taken one at a time: the effects of one input are all carried out, each persist awaited
 * before the frame or event after it, before the next input is taken. So a message is stored
 * before it is acknowledged or handed to the app, and `send` resolves only once the message is
 * in the outbox on disk.
 *
 * The connection is the client's business: it connects in the background, reconnects with
 * backoff and jitter (moving on to the next server URL after a failure), pings an idle server
 * and gives up on one that answers nothing, and in a browser goes offline and back with the
 * page's network. A refused token or a URL that cannot work stops it (`connect_failed` with
 * `permanent`, then `nextEvent` returns `null`): only a new token or URL helps.
 */

import { delayMs, reconnectPolicy, type RetryPolicy } from './backoff.js';
import type { Pending, Target } from './outbox.js';
import { decodeServerFrame, encodeClientFrame, type ClientFrame } from './protocol.js';
import { ClientState, defaultConfig, type ClientConfig, type Event, type StoreOp } from './state.js';
import type { LocalStore } from './store.js';

/** The WebSocket path the server serves, appended to each server URL. */
export const WS_PATH = '/v1/ws';

/** The parts of the standard WebSocket the client uses (browsers', Node 22's, or `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketFactory = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** Server base URL (`ws://host:port` or `wss://...`), or several, comma-separated or listed. */
  url: string | string[];
  /** The device's token (a JWT or an Ordo token), naming its user and device. */
  token: string;
  /** Where the outbox, messages and positions live: one store per device. */
  store: LocalStore;
  /** The state machine's settings (acks, reorder buffer, sync pages, message retries). */
  config?: Partial<ClientConfig>;
  /** Backoff between connection attempts (never gives up). */
  reconnect?: RetryPolicy;
  /** Give up a connection attempt after this long (10 s). */
  connectTimeoutMs?: number;
  /** Ping the server after this long without a frame from it (20 s)... */
  pingAfterMs?: number;
  /** ...and drop the connection if nothing arrives for this long (45 s). */
  deadAfterMs?: number;
  /** The WebSocket class; `globalThis.WebSocket` by default (Node 20: pass `ws`'s, or run with
   * `--experimental-websocket`). */
  WebSocket?: WebSocketFactory;
  /** Seeds client message ids and jitter; random by default. */
  seed?: bigint;
}

/** Where the connection stands. */
export type ConnectionState =
  | { state: 'connecting'; url: string }
  | { state: 'connected'; url: string }
  | { state: 'retrying'; url: string; reason: string; failures: number; retryInMs: number }
  | { state: 'stopped'; reason: string; unauthorized: boolean };

/** A call the client cannot carry out: it is stopped, or the store failed. */
export class ClientError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ClientError';
  }
}

/** Why a server URL cannot work, or `null` for one that can. */
export function checkUrl(url: string): string | null {
  const raw = url.trim();
  if (raw === '') return 'the server URL is empty; use ws://host:port';
  const m = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\/(.*)$/.exec(raw);
  if (m === null) return `${raw} has no scheme; use ws://${raw}`;
  const scheme = m[1]!.toLowerCase();
  const rest = m[2]!;
  if (scheme !== 'ws' && scheme !== 'wss') {
    const to = scheme === 'https' ? 'wss' : 'ws';
    return `${raw} is not a WebSocket URL; use ${to}://${rest.replace(/\/+$/, '')}`;
  }
  if (/[?#]/.test(rest)) return `${raw}: a query or a fragment has no place in it; give only ws[s]://host:port`;
  if (rest.replace(/\/+$/, '').endsWith(WS_PATH)) {
    return `${raw} names the endpoint; give the base URL, ${scheme}://${rest.replace(/\/+$/, '').slice(0, -WS_PATH.length)}`;
  }
  const host = rest.split('/')[0] ?? '';
  if (host === '' || host.startsWith(':')) return `${raw} names no host`;
  return null;
}

/** The WebSocket endpoint for server base URL `url`, with the token in the query. */
export function endpoint(url: string, token: string): string {
  return `${url.trim().replace(/\/+$/, '')}${WS_PATH}?token=${encodeURIComponent(token)}`;
}

/** The HTTP base of a WebSocket base URL (`ws://h` -> `http://h`). */
export function httpBase(url: string): string {
  return url.trim().replace(/\/+$/, '').replace(/^ws/i, 'http');
}

function base64UrlJson(part: string): any {
  const b64 = part.replace(/-/g, '+').replace(/_/g, '/').replace(/=+$/, '');
  const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
  const bin = atob(padded);
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/**
 * The (user, device) a token names, read from its claims without checking the signature (only
 * the server can): Ordo's own `<payload>.<sig>` (`u`, `d`) or a JWT (`sub`, `device`).
 */
export function tokenIdentity(token: string): { user: string; device: string } | null {
  const parts = token.trim().split('.');
  try {
    if (parts.length === 2) {
      const v = base64UrlJson(parts[0]!);
      return typeof v.u === 'string' && typeof v.d === 'string' ? { user: v.u, device: v.d } : null;
    }
    if (parts.length === 3) {
      const v = base64UrlJson(parts[1]!);
      return typeof v.sub === 'string' && typeof v.device === 'string'
        ? { user: v.sub, device: v.device }
        : null;
    }
  } catch {
    return null;
  }
  return null;
}

function randomSeed(): bigint {
  const words = new Uint32Array(2);
  globalThis.crypto.getRandomValues(words);
  return (BigInt(words[0]!) << 32n) | BigInt(words[1]!);
}

const OPEN = 1;

/** Most inputs taken together (their writes in one store transaction). */
const MAX_BATCH = 256;

/** A client of one device, connected or reconnecting. */
export class Client {
  readonly store: LocalStore;
  /** This device's user, from the token, then from the server. */
  user: string | null;
  readonly device: string;

  private readonly st: ClientState;
  private readonly servers: string[];
  private current = 0;
  private readonly opts: Required<Pick<ClientOptions, 'connectTimeoutMs' | 'pingAfterMs' | 'deadAfterMs'>> &
    ClientOptions;
  private readonly reconnectPolicy: RetryPolicy;
  private readonly WS: WebSocketFactory;
  private ws: WebSocketLike | null = null;
  /** Whether `ws` opened. */
  private wsOpen = false;
  /**
   * The socket the state machine was told is connected: frames go out on it only. It is set by
   * the `connected` input and cleared at once when the socket goes, so that work queued before
   * the state machine hears of the loss never goes out on a newer socket.
   */
  private live: WebSocketLike | null = null;
  /** Numbers connection attempts, so that a late answer about an old one changes nothing. */
  private attempt = 0;
  private conn: ConnectionState;
  private failures = 0;
  private reconnectAt: number | null = null;
  private lastHeard = 0;
  private pinged = false;
  private closed = false;
  private stoppedReason: string | null = null;
  /** Inputs waiting to be taken, and whether a batch is being carried out. */
  private readonly inbox: { run: () => unknown; resolve: (v: unknown) => void; reject: (e: unknown) => void }[] = [];
  private draining = false;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private timerAt = Infinity;
  private readonly events: Event[] = [];
  /** Messages `send` took whose outbox write is not done yet. */
  private readonly unstored = new Set<string>();
  private waiters: ((e: Event | null) => void)[] = [];
  /** The last message handed out, recorded as taken when the app asks for the next event. */
  private taken: { conv: string; seq: number } | null = null;
  private readonly start = Date.now();
  private readonly onOnline = (): void => this.wakeUp();
  private readonly onOffline = (): void => this.dropConnection('the device went offline');

  private constructor(opts: ClientOptions, servers: string[], st: ClientState, device: string) {
    this.opts = { connectTimeoutMs: 10_000, pingAfterMs: 20_000, deadAfterMs: 45_000, ...opts };
    this.store = opts.store;
    this.servers = servers;
    this.st = st;
    this.device = device;
    this.user = tokenIdentity(opts.token)?.user ?? null;
    this.reconnectPolicy = opts.reconnect ?? reconnectPolicy();
    const WS = opts.WebSocket ?? (globalThis as any).WebSocket;
    if (WS === undefined) {
      throw new ClientError(
        'no WebSocket class: pass `WebSocket` in the options (the `ws` package), or run Node 20 with --experimental-websocket',
      );
    }
    this.WS = WS;
    this.conn = { state: 'connecting', url: servers[0]! };
  }

  /**
   * Opens the client on its store and starts connecting in the background. Messages stored
   * earlier but never taken by the app come out of `nextEvent` first. Fails at once on a server
   * URL that cannot work.
   */
  static async open(opts: ClientOptions): Promise<Client> {
    const list = (Array.isArray(opts.url) ? opts.url : opts.url.split(','))
      .map((u) => u.trim())
      .filter((u) => u !== '');
    if (list.length === 0) throw new ClientError('no server URL given; use ws://host:port');
    for (const u of list) {
      const why = checkUrl(u);
      if (why !== null) throw new ClientError(why);
    }
    if (opts.token.trim() === '') throw new ClientError('the token is empty');
    const device = tokenIdentity(opts.token)?.device ?? 'client';
    const cfg = { ...defaultConfig(), ...opts.config };
    const snap = await opts.store.snapshot();
    const st = new ClientState(cfg, /^[A-Za-z0-9._@:-]{1,128}$/.test(device) ? device : 'client', opts.seed ?? randomSeed(), snap);
    const c = new Client(opts, list, st, device);
    for (const m of await opts.store.unhanded()) c.events.push({ type: 'message', message: m });
    const g = globalThis as any;
    if (typeof g.addEventListener === 'function') {
      g.addEventListener('online', c.onOnline);
      g.addEventListener('offline', c.onOffline);
    }
    c.reconnectAt = 0;
    c.schedule();
    return c;
  }

  /** Milliseconds on the client's clock. */
  private now(): number {
    return Date.now() - this.start;
  }

  /** Where the connection stands. */
  connection(): ConnectionState {
    return this.conn;
  }

  /**
   * Messages in the outbox (not yet accepted), in the order they were sent: those whose `send`
   * has resolved, that is, that are on disk.
   */
  pending(): Pending[] {
    return this.st
      .outbox()
      .items()
      .filter((p) => !this.unstored.has(p.cmid))
      .map((p) => ({ ...p }));
  }

  /** Highest seq of `conv` stored without a hole. */
  contiguous(conv: string): number {
    return this.st.contiguous(conv);
  }

  /** This device's read position in `conv`. */
  readPosition(conv: string): number {
    return this.st.readPosition(conv);
  }

  /**
   * Sends `body` to `target`: resolves with the message's client message id once it is in the
   * outbox on disk (its status is `pending`). The client resends it, with the same id, until
   * the server accepts it; statuses follow as events.
   */
  send(target: Target, body: string, opts: { replyTo?: number } = {}): Promise<string> {
    if (this.stoppedReason !== null) return Promise.reject(new ClientError(this.stoppedReason));
    if (this.closed) return Promise.reject(new ClientError('the client is closed'));
    let cmid: string | null = null;
    return this.input(() => {
      cmid = this.st.send(target, body, opts.replyTo ?? null, this.now());
      this.unstored.add(cmid);
      return cmid;
    }).catch((e: unknown) => {
      // A failure after the outbox write (the client stops) does not undo the send.
      if (cmid !== null && !this.unstored.has(cmid)) return cmid;
      throw e;
    });
  }

  /** The app showed the user everything up to `seq` of `conv`. */
  markRead(conv: string, seq: number): void {
    if (this.closed) return;
    void this.input(() => this.st.markRead(conv, seq)).catch(() => {});
  }

  /**
   * The next event: each message of each conversation once, in seq order, stored before it is
   * handed out. `null` once the client is closed or stopped. A message counts as taken when
   * the app asks for the next event (or closes the client): one handed out but not taken is
   * handed out again after a crash or reload.
   */
  async nextEvent(): Promise<Event | null> {
    await this.commitTaken();
    const e = this.events.shift();
    if (e !== undefined) return this.hand(e);
    if (this.closed || this.stoppedReason !== null) return null;
    const next = await new Promise<Event | null>((resolve) => this.waiters.push(resolve));
    return next === null ? null : this.hand(next);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Event> {
    for (;;) {
      const e = await this.nextEvent();
      if (e === null) return;
      yield e;
    }
  }

  private hand(e: Event): Event {
    if (e.type === 'message') {
      // A message of a history that was reset since (its reset is queued behind it) must not
      // move the new history's handed position when it is recorded as taken.
      const conv = e.message.conv;
      const reset = this.events.some((q) => q.type === 'epoch_reset' && q.conv === conv);
      this.taken = reset ? null : { conv, seq: e.message.seq };
    }
    return e;
  }

  private async commitTaken(): Promise<void> {
    const t = this.taken;
    if (t === null) return;
    this.taken = null;
    await this.store.setHanded(t.conv, t.seq);
  }

  /**
   * Stops the client: the connection closes, pending messages stay in the outbox for the next
   * open, and the last message taken is recorded as taken. The store is left open.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const g = globalThis as any;
    if (typeof g.removeEventListener === 'function') {
      g.removeEventListener('online', this.onOnline);
      g.removeEventListener('offline', this.onOffline);
    }
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    // Whatever was taken before is carried out first.
    await this.input(() => undefined).catch(() => {});
    await this.commitTaken().catch(() => {});
    const ws = this.ws;
    this.ws = null;
    this.live = null;
    if (ws !== null) shut(ws, 1000, 'client closed');
    this.wake(null);
  }

  // ----- inputs -----

  /**
   * Runs `f` on the state machine once the effects of every earlier input are carried out.
   * Inputs that arrive while a batch is being carried out are taken together as the next
   * batch, whose writes go to the store as one transaction: one disk flush for a burst of
   * frames rather than one per frame. That keeps the rule, since writes only move earlier:
   * every frame and event still follows the writes it depends on.
   */
  private input<T>(f: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.inbox.push({ run: f, resolve: resolve as (v: unknown) => void, reject });
      if (this.inbox.length > 1 || this.draining) return;
      this.draining = true;
      queueMicrotask(() => void this.drain());
    });
  }

  private async drain(): Promise<void> {
    while (this.inbox.length > 0) {
      const batch = this.inbox.splice(0, MAX_BATCH);
      const results: unknown[] = [];
      const ops: StoreOp[] = [];
      /** Frames (with the socket they were meant for) and events, in order. */
      const out: ({ frame: ClientFrame; ws: WebSocketLike | null } | { event: Event })[] = [];
      for (const task of batch) {
        if (this.stoppedReason !== null) {
          results.push(new ClientError(this.stoppedReason));
          continue;
        }
        try {
          results.push({ ok: task.run() });
        } catch (err) {
          results.push(err);
        }
        // Frames go out only on the socket the state machine meant them for, should a later
        // input of the batch have moved it to another.
        for (let e = this.st.pollEffect(); e !== undefined; e = this.st.pollEffect()) {
          if ('persist' in e) ops.push(...e.persist);
          else if ('transmit' in e) out.push({ frame: e.transmit, ws: this.live });
          else out.push({ event: e.event });
        }
      }
      let failed: ClientError | null = null;
      if (ops.length > 0 && this.stoppedReason === null) {
        try {
          await this.store.apply(ops);
          for (const op of ops) if (op.op === 'put_pending') this.unstored.delete(op.pending.cmid);
        } catch (err) {
          failed = new ClientError(`the local store failed: ${(err as Error).message}`);
          this.stop(failed.message, false);
        }
      }
      if (failed === null) {
        for (const o of out) {
          if ('frame' in o) {
            if (o.ws !== null && o.ws === this.live) this.transmit(o.frame);
          } else {
            this.emit(o.event);
          }
        }
      }
      batch.forEach((task, i) => {
        const r = results[i] as { ok: unknown } | unknown;
        if (failed !== null) task.reject(failed);
        else if (typeof r === 'object' && r !== null && 'ok' in r) task.resolve(r.ok);
        else task.reject(r);
      });
      this.schedule();
    }
    this.draining = false;
  }

  private transmit(f: ClientFrame): void {
    const ws = this.live;
    if (ws === null || ws.readyState !== OPEN) return; // resent after the next connect
    try {
      ws.send(encodeClientFrame(f));
    } catch (err) {
      this.dropConnection(`sending failed: ${(err as Error).message}`);
    }
  }

  private emit(e: Event): void {
    // The app took a message of the history that was just reset: never record it as taken.
    if (e.type === 'epoch_reset' && this.taken?.conv === e.conv) this.taken = null;
    const w = this.waiters.shift();
    if (w !== undefined) w(e);
    else this.events.push(e);
  }

  private wake(e: Event | null): void {
    if (e !== null) {
      this.emit(e);
      return;
    }
    for (const w of this.waiters.splice(0)) w(null);
  }

  // ----- connection -----

  /** Arms the one timer for the earliest of: a state machine deadline, a reconnect, a ping. */
  private schedule(): void {
    if (this.closed || this.stoppedReason !== null) return;
    const deadlines: number[] = [];
    const d = this.st.nextDeadline();
    if (d !== null) deadlines.push(d);
    if (this.ws === null && this.reconnectAt !== null) deadlines.push(this.reconnectAt);
    if (this.ws !== null && this.conn.state === 'connected') {
      deadlines.push(this.lastHeard + (this.pinged ? this.opts.deadAfterMs : this.opts.pingAfterMs));
    }
    const at = Math.min(...deadlines);
    if (at === Infinity) return;
    if (this.timer !== null && this.timerAt <= at) return;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.timerAt = Infinity;
      this.onTimer();
    }, Math.max(0, at - this.now()));
  }

  private onTimer(): void {
    if (this.closed || this.stoppedReason !== null) return;
    const now = this.now();
    if (this.ws === null && this.reconnectAt !== null && this.reconnectAt <= now) {
      this.reconnectAt = null;
      this.connect();
    }
    if (this.ws !== null && this.conn.state === 'connected') {
      const quiet = now - this.lastHeard;
      if (this.pinged && quiet >= this.opts.deadAfterMs) {
        this.dropConnection(`the server sent nothing for ${Math.round(quiet / 1000)} s`);
      } else if (!this.pinged && quiet >= this.opts.pingAfterMs) {
        this.pinged = true;
        this.transmit({ type: 'ping' });
      }
    }
    void this.input(() => this.st.tick(this.now())).catch(() => {});
  }

  /** The browser says the network is back: try at once. */
  private wakeUp(): void {
    if (this.ws === null && !this.closed && this.stoppedReason === null) {
      this.failures = 0;
      this.reconnectAt = this.now();
      this.schedule();
    }
  }

  private connect(): void {
    const url = this.servers[this.current]!;
    this.conn = { state: 'connecting', url };
    let ws: WebSocketLike;
    try {
      ws = new this.WS(endpoint(url, this.opts.token));
    } catch (err) {
      this.stop(`cannot connect to ${url}: ${(err as Error).message}`, false);
      return;
    }
    this.ws = ws;
    this.wsOpen = false;
    const attempt = ++this.attempt;
    let opened = false;
    const timeout = setTimeout(() => {
      if (!opened && this.ws === ws) this.failed(ws, url, attempt, `no answer within ${this.opts.connectTimeoutMs} ms`);
    }, this.opts.connectTimeoutMs);
    ws.onopen = () => {
      clearTimeout(timeout);
      if (this.ws !== ws) return;
      opened = true;
      this.wsOpen = true;
      this.failures = 0;
      this.lastHeard = this.now();
      this.pinged = false;
      this.conn = { state: 'connected', url };
      void this.input(() => {
        // Gone already? Then its loss is queued behind this, and nothing goes out on it.
        this.live = this.ws === ws ? ws : null;
        this.st.connected(this.now());
      }).catch(() => {});
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastHeard = this.now();
      this.pinged = false;
      if (typeof ev.data !== 'string') return; // binary frames only answer binary ones
      let frame;
      try {
        frame = decodeServerFrame(ev.data);
      } catch (err) {
        console.warn(`ordo-client: undecodable frame from the server: ${(err as Error).message}`);
        return;
      }
      if (frame.type === 'welcome') this.user = frame.user;
      void this.input(() => this.st.frame(frame, this.now())).catch(() => {});
    };
    ws.onclose = (ev) => {
      clearTimeout(timeout);
      if (this.ws !== ws) return;
      if (!opened) {
        this.failed(ws, url, attempt, `the connection closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ''})`);
        return;
      }
      this.lost(`the server closed it (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ''})`);
    };
    ws.onerror = () => {
      // Before the upgrade, some WebSocket classes fire no close after the error: the attempt
      // failed. Once open, a close event follows with what little the WebSocket API says.
      if (!opened && this.ws === ws) {
        clearTimeout(timeout);
        this.failed(ws, url, attempt, 'the upgrade failed');
      }
    };
  }

  /** A connection attempt failed: ask the server whether the token is the reason, then retry. */
  private failed(ws: WebSocketLike, url: string, attempt: number, reason: string): void {
    shut(ws);
    this.ws = null;
    if (this.live === ws) this.live = null;
    void this.tokenRefused(url).then((refused) => {
      // A newer attempt started meanwhile (the network came back): this answer is stale.
      if (this.closed || attempt !== this.attempt || this.ws !== null) return;
      if (refused !== null) {
        this.stop(`${url} refused the token: ${refused}`, true);
        return;
      }
      this.retry(url, `cannot connect to ${url}: ${reason}`, 'connect_failed');
    });
  }

  /** The server's reason for refusing the token, or `null` if it takes it (or cannot say). */
  private async tokenRefused(url: string): Promise<string | null> {
    if (typeof fetch !== 'function') return null;
    try {
      const ctrl = new AbortController();
      const t = setTimeout(() => ctrl.abort(), 5_000);
      try {
        const resp = await fetch(`${httpBase(url)}/v1/me`, {
          headers: { authorization: `Bearer ${this.opts.token}` },
          signal: ctrl.signal,
        });
        if (resp.status !== 401) return null;
        const body = (await resp.json().catch(() => ({}))) as any;
        return String(body?.error?.message ?? 'unauthorized');
      } finally {
        clearTimeout(t);
      }
    } catch {
      return null;
    }
  }

  /** An open connection was lost. */
  private lost(reason: string): void {
    const url = this.servers[this.current]!;
    const ws = this.ws;
    if (ws !== null) detach(ws);
    this.ws = null;
    this.live = null;
    void this.input(() => this.st.disconnected()).catch(() => {});
    this.retry(url, `lost the connection to ${url}: ${reason}`, null);
  }

  /** Closes the connection (it is dead, or the device went offline) and reconnects later. */
  private dropConnection(reason: string): void {
    const ws = this.ws;
    if (ws === null) return;
    const wasOpen = this.wsOpen;
    shut(ws, 4000, reason.slice(0, 100));
    this.ws = null;
    this.live = null;
    if (wasOpen) void this.input(() => this.st.disconnected()).catch(() => {});
    this.retry(this.servers[this.current]!, reason, wasOpen ? null : 'connect_failed');
  }

  private retry(url: string, reason: string, event: 'connect_failed' | null): void {
    if (this.closed || this.stoppedReason !== null) return;
    this.failures += 1;
    // The next attempt goes to the next server, if there are several.
    this.current = (this.current + 1) % this.servers.length;
    const offline = (globalThis as any).navigator?.onLine === false;
    const retryInMs = delayMs(this.reconnectPolicy, this.failures, Math.random());
    this.conn = { state: 'retrying', url, reason, failures: this.failures, retryInMs };
    // Offline, the browser's `online` event is the signal to try again; in case it never
    // comes (the browser can be wrong), a slow retry too.
    this.reconnectAt = this.now() + (offline ? this.reconnectPolicy.max_ms : retryInMs);
    if (event !== null) this.emit({ type: 'connect_failed', reason, unauthorized: false });
    this.schedule();
  }

  /** A failure that retrying cannot mend: stop, and say why. */
  private stop(reason: string, unauthorized: boolean): void {
    if (this.stoppedReason !== null) return;
    this.stoppedReason = reason;
    this.conn = { state: 'stopped', reason, unauthorized };
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    this.live = null;
    if (ws !== null) shut(ws);
    this.emit({ type: 'connect_failed', reason, unauthorized, permanent: true });
    this.wake(null);
  }
}

/**
 * Closes `ws` (with `code` and `reason`, if given) after detaching its handlers, so that
 * nothing it still reports reaches the client; a socket that is already closing, or never
 * opened, is left as it is.
 */
function shut(ws: WebSocketLike, code?: number, reason?: string): void {
  detach(ws);
  try {
    // Absent arguments are undefined, which the WebSocket API takes as not given.
    ws.close(code, reason);
  } catch {
    // already closing, or never opened
  }
}

function detach(ws: WebSocketLike): void {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}
