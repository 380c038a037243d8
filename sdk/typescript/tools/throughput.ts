// How fast the TypeScript SDK moves messages through a real server: one sending device and one
// receiving device, both Node processes' clients in this one process, on SQLite stores (every
// write fsynced) or memory stores. The sender keeps up to `window` sends outstanding; the run
// lasts `seconds` after a warm-up. Prints sustained messages per second received, the delay
// from `send` to the receiver's event (p50, p99), and the server's resident memory.
//
// usage: ORDO_BIN=target/release/ordo node --experimental-websocket \
//          dist/tools/throughput.js [--seconds 20] [--window 64] [--store sqlite|memory]

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client, MemoryStore, type LocalStore } from '../src/index.js';
import { SqliteStore } from '../src/sqlite-store.js';
import { TestServer } from '../test/support/server.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : dflt;
}

const seconds = Number(arg('seconds', '20'));
const window = Number(arg('window', '64'));
const kind = arg('store', 'sqlite');
const tmp = mkdtempSync(join(tmpdir(), 'ordo-sdk-throughput-'));

async function store(name: string): Promise<LocalStore> {
  return kind === 'memory' ? new MemoryStore() : SqliteStore.open(join(tmp, `${name}.sqlite`));
}

function rssMiB(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m === null ? NaN : Number(m[1]) / 1024;
}

const server = await TestServer.start();
try {
  await server.group('bench', ['sender', 'receiver']);
  const sender = await Client.open({ url: server.url, token: await server.token('sender', 'a'), store: await store('sender') });
  const receiver = await Client.open({ url: server.url, token: await server.token('receiver', 'b'), store: await store('receiver') });
  const sentAt = new Map<string, number>();
  const delays: number[] = [];
  let received = 0;
  let counting = false;
  void (async () => {
    for (;;) {
      const e = await receiver.nextEvent();
      if (e === null) return;
      if (e.type !== 'message') continue;
      const t = sentAt.get(e.message.body);
      if (t !== undefined) {
        sentAt.delete(e.message.body);
        if (counting) {
          received += 1;
          delays.push(performance.now() - t);
        }
      }
    }
  })();
  void (async () => {
    for (;;) if ((await sender.nextEvent()) === null) return;
  })();
  let n = 0;
  let stop = false;
  const inFlight = new Set<Promise<void>>();
  const pump = (async () => {
    while (!stop) {
      while (sentAt.size >= window && !stop) await new Promise((r) => setTimeout(r, 1));
      const body = `m${n++}`;
      sentAt.set(body, performance.now());
      const p: Promise<void> = sender.send({ conv: 'bench' }, body).then(() => void inFlight.delete(p));
      inFlight.add(p);
      if (inFlight.size >= window) await Promise.race(inFlight);
    }
  })();
  const warmup = Math.min(5, seconds / 4);
  await new Promise((r) => setTimeout(r, warmup * 1000));
  counting = true;
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const elapsed = (performance.now() - t0) / 1000;
  counting = false;
  stop = true;
  await pump;
  delays.sort((a, b) => a - b);
  const q = (p: number) => delays[Math.min(delays.length - 1, Math.floor(p * delays.length))] ?? NaN;
  console.log(
    JSON.stringify({
      store: kind,
      window,
      seconds: Number(elapsed.toFixed(1)),
      msgs_per_sec: Math.round(received / elapsed),
      delay_p50_ms: Number(q(0.5).toFixed(1)),
      delay_p99_ms: Number(q(0.99).toFixed(1)),
      server_rss_mib: Number(rssMiB(server.pid()).toFixed(1)),
      client_process_rss_mib: Number((process.memoryUsage().rss / 2 ** 20).toFixed(1)),
    }),
  );
  await sender.close();
  await receiver.close();
} finally {
  await server.stop();
  rmSync(tmp, { recursive: true, force: true });
}
