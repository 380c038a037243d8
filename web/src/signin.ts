/**
 * The sign-in screen: a token (from `ordo token` or the app's backend) and the server's URL,
 * which defaults to the server the page came from. Before the token is kept, the server is
 * asked whether it takes it (`GET /v1/me`); a server that cannot be reached does not stop the
 * sign-in (the app works offline, and connects when it can).
 */

import { h, setText } from './dom';
import { pageServerUrl, savedUrl } from './prefs';

export interface SignInRequest {
  token: string;
  url: string;
}

/** The HTTP base of a WebSocket base URL (the first of a comma-separated list). */
function httpBase(url: string): string {
  const first = url.split(',')[0]!.trim().replace(/\/+$/, '');
  return first.replace(/^ws(s?):\/\//i, 'http$1://');
}

/**
 * Why the server refuses `token`, or `null` when it takes it or cannot be asked (down,
 * offline, not an Ordo server): then the client finds out when it connects.
 */
export async function tokenRefusal(token: string, url: string): Promise<string | null> {
  try {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 5000);
    const resp = await fetch(`${httpBase(url)}/v1/me`, {
      headers: { authorization: `Bearer ${token}` },
      signal: ctrl.signal,
    });
    clearTimeout(timer);
    if (resp.status !== 401) return null;
    const body = (await resp.json().catch(() => null)) as { error?: { message?: string } } | null;
    return body?.error?.message ?? 'the server refused the token';
  } catch {
    return null;
  }
}

export class SignInScreen {
  readonly el: HTMLElement;
  private readonly token = h('textarea', {
    'data-testid': 'token-input',
    rows: 3,
    placeholder: 'token from `ordo token --user alice --device laptop`',
    'aria-label': 'Token',
    spellcheck: false,
    autocomplete: 'off',
  });
  private readonly url = h('input', {
    type: 'text',
    'data-testid': 'server-url-input',
    'aria-label': 'Server URL',
    spellcheck: false,
    autocomplete: 'off',
  });
  private readonly button = h('button', { type: 'submit', 'data-testid': 'sign-in' }, 'Sign in');
  private readonly error = h('p', { class: 'error', 'data-testid': 'sign-in-error', role: 'alert', hidden: true });
  onSubmit: (r: SignInRequest) => Promise<void> = async () => {};

  constructor(prefill: { token?: string; error?: string } = {}) {
    this.url.value = savedUrl();
    this.token.value = prefill.token ?? '';
    const form = h(
      'form',
      { class: 'signin', 'data-testid': 'sign-in-form' },
      h('h1', {}, 'Ordo'),
      h('label', {}, 'Token', this.token),
      h('label', {}, 'Server', this.url),
      h('p', { class: 'hint' }, `This page's server is ${pageServerUrl()}.`),
      this.error,
      this.button,
    );
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      void this.submit();
    });
    this.el = h('main', { class: 'signin-screen' }, form);
    if (prefill.error !== undefined) this.showError(prefill.error);
  }

  showError(text: string): void {
    setText(this.error, text);
    this.error.hidden = false;
  }

  private async submit(): Promise<void> {
    const token = this.token.value.trim();
    const url = this.url.value.trim() || pageServerUrl();
    if (token === '') {
      this.showError('Paste a token: `ordo token --data DIR --user alice --device laptop` prints one.');
      return;
    }
    this.button.disabled = true;
    this.error.hidden = true;
    try {
      const refused = await tokenRefusal(token, url);
      if (refused !== null) {
        this.showError(`The server refused this token: ${refused}`);
        return;
      }
      await this.onSubmit({ token, url });
    } catch (e) {
      this.showError((e as Error).message);
    } finally {
      this.button.disabled = false;
    }
  }
}
