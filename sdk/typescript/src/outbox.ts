/**
 * The outbox: every message the app sent and the server has not yet accepted, in the order the
 * app sent it, with its retry schedule.
 *
 * Rules: a message keeps its client message id for life, so every resend is recognised by the
 * server's dedup; messages of one conversation are (re)sent in their original order, so the
 * server numbers them in that order; a retryable rejection waits (at least its retry-after); a
 * message that used all its attempts, or got a non-retryable rejection, fails.
 */

import { delayMs, mayRetry, type RetryPolicy } from './backoff.js';
import type { ClientFrame } from './protocol.js';

/** Where a message goes: an existing conversation, or the direct conversation with a user. */
export type Target = { conv: string } | { user: string };

/** One message waiting for `accepted`. */
export interface Pending {
  cmid: string;
  target: Target;
  body: string;
  reply_to: number | null;
  /** Sends so far (0: never sent). */
  attempts: number;
  /** When the next send is due, in the caller's milliseconds; 0 means "as soon as possible". */
  due_ms: number;
  /**
   * Sent on the current connection and not refused (never stored: it means nothing after a
   * restart). A later message of the same conversation may follow it at once; one that is not
   * in flight holds the later ones back.
   */
  in_flight?: boolean;
}

/** Why a message was given up. */
export type Failure =
  | { kind: 'exhausted'; attempts: number }
  | { kind: 'rejected'; code: string; message: string };

export function targetKey(t: Target): string {
  return 'conv' in t ? `c:${t.conv}` : `u:${t.user}`;
}

export function targetConv(t: Target): string | null {
  return 'conv' in t ? t.conv : null;
}

export function sendFrame(p: Pending): ClientFrame {
  const f: Extract<ClientFrame, { type: 'send' }> =
    'conv' in p.target
      ? { type: 'send', conv: p.target.conv, cmid: p.cmid, body: p.body }
      : { type: 'send', to: p.target.user, cmid: p.cmid, body: p.body };
  if (p.reply_to !== null) f.reply_to = p.reply_to;
  return f;
}

/** A copy of `p` as it is stored: without `in_flight`. */
export function stored(p: Pending): Pending {
  return {
    cmid: p.cmid,
    target: 'conv' in p.target ? { conv: p.target.conv } : { user: p.target.user },
    body: p.body,
    reply_to: p.reply_to,
    attempts: p.attempts,
    due_ms: p.due_ms,
  };
}

export class Outbox {
  private queue: Pending[];

  constructor(
    private readonly policy: RetryPolicy,
    pending: Pending[],
  ) {
    this.queue = pending.map((p) => ({ ...stored(p), in_flight: false }));
  }

  get length(): number {
    return this.queue.length;
  }

  items(): readonly Pending[] {
    return this.queue;
  }

  get(cmid: string): Pending | undefined {
    return this.queue.find((p) => p.cmid === cmid);
  }

  push(p: Pending): void {
    this.queue.push({ ...p, in_flight: false });
  }

  /** The server accepted `cmid`: it leaves the outbox. */
  accepted(cmid: string): Pending | undefined {
    const i = this.queue.findIndex((p) => p.cmid === cmid);
    if (i < 0) return undefined;
    return this.queue.splice(i, 1)[0];
  }

  /** After a (re)connect every pending message is due at once, in order, attempts kept. */
  allDueNow(): void {
    for (const p of this.queue) {
      p.due_ms = 0;
      p.in_flight = false;
    }
  }

  /**
   * The messages to send now, in order, each marked as sent once more with its next retry
   * time. Within a conversation nothing overtakes an earlier message that is waiting; only a
   * first send may follow messages in flight at once. `unit` yields jitter in `[0, 1)`.
   * Messages that used up their attempts are returned as failed instead.
   */
  takeDue(
    nowMs: number,
    unit: () => number,
  ): { send: Pending[]; failed: { pending: Pending; failure: Failure }[] } {
    const send: Pending[] = [];
    const failed: { pending: Pending; failure: Failure }[] = [];
    const blocked = new Set<string>();
    const onlyNew = new Set<string>();
    const keep: Pending[] = [];
    for (const p of this.queue) {
      const key = targetKey(p.target);
      const resend = p.attempts > 0;
      if (blocked.has(key) || (resend && onlyNew.has(key))) {
        keep.push(p);
        continue;
      }
      if (p.due_ms > nowMs) {
        if (p.in_flight) onlyNew.add(key);
        else blocked.add(key);
        keep.push(p);
        continue;
      }
      if (p.attempts > 0 && !mayRetry(this.policy, p.attempts)) {
        failed.push({ pending: p, failure: { kind: 'exhausted', attempts: p.attempts } });
        continue;
      }
      p.attempts += 1;
      p.in_flight = true;
      p.due_ms = nowMs + delayMs(this.policy, p.attempts, unit());
      send.push({ ...p });
      keep.push(p);
    }
    this.queue = keep;
    return { send, failed };
  }

  /**
   * A retryable rejection: wait at least `retryAfterMs` (or the regular backoff) before this
   * message and the later ones of its conversation go again.
   */
  retryLater(cmid: string, nowMs: number, retryAfterMs: number | undefined): void {
    const p = this.get(cmid);
    if (p === undefined) return;
    // The server's hint, but never longer than our own longest backoff.
    const wait = Math.min(retryAfterMs ?? 0, this.policy.max_ms);
    p.due_ms = Math.max(p.due_ms, nowMs + wait);
    p.in_flight = false;
  }

  /** A non-retryable rejection: the message fails and leaves the outbox. */
  reject(cmid: string): Pending | undefined {
    return this.accepted(cmid);
  }

  /**
   * The earliest time `takeDue` would send something, if any: messages held back behind a
   * waiting one of their conversation do not count.
   */
  nextDue(): number | null {
    const blocked = new Set<string>();
    const onlyNew = new Set<string>();
    let next: number | null = null;
    for (const p of this.queue) {
      const key = targetKey(p.target);
      const resend = p.attempts > 0;
      if (blocked.has(key) || (resend && onlyNew.has(key))) continue;
      next = next === null ? p.due_ms : Math.min(next, p.due_ms);
      if (p.due_ms > 0) {
        if (p.in_flight) onlyNew.add(key);
        else blocked.add(key);
      }
    }
    return next;
  }
}
