/**
 * The state mark of each of our messages, from what the SDK says in three places that do not
 * move together: its outbox (`client.pending()`, in memory, updated first), its store's
 * `sentStatuses()` (our accepted messages not yet read by everyone, written next), and the
 * `status` events (emitted after the write, taken by the app later still). Rules:
 *
 * - in the outbox: pending;
 * - in `sentStatuses()`: the further of that and the last event (statuses only move forward);
 * - otherwise, stored and last heard of as pending: pending still (the server accepted it and
 *   the SDK is writing that down; the `sent` event follows);
 * - otherwise, stored: read by everyone (a read status leaves `sentStatuses()`), unless it was
 *   sent from another of our devices, whose statuses this device does not follow: then `sent`.
 */

import type { Status } from 'ordo-client';

export type MarkState = 'pending' | 'sent' | 'delivered' | 'read' | 'failed';

const RANK: Record<MarkState, number> = { pending: 0, sent: 1, delivered: 2, read: 3, failed: 4 };

/** The further of two states (`failed` is final). */
export function further(a: MarkState, b: MarkState | undefined): MarkState {
  if (b === undefined) return a;
  return RANK[b] > RANK[a] ? b : a;
}

export interface OwnMessageFacts {
  cmid: string;
  /** The sending device of the stored message. */
  device: string;
  inOutbox: boolean;
  /** From `sentStatuses()`, if listed there. */
  stored: Status | undefined;
  /** The last `status` event's state for this cmid, if any came. */
  heard: MarkState | undefined;
}

export function ownState(f: OwnMessageFacts, thisDevice: string): MarkState {
  if (f.inOutbox) return 'pending';
  if (f.stored !== undefined) return further(f.stored.state, f.heard);
  if (f.heard === 'pending') return 'pending';
  if (f.device !== thisDevice && f.heard === undefined) return 'sent';
  return 'read';
}

/** The glyph and its accessible label for a state. */
export function mark(state: MarkState): { glyph: string; label: string } {
  switch (state) {
    case 'pending':
      return { glyph: '◷', label: 'waiting to be sent' };
    case 'sent':
      return { glyph: '✓', label: 'sent: stored on the server' };
    case 'delivered':
      return { glyph: '✓✓', label: 'delivered to everyone' };
    case 'read':
      return { glyph: '✓✓', label: 'read by everyone' };
    case 'failed':
      return { glyph: '⚠', label: 'not sent' };
  }
}
