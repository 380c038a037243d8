/**
 * The entry point: signs in with the remembered token (or shows the sign-in screen), and
 * switches between the two screens. A service worker (`public/sw.js`) keeps the page's three
 * files, so that a reload works while the server cannot be reached: messages written then
 * wait in the SDK's outbox, on disk, and go out once it is back.
 */

import './style.css';
import { ChatScreen } from './chat';
import { forgetToken, saveSignIn, savedSignIn, savedUrl } from './prefs';
import { Session } from './session';
import { SignInScreen } from './signin';

const root = document.getElementById('app')!;
let current: { session: Session; screen: ChatScreen } | null = null;

async function startSession(token: string, url: string): Promise<void> {
  const session = await Session.open(token, url);
  saveSignIn({ token, url });
  const screen = new ChatScreen(session);
  screen.onSignOut = () => void signOut();
  current = { session, screen };
  root.replaceChildren(screen.el);
}

async function signOut(): Promise<void> {
  const c = current;
  current = null;
  forgetToken();
  showSignIn();
  if (c !== null) {
    c.screen.dispose();
    await c.session.close().catch((e) => console.error('ordo: closing the session failed', e));
  }
}

function showSignIn(prefill: { token?: string; error?: string } = {}): void {
  const screen = new SignInScreen(prefill);
  screen.onSubmit = (r) => startSession(r.token, r.url);
  root.replaceChildren(screen.el);
}

async function boot(): Promise<void> {
  const saved = savedSignIn();
  if (saved === null) {
    showSignIn();
    return;
  }
  try {
    await startSession(saved.token, saved.url || savedUrl());
  } catch (e) {
    showSignIn({ token: saved.token, error: `Cannot resume the session: ${(e as Error).message}` });
  }
}

if ('serviceWorker' in navigator && window.isSecureContext) {
  navigator.serviceWorker.register('/sw.js').catch((e) => console.warn('ordo: no offline reload:', e));
}
void boot();
