// The three local stores mean the same by every store operation: the writes of every
// conformance vector (as its client carried them out, crashes included) go to the reference
// MemoryStore, to a SqliteStore file and to an IndexedDbStore (on fake-indexeddb, an
// implementation of the IndexedDB standard for Node; the browser tests run the real one), and
// at every restart and at the end all three must hold the same: the snapshot the client
// restarts from, each conversation's row, its messages, and what is still to be handed.

import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { IDBFactory } from 'fake-indexeddb';
import 'fake-indexeddb/auto';
import { IndexedDbStore } from '../src/indexeddb-store.js';
import { ClientState, emptySnapshot, type Effect, type StoreOp } from '../src/state.js';
import { MemoryStore, type LocalStore } from '../src/store.js';
import { SqliteStore } from '../src/sqlite-store.js';
import { readServerFrame } from '../src/protocol.js';

const dir = new URL('../../conformance/', import.meta.url);
const tmp = mkdtempSync(join(tmpdir(), 'ordo-sdk-stores-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

async function contents(s: LocalStore): Promise<unknown> {
  const convs = await s.conversations();
  const messages: Record<string, unknown> = {};
  for (const c of convs) {
    messages[c.conv] = {
      all: await s.history(c.conv, 0, 1_000_000),
      latest3: await s.latest(c.conv, 3),
      before3: await s.latest(c.conv, 2, 3),
    };
  }
  return JSON.parse(
    JSON.stringify({ snapshot: await s.snapshot(), convs, messages, unhanded: await s.unhanded(), sent: await s.sentStatuses() }),
  );
}

async function same(stores: LocalStore[], where: string): Promise<void> {
  const want = await contents(stores[0]!);
  for (const s of stores.slice(1)) assert.deepStrictEqual(await contents(s), want, `${where}: ${s.constructor.name}`);
}

const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
for (const f of files) {
  const v = JSON.parse(readFileSync(new URL(f, dir), 'utf8'));
  test(`stores agree: ${v.name}`, async () => {
    const mem = new MemoryStore();
    const sqlite = await SqliteStore.open(join(tmp, `${v.name}.sqlite`));
    const idb = await IndexedDbStore.open(`ordo-test-${v.name}`, new IDBFactory());
    const stores: LocalStore[] = [mem, sqlite, idb];
    let st = new ClientState(v.config, v.device, BigInt(v.seed), emptySnapshot());
    let handed = 0;
    for (const [i, step] of (v.steps as any[]).entries()) {
      const input = step.in;
      if (input === 'disconnected') st.disconnected();
      else if ('restart' in input) {
        await same(stores, `${v.name} step ${i}`);
        st = new ClientState(v.config, v.device, BigInt(input.restart.seed), await sqlite.snapshot());
        continue;
      } else if ('connected' in input) st.connected(input.connected.now);
      else if ('tick' in input) st.tick(input.tick.now);
      else if ('frame' in input) st.frame(readServerFrame(input.frame.frame), input.frame.now);
      else if ('send' in input) st.send(input.send.target, input.send.body, input.send.reply_to, input.send.now);
      else if ('mark_read' in input) st.markRead(input.mark_read.conv, input.mark_read.seq);
      const out: Effect[] = [];
      for (let e = st.pollEffect(); e !== undefined; e = st.pollEffect()) out.push(e);
      const kept = step.crash_after === undefined ? out : out.slice(0, step.crash_after);
      for (const e of kept) {
        if ('persist' in e) {
          const ops: StoreOp[] = e.persist;
          for (const s of stores) await s.apply(ops);
        }
        // The app takes every other message, so that handed positions differ from stored ones.
        if ('event' in e && e.event.type === 'message' && handed++ % 2 === 0) {
          for (const s of stores) await s.setHanded(e.event.message.conv, e.event.message.seq);
        }
      }
    }
    await same(stores, `${v.name} end`);
    await sqlite.close();
    await idb.close();
  });
}

test('a second process cannot open a SQLite store in use', async () => {
  const file = join(tmp, 'locked.sqlite');
  const a = await SqliteStore.open(file);
  await assert.rejects(SqliteStore.open(file), /another client is using it/);
  await a.close();
  const b = await SqliteStore.open(file);
  await b.close();
});
