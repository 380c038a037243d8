/**
 * The chat screen of a signed-in device: the header (who is signed in, sign out), the offline
 * banner, the conversation list with its "new chat" field, and the open conversation with its
 * composer. Redraws are coalesced: a change asks for one, and a redraw that is asked for while
 * another runs follows it.
 */

import type { Message } from 'ordo-client';
import { Banner } from './banner';
import { ConvList, convTitle, summaries } from './convlist';
import { h, setText } from './dom';
import { MessageView } from './messages';
import { ID_RE, type Change, type Session } from './session';

export class ChatScreen {
  readonly el: HTMLElement;
  private readonly banner: Banner;
  private readonly list = new ConvList();
  private readonly view: MessageView;
  private readonly alert = h('div', { class: 'alert', 'data-testid': 'server-error', role: 'alert', hidden: true });
  private readonly title = h('h2', { class: 'conv-heading', 'data-testid': 'conv-heading' });
  private readonly newChat = h('input', {
    type: 'text',
    'data-testid': 'new-chat-input',
    placeholder: 'user id',
    'aria-label': 'Start a chat with user',
    autocomplete: 'off',
    spellcheck: false,
  });
  private readonly newChatError = h('p', { class: 'error', 'data-testid': 'new-chat-error', hidden: true });
  private readonly input = h('textarea', {
    'data-testid': 'composer-input',
    rows: 2,
    placeholder: 'Write a message',
    'aria-label': 'Message',
  });
  private readonly sendButton = h('button', { type: 'submit', 'data-testid': 'send-button' }, 'Send');
  private readonly sendError = h('p', { class: 'error', 'data-testid': 'send-error', hidden: true });
  private readonly replying = h('div', { class: 'replying', 'data-testid': 'replying', hidden: true });
  private readonly composer: HTMLFormElement;
  private readonly pane: HTMLElement;
  private open: string | null = null;
  private replyTo: number | null = null;
  /** Conversations whose messages changed since the last redraw (`null`: all). */
  private dirty: Set<string> | null = new Set();
  private drawing = false;
  private again = false;
  private timer: ReturnType<typeof setInterval> | null = null;
  private alertTimer: ReturnType<typeof setTimeout> | null = null;
  onSignOut: () => void = () => {};

