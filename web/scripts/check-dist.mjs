// `npm run check`: builds the app into a temporary directory and compares it, file by file and
// byte by byte, with the committed `dist/` (which `ordo serve` embeds). Exits non-zero, naming
// the first files that differ, when `dist/` is not what the sources build to.

import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'vite';

const web = fileURLToPath(new URL('..', import.meta.url));
const committed = join(web, 'dist');
const fresh = mkdtempSync(join(tmpdir(), 'ordo-web-'));

function files(dir) {
  const out = [];
  const walk = (d) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.sort();
}

let problems = [];
try {
  await build({ root: web, logLevel: 'warn', build: { outDir: fresh, emptyOutDir: true } });
  let have = [];
  try {
    have = files(committed);
  } catch {
    problems.push('web/dist/ is missing');
  }
  const want = files(fresh);
  for (const f of want) {
    if (!have.includes(f)) problems.push(`web/dist/${f} is missing`);
    else if (!readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f)))) {
      problems.push(`web/dist/${f} differs from what the sources build to`);
    }
  }
  for (const f of have) if (!want.includes(f)) problems.push(`web/dist/${f} is not built from the sources any more`);
} finally {
  rmSync(fresh, { recursive: true, force: true });
}

if (problems.length > 0) {
  console.error(`web/dist is out of date:\n  ${problems.join('\n  ')}`);
  console.error('Run `npm run build` in web/ and commit web/dist.');
  process.exit(1);
}
console.log('web/dist matches the sources.');
