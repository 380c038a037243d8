/**
 * The conversation list: every conversation the device's store knows, plus those opened or
 * written to but with nothing stored yet, most recent first, each with its unread count: the
 * stored messages past this device's read position that someone else wrote (our own, and
 * records of group changes, are not counted).
 */

import { h, reconcile, setAttrs, setText } from './dom';
import { eventText } from './messages';
import type { Session } from './session';

export interface ConvSummary {
  conv: string;
  title: string;
  preview: string;
  /** For ordering: the last message's time, or now for a conversation with pending ones. */
  activity: number;
  unread: number;
}

/** Unread messages are counted one by one up to this many; past them, every seq counts. */
const COUNT_LIMIT = 1000;

/** The name a conversation is shown by. */
export function convTitle(session: Session, conv: string): string {
  if (!conv.startsWith('d_')) return conv;
  const peer = session.prefs.peers()[conv];
  return peer ?? `direct ${conv.slice(2, 10)}…`;
}

export async function summaries(session: Session): Promise<ConvSummary[]> {
  const { store } = session;
  const me = session.me();
  const rows = new Map((await session.conversations()).map((r) => [r.conv, r]));
  const pendingAt = new Map<string, number>();
  for (const p of session.pending()) pendingAt.set(await session.convOf(p.target), Date.now());
  const ids = new Set<string>([...rows.keys(), ...session.prefs.opened(), ...pendingAt.keys()]);
  for (const f of session.prefs.failed()) ids.add(f.conv);
  const out: ConvSummary[] = [];
  for (const conv of ids) {
    const row = rows.get(conv);
    const contiguous = row?.contiguous ?? 0;
    const read = session.readPosition(conv);
    let unread = 0;
    if (contiguous > read) {
      const limit = Math.min(contiguous - read, COUNT_LIMIT);
      const after = await store.history(conv, read, limit);
      unread = after.filter((m) => m.from !== me && m.event === undefined).length;
      // Past the ones counted (a range removed by retention holds nothing to count).
      const last = after[after.length - 1];
      if (after.length === limit && last !== undefined) unread += Math.max(0, contiguous - last.seq);
    }
    const last = (await store.latest(conv, 1))[0];
    const preview =
      last === undefined
        ? ''
        : last.event !== undefined
          ? eventText(last)
          : `${last.from === me ? 'You' : last.from || 'system'}: ${last.body}`;
    out.push({
      conv,
      title: convTitle(session, conv),
      preview,
      activity: pendingAt.get(conv) ?? last?.ts ?? 0,
      unread,
    });
  }
  out.sort((a, b) => b.activity - a.activity || (a.conv < b.conv ? -1 : 1));
  return out;
}

export class ConvList {
  readonly el = h('ul', { class: 'conv-list', 'data-testid': 'conv-list' });
  onOpen: (conv: string) => void = () => {};

  render(items: ConvSummary[], open: string | null): void {
    reconcile(
      this.el,
      items,
      (c) => c.conv,
      (c) => {
        const li = h(
          'li',
          { class: 'conv-item', 'data-testid': 'conv-item', 'data-conv': c.conv, tabindex: 0, role: 'button' },
          h('span', { class: 'conv-title', 'data-testid': 'conv-title' }),
          h('span', { class: 'unread', 'data-testid': 'unread' }),
          h('span', { class: 'conv-preview' }),
        );
        li.addEventListener('click', () => this.onOpen(c.conv));
        li.addEventListener('keydown', (e) => {
          if (e.key === 'Enter' || e.key === ' ') this.onOpen(c.conv);
        });
        return li;
      },
      (el, c) => {
        setAttrs(el, { 'aria-current': c.conv === open ? 'true' : null, title: c.conv });
        el.classList.toggle('open', c.conv === open);
        setText(el.querySelector('.conv-title')!, c.title);
        const badge = el.querySelector('.unread')!;
        setText(badge, String(c.unread));
        setAttrs(badge, { hidden: c.unread === 0, 'aria-label': `${c.unread} unread` });
        setText(el.querySelector('.conv-preview')!, c.preview);
      },
    );
  }
}
