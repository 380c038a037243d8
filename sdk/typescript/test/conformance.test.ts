// Replays the client conformance vectors recorded from the Rust SDK's state machine
// (`crates/client/tests/conformance.rs`, format described there): every input goes through this
// package's `ClientState`, its effects are carried out on the reference `MemoryStore` (up to a
// crash, where a step says so), and the effects must equal the recorded ones exactly.

import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { ClientState, emptySnapshot, type ClientConfig, type Effect } from '../src/state.js';
import { MemoryStore } from '../src/store.js';
import { readServerFrame } from '../src/protocol.js';

const dir = new URL('../../conformance/', import.meta.url);

interface Vector {
  name: string;
  about: string;
  config: ClientConfig;
  device: string;
  seed: number;
  steps: { in: any; out: unknown[]; crash_after?: number }[];
}

/** The JSON form of a value, as the vectors hold it (absent fields dropped). */
function json(v: unknown): unknown {
  return JSON.parse(JSON.stringify(v));
}

function replay(v: Vector): number {
  let st = new ClientState(v.config, v.device, BigInt(v.seed), emptySnapshot());
  const db = new MemoryStore();
  let effects = 0;
  v.steps.forEach((step, i) => {
    const where = `${v.name}, step ${i} (${JSON.stringify(step.in).slice(0, 120)})`;
    const input = step.in;
    if (input === 'disconnected') {
      st.disconnected();
    } else if ('restart' in input) {
      const snap = db.snapshotSync();
      assert.deepStrictEqual(json(snap), input.restart.snapshot, `${where}: the store holds another snapshot`);
      st = new ClientState(v.config, v.device, BigInt(input.restart.seed), snap);
    } else if ('connected' in input) {
      st.connected(input.connected.now);
    } else if ('tick' in input) {
      st.tick(input.tick.now);
    } else if ('frame' in input) {
      st.frame(readServerFrame(input.frame.frame), input.frame.now);
    } else if ('send' in input) {
      const s = input.send;
      st.send(s.target, s.body, s.reply_to, s.now);
    } else if ('mark_read' in input) {
      st.markRead(input.mark_read.conv, input.mark_read.seq);
    } else {
      assert.fail(`${where}: unknown input`);
    }
    const out: Effect[] = [];
    for (let e = st.pollEffect(); e !== undefined; e = st.pollEffect()) {
      if ('persist' in e && (step.crash_after === undefined || out.length < step.crash_after)) {
        db.applySync(e.persist);
      }
      out.push(e);
    }
    effects += out.length;
    assert.deepStrictEqual(json(out), step.out, where);
  });
  return effects;
}

const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort();

test('there are conformance vectors to replay', () => {
  assert.ok(files.length >= 10, `only ${files.length} vectors in ${dir.pathname}`);
});

for (const f of files) {
  const v = JSON.parse(readFileSync(new URL(f, dir), 'utf8')) as Vector;
  test(`conformance: ${v.name}: ${v.about}`, () => {
    const effects = replay(v);
    assert.ok(effects > 0, 'the vector produced effects');
  });
}
