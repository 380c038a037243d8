/**
 * Our accepted messages of one conversation whose status can still move (sent or delivered),
 * kept in seq order by what they wait for, so that a receipt moves exactly the messages it
 * concerns: the cost of a receipt is the messages whose status changes, not every message
 * sent and not yet read (which grows without end in a group where someone never reads).
 * The statuses and their order are the Rust state machine's (its `update_statuses`).
 */

import type { Status } from './state.js';

function insert(list: number[], seq: number): void {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid]! < seq) lo = mid + 1;
    else hi = mid;
  }
  if (list[lo] !== seq) list.splice(lo, 0, seq);
}

function remove(list: number[], seq: number): void {
  const i = list.indexOf(seq);
  if (i >= 0) list.splice(i, 1);
}

/** How many leading seqs of the ascending `list` are at most `upTo`. */
function prefix(list: number[], upTo: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid]! <= upTo) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class SentMessages {
  private readonly bySeq = new Map<number, [string, Status]>();
  /** Seqs not `delivered` yet (`sent`), ascending. */
  private readonly notDelivered: number[] = [];
  /** Seqs `sent` or `delivered`, ascending. */
  private readonly notRead: number[] = [];

  get size(): number {
    return this.bySeq.size;
  }

  /** Records `cmid` at `seq` with `status` (sent or delivered; a read one is not kept). */
  put(seq: number, cmid: string, status: Status): void {
    if (this.bySeq.has(seq)) {
      remove(this.notDelivered, seq);
      remove(this.notRead, seq);
      this.bySeq.delete(seq);
    }
    if (status.state === 'read') return;
    this.bySeq.set(seq, [cmid, status]);
    insert(this.notRead, seq);
    if (status.state !== 'delivered') insert(this.notDelivered, seq);
  }

  /**
   * Every other member got to `delivered` and read up to `read`: the messages whose status
   * moves, in seq order, with their new status. Read ones are forgotten (read is final).
   */
  advance(delivered: number, read: number): { seq: number; cmid: string; status: Status }[] {
    const out: { seq: number; cmid: string; status: Status }[] = [];
    for (const seq of this.notRead.splice(0, prefix(this.notRead, read))) {
      const [cmid] = this.bySeq.get(seq)!;
      this.bySeq.delete(seq);
      out.push({ seq, cmid, status: { state: 'read' } });
    }
    this.notDelivered.splice(0, prefix(this.notDelivered, read));
    for (const seq of this.notDelivered.splice(0, prefix(this.notDelivered, delivered))) {
      const entry = this.bySeq.get(seq)!;
      entry[1] = { state: 'delivered' };
      out.push({ seq, cmid: entry[0], status: entry[1] });
    }
    return out;
  }
}
