/**
 * The offline banner: shown whenever the client is not connected, saying why (the SDK's
 * reason), when it tries again, and how many messages wait in the outbox meanwhile.
 */

import { h, setAttrs, setText } from './dom';
import type { Session } from './session';

export class Banner {
  readonly el = h('div', { class: 'banner', 'data-testid': 'offline-banner', role: 'status', hidden: true });
  private readonly text = h('span', { class: 'banner-text', 'data-testid': 'offline-reason' });
  private readonly retry = h('span', { class: 'banner-retry', 'data-testid': 'offline-retry' });

  constructor(private readonly session: Session) {
    this.el.append(this.text, ' ', this.retry);
  }

  render(): void {
    const { state: c, since } = this.session.connection();
    setAttrs(this.el, { hidden: c.state === 'connected', 'data-state': c.state });
    const waiting = this.session.pending().length;
    const queued =
      waiting === 0 ? '' : ` ${waiting} message${waiting === 1 ? '' : 's'} will be sent once connected.`;
    switch (c.state) {
      case 'connected':
        setText(this.text, '');
        setText(this.retry, '');
        return;
      case 'connecting':
        setText(this.text, `Connecting to ${c.url}…${queued}`);
        setText(this.retry, '');
        return;
      case 'retrying': {
        setText(this.text, `Offline: ${c.reason}.${queued}`);
        if (navigator.onLine === false) {
          setText(this.retry, 'Waiting for the network.');
        } else {
          const left = Math.max(0, Math.ceil((since + c.retryInMs - Date.now()) / 1000));
          setText(this.retry, left > 0 ? `Retrying in ${left} s.` : 'Retrying now…');
        }
        return;
      }
      case 'stopped':
        setText(this.text, `Disconnected: ${c.reason}.${queued}`);
        setText(
          this.retry,
          c.unauthorized ? 'Sign out, then sign in with a new token.' : 'Sign out and sign in again to retry.',
        );
        return;
    }
  }
}
