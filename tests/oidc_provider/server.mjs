// A Keycloak-shaped OpenID Connect provider for Concord's identity integration tests.
//
// Keycloak itself cannot be installed here, so this wraps oidc-provider@9 so that it looks
// like one Keycloak realm to python-keycloak and to Concord's token verifier:
//
//   issuer       http://127.0.0.1:PORT/realms/<realm>
//   discovery    GET  /realms/<realm>/.well-known/openid-configuration
//   token        POST /realms/<realm>/protocol/openid-connect/token   (client_credentials)
//   jwks         GET  /realms/<realm>/protocol/openid-connect/certs
//   realm info   GET  /realms/<realm>   -> {"realm": ..., "public_key": <base64 DER SPKI>}
//
// Access tokens are RS256 JWTs with Keycloak's claim shape: aud = the API audience,
// azp = client id, typ = "Bearer", nbf = iat, realm_access.roles and an organisation claim
// taken from the clients file.
//
// Usage:
//   node server.mjs --clients clients.json [--port 0] [--host 127.0.0.1] [--realm consortium]
//                   [--audience concord-api] [--access-token-ttl 300] [--exit-on-stdin-close]
//                   [--tls-cert cert.pem --tls-key key.pem]
//
// With --tls-cert and --tls-key it serves HTTPS (as Keycloak does in production) and the
// issuer is https://...
//
// clients.json is either a list of clients or {"clients": [...]}; each client is
//   {"client_id": "...", "client_secret": "...", "roles": ["researcher"],
//    "organisation": "hospital-a" | null, "access_token_ttl": 2 (optional, seconds)}
//
// With --port 0 the OS picks a free port. When the provider is listening, one line is
// written to stdout:  CONCORD-OIDC-READY {"issuer": "...", "port": N}
// The process exits on SIGTERM / SIGINT, and with --exit-on-stdin-close also when stdin
// closes (so it cannot outlive a test run whose parent was killed).

import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const READY_PREFIX = 'CONCORD-OIDC-READY';

function fail(message) {
  process.stderr.write(`oidc test provider: ${message}\n`);
  process.exit(2);
}

function parseOptions() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      host: { type: 'string', default: '127.0.0.1' },
      realm: { type: 'string', default: 'consortium' },
      audience: { type: 'string', default: 'concord-api' },
      clients: { type: 'string' },
      'access-token-ttl': { type: 'string', default: '300' },
      'exit-on-stdin-close': { type: 'boolean', default: false },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
    },
    strict: true,
  });
  if (!values.clients) fail('--clients <file.json> is required');
  if (Boolean(values['tls-cert']) !== Boolean(values['tls-key'])) {
    fail('--tls-cert and --tls-key go together');
  }
  const port = Number(values.port);
  const ttl = Number(values['access-token-ttl']);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`bad --port ${values.port}`);
  if (!Number.isInteger(ttl) || ttl < 1) fail(`bad --access-token-ttl ${values['access-token-ttl']}`);
  return { ...values, port, accessTokenTtl: ttl };
}

function loadClients(path, defaultTtl) {
  let raw;
  try {
    raw = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    fail(`cannot read clients file ${path}: ${error.message}`);
  }
  const list = Array.isArray(raw) ? raw : raw?.clients;
  if (!Array.isArray(list) || list.length === 0) fail(`${path} defines no clients`);
  const byId = new Map();
  for (const entry of list) {
    if (typeof entry?.client_id !== 'string' || typeof entry?.client_secret !== 'string') {
      fail(`every client needs a string client_id and client_secret (${path})`);
    }
    if (byId.has(entry.client_id)) fail(`duplicate client_id ${entry.client_id}`);
    const ttl = entry.access_token_ttl ?? defaultTtl;
    if (!Number.isInteger(ttl) || ttl < 1) fail(`bad access_token_ttl for ${entry.client_id}`);
    byId.set(entry.client_id, {
      secret: entry.client_secret,
      roles: Array.isArray(entry.roles) ? entry.roles.map(String) : [],
      organisation: entry.organisation ?? null,
      ttl,
    });
  }
  return byId;
}