  constructor(private readonly session: Session) {
    this.banner = new Banner(session);
    this.view = new MessageView(session);
    // Scrolling down to messages not seen yet reads them.
    this.view.el.addEventListener('scroll', () => {
      if (this.open !== null) this.changed({ convs: new Set([this.open]), connection: false });
    });
    const signOut = h('button', { type: 'button', class: 'link', 'data-testid': 'sign-out' }, 'Sign out');
    signOut.addEventListener('click', () => this.onSignOut());

    const newChatForm = h(
      'form',
      { class: 'new-chat', 'data-testid': 'new-chat' },
      this.newChat,
      h('button', { type: 'submit', 'data-testid': 'new-chat-button' }, 'Chat'),
    );
    newChatForm.addEventListener('submit', (e) => {
      e.preventDefault();
      void this.startChat();
    });

    this.composer = h('form', { class: 'composer', 'data-testid': 'composer' }, this.input, this.sendButton);
    this.composer.addEventListener('submit', (e) => {
      e.preventDefault();
      void this.send();
    });
    this.input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        void this.send();
      }
    });
    this.replying.addEventListener('click', () => this.setReply(null));

    this.pane = h(
      'section',
      { class: 'pane', 'data-testid': 'conversation', hidden: true },
      this.title,
      this.view.el,
      this.replying,
      this.sendError,
      this.composer,
    );
    const placeholder = h('section', { class: 'pane placeholder', 'data-testid': 'no-conversation' }, 'Pick a conversation, or start one with a user id.');
    this.el = h(
      'div',
      { class: 'chat', 'data-testid': 'chat' },
      h(
        'header',
        { class: 'top' },
        h('h1', {}, 'Ordo'),
        h('span', { class: 'me', 'data-testid': 'me' }, `${session.user} · ${session.device}`),
        signOut,
      ),
      this.banner.el,
      this.alert,
      h(
        'div',
        { class: 'main' },
        h('nav', { class: 'sidebar' }, newChatForm, this.newChatError, this.list.el),
        placeholder,
        this.pane,
      ),
    );
    this.list.onOpen = (conv) => this.openConv(conv);
    this.view.onReply = (seq, m) => this.setReply(seq, m);
    this.view.onRetry = (f) => {
      this.session.prefs.dismissFailed(f.cmid);
      void this.session
        .send(f.conv, f.body)
        .catch((e) => this.showSendError(e))
        .finally(() => this.changed({ convs: new Set([f.conv]), connection: false }));
    };
    this.view.onDismiss = (f) => {
      this.session.prefs.dismissFailed(f.cmid);
      this.changed({ convs: new Set([f.conv]), connection: false });
    };

    session.onChange = (c) => this.changed(c);
    session.onAlert = (a) => this.showAlert(`${a.code}: ${a.message}`);
    document.addEventListener('visibilitychange', this.onVisible);
    window.addEventListener('focus', this.onVisible);
    // The banner's countdown, and anything the SDK did without an event (a retry scheduled).
    this.timer = setInterval(() => this.banner.render(), 500);
    const last = session.prefs.lastOpen();
    if (last !== null) this.openConv(last);
    this.changed({ convs: null, connection: true });
  }

  private readonly onVisible = (): void => {
    if (this.open !== null) this.changed({ convs: new Set([this.open]), connection: false });
  };

  /** Stops timers and listeners (the session is closed by the caller). */
  dispose(): void {
    if (this.timer !== null) clearInterval(this.timer);
    if (this.alertTimer !== null) clearTimeout(this.alertTimer);
    document.removeEventListener('visibilitychange', this.onVisible);
    window.removeEventListener('focus', this.onVisible);
    this.session.onChange = () => {};
    this.session.onAlert = () => {};
  }

  private openConv(conv: string): void {
    if (this.open !== conv) this.setReply(null);
    this.open = conv;
    this.session.prefs.setLastOpen(conv);
    this.pane.hidden = false;
    this.el.querySelector<HTMLElement>('.placeholder')!.hidden = true;
    this.pane.dataset.conv = conv;
    setText(this.title, convTitle(this.session, conv));
    this.title.title = conv;
    this.changed({ convs: null, connection: false });
    this.input.focus();
  }

  private changed(c: Change): void {
    if (c.convs === null || this.dirty === null) this.dirty = null;
    else for (const conv of c.convs) this.dirty.add(conv);
    if (c.connection) this.banner.render();
    this.redraw();
  }

  private redraw(): void {
    if (this.drawing) {
      this.again = true;
      return;
    }
    this.drawing = true;
    void (async () => {
      do {
        this.again = false;
        const dirty = this.dirty;
        this.dirty = new Set();
        try {
          await this.draw(dirty);
        } catch (e) {
          console.error('ordo: redraw failed', e);
          this.showAlert(`cannot read the local store: ${(e as Error).message}`);
        }
      } while (this.again);
      // In the same turn as the last check of `again`: a change from now on starts a redraw.
      this.drawing = false;
    })();
  }

  /** Marks read what the user can see of the open conversation. */
  private markSeen(): void {
    const seen = this.view.seenUpTo();
    if (this.open !== null && seen !== null) this.session.markRead(this.open, seen);
  }

  private async draw(dirty: Set<string> | null): Promise<void> {
    const open = this.open;
    if (open !== null) {
      await this.session.conversations();
      if (dirty === null || dirty.has(open)) await this.view.render(open);
      // Read: what of the open conversation is on screen, before the list counts it.
      this.markSeen();
    }
    this.list.render(await summaries(this.session), open);
    if (open !== null) {
      setText(this.title, convTitle(this.session, open));
      const out = this.session.isRemoved(open);
      this.input.disabled = out;
      this.sendButton.disabled = out;
      this.input.placeholder = out ? 'You are no longer a member of this group' : 'Write a message';
    }
    this.banner.render();
  }

  private async startChat(): Promise<void> {
    const other = this.newChat.value.trim();
    const fail = (why: string): void => {
      setText(this.newChatError, why);
      this.newChatError.hidden = false;
    };
    if (!ID_RE.test(other)) {
      fail('A user id is 1 to 128 letters, digits or . _ - @ :');
      return;
    }
    if (other === this.session.me()) {
      fail('That is you: give the id of someone else.');
      return;
    }
    try {
      const conv = await this.session.openDirect(other);
      this.newChatError.hidden = true;
      this.newChat.value = '';
      this.openConv(conv);
    } catch (e) {
      fail(`Cannot open the chat: ${(e as Error).message}`);
    }
  }

  private setReply(seq: number | null, m?: Message): void {
    this.replyTo = seq;
    if (seq === null) {
      this.replying.hidden = true;
      return;
    }
    setText(this.replying, `Replying to ${m?.from === this.session.me() ? 'yourself' : (m?.from ?? '')}: ${m?.body ?? ''} ✕`);
    this.replying.dataset.seq = String(seq);
    this.replying.title = 'Click to cancel the reply';
    this.replying.hidden = false;
    this.input.focus();
  }

  private async send(): Promise<void> {
    const conv = this.open;
    const body = this.input.value;
    if (conv === null || body.trim() === '') return;
    const replyTo = this.replyTo ?? undefined;
    this.input.value = '';
    this.setReply(null);
    try {
      await this.session.send(conv, body, replyTo);
      this.sendError.hidden = true;
    } catch (e) {
      // Not in the outbox: give the text back.
      if (this.input.value === '') this.input.value = body;
      this.showSendError(e);
    }
    this.changed({ convs: new Set([conv]), connection: false });
  }

  private showSendError(e: unknown): void {
    setText(this.sendError, `Not sent: ${(e as Error).message}`);
    this.sendError.hidden = false;
  }

  private showAlert(text: string): void {
    setText(this.alert, text);
    this.alert.hidden = false;
    if (this.alertTimer !== null) clearTimeout(this.alertTimer);
    this.alertTimer = setTimeout(() => (this.alert.hidden = true), 8000);
  }
}
