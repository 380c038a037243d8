// The protocol helpers: direct conversation ids as the server makes them (with the Web Crypto
// API and without it, as on a page served over plain http), the hand-written SHA-256 against
// Node's, and server frames read with the server's defaults or refused with the reason.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { decodeServerFrame, directConvId, FrameError } from '../src/protocol.js';
import { sha256 } from '../src/sha256.js';

test('direct conversation ids are the server’s, with and without crypto.subtle', async () => {
  // As `ordo_protocol::direct_conv_id("alice", "bob")` makes it.
  const want = 'd_884a452152d3bf048cc051df8f708aff';
  assert.equal(await directConvId('alice', 'bob'), want);
  assert.equal(await directConvId('bob', 'alice'), want);
  const crypto = globalThis.crypto;
  Object.defineProperty(globalThis, 'crypto', { value: undefined, configurable: true });
  try {
    assert.equal(await directConvId('bob', 'alice'), want);
  } finally {
    Object.defineProperty(globalThis, 'crypto', { value: crypto, configurable: true });
  }
});

test('the fallback SHA-256 agrees with Node’s on every length around the block size', () => {
  for (let len = 0; len < 300; len++) {
    const data = randomBytes(len);
    assert.equal(Buffer.from(sha256(data)).toString('hex'), createHash('sha256').update(data).digest('hex'), `length ${len}`);
  }
});

test('server frames: defaults as the server has them, and a clear error otherwise', () => {
  const convs = decodeServerFrame('{"type":"convs","conversations":[{"conv":"c","kind":"group","epoch":3,"max_seq":1,"first_seq":1,"delivered":0,"read":0}]}');
  assert.equal(convs.type, 'convs');
  assert.ok(convs.type === 'convs' && convs.has_more === false && convs.conversations[0]!.members.length === 0);
  assert.throws(() => decodeServerFrame('{"type":"accepted","cmid":"x","conv":"c","seq":-1,"ts":0}'), FrameError);
  assert.throws(() => decodeServerFrame('nope'), /not JSON/);
  assert.throws(() => decodeServerFrame('{"type":"shout"}'), /unknown frame type "shout"/);
});
