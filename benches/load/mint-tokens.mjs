// Makes the RS256 key, its JWKS and public PEM, and N distinct tokens for the load harness, with
// Node's built-in crypto (OpenSSL underneath): `node mint-tokens.mjs <dir> <count>...`.
// Writes <dir>/jwt-pub.pem, <dir>/jwks.json and <dir>/tokens-<count>.txt for each count.
// With BENCH_PATIENT set, every token also carries that `patient` claim (a patient context, for
// the gateways whose issuer maps it).
import { generateKeyPairSync, sign, verify } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

const ISSUER = "https://idp.bench.example";
const AUDIENCE = "caregate-bench";
const KID = "bench-1";

const [dir, ...counts] = process.argv.slice(2);
if (!dir || counts.length === 0) {
  console.error("usage: node mint-tokens.mjs <dir> <count>...");
  process.exit(2);
}
const { publicKey, privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
writeFileSync(join(dir, "jwt-pub.pem"), publicKey.export({ type: "spki", format: "pem" }));
const jwk = publicKey.export({ format: "jwk" });
writeFileSync(join(dir, "jwks.json"), JSON.stringify({ keys: [{ ...jwk, kid: KID, use: "sig", alg: "RS256" }] }));

const b64u = (buf) => Buffer.from(buf).toString("base64url");
const header = b64u(JSON.stringify({ alg: "RS256", typ: "JWT", kid: KID }));
const now = Math.floor(Date.now() / 1000);
function token(i) {
  const claims = {
    iss: ISSUER,
    aud: AUDIENCE,
    sub: `user-${String(i).padStart(5, "0")}`,
    iat: now,
    exp: now + 7200,
    scope: "user/*.rs",
    roles: ["clinician"],
    tenant: "st-mary",
    ...(process.env.BENCH_PATIENT ? { patient: process.env.BENCH_PATIENT } : {}),
  };
  const input = `${header}.${b64u(JSON.stringify(claims))}`;
  return `${input}.${b64u(sign("sha256", Buffer.from(input), privateKey))}`;
}
// One self-check, so a wrong signer fails here and not as a run of 401s.
const probe = token(0).split(".");
if (!verify("sha256", Buffer.from(`${probe[0]}.${probe[1]}`), publicKey, Buffer.from(probe[2], "base64url"))) {
  console.error("minted token does not verify");
  process.exit(1);
}
for (const c of counts.map(Number)) {
  const lines = [];
  for (let i = 0; i < c; i++) lines.push(token(i));
  writeFileSync(join(dir, `tokens-${c}.txt`), lines.join("\n") + "\n");
}
