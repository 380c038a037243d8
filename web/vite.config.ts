/**
 * Builds the web app into `dist/` with fixed file names (`index.html`, `assets/app.js`,
 * `assets/app.css`, `sw.js`): the server embeds exactly these files, and `npm run check`
 * compares a fresh build with the committed one byte for byte, so nothing may carry a content
 * hash, a time or an absolute path. The SDK is bundled from its source (`ordo-client` is an
 * alias of `../sdk/typescript/src/index.ts`).
 */

import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

const sdk = fileURLToPath(new URL('../sdk/typescript/src/index.ts', import.meta.url));

export default defineConfig({
  base: '/',
  resolve: {
    alias: { 'ordo-client': sdk },
  },
  server: {
    // `npm run dev`: the page on Vite's port, the app pointed at a local `ordo serve`.
    fs: { allow: ['..'] },
  },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: false,
    cssCodeSplit: false,
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    reportCompressedSize: false,
    rolldownOptions: {
      output: {
        entryFileNames: 'assets/app.js',
        chunkFileNames: 'assets/[name].js',
        assetFileNames: (asset) =>
          asset.names.some((n) => n.endsWith('.css')) ? 'assets/app.css' : 'assets/[name][extname]',
      },
    },
  },
});
