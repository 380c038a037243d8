// The SDK against a real `ordo serve` (no mock of the server): delivery exactly once and in
// order, message states to read, the outbox across server kills and a client crash, several
// server URLs, a refused token, retention gaps, groups and receipts.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { directConvId, MemoryStore } from '../src/index.js';
import { SqliteStore } from '../src/sqlite-store.js';
import { Device, sleep } from './support/device.js';
import { TestServer } from './support/server.js';

let server: TestServer;
const tmp = mkdtempSync(join(tmpdir(), 'ordo-sdk-stores-'));

before(async () => {
  // Retention runs with housekeeping, every second here.
  server = await TestServer.start(['--housekeeping-secs', '1']);
});

after(async () => {
  await server.stop();
  rmSync(tmp, { recursive: true, force: true });
});

async function device(user: string, dev: string, opts: { store?: 'memory' | string; url?: string } = {}) {
  const store =
    opts.store === undefined || opts.store === 'memory' ? new MemoryStore() : await SqliteStore.open(opts.store);
  return Device.open(`${user}/${dev}`, {
    url: opts.url ?? server.url,
    token: await server.token(user, dev),
    store,
  });
}

test('a direct chat arrives once and in order, and its statuses move to read', async () => {
  const alice = await device('alice1', 'laptop');
  const bob = await device('bob1', 'phone');
  const conv = await directConvId('alice1', 'bob1');
  const cmids: string[] = [];
  for (let i = 0; i < 30; i++) cmids.push(await alice.client.send({ user: 'bob1' }, `hello ${i}`));
  await bob.until('30 messages', () => bob.seqs(conv).length >= 30);
  assert.deepEqual(bob.seqs(conv), Array.from({ length: 30 }, (_, i) => i + 1));
  assert.deepEqual(bob.bodies(conv), Array.from({ length: 30 }, (_, i) => `hello ${i}`));
  // Every message of alice's: pending first, then sent with its seq, in send order.
  for (const [i, cmid] of cmids.entries()) {
    await alice.until(`${cmid} delivered`, () => ['delivered', 'read'].includes(alice.lastStatus(cmid)?.state ?? ''));
    const states = alice.statuses.get(cmid)!;
    assert.deepEqual(states[0], { state: 'pending' });
    assert.deepEqual(states[1], { state: 'sent', seq: i + 1 });
  }
  bob.client.markRead(conv, 30);
  for (const cmid of cmids) await alice.until(`${cmid} read`, () => alice.lastStatus(cmid)?.state === 'read');
  // Stored before handed: bob's store holds every message it was handed.
  assert.equal((await bob.store.history(conv, 0, 100)).length, 30);
  await alice.close();
  await bob.close();
});

test('messages sent while the server is down, and across a SIGKILL, arrive exactly once', async () => {
  const alice = await device('alice2', 'laptop', { store: join(tmp, 'alice2.sqlite') });
  const bob = await device('bob2', 'phone');
  await server.group('kill-team', ['alice2', 'bob2']);
  const first = await alice.client.send({ conv: 'kill-team' }, 'before');
  await alice.until('the first accepted', () => alice.lastStatus(first)?.state === 'sent');
  await server.kill9();
  for (let i = 0; i < 10; i++) await alice.client.send({ conv: 'kill-team' }, `offline ${i}`);
  assert.equal(alice.client.pending().length, 10, 'the outbox holds them');
  await sleep(300);
  await server.restart();
  await bob.until('11 messages', () => bob.seqs('kill-team').length >= 11, 30_000);
  // A second kill while messages are in flight.
  const burst = Promise.all(Array.from({ length: 20 }, (_, i) => alice.client.send({ conv: 'kill-team' }, `burst ${i}`)));
  await sleep(5);
  await server.kill9();
  await burst;
  await server.restart();
  await bob.until('31 messages', () => bob.seqs('kill-team').length >= 31, 30_000);
  await sleep(500);
  assert.deepEqual(bob.seqs('kill-team'), Array.from({ length: 31 }, (_, i) => i + 1), 'each seq once, in order');
  const expected = ['before', ...Array.from({ length: 10 }, (_, i) => `offline ${i}`), ...Array.from({ length: 20 }, (_, i) => `burst ${i}`)];
  assert.deepEqual(bob.bodies('kill-team'), expected, 'each message once, in the order sent');
  await alice.until('an empty outbox', () => alice.client.pending().length === 0);
  await alice.close();
  await alice.store.close();
  await bob.close();
});

