#!/usr/bin/env node
// Test OpenID provider for caregate's end-to-end tests, built on panva's
// oidc-provider (MIT, installed from the npm registry). Test use only.
//
//   node server.mjs --port N --keys KEYS.json --clients CLIENTS.json [--ttl SECONDS]
//
// Issuer is http://127.0.0.1:N. Only the client_credentials grant is used; access
// tokens are RS256 (or ES256) JWTs (typ at+jwt) for the audience
// https://gateway.test/fhir (unless another `resource` is requested), with each client's extra_claims merged in. The
// first key in KEYS.json signs; all keys are published at /jwks.
// Prints "READY <issuer>" on stdout once listening; exits 0 on SIGTERM/SIGINT.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import Provider from 'oidc-provider';

const AUDIENCE = 'https://gateway.test/fhir';

const { values: opt } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.PORT },
    keys: { type: 'string', default: process.env.KEYS },
    clients: { type: 'string', default: process.env.CLIENTS },
    ttl: { type: 'string', default: process.env.TOKEN_TTL ?? '3600' },
  },
});
if (!opt.port || !opt.keys || !opt.clients) {
  console.error('usage: node server.mjs --port N --keys KEYS.json --clients CLIENTS.json [--ttl SECONDS]');
  process.exit(2);
}

const readJson = (file) => JSON.parse(readFileSync(file, 'utf8'));
const { keys } = readJson(opt.keys);
const clients = readJson(opt.clients);
const issuer = `http://127.0.0.1:${opt.port}`;

// The first key signs. Its alg comes from the JWK ("alg"), else from its type.
const signingKey = keys[0];
const signingAlg = signingKey.alg ?? (signingKey.kty === 'EC' ? 'ES256' : 'RS256');

const extraClaims = new Map(clients.map((c) => [c.client_id, c.extra_claims ?? {}]));
// Every scope some client may hold must be a scope the provider knows about.
const allScopes = new Set(clients.flatMap((c) => (c.scope ?? '').split(' ').filter(Boolean)));

const provider = new Provider(issuer, {
  jwks: { keys },
  clients: clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    scope: c.scope,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic', // client_secret_post is accepted too
    id_token_signed_response_alg: signingAlg, // else an ES256-only key set is refused
  })),
  scopes: ['openid', ...allScopes],
  cookies: { keys: ['caregate-oidc-test-peer'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // No `resource` parameter in the token request -> aud is AUDIENCE.
      defaultResource: async () => AUDIENCE,
      // An explicit `resource=X` is accepted and gives aud X (for wrong-audience
      // tests). The token's scope is the requested scope filtered by this list,
      // i.e. by the scope registered for the client.
      getResourceServerInfo: async (ctx, resource, client) => ({
        scope: client.scope ?? '',
        audience: resource,
        accessTokenTTL: Number(opt.ttl),
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: signingAlg, kid: signingKey.kid } },
      }),
    },
  },
  extraTokenClaims: async (ctx, token) => extraClaims.get(token.clientId),
});

provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description ?? ''));

const server = createServer(provider.callback());
server.listen(Number(opt.port), '127.0.0.1', () => console.log(`READY ${issuer}`));

const stop = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
