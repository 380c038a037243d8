// A real `ordo serve` for the browser tests: a fresh data directory and a free port, SIGKILL
// and restart on the same port and data, tokens from its admin API. The binary is ORDO_BIN,
// else the workspace's debug or release build.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = fileURLToPath(new URL('../../', import.meta.url));

function ordoBin() {
  if (process.env.ORDO_BIN) return process.env.ORDO_BIN;
  for (const profile of ['debug', 'release']) {
    const p = join(repo, 'target', profile, 'ordo');
    if (existsSync(p)) return p;
  }
  throw new Error(`no ordo binary: build it (cargo build --bin ordo, in ${repo}) or name it with ORDO_BIN`);
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class TestServer {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), 'ordo-web-test-'));
    this.adminKey = `admin-${Math.random().toString(36).slice(2)}`;
    this.port = 0;
    this.child = null;
    this.starts = 0;
  }

  static async start() {
    const s = new TestServer();
    s.port = await freePort();
    await s.restart();
    return s;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  log() {
    try {
      return readFileSync(join(this.dir, `server-${this.starts}.log`), 'utf8').slice(-4000);
    } catch {
      return '';
    }
  }

  async restart() {
    if (this.child !== null) throw new Error('the server is already running');
    this.starts += 1;
    const log = openSync(join(this.dir, `server-${this.starts}.log`), 'w');
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('ORDO_') && k !== 'RUST_LOG'));
    const child = spawn(
      ordoBin(),
      ['serve', '--listen', `127.0.0.1:${this.port}`, '--data', join(this.dir, 'data'), '--admin-key', this.adminKey],
      { stdio: ['ignore', 'ignore', log], env },
    );
    this.child = child;
    let exited = false;
    child.once('exit', () => (exited = true));
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (exited) {
        this.child = null;
        throw new Error(`the server exited at start:\n${this.log()}`);
      }
      try {
        if ((await fetch(`${this.http}/healthz`)).status === 200) return;
      } catch {
        // not up yet
      }
      if (Date.now() > deadline) throw new Error(`the server did not answer within 20 s:\n${this.log()}`);
      await sleep(25);
    }
  }

  async kill9() {
    const c = this.child;
    if (c === null) return;
    this.child = null;
    const gone = new Promise((r) => c.once('exit', r));
    c.kill('SIGKILL');
    await gone;
  }

  async stop() {
    await this.kill9();
    rmSync(this.dir, { recursive: true, force: true });
  }

  async token(user, device) {
    const r = await fetch(`${this.http}/v1/admin/tokens`, {
      method: 'POST',
      headers: { authorization: `Bearer ${this.adminKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ user, device, ttl_secs: 3600 }),
    });
    const body = await r.json();
    if (!r.ok) throw new Error(`token: ${r.status} ${JSON.stringify(body)}`);
    return body.token;
  }
}
