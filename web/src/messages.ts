/**
 * The messages of the open conversation: the newest stored ones (more on request), then our
 * messages in the outbox (once it is on disk), then those the SDK gave up on; with the lines that are not
 * messages (history removed by retention, a history reset on the server, our removal from a
 * group) at their place. Each of our messages carries its state mark (see `status.ts`).
 *
 * Everything is read again from the store on each render: the store is the record, and a
 * message is keyed by (sender, cmid), so each shows once, moving from pending to stored in
 * place.
 */

import type { Message, Pending, SentSnapshot } from 'ordo-client';
import { h, reconcile, setAttrs, setText } from './dom';
import type { Failed, Notice } from './prefs';
import type { Session } from './session';
import { mark, ownState, type MarkState } from './status';

/** Messages read from the store at first, and added by each "show older". */
const PAGE = 200;

type Item =
  | { kind: 'message'; m: Message; state: MarkState | null }
  | { kind: 'pending'; p: Pending; conv: string }
  | { kind: 'failed'; f: Failed }
  | { kind: 'notice'; n: Notice; key: string };

function noticeText(n: Notice): string {
  switch (n.kind) {
    case 'history_gap':
      return n.from === n.to
        ? `Message ${n.from} was removed by the conversation's retention before this device got it.`
        : `Messages ${n.from} to ${n.to} were removed by the conversation's retention before this device got them.`;
    case 'epoch_reset':
      return `The server's history of this conversation was reset (epoch ${n.epoch}); its messages were fetched again.`;
    case 'removed':
      return n.left ? 'You left this group.' : 'You were removed from this group.';
  }
}

function noticeId(n: Notice): string {
  return n.kind === 'history_gap' ? 'history-gap' : n.kind === 'epoch_reset' ? 'epoch-reset' : 'removed-notice';
}

/** Where a notice sits among the seqs. */
function noticeAt(n: Notice): number {
  switch (n.kind) {
    case 'history_gap':
      return n.from - 0.5;
    case 'epoch_reset':
      return 0;
    case 'removed':
      return n.seq + 0.5;
  }
}

/** A record of a group change, in words. */
export function eventText(m: Message): string {
  const e = m.event!;
  switch (e.kind) {
    case 'joined':
      return `${e.users.join(', ')} joined`;
    case 'left':
      return `${e.users.join(', ')} left`;
    case 'removed':
      return `${e.users.join(', ')} ${e.users.length === 1 ? 'was' : 'were'} removed`;
    case 'renamed':
      return e.name === '' ? 'The group has no name now' : `The group was renamed "${e.name}"`;
  }
}

