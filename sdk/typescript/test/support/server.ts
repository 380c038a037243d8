// A real `ordo serve` for the SDK's tests: started on a fresh data directory and a free port,
// killed with SIGKILL and restarted on the same port and data, and asked for tokens and groups
// through its admin API. The binary is `ORDO_BIN`, else the workspace's debug or release build.

import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = fileURLToPath(new URL('../../../../../', import.meta.url));

export function ordoBin(): string {
  const env = process.env.ORDO_BIN;
  if (env !== undefined && env !== '') return env;
  for (const profile of ['debug', 'release']) {
    const p = join(repo, 'target', profile, 'ordo');
    if (existsSync(p)) return p;
  }
  throw new Error(
    `no ordo binary: build it (cargo build --bin ordo, in ${repo}) or name it with ORDO_BIN`,
  );
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      s.close(() => resolve(typeof addr === 'object' && addr !== null ? addr.port : 0));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class TestServer {
  readonly dir: string;
  readonly adminKey = `admin-${Math.random().toString(36).slice(2)}`;
  readonly secret = `secret-${Math.random().toString(36).slice(2)}`;
  port = 0;
  private child: ChildProcess | null = null;
  private starts = 0;

  private constructor(private readonly extra: string[]) {
    this.dir = mkdtempSync(join(tmpdir(), 'ordo-sdk-test-'));
  }

  /** Starts a server; `extra` are more `ordo serve` flags. */
  static async start(extra: string[] = []): Promise<TestServer> {
    const s = new TestServer(extra);
    s.port = await freePort();
    await s.restart();
    return s;
  }

  get url(): string {
    return `ws://127.0.0.1:${this.port}`;
  }

  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  log(): string {
    try {
      return readFileSync(join(this.dir, `server-${this.starts}.log`), 'utf8').slice(-4000);
    } catch {
      return '';
    }
  }

  /** Starts it again (same port, same data) and waits until it answers. */
  async restart(): Promise<void> {
    if (this.child !== null) throw new Error('the server is already running');
    this.starts += 1;
    const log = openSync(join(this.dir, `server-${this.starts}.log`), 'w');
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ORDO_') && k !== 'RUST_LOG'));
    const child = spawn(
      ordoBin(),
      [
        'serve',
        '--listen',
        `127.0.0.1:${this.port}`,
        '--data',
        join(this.dir, 'data'),
        '--secret',
        this.secret,
        '--admin-key',
        this.adminKey,
        '--rate-per-sec',
        '0',
        '--rate-burst',
        '1',
        ...this.extra,
      ],
      { stdio: ['ignore', 'ignore', log], env },
    );
    this.child = child;
    let exited = false;
    child.once('exit', () => {
      exited = true;
    });
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (exited) {
        this.child = null;
        throw new Error(`the server exited at start:\n${this.log()}`);
      }
      try {
        const r = await fetch(`${this.http}/healthz`);
        if (r.status === 200) return;
      } catch {
        // not up yet
      }
      if (Date.now() > deadline) throw new Error(`the server did not answer within 20 s:\n${this.log()}`);
      await sleep(25);
    }
  }

  /** The server's process id while it runs. */
  pid(): number | undefined {
    return this.child?.pid;
  }

  /** SIGKILL: nothing is flushed, nothing is said to the clients. */
  async kill9(): Promise<void> {
    const c = this.child;
    if (c === null) return;
    this.child = null;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await gone;
  }

  async stop(): Promise<void> {
    await this.kill9();
    rmSync(this.dir, { recursive: true, force: true });
  }

  async admin(method: string, path: string, body?: unknown): Promise<any> {
    const r = await fetch(`${this.http}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.adminKey}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = await r.json();
    if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(json)}`);
    return json;
  }

  async token(user: string, device: string, ttlSecs = 3600): Promise<string> {
    return (await this.admin('POST', '/v1/admin/tokens', { user, device, ttl_secs: ttlSecs })).token;
  }

  async group(id: string, members: string[], extra: Record<string, unknown> = {}): Promise<void> {
    await this.admin('POST', '/v1/admin/groups', { id, members, ...extra });
  }
}
