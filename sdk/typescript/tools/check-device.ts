// One TypeScript device of `ordo check` (crates/cli/src/check/ts_device.rs): the SDK's `Client`
// on a `SqliteStore`, in a process of its own, driven over stdin/stdout with JSON lines. The
// check SIGKILLs this process to crash the device (only the store file survives) and starts it
// again on the same file.
//
// usage: node --experimental-websocket check-device.js <url[,url...]> <token> <store file>
//
// Out (stdout), one JSON object a line:
//   {"ready":true}                  the client is open (first line)
//   {"event":<Event>}               every event, as `nextEvent` returned it
//   {"id":N,"cmid":"..."}           a send resolved: the message is in the outbox on disk
//   {"id":N,"error":"..."}          a command failed
//   {"id":N,"pending":K}            K messages in the outbox
// In (stdin):
//   {"id":N,"send":{"target":{"conv":"x"}|{"user":"y"},"body":"..."}}
//   {"id":N,"pending":true}
// When stdin closes the client is closed and the process exits 0. If the client stops by itself
// (`nextEvent` returns null) it exits 3, the reason on stderr.
//
// Lines are written with a synchronous write, so an event line is in the pipe before the loop
// asks for the next event, which is when the SDK records the message as taken: a SIGKILL can
// at most repeat the last message line after the restart, as the SDK documents.

import { writeSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { Client, type RetryPolicy, type Target } from '../src/index.js';
import { SqliteStore } from '../src/sqlite-store.js';

const [url, token, file] = process.argv.slice(2);
if (url === undefined || token === undefined || file === undefined) {
  process.stderr.write('usage: check-device.js <url[,url...]> <token> <store file>\n');
  process.exit(2);
}

const pause = new Int32Array(new SharedArrayBuffer(4));

/** Writes `v` as one line to fd 1, all of it, before returning (waiting out a full pipe). */
function out(v: unknown): void {
  const bytes = Buffer.from(`${JSON.stringify(v)}\n`);
  let done = 0;
  while (done < bytes.length) {
    try {
      done += writeSync(1, bytes, done);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
      Atomics.wait(pause, 0, 0, 5);
    }
  }
}

// The check's settings, as its Rust devices have them: under chaos, never give up.
const retry = (initial_ms: number): RetryPolicy => ({
  initial_ms,
  factor: 2,
  max_ms: 2000,
  jitter: 0.3,
  max_attempts: null,
});
const store = await SqliteStore.open(file);
const client = await Client.open({
  url,
  token,
  store,
  reconnect: retry(100),
  config: { retry: retry(500) },
});
let closing = false;
out({ ready: true });

void (async () => {
  for (;;) {
    const event = await client.nextEvent();
    if (event === null) break;
    out({ event });
  }
  if (!closing) {
    const c = client.connection();
    process.stderr.write(`check-device: the client stopped: ${'reason' in c ? c.reason : c.state}\n`);
    process.exit(3);
  }
})();

type Command = { id: number; send?: { target: Target; body: string }; pending?: boolean };

async function answer(c: Command): Promise<unknown> {
  try {
    if (c.send !== undefined) return { id: c.id, cmid: await client.send(c.send.target, c.send.body) };
    if (c.pending === true) return { id: c.id, pending: client.pending().length };
    return { id: c.id, error: 'unknown command: give "send" or "pending"' };
  } catch (e) {
    return { id: c.id, error: (e as Error).message };
  }
}

const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  let c: Command;
  try {
    c = JSON.parse(line) as Command;
  } catch (e) {
    process.stderr.write(`check-device: not a JSON command (${(e as Error).message}): ${line}\n`);
    return;
  }
  void answer(c).then(out);
});
lines.on('close', () => {
  closing = true;
  void client
    .close()
    .then(() => store.close())
    .then(() => process.exit(0));
});