function time(ts: number): string {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

export class MessageView {
  readonly el = h('div', { class: 'messages', 'data-testid': 'message-list', role: 'log' });
  private readonly older = h('button', { class: 'older', 'data-testid': 'show-older', type: 'button', hidden: true }, 'Show older messages');
  private readonly list = h('div', { class: 'message-items' });
  private readonly empty = h('p', { class: 'empty', 'data-testid': 'no-messages', hidden: true }, 'No messages yet. Say hello!');
  private conv: string | null = null;
  private limit = PAGE;
  /** Stored messages by seq, as last rendered (for replies). */
  private bySeq = new Map<number, Message>();
  onReply: (seq: number, m: Message) => void = () => {};
  onRetry: (f: Failed) => void = () => {};
  onDismiss: (f: Failed) => void = () => {};

  constructor(private readonly session: Session) {
    this.el.append(this.older, this.list, this.empty);
    this.older.addEventListener('click', () => {
      this.limit += PAGE;
      void this.render(this.conv);
    });
  }

  /**
   * The highest seq of the open conversation the user can have seen: the last stored message
   * whose top is within the visible part of the list (`null`: none rendered). Scrolled to the
   * bottom, the last one.
   */
  seenUpTo(): number | null {
    const bottom = this.el.getBoundingClientRect().bottom;
    let seen: number | null = null;
    for (const el of this.list.querySelectorAll<HTMLElement>('[data-testid="message"][data-seq]')) {
      const seq = Number(el.dataset.seq);
      if (!Number.isInteger(seq) || seq <= 0) continue;
      if (el.getBoundingClientRect().top >= bottom) break;
      seen = seq;
    }
    return seen;
  }

  /** The stored message `seq` of the open conversation, if rendered. */
  message(seq: number): Message | undefined {
    return this.bySeq.get(seq);
  }

  async render(conv: string | null): Promise<void> {
    if (conv !== this.conv) {
      this.conv = conv;
      this.limit = PAGE;
      this.list.replaceChildren();
    }
    if (conv === null) {
      this.empty.hidden = true;
      this.older.hidden = true;
      return;
    }
    const s = this.session;
    const me = s.me();
    const [stored, sent] = await Promise.all([s.store.latest(conv, this.limit), s.store.sentStatuses()]);
    // The outbox after the store: a message leaves the outbox (in memory) before its new
    // status is written, so read the other way round it could be in neither.
    const outbox = s.pending();
    if (conv !== this.conv) return; // another conversation was opened meanwhile
    const sentBy = new Map<string, SentSnapshot>();
    for (const x of sent) if (x.conv === conv) sentBy.set(x.cmid, x);
    const inOutbox = new Set(outbox.map((p) => p.cmid));
    const storedOwn = new Set(stored.filter((m) => m.from === me).map((m) => m.cmid));
    this.bySeq = new Map(stored.map((m) => [m.seq, m]));

    const items: Item[] = [];
    const first = stored[0]?.seq ?? Infinity;
    const complete = stored.length < this.limit;
    const notices = s.prefs
      .notices(conv)
      .map((n, i) => ({ n, at: noticeAt(n), key: `n:${i}` }))
      .filter((x) => complete || x.at > first)
      .sort((a, b) => a.at - b.at);
    let ni = 0;
    for (const m of stored) {
      while (ni < notices.length && notices[ni]!.at < m.seq) {
        const x = notices[ni++]!;
        items.push({ kind: 'notice', n: x.n, key: x.key });
      }
      const state =
        m.from === me && m.event === undefined
          ? ownState(
              {
                cmid: m.cmid,
                device: m.device,
                inOutbox: inOutbox.has(m.cmid),
                stored: sentBy.get(m.cmid)?.status,
                heard: s.heard.get(m.cmid),
              },
              s.device,
            )
          : null;
      items.push({ kind: 'message', m, state });
    }
    for (; ni < notices.length; ni++) {
      const x = notices[ni]!;
      items.push({ kind: 'notice', n: x.n, key: x.key });
    }
    for (const p of outbox) {
      // `pending()` lists only messages whose send resolved: they are on disk.
      if (storedOwn.has(p.cmid)) continue;
      if ((await s.convOf(p.target)) === conv) items.push({ kind: 'pending', p, conv });
    }
    for (const f of s.failed(conv)) {
      if (!inOutbox.has(f.cmid) && !storedOwn.has(f.cmid)) items.push({ kind: 'failed', f });
    }
    if (conv !== this.conv) return;

    const atBottom = this.el.scrollHeight - this.el.scrollTop - this.el.clientHeight < 40;
    const wasEmpty = this.list.childElementCount === 0;
    this.older.hidden = complete;
    this.empty.hidden = items.length > 0;
    reconcile(
      this.list,
      items,
      (it) => this.key(it, me),
      (it) => (it.kind === 'notice' ? this.makeNotice() : this.makeMessage()),
      (el, it) => (it.kind === 'notice' ? this.updateNotice(el, it.n) : this.updateMessage(el, it, me)),
    );
    if (atBottom || wasEmpty) this.el.scrollTop = this.el.scrollHeight;
  }

  private key(it: Item, me: string): string {
    switch (it.kind) {
      case 'message':
        return `m:${it.m.from}/${it.m.cmid}`;
      case 'pending':
        return `m:${me}/${it.p.cmid}`;
      case 'failed':
        return `m:${me}/${it.f.cmid}`;
      case 'notice':
        return it.key;
    }
  }

  private makeNotice(): HTMLElement {
    return h('div', { class: 'notice', role: 'note' });
  }

  private updateNotice(el: HTMLElement, n: Notice): void {
    setAttrs(el, { 'data-testid': noticeId(n) });
    setText(el, noticeText(n));
  }

  private makeMessage(): HTMLElement {
    const el = h(
      'div',
      { class: 'msg', 'data-testid': 'message' },
      h(
        'div',
        { class: 'meta' },
        h('span', { class: 'from' }),
        ' ',
        h('span', { class: 'time' }),
        h('span', { class: 'actions' }),
      ),
      h('div', { class: 'quote', 'data-testid': 'reply-quote', hidden: true }),
      h('div', { class: 'body', 'data-testid': 'message-body' }),
      h('div', { class: 'foot', hidden: true }, h('span', { class: 'mark', 'data-testid': 'status-mark' })),
    );
    return el;
  }

  private updateMessage(el: HTMLElement, it: Exclude<Item, { kind: 'notice' }>, me: string): void {
    let from: string;
    let body: string;
    let seq: number | null = null;
    let cmid: string;
    let state: MarkState | null;
    let ts: number | null = null;
    let replyTo: number | null = null;
    let reason: string | null = null;
    let system = false;
    switch (it.kind) {
      case 'message':
        ({ from, body, seq, cmid, ts } = it.m);
        state = it.state;
        replyTo = it.m.reply_to ?? null;
        if (it.m.event !== undefined) {
          body = eventText(it.m);
          system = true;
        }
        break;
      case 'pending':
        from = me;
        body = it.p.body;
        cmid = it.p.cmid;
        state = 'pending';
        replyTo = it.p.reply_to;
        break;
      case 'failed':
        from = me;
        body = it.f.body;
        cmid = it.f.cmid;
        state = 'failed';
        reason = it.f.reason;
        break;
    }
    const own = from === me;
    setAttrs(el, {
      'data-seq': seq,
      'data-cmid': cmid,
      'data-from': from,
      'data-state': state,
      'data-event': it.kind === 'message' ? (it.m.event?.kind ?? null) : null,
    });
    el.classList.toggle('own', own);
    el.classList.toggle('system', system || (from === '' && !own));
    setText(el.querySelector('.from')!, own ? 'You' : from === '' ? 'system' : from);
    setText(el.querySelector('.time')!, ts === null ? '' : time(ts));
    setAttrs(el.querySelector('.time')!, { title: ts === null ? null : new Date(ts).toLocaleString() });
    setText(el.querySelector('.body')!, body);

    const quote = el.querySelector<HTMLElement>('.quote')!;
    if (replyTo === null) {
      quote.hidden = true;
    } else {
      const q = this.bySeq.get(replyTo);
      setText(quote, q === undefined ? `↪ message ${replyTo}` : `↪ ${q.from === me ? 'You' : q.from}: ${q.body}`);
      setAttrs(quote, { 'data-reply-to': replyTo });
      quote.hidden = false;
    }

    const markEl = el.querySelector<HTMLElement>('.mark')!;
    el.querySelector<HTMLElement>('.foot')!.hidden = state === null;
    if (state !== null) {
      const m = mark(state);
      setText(markEl, m.glyph);
      setAttrs(markEl, {
        class: `mark state-${state}`,
        title: state === 'failed' ? `Not sent: ${reason ?? 'unknown reason'}` : m.label,
        'aria-label': state === 'failed' ? `not sent: ${reason ?? ''}` : m.label,
      });
    }

    const actions = el.querySelector<HTMLElement>('.actions')!;
    const want = it.kind === 'failed' ? 'failed' : seq !== null && !system ? 'reply' : '';
    if (actions.dataset.kind !== want) {
      actions.dataset.kind = want;
      actions.replaceChildren();
      if (it.kind === 'failed') {
        const f = it.f;
        const retry = h('button', { type: 'button', class: 'link', 'data-testid': 'retry-button' }, 'Send again');
        const dismiss = h('button', { type: 'button', class: 'link', 'data-testid': 'dismiss-button' }, 'Dismiss');
        retry.addEventListener('click', () => this.onRetry(f));
        dismiss.addEventListener('click', () => this.onDismiss(f));
        actions.append(retry, dismiss);
      } else if (want === 'reply' && it.kind === 'message') {
        const m = it.m;
        const reply = h('button', { type: 'button', class: 'link', 'data-testid': 'reply-button' }, 'Reply');
        reply.addEventListener('click', () => this.onReply(m.seq, m));
        actions.append(reply);
      }
    }
  }
}
