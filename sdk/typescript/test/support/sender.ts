// A sending client in a process of its own, for the crash test: opens a SQLite store, sends
// `n` messages `m0`, `m1`, ... to a conversation, and prints the index of each send as it
// resolves (that is, once the message is in the outbox on disk). Killed with SIGKILL mid-way.
//
// usage: node --experimental-websocket sender.js <url> <token> <store file> <conv> <n>

import { Client } from '../../src/index.js';
import { SqliteStore } from '../../src/sqlite-store.js';

const [url, token, file, conv, n] = process.argv.slice(2);
if (url === undefined || token === undefined || file === undefined || conv === undefined || n === undefined) {
  console.error('usage: sender.js <url> <token> <store file> <conv> <n>');
  process.exit(2);
}
const client = await Client.open({ url, token, store: await SqliteStore.open(file) });
void (async () => {
  while ((await client.nextEvent()) !== null) {
    // events are not this process's business
  }
})();
for (let i = 0; i < Number(n); i++) {
  await client.send({ conv }, `m${i}`);
  process.stdout.write(`${i}\n`);
}
await client.close();
