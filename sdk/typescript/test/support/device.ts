// A device under test: a `Client` whose events are taken as they come and kept, with waits
// (each with a deadline) on what it has received and on its messages' statuses.

import { Client, type ClientOptions, type Event, type LocalStore, type Message, type Status } from '../../src/index.js';

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class Device {
  readonly events: Event[] = [];
  readonly messages: Message[] = [];
  readonly statuses = new Map<string, Status[]>();
  private readonly loop: Promise<void>;

  private constructor(
    readonly client: Client,
    readonly name: string,
  ) {
    this.loop = (async () => {
      for (;;) {
        const e = await client.nextEvent();
        if (e === null) return;
        this.events.push(e);
        if (e.type === 'message') this.messages.push(e.message);
        if (e.type === 'status') {
          const list = this.statuses.get(e.cmid) ?? [];
          list.push(e.status);
          this.statuses.set(e.cmid, list);
        }
      }
    })();
  }

  static async open(name: string, opts: ClientOptions): Promise<Device> {
    return new Device(await Client.open({ connectTimeoutMs: 3_000, ...opts }), name);
  }

  get store(): LocalStore {
    return this.client.store;
  }

  /** Received messages of `conv`, by seq. */
  seqs(conv: string): number[] {
    return this.messages.filter((m) => m.conv === conv).map((m) => m.seq);
  }

  bodies(conv: string): string[] {
    return this.messages.filter((m) => m.conv === conv).map((m) => m.body);
  }

  lastStatus(cmid: string): Status | undefined {
    const l = this.statuses.get(cmid);
    return l === undefined ? undefined : l[l.length - 1];
  }

  /** Waits until `cond` holds, or fails after `ms` saying what it waited for. */
  async until(what: string, cond: () => boolean, ms = 15_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!cond()) {
      if (Date.now() > deadline) {
        throw new Error(
          `${this.name}: timed out after ${ms} ms waiting for ${what}; connection ${JSON.stringify(this.client.connection())}, ` +
            `last events ${JSON.stringify(this.events.slice(-5))}`,
        );
      }
      await sleep(20);
    }
  }

  async close(): Promise<void> {
    await this.client.close();
    await this.loop;
  }
}
