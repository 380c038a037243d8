/**
 * What the app keeps in `localStorage`: the sign-in (token and server URL), and per device
 * what the SDK's store does not hold: the peer of each direct conversation (its id is a hash),
 * conversations opened but still empty, notices shown in a conversation (history gaps, epoch
 * resets, removals), and messages the SDK gave up on (they leave its outbox).
 *
 * Every read tolerates a missing or damaged value (it falls back to empty): these are
 * conveniences, never the record of a message that was accepted.
 */

const TOKEN = 'ordo.token';
const URL_KEY = 'ordo.url';

function read<T>(key: string, fallback: T): T {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : (JSON.parse(raw) as T);
  } catch {
    return fallback;
  }
}

function write(key: string, value: unknown): void {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    console.warn(`ordo: cannot save ${key} in localStorage: ${(e as Error).message}`);
  }
}

/** The server URL the page itself came from, as a WebSocket base URL. */
export function pageServerUrl(): string {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}`;
}

export interface SignIn {
  token: string;
  url: string;
}

export function savedSignIn(): SignIn | null {
  const token = read<string | null>(TOKEN, null);
  if (typeof token !== 'string' || token === '') return null;
  return { token, url: savedUrl() };
}

export function savedUrl(): string {
  const url = read<string | null>(URL_KEY, null);
  return typeof url === 'string' && url !== '' ? url : pageServerUrl();
}

export function saveSignIn(s: SignIn): void {
  write(TOKEN, s.token);
  write(URL_KEY, s.url);
}

/** Forgets the token (the URL stays, for the next sign-in). */
export function forgetToken(): void {
  localStorage.removeItem(TOKEN);
}

/** A line shown in a conversation that is not a message. */
export type Notice =
  | { kind: 'history_gap'; from: number; to: number }
  | { kind: 'epoch_reset'; epoch: number }
  | { kind: 'removed'; seq: number; left: boolean };

/** A message the SDK gave up on. */
export interface Failed {
  cmid: string;
  conv: string;
  body: string;
  reason: string;
}

/** Per-device state, under keys prefixed with the device's database name. */
export class DevicePrefs {
  constructor(private readonly prefix: string) {}

  private key(what: string): string {
    return `${this.prefix}:${what}`;
  }

  /** Direct conversation id -> the other user. */
  peers(): Record<string, string> {
    return read<Record<string, string>>(this.key('peers'), {});
  }

  setPeer(conv: string, user: string): void {
    const p = this.peers();
    if (p[conv] === user) return;
    p[conv] = user;
    write(this.key('peers'), p);
  }

  /** Conversations the user opened that may have nothing stored yet. */
  opened(): string[] {
    return read<string[]>(this.key('opened'), []);
  }

  addOpened(conv: string): void {
    const o = this.opened();
    if (o.includes(conv)) return;
    o.push(conv);
    write(this.key('opened'), o);
  }

  notices(conv: string): Notice[] {
    return read<Record<string, Notice[]>>(this.key('notices'), {})[conv] ?? [];
  }

  addNotice(conv: string, n: Notice): void {
    const all = read<Record<string, Notice[]>>(this.key('notices'), {});
    const list = all[conv] ?? [];
    if (list.some((x) => JSON.stringify(x) === JSON.stringify(n))) return;
    list.push(n);
    all[conv] = list;
    write(this.key('notices'), all);
  }

  failed(): Failed[] {
    return read<Failed[]>(this.key('failed'), []);
  }

  addFailed(f: Failed): void {
    const list = this.failed().filter((x) => x.cmid !== f.cmid);
    list.push(f);
    write(this.key('failed'), list);
  }

  dismissFailed(cmid: string): void {
    write(
      this.key('failed'),
      this.failed().filter((x) => x.cmid !== cmid),
    );
  }

  /** The conversation open when the page was left. */
  lastOpen(): string | null {
    return read<string | null>(this.key('open'), null);
  }

  setLastOpen(conv: string | null): void {
    write(this.key('open'), conv);
  }
}
