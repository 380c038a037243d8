/*
 * Ordo web app's service worker: keeps the page's files (the page, app.js, app.css) so that a
 * reload works while the server cannot be reached. Network first: a server that answers always
 * wins (and refreshes the copy), so a rebuilt app is picked up at once; only a request that
 * fails, or gets no answer within a few seconds, is answered from the copy. Nothing else (the
 * API, the WebSocket) goes through it.
 */

const CACHE = 'ordo-app-v1';
const SHELL = ['/', '/assets/app.js', '/assets/app.css'];
const WAIT_MS = 4000;

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((c) => c.addAll(SHELL))
      .catch(() => undefined)
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(self.clients.claim());
});

function shellPath(request) {
  if (request.method !== 'GET') return null;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return null;
  if (url.pathname === '/index.html') return '/';
  return SHELL.includes(url.pathname) ? url.pathname : null;
}

async function networkFirst(request, path) {
  const cache = await caches.open(CACHE);
  try {
    const response = await Promise.race([
      fetch(request),
      new Promise((_, reject) => setTimeout(() => reject(new Error('no answer')), WAIT_MS)),
    ]);
    if (response.ok) await cache.put(path, response.clone());
    return response;
  } catch (err) {
    const copy = await cache.match(path);
    if (copy !== undefined) return copy;
    throw err;
  }
}

self.addEventListener('fetch', (event) => {
  const path = shellPath(event.request);
  if (path !== null) event.respondWith(networkFirst(event.request, path));
});