test('a client process killed mid-send resends from its SQLite outbox, and nothing twice', async () => {
  const file = join(tmp, 'crash.sqlite');
  const token = await server.token('alice3', 'cli');
  const bob = await device('bob3', 'phone');
  await server.group('crash-team', ['alice3', 'bob3']);
  const script = fileURLToPath(new URL('./support/sender.js', import.meta.url));
  const child = spawn(process.execPath, ['--experimental-websocket', script, server.url, token, file, 'crash-team', '200'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const resolved: string[] = [];
  let buf = '';
  child.stdout.on('data', (d: Buffer) => {
    buf += d.toString();
    const lines = buf.split('\n');
    buf = lines.pop() ?? '';
    resolved.push(...lines.filter((l) => l !== ''));
  });
  // Kill it once some sends resolved (in the outbox on disk) and some are surely in flight.
  const deadline = Date.now() + 20_000;
  while (resolved.length < 60 && Date.now() < deadline) await sleep(5);
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await exited;
  assert.ok(resolved.length >= 60, `the sender resolved ${resolved.length} sends before it was killed`);
  // The same store, reopened: what was in the outbox goes out, with the same ids.
  const again = await Device.open('alice3/cli again', { url: server.url, token, store: await SqliteStore.open(file) });
  await again.until('an empty outbox', () => again.client.pending().length === 0, 30_000);
  await sleep(500);
  const got = bob.messages.filter((m) => m.conv === 'crash-team');
  assert.deepEqual(got.map((m) => m.seq), Array.from({ length: got.length }, (_, i) => i + 1), 'no hole, no repeat');
  const bodies = got.map((m) => m.body);
  assert.equal(new Set(bodies).size, bodies.length, 'no message twice');
  for (let i = 0; i < resolved.length; i++) {
    assert.ok(bodies.includes(`m${i}`), `m${i}, whose send resolved before the kill, was delivered`);
  }
  // Sends that resolved keep their order.
  const order = bodies.map((b) => Number(b.slice(1)));
  assert.deepEqual(order, [...order].sort((a, b) => a - b), 'delivered in the order sent');
  await again.close();
  await again.store.close();
  await bob.close();
});

test('several server URLs: a dead one is passed over', async () => {
  const dead = 'ws://127.0.0.1:9';
  const alice = await device('alice4', 'laptop', { url: `${dead},${server.url}` });
  await alice.until('connected', () => alice.client.connection().state === 'connected', 20_000);
  assert.ok(alice.events.some((e) => e.type === 'connect_failed' && e.reason.includes('127.0.0.1:9')));
  const cmid = await alice.client.send({ user: 'bob4' }, 'via the second URL');
  await alice.until('accepted', () => alice.lastStatus(cmid)?.state === 'sent');
  await alice.close();
});

test('a refused token stops the client with the reason', async () => {
  const d = await Device.open('forged', { url: server.url, token: 'eyJ1IjoibWFsbG9yeSIsImQiOiJ4In0.bad', store: new MemoryStore() });
  await d.until('the stop', () => d.client.connection().state === 'stopped');
  const c = d.client.connection();
  assert.equal(c.state, 'stopped');
  assert.ok(c.state === 'stopped' && c.unauthorized, 'told as unauthorized');
  const last = d.events[d.events.length - 1];
  assert.equal(last?.type, 'connect_failed');
  await assert.rejects(d.client.send({ user: 'bob' }, 'x'), /refused the token/);
  await d.close();
});

test('history removed by retention is reported as a gap, and the rest arrives', async () => {
  await server.group('short', ['alice5', 'bob5'], { retention: { max_count: 5 } });
  const alice = await device('alice5', 'laptop');
  for (let i = 0; i < 12; i++) await alice.client.send({ conv: 'short' }, `r${i}`);
  await alice.until('all accepted', () => alice.client.pending().length === 0);
  // Retention runs with the server's housekeeping; wait until the group shows it.
  const deadline = Date.now() + 90_000;
  while ((await server.admin('GET', '/v1/admin/groups/short')).first_seq <= 1) {
    if (Date.now() > deadline) throw new Error('retention did not run');
    await sleep(200);
  }
  const first = (await server.admin('GET', '/v1/admin/groups/short')).first_seq as number;
  const bob = await device('bob5', 'phone');
  await bob.until('the rest', () => bob.seqs('short').includes(12));
  const gap = bob.events.find((e) => e.type === 'history_gap');
  assert.deepEqual(gap, { type: 'history_gap', conv: 'short', from: 1, to: first - 1 });
  assert.deepEqual(bob.seqs('short'), Array.from({ length: 12 - first + 1 }, (_, i) => first + i));
  await alice.close();
  await bob.close();
});

test('in a group, statuses wait for every other member; receipts are reported', async () => {
  await server.group('trio', ['alice6', 'bob6', 'carol6']);
  const alice = await device('alice6', 'laptop');
  const bob = await device('bob6', 'phone');
  const cmid = await alice.client.send({ conv: 'trio' }, 'to both');
  await bob.until('the message', () => bob.seqs('trio').length === 1);
  bob.client.markRead('trio', 1);
  await alice.until('a receipt from bob', () =>
    alice.events.some((e) => e.type === 'receipt' && e.user === 'bob6' && e.read === 1),
  );
  await sleep(300);
  assert.equal(alice.lastStatus(cmid)?.state, 'sent', 'carol has not got it yet');
  const carol = await device('carol6', 'tablet');
  await carol.until('the message', () => carol.seqs('trio').length === 1);
  await alice.until('delivered', () => alice.lastStatus(cmid)?.state === 'delivered');
  carol.client.markRead('trio', 1);
  await alice.until('read', () => alice.lastStatus(cmid)?.state === 'read');
  await alice.close();
  await bob.close();
  await carol.close();
});
