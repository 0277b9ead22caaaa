#!/usr/bin/env node
// Generate a private JWKS for server.mjs (test keys only, never for production).
//
//   node gen-keys.mjs [--alg RS256|ES256] [--kid KID] [--out FILE]
//       new set with one fresh key -> FILE (default: stdout)
//   node gen-keys.mjs --add-to FILE [--out FILE2]
//       rotation: fresh key prepended to the keys in FILE (new key first, old
//       keys kept) -> written back to FILE in place, or to FILE2 if given
//   --only-new    write only the fresh key (drop the existing ones)
//   node gen-keys.mjs --retire-old FILE [--out FILE2]
//       end of rotation: keep only the first (newest) key of FILE, no new key
//
// The new key's kid is printed on stderr.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values: opt } = parseArgs({
  options: {
    alg: { type: 'string', default: 'RS256' },
    kid: { type: 'string' },
    out: { type: 'string' },
    'add-to': { type: 'string' },
    'only-new': { type: 'boolean', default: false },
    'retire-old': { type: 'string' },
  },
});

const readSet = (file) => JSON.parse(readFileSync(file, 'utf8')).keys;
const write = (file, keys) => {
  const text = `${JSON.stringify({ keys }, null, 2)}\n`;
  if (file) writeFileSync(file, text, { mode: 0o600 });
  else process.stdout.write(text);
};

if (opt['retire-old']) {
  const [newest] = readSet(opt['retire-old']);
  write(opt.out ?? opt['retire-old'], [newest]);
  process.stderr.write(`kept kid ${newest.kid}\n`);
  process.exit(0);
}

function newKey(alg, kid) {
  const { privateKey } = alg === 'ES256'
    ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : alg === 'RS256'
      ? generateKeyPairSync('rsa', { modulusLength: 2048 })
      : (() => { throw new Error(`unsupported --alg ${alg} (RS256 or ES256)`); })();
  return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
}

const key = newKey(opt.alg, opt.kid ?? `${opt.alg.toLowerCase()}-${randomUUID()}`);
const existing = opt['add-to'] && !opt['only-new'] ? readSet(opt['add-to']) : [];
write(opt.out ?? opt['add-to'], [key, ...existing]);
process.stderr.write(`new kid ${key.kid}\n`);
