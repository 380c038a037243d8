/**
 * A small helper to build DOM elements without a UI framework: `h('div', {class: 'x'}, ...)`.
 * Attributes whose value is `null`, `undefined` or `false` are left out; `true` sets an empty
 * attribute; children may be strings, nodes, or nothing.
 */

export type Attrs = Record<string, string | number | boolean | null | undefined>;
export type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return el;
}

/** Sets (or removes) each attribute, touching the DOM only where the value changes. */
export function setAttrs(el: Element, attrs: Attrs): void {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) {
      if (el.hasAttribute(k)) el.removeAttribute(k);
      continue;
    }
    const s = v === true ? '' : String(v);
    if (el.getAttribute(k) !== s) el.setAttribute(k, s);
  }
}

/** Sets an element's text, touching the DOM only if it changes. */
export function setText(el: Element, text: string): void {
  if (el.textContent !== text) el.textContent = text;
}

/**
 * Makes `parent`'s children exactly `items`, in order, reusing the element of each key: an
 * element keeps its place in the DOM (and focus, selection, scroll) when its key stays.
 */
export function reconcile<T>(
  parent: Element,
  items: T[],
  key: (item: T) => string,
  make: (item: T) => HTMLElement,
  update: (el: HTMLElement, item: T) => void,
): void {
  const existing = new Map<string, HTMLElement>();
  for (const child of Array.from(parent.children)) {
    const k = (child as HTMLElement).dataset.key;
    if (k !== undefined) existing.set(k, child as HTMLElement);
  }
  const wanted = new Set<string>();
  let at: Element | null = parent.firstElementChild;
  for (const item of items) {
    const k = key(item);
    wanted.add(k);
    let el = existing.get(k);
    if (el === undefined) {
      el = make(item);
      el.dataset.key = k;
    }
    update(el, item);
    if (el !== at) parent.insertBefore(el, at);
    else at = at.nextElementSibling;
  }
  for (const [k, el] of existing) if (!wanted.has(k)) el.remove();
}