function signingKey() {
  const { privateKey, publicKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  const publicJwk = publicKey.export({ format: 'jwk' });
  // RFC 7638 thumbprint as kid, like a real issuer would publish a stable key id.
  const thumbprint = crypto
    .createHash('sha256')
    .update(JSON.stringify({ e: publicJwk.e, kty: 'RSA', n: publicJwk.n }))
    .digest('base64url');
  return {
    jwk: { ...jwk, kid: thumbprint, use: 'sig', alg: 'RS256' },
    spkiBase64: publicKey.export({ type: 'spki', format: 'der' }).toString('base64'),
  };
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

function buildProvider({ issuer, audience, clients, key }) {
  // A resource indicator must be an absolute URI; Keycloak's audience is a bare client id,
  // so the resource server is identified by a URN and sets the token audience explicitly.
  const resourceIndicator = `urn:concord:resource:${audience}`;
  const provider = new Provider(issuer, {
    clients: [...clients].map(([clientId, client]) => ({
      client_id: clientId,
      client_secret: client.secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    })),
    jwks: { keys: [key.jwk] },
    routes: {
      token: '/protocol/openid-connect/token',
      jwks: '/protocol/openid-connect/certs',
      userinfo: '/protocol/openid-connect/userinfo',
      authorization: '/protocol/openid-connect/auth',
      end_session: '/protocol/openid-connect/logout',
      revocation: '/protocol/openid-connect/revoke',
      introspection: '/protocol/openid-connect/token/introspect',
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resourceIndicator,
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, indicator) => {
          if (indicator !== resourceIndicator) {
            throw new Provider.errors.InvalidTarget(`unknown resource ${indicator}`);
          }
          return {
            audience,
            scope: 'openid profile roles',
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    ttl: {
      ClientCredentials: (_ctx, _token, client) => clients.get(client.clientId)?.ttl ?? 300,
    },
    extraTokenClaims: (_ctx, token) => {
      const client = clients.get(token.clientId);
      if (!client) return undefined;
      const claims = {
        azp: token.clientId,
        typ: 'Bearer',
        realm_access: { roles: client.roles },
      };
      if (client.organisation !== null) claims.organisation = client.organisation;
      return claims;
    },
    formats: {
      customizers: {
        jwt: (_ctx, _token, structured) => {
          structured.payload.nbf = structured.payload.iat;
        },
      },
    },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  });
  provider.on('server_error', (_ctx, error) => {
    process.stderr.write(`oidc test provider: server_error ${error?.stack ?? error}\n`);
  });
  return provider;
}

function main() {
  const options = parseOptions();
  const clients = loadClients(options.clients, options.accessTokenTtl);
  const key = signingKey();
  const realmPath = `/realms/${options.realm}`;
  let handle = (_req, res) => json(res, 503, { error: 'starting' });

  const tls = options['tls-cert']
    ? { cert: readFileSync(options['tls-cert']), key: readFileSync(options['tls-key']) }
    : null;
  const scheme = tls ? 'https' : 'http';
  const server = tls
    ? https.createServer(tls, (req, res) => handle(req, res))
    : http.createServer((req, res) => handle(req, res));
  server.on('error', (error) => fail(`cannot listen: ${error.message}`));
  server.listen(options.port, options.host, () => {
    const { port } = server.address();
    const issuer = `${scheme}://${options.host}:${port}${realmPath}`;
    const provider = buildProvider({ issuer, audience: options.audience, clients, key });
    const callback = provider.callback();
    const realmInfo = {
      realm: options.realm,
      public_key: key.spkiBase64,
      'token-service': `${issuer}/protocol/openid-connect`,
      'account-service': `${issuer}/account`,
      'tokens-not-before': 0,
    };

    handle = (req, res) => {
      const url = req.url ?? '/';
      const path = url.split('?')[0];
      if (req.method === 'GET' && (path === realmPath || path === `${realmPath}/`)) {
        json(res, 200, realmInfo);
        return;
      }
      if (!url.startsWith(`${realmPath}/`)) {
        json(res, 404, { error: 'not_found', error_description: `no realm at ${path}` });
        return;
      }
      // Mount the provider under the realm path (what Express's app.use(path, ...) does).
      req.originalUrl = url;
      req.url = url.slice(realmPath.length);
      callback(req, res);
    };

    process.stdout.write(`${READY_PREFIX} ${JSON.stringify({ issuer, port })}\n`);
  });

  const stop = () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  if (options['exit-on-stdin-close']) {
    process.stdin.on('end', stop);
    process.stdin.on('close', stop);
    process.stdin.resume();
  }
}

main();
