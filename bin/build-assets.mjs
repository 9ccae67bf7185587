#!/usr/bin/env node
// Copy the chart page's third-party assets from node_modules (installed by `npm ci` from the
// pinned package-lock.json) into the Python package, where the bridge serves them under
// /static/vendor/. The destination is git-ignored: third-party code is never committed, and the
// page never loads anything from a CDN (polyfan runs on closed networks).
//
// Run by bin/_bootstrap after `npm ci`; safe to run again (it overwrites the copies).
import { copyFileSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const vendor = join(root, "src", "polyfan", "web", "static", "vendor");

// [package, file inside the package, name under static/vendor/]
const assets = [
  [
    "lightweight-charts",
    "dist/lightweight-charts.standalone.production.js",
    "lightweight-charts.standalone.production.js",
  ],
  ["lightweight-charts", "LICENSE", "lightweight-charts.LICENSE.txt"],
];

mkdirSync(vendor, { recursive: true });
for (const [pkg, file, name] of assets) {
  const pkgDir = join(root, "node_modules", pkg);
  const source = join(pkgDir, file);
  if (!existsSync(source)) {
    console.error(`build-assets: ${source} is missing; run \`npm ci\` first`);
    process.exit(1);
  }
  copyFileSync(source, join(vendor, name));
  const { version } = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8"));
  console.error(`build-assets: ${pkg}@${version} ${file} -> src/polyfan/web/static/vendor/${name}`);
}
