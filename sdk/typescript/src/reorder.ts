/**
 * Per-conversation reorder buffer: messages arrive pushed, pulled, duplicated and out of order;
 * the app gets each seq exactly once, in order, and never a seq past a hole.
 */

import type { Message } from './protocol.js';

/** What offering a message produced. */
export type Offer =
  /** Already delivered or already buffered: drop it. */
  | { kind: 'duplicate' }
  /** Buffered behind a hole; the caller should pull from `after`. */
  | { kind: 'gap'; after: number }
  /** These messages are now contiguous: store them and hand them on, in this order. */
  | { kind: 'ready'; messages: Message[] };

export class ReorderBuffer {
  /** Every seq up to here has been delivered (or reported removed by retention). */
  private pos: number;
  private readonly waiting = new Map<number, Message>();
  /**
   * Most messages held behind a hole; beyond it the highest are dropped (they will be pulled
   * again), so a hole never grows memory without bound.
   */
  private readonly capacity: number;

  constructor(contiguous: number, capacity: number) {
    this.pos = contiguous;
    this.capacity = Math.max(capacity, 1);
  }

  contiguous(): number {
    return this.pos;
  }

  waitingCount(): number {
    return this.waiting.size;
  }

  private highest(): number | undefined {
    let high: number | undefined;
    for (const s of this.waiting.keys()) if (high === undefined || s > high) high = s;
    return high;
  }

  offer(m: Message): Offer {
    if (m.seq <= this.pos || this.waiting.has(m.seq)) return { kind: 'duplicate' };
    if (m.seq !== this.pos + 1) {
      if (this.waiting.size >= this.capacity) {
        // Keep the lowest seqs: they are the next to become contiguous.
        const high = this.highest();
        if (high !== undefined) {
          if (m.seq > high) return { kind: 'gap', after: this.pos };
          this.waiting.delete(high);
        }
      }
      this.waiting.set(m.seq, m);
      return { kind: 'gap', after: this.pos };
    }
    const ready = [m];
    this.pos += 1;
    this.drain(ready);
    return { kind: 'ready', messages: ready };
  }

  private drain(into: Message[]): void {
    for (;;) {
      const next = this.waiting.get(this.pos + 1);
      if (next === undefined) return;
      this.waiting.delete(this.pos + 1);
      this.pos += 1;
      into.push(next);
    }
  }

  /**
   * Retention removed everything below `firstSeq`: the hole up to it is reported, not waited
   * for. Returns the removed range `[from, to]` if it moved the position, and the buffered
   * messages that became contiguous.
   */
  skipTo(firstSeq: number): { gap: [number, number] | null; ready: Message[] } {
    if (firstSeq <= this.pos + 1) return { gap: null, ready: [] };
    const gap: [number, number] = [this.pos + 1, firstSeq - 1];
    this.pos = firstSeq - 1;
    for (const s of [...this.waiting.keys()]) if (s < firstSeq) this.waiting.delete(s);
    const ready: Message[] = [];
    this.drain(ready);
    return { gap, ready };
  }

  /** Forgets everything (the conversation's epoch changed): start again from `contiguous`. */
  reset(contiguous: number): void {
    this.pos = contiguous;
    this.waiting.clear();
  }
}
