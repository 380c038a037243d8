// The web app in a real browser (Debian's Chromium, driven by playwright-core) against a real
// `ordo serve`: two browser contexts (alice and bob) chat; alice goes offline, sends 20
// messages, reloads the page while still offline and comes back: all 20 reach bob exactly
// once and in order, and her marks move to read; the server is SIGKILLed mid-conversation and
// restarted: nothing is lost, nothing is shown twice.
//
// Run by `npm run test:browser` (after `npm ci`), with the `ordo` binary in ORDO_BIN (or the
// workspace's debug or release build) and Chromium at CHROMIUM (default /usr/bin/chromium).
// With ORDO_SCREENSHOTS=<dir> it saves screenshots of the app there (docs/screenshots).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { TestServer } from './server.mjs';

const shots = process.env.ORDO_SCREENSHOTS;
let server;
let browser;

before(async () => {
  server = await TestServer.start();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** A signed-in browser context for `user` on device `device`. */
async function person(user, device) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[${user}] page error: ${e.message}`));
  await page.goto(`${server.http}/`);
  await page.getByTestId('token-input').fill(await server.token(user, device));
  await page.getByTestId('sign-in').click();
  await page.getByTestId('offline-banner').waitFor({ state: 'hidden', timeout: 15_000 });
  return { user, context, page };
}

async function openChatWith(p, other) {
  await p.page.getByTestId('new-chat-input').fill(other);
  await p.page.getByTestId('new-chat-button').click();
  await p.page.getByTestId('composer-input').waitFor();
}

async function openConv(p, conv) {
  await p.page.locator(`[data-testid="conv-item"][data-conv="${conv}"]`).click();
  await p.page.getByTestId('composer-input').waitFor();
}

async function send(p, body) {
  await p.page.getByTestId('composer-input').fill(body);
  await p.page.getByTestId('send-button').click();
}

/** The messages the page shows: [{seq, from, body, state, cmid}] in page order. */
async function shown(p) {
  return p.page.getByTestId('message').evaluateAll((els) =>
    els.map((el) => ({
      seq: el.getAttribute('data-seq'),
      cmid: el.getAttribute('data-cmid'),
      from: el.getAttribute('data-from'),
      state: el.getAttribute('data-state'),
      body: el.querySelector('[data-testid="message-body"]')?.textContent ?? '',
    })),
  );
}

async function until(what, cond, ms = 30_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await cond();
    if (last === true) return;
    if (Date.now() > deadline) assert.fail(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Every message shows once, in seq order, with no hole: the app's view of G1/G2/G3. */
function assertOnceInOrder(list, who) {
  const seqs = list.filter((m) => m.seq !== null && m.seq !== '').map((m) => Number(m.seq));
  assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => i + 1), `${who}: seqs once, in order, no hole`);
  const cmids = list.map((m) => m.cmid);
  assert.equal(new Set(cmids).size, cmids.length, `${who}: no message shown twice`);
}

test('two browsers chat; one goes offline, sends 20, reloads, comes back; the server is SIGKILLed mid-conversation', async () => {
  const alice = await person('alice', 'laptop');
  const bob = await person('bob', 'browser');

  // A chat: alice starts it, bob sees it in his list with an unread count and answers.
  await openChatWith(alice, 'bob');
  await send(alice, 'hi bob');
  const conv = await alice.page.getByTestId('conversation').getAttribute('data-conv');
  assert.ok(conv?.startsWith('d_'), `a direct conversation (${conv})`);
  const bobItem = bob.page.locator(`[data-testid="conv-item"][data-conv="${conv}"]`);
  await bobItem.waitFor({ timeout: 15_000 });
  await until('bob unread 1', async () => (await bobItem.getByTestId('unread').textContent())?.trim() === '1');
  await openConv(bob, conv);
  await send(bob, 'hello alice');
  await until('alice sees the answer', async () => (await shown(alice)).some((m) => m.body === 'hello alice'));
  await until('hi bob read', async () => (await shown(alice)).find((m) => m.body === 'hi bob')?.state === 'read');
  if (shots) {
    await alice.page.screenshot({ path: `${shots}/chat.png` });
    await bob.page.screenshot({ path: `${shots}/chat-bob.png` });
  }

  // Offline: 20 messages wait in the outbox, shown as pending, and survive a reload.
  await alice.context.setOffline(true);
  await alice.page.getByTestId('offline-banner').waitFor({ state: 'visible', timeout: 15_000 });
  for (let i = 1; i <= 20; i++) await send(alice, `offline ${i}`);
  await until('20 pending', async () => (await shown(alice)).filter((m) => m.state === 'pending').length === 20);
  if (shots) await alice.page.screenshot({ path: `${shots}/offline.png` });
  await alice.page.reload();
  await alice.page.getByTestId('offline-banner').waitFor({ state: 'visible', timeout: 15_000 });
  await openConv(alice, conv);
  await until('20 pending after the reload', async () => (await shown(alice)).filter((m) => m.state === 'pending').length === 20);
  assert.equal((await shown(bob)).filter((m) => m.body.startsWith('offline ')).length, 0, 'nothing left while offline');

  // Back online: all 20 reach bob once and in order, and alice's marks move to read.
  await alice.context.setOffline(false);
  await until('bob has the 20', async () => (await shown(bob)).filter((m) => m.body.startsWith('offline ')).length >= 20);
  const want = Array.from({ length: 20 }, (_, i) => `offline ${i + 1}`);
  await until('alice sees them read', async () => {
    const a = await shown(alice);
    return want.every((b) => a.find((m) => m.body === b)?.state === 'read') || a.map((m) => `${m.body}:${m.state}`);
  });
  const b1 = await shown(bob);
  assert.deepEqual(b1.filter((m) => m.body.startsWith('offline ')).map((m) => m.body), want, 'bob: all 20, once, in order');
  assertOnceInOrder(b1, 'bob');
  assertOnceInOrder(await shown(alice), 'alice');

  // The server is SIGKILLed mid-conversation and restarted: nothing lost, nothing twice.
  const burst = [];
  for (let i = 1; i <= 10; i++) {
    burst.push(`kill ${i}`);
    await send(alice, `kill ${i}`);
    if (i === 4) await server.kill9();
    await send(bob, `reply ${i}`);
    burst.push(`reply ${i}`);
  }
  await alice.page.getByTestId('offline-banner').waitFor({ state: 'visible', timeout: 15_000 });
  await server.restart();
  for (const p of [alice, bob]) {
    await until(`${p.user} has the conversation`, async () => {
      const l = await shown(p);
      return burst.every((b) => l.some((m) => m.body === b && m.state !== 'pending')) || l.length;
    }, 60_000);
  }
  await new Promise((r) => setTimeout(r, 1_000));
  const [fa, fb] = [await shown(alice), await shown(bob)];
  assertOnceInOrder(fa, 'alice');
  assertOnceInOrder(fb, 'bob');
  assert.deepEqual(fa.map((m) => m.body), fb.map((m) => m.body), 'both show the same conversation in the same order');
  for (const who of ['kill', 'reply']) {
    const order = fa.filter((m) => m.body.startsWith(`${who} `)).map((m) => Number(m.body.split(' ')[1]));
    assert.deepEqual(order, Array.from({ length: 10 }, (_, i) => i + 1), `${who}: each once, in the order sent`);
  }
  if (shots) {
    await alice.page.screenshot({ path: `${shots}/after-kill.png` });
    await alice.page.setViewportSize({ width: 420, height: 760 });
    await alice.page.screenshot({ path: `${shots}/narrow.png` });
  }
  await alice.context.close();
  await bob.context.close();
});

test('two tabs of one browser share one client: each shows every message once, and the second takes over when the first closes', async () => {
  const carol = await person('carol', 'laptop');
  const dave = await person('dave', 'phone');
  // A second tab of carol's, on the same profile: it follows the first.
  const tab2 = await carol.context.newPage();
  await tab2.goto(`${server.http}/`);
  const second = { user: 'carol (tab 2)', context: carol.context, page: tab2 };
  await openChatWith(dave, 'carol');
  await send(dave, 'to both tabs');
  const conv = await dave.page.getByTestId('conversation').getAttribute('data-conv');
  await openConv(carol, conv);
  await openConv(second, conv);
  for (const p of [carol, second]) {
    await until(`${p.user} shows it`, async () => (await shown(p)).some((m) => m.body === 'to both tabs'));
  }
  // The follower sends through the leader.
  await send(second, 'from tab 2');
  await until('dave has it', async () => (await shown(dave)).some((m) => m.body === 'from tab 2'));
  // The leading tab closes: the second takes over the connection and carries on.
  await carol.page.close();
  await send(dave, 'after the first tab closed');
  await until('tab 2 has it', async () => (await shown(second)).some((m) => m.body === 'after the first tab closed'), 30_000);
  await send(second, 'tab 2 leads');
  await until('dave has the last', async () => (await shown(dave)).some((m) => m.body === 'tab 2 leads'), 30_000);
  await new Promise((r) => setTimeout(r, 500));
  for (const p of [second, dave]) {
    const l = await shown(p);
    assertOnceInOrder(l, p.user);
    assert.deepEqual(
      l.map((m) => m.body),
      ['to both tabs', 'from tab 2', 'after the first tab closed', 'tab 2 leads'],
      `${p.user}: the conversation once, in order`,
    );
  }
  await carol.context.close();
  await dave.context.close();
});
