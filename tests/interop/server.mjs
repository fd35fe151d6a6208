// A third-party OAuth server for obo-sidecar's interop test: panva's oidc-provider with two extension grants
// (Entra-style jwt-bearer On-Behalf-Of and RFC 8693 token exchange), its built-in client credentials grant, and
// three clients (client_secret_post, client_secret_basic, private_key_jwt). oidc-provider authenticates the
// client before a grant handler runs, so the sidecar's client authentication is checked by code this project
// did not write. Not for production.
//
// Environment:
//   INTEROP_CLIENT_SECRET    the secret of `sidecar-post` and `sidecar-basic` (required)
//   INTEROP_CLIENT_CERT_PEM  path of a PEM certificate whose RSA key `sidecar-pkjwt` signs its client
//                            assertions with (optional: without it that client is not registered)
//
// Prints one JSON line on stdout when ready ({"issuer", "token_endpoint", "jwks_uri"}); logs go to stderr.
// Exits when stdin closes (so a killed test never leaves it running), on SIGTERM or on SIGINT.
//
// Besides oidc-provider's own routes:
//   POST /dev/token  {"sub", "scp", "aud"?, "lifetime_secs"?} -> a caller token (text/plain), signed with the
//                    provider's key, for audience `api://obo-sidecar` unless `aud` says otherwise
//   GET  /dev/stats  -> {"token_requests": N}, the number of POSTs to the token endpoint

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

/** The audience a caller token must carry for any of the clients to exchange it. */
const API_AUDIENCE = 'api://obo-sidecar';
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const JWT_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
/** Lifetime of every token this server issues (seconds). */
const TOKEN_LIFETIME = 3600;
/** Longest client assertion accepted (seconds between now and its `exp`), as SPEC §1 asks of the sidecar. */
const MAX_ASSERTION_LIFETIME = 300;
/** A subject token with this `sub` is refused with `invalid_grant` (the error-mapping case). */
const REVOKED_SUBJECT = 'revoked';

const log = (...args) => console.error('[interop-idp]', ...args);

const secret = process.env.INTEROP_CLIENT_SECRET;
if (!secret) {
  log('INTEROP_CLIENT_SECRET must be set');
  process.exit(2);
}
const certPath = process.env.INTEROP_CLIENT_CERT_PEM;

// The provider's signing key, also used for caller tokens and exchanged tokens.
const KID = 'interop-1';
const { privateKey, publicKey } = await jose.generateKeyPair('RS256', { extractable: true });
const signingJwk = { ...(await jose.exportJWK(privateKey)), kid: KID, alg: 'RS256', use: 'sig' };

const GRANT_TYPES = ['client_credentials', JWT_BEARER, TOKEN_EXCHANGE];
const clients = [
  {
    client_id: 'sidecar-post',
    client_secret: secret,
    token_endpoint_auth_method: 'client_secret_post',
  },
  {
    client_id: 'sidecar-basic',
    client_secret: secret,
    token_endpoint_auth_method: 'client_secret_basic',
  },
];
/** client_id -> the `x5t#S256` its assertions must carry. */
const certificateThumbprints = new Map();
if (certPath) {
  const cert = new crypto.X509Certificate(fs.readFileSync(certPath));
  const thumbprint = crypto.createHash('sha256').update(cert.raw).digest('base64url');
  const jwk = cert.publicKey.export({ format: 'jwk' });
  if (jwk.kty !== 'RSA') {
    log(`${certPath}: the certificate's key must be RSA, not ${jwk.kty}`);
    process.exit(2);
  }
  clients.push({
    client_id: 'sidecar-pkjwt',
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'RS256',
    jwks: {
      keys: [{ ...jwk, alg: 'RS256', use: 'sig', 'x5t#S256': thumbprint, x5c: [cert.raw.toString('base64')] }],
    },
  });
  certificateThumbprints.set('sidecar-pkjwt', thumbprint);
} else {
  log('INTEROP_CLIENT_CERT_PEM not set: the private_key_jwt client sidecar-pkjwt is not registered');
}
for (const client of clients) {
  Object.assign(client, { grant_types: GRANT_TYPES, response_types: [], redirect_uris: [] });
}

// The issuer needs the port, so bind first and hand requests to the provider once it exists.
let handler = (_req, res) => {
  res.statusCode = 503;
  res.end();
};
const server = http.createServer((req, res) => handler(req, res));
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(0, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

/**
 * `scope=api://downstream/.default` (Entra's grammar) names the resource `api://downstream`; every entry must
 * name the same one. Returns `{ resource, names }`, or undefined when the scope does not follow that grammar.
 */
function resourceOfScope(scope) {
  const entries = (scope ?? '').split(' ').filter(Boolean);
  if (entries.length === 0) return undefined;
  const parsed = entries.map((entry) => {
    const slash = entry.lastIndexOf('/');
    return slash > 0 && slash < entry.length - 1
      ? { resource: entry.slice(0, slash), name: entry.slice(slash + 1) }
      : undefined;
  });
  if (parsed.some((p) => p === undefined)) return undefined;
  const resources = new Set(parsed.map((p) => p.resource));
  if (resources.size !== 1) return undefined;
  return { resource: parsed[0].resource, names: parsed.map((p) => p.name) };
}

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingJwk] },
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    // The sidecar asks for app tokens with `scope=<resource>/.default` and no `resource` parameter (Entra's
    // grammar); map that scope to the resource so oidc-provider issues a JWT for it.
    resourceIndicators: {
      enabled: true,
      defaultResource(ctx) {
        if (ctx.oidc.params.grant_type !== 'client_credentials') return undefined;
        return resourceOfScope(ctx.oidc.params.scope)?.resource;
      },
      getResourceServerInfo(ctx, resourceIndicator) {
        const scope = ctx.oidc.params.scope;
        if (resourceOfScope(scope)?.resource !== resourceIndicator) {
          throw new errors.InvalidTarget(`scope must name ${resourceIndicator} (e.g. ${resourceIndicator}/.default)`);
        }
        return {
          scope,
          audience: resourceIndicator,
          accessTokenFormat: 'jwt',
          accessTokenTTL: TOKEN_LIFETIME,
        };
      },
      useGrantedResource: () => false,
    },
  },
  // RFC 7523 §3 asks for the rest (iss, aud, exp, jti, replay); oidc-provider checks those itself. Also
  // require what the sidecar promises: the certificate's thumbprint in the header and a short lifetime.
  async assertJwtClientAuthClaimsAndHeader(_ctx, claims, header, client) {
    const expected = certificateThumbprints.get(client.clientId);
    if (expected !== undefined && header['x5t#S256'] !== expected) {
      throw new errors.InvalidClientAuth("client assertion header x5t#S256 must be the registered certificate's");
    }
    if (claims.sub !== client.clientId) {
      throw new errors.InvalidClientAuth('sub (JWT subject) must be the client_id');
    }
    if (claims.exp - Math.floor(Date.now() / 1000) > MAX_ASSERTION_LIFETIME) {
      throw new errors.InvalidClientAuth(`client assertion must expire within ${MAX_ASSERTION_LIFETIME} s`);
    }
  },
  ttl: {
    AccessToken: TOKEN_LIFETIME,
    ClientCredentials: TOKEN_LIFETIME,
  },
});

// oidc-provider accepts a client secret in the form or in HTTP Basic whichever of the two methods the client
// registered. Hold each secret client to its registered method, so `sidecar-basic` proves the sidecar sends
// RFC 6749 §2.3.1 Basic credentials and `sidecar-post` that it sends them in the form. (Checked after the
// grant ran: the answer is replaced, never sent.)
provider.use(async (ctx, next) => {
  await next();
  const client = ctx.oidc?.client;
  if (ctx.oidc?.route !== 'token' || ctx.status !== 200 || client === undefined) return;
  const registered = client.clientAuthMethod;
  if (registered !== 'client_secret_basic' && registered !== 'client_secret_post') return;
  const used = /^basic /i.test(ctx.headers.authorization ?? '') ? 'client_secret_basic' : 'client_secret_post';
  if (used !== registered) {
    log(`rejecting ${client.clientId}: authenticated with ${used}, registered ${registered}`);
    ctx.status = 401;
    ctx.body = {
      error: 'invalid_client',
      error_description: `client authentication must use ${registered}`,
    };
  }
});

provider.on('server_error', (_ctx, error) => log('server_error', error));
provider.on('grant.error', (ctx, error) => {
  log(`grant.error ${ctx.oidc.params?.grant_type}: ${error.error} (${error.error_description}) ${error.error_detail ?? ''}`);
});
provider.on('grant.success', (ctx) => {
  log(`grant.success ${ctx.oidc.params.grant_type} client=${ctx.oidc.client?.clientId}`);
});

function invalidGrant(description) {
  return new errors.CustomOIDCProviderError('invalid_grant', description);
}

function invalidRequest(description) {
  return new errors.InvalidRequest(description);
}

/** Verifies a caller token (signed by this server, for the sidecar's API audience): its claims, or invalid_grant. */
async function verifySubjectToken(token, parameter) {
  let payload;
  try {
    ({ payload } = await jose.jwtVerify(token, publicKey, {
      issuer,
      audience: API_AUDIENCE,
      algorithms: ['RS256'],
    }));
  } catch (error) {
    throw invalidGrant(`${parameter} rejected: ${error.message}`);
  }
  if (typeof payload.sub !== 'string' || payload.sub === '') {
    throw invalidGrant(`${parameter} has no sub`);
  }
  if (payload.sub === REVOKED_SUBJECT) {
    throw invalidGrant(`${parameter} rejected: the subject's session was revoked`);
  }
  return payload;
}

async function issue(claims) {
  const now = Math.floor(Date.now() / 1000);
  return new jose.SignJWT({ ...claims, iss: issuer, iat: now, exp: now + TOKEN_LIFETIME, jti: crypto.randomUUID() })
    .setProtectedHeader({ alg: 'RS256', kid: KID, typ: 'at+jwt' })
    .sign(privateKey);
}

function asList(value) {
  if (value === undefined) return [];
  return Array.isArray(value) ? value : [value];
}

// Entra's On-Behalf-Of: client auth + assertion (the caller's token) + requested_token_use + scope.
provider.registerGrantType(
  JWT_BEARER,
  async (ctx) => {
    const { params, client } = ctx.oidc;
    if (params.requested_token_use !== 'on_behalf_of') {
      throw invalidRequest('requested_token_use must be on_behalf_of');
    }
    if (!params.assertion) throw invalidRequest('missing required parameter assertion');
    if (!params.scope) throw invalidRequest('missing required parameter scope');
    const subject = await verifySubjectToken(params.assertion, 'assertion');
    const target = resourceOfScope(params.scope);
    if (target === undefined) {
      throw new errors.InvalidScope('scope must be <resource>/<name> entries of one resource', params.scope);
    }
    const accessToken = await issue({
      aud: target.resource,
      sub: subject.sub,
      azp: client.clientId,
      scp: target.names.join(' '),
    });
    ctx.body = {
      access_token: accessToken,
      token_type: 'Bearer',
      expires_in: TOKEN_LIFETIME,
      scope: params.scope,
    };
  },
  ['assertion', 'requested_token_use', 'scope'],
);

// RFC 8693 token exchange; `audience` and `resource` may repeat (§2.1).
provider.registerGrantType(
  TOKEN_EXCHANGE,
  async (ctx) => {
    const { params, client } = ctx.oidc;
    if (!params.subject_token) throw invalidRequest('missing required parameter subject_token');
    if (params.subject_token_type !== ACCESS_TOKEN_TYPE) {
      throw invalidRequest(`subject_token_type must be ${ACCESS_TOKEN_TYPE}`);
    }
    if (
      params.requested_token_type !== undefined
      && params.requested_token_type !== ACCESS_TOKEN_TYPE
      && params.requested_token_type !== JWT_TOKEN_TYPE
    ) {
      throw invalidRequest(`requested_token_type ${params.requested_token_type} is not supported`);
    }
    const subject = await verifySubjectToken(params.subject_token, 'subject_token');
    const audiences = asList(params.audience);
    const resources = asList(params.resource);
    let aud;
    if (audiences.length) aud = audiences;
    else if (resources.length) aud = resources;
    else aud = [resourceOfScope(params.scope)?.resource].filter(Boolean);
    if (aud.length === 0) {
      throw new errors.InvalidTarget('audience, resource or a <resource>/<name> scope is required');
    }
    const accessToken = await issue({
      aud: aud.length === 1 ? aud[0] : aud,
      sub: subject.sub,
      azp: client.clientId,
      ...(params.scope ? { scope: params.scope } : {}),
    });
    ctx.body = {
      access_token: accessToken,
      issued_token_type: ACCESS_TOKEN_TYPE,
      token_type: 'Bearer',
      expires_in: TOKEN_LIFETIME,
      ...(params.scope ? { scope: params.scope } : {}),
    };
  },
  ['subject_token', 'subject_token_type', 'audience', 'resource', 'scope', 'requested_token_type'],
  ['audience', 'resource'],
);

const tokenPath = new URL(provider.urlFor('token')).pathname;
let tokenRequests = 0;

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      try {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve(text ? JSON.parse(text) : {});
      } catch (error) {
        reject(error);
      }
    });
    req.on('error', reject);
  });
}

function send(res, status, contentType, body) {
  res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store' });
  res.end(body);
}

/** POST /dev/token: a caller token, as Entra would issue one for the sidecar's API. */
async function mintCallerToken(req, res) {
  let body;
  try {
    body = await readJson(req);
  } catch {
    send(res, 400, 'application/json', JSON.stringify({ error: 'body must be JSON' }));
    return;
  }
  if (typeof body.sub !== 'string' || body.sub === '') {
    send(res, 400, 'application/json', JSON.stringify({ error: 'sub is required' }));
    return;
  }
  const lifetime = Number.isInteger(body.lifetime_secs) ? body.lifetime_secs : TOKEN_LIFETIME;
  const now = Math.floor(Date.now() / 1000);
  const claims = {
    iss: issuer,
    aud: body.aud ?? API_AUDIENCE,
    sub: body.sub,
    iat: now,
    exp: now + lifetime,
    jti: crypto.randomUUID(),
  };
  if (body.scp !== undefined) claims.scp = Array.isArray(body.scp) ? body.scp.join(' ') : String(body.scp);
  const token = await new jose.SignJWT(claims)
    .setProtectedHeader({ alg: 'RS256', kid: KID, typ: 'JWT' })
    .sign(privateKey);
  send(res, 200, 'text/plain', token);
}

const callback = provider.callback();
handler = (req, res) => {
  const { pathname } = new URL(req.url, issuer);
  if (req.method === 'POST' && pathname === tokenPath) {
    tokenRequests += 1;
  }
  if (req.method === 'POST' && pathname === '/dev/token') {
    mintCallerToken(req, res).catch((error) => {
      log('/dev/token failed', error);
      send(res, 500, 'text/plain', 'internal error');
    });
    return;
  }
  if (req.method === 'GET' && pathname === '/dev/stats') {
    send(res, 200, 'application/json', JSON.stringify({ token_requests: tokenRequests }));
    return;
  }
  callback(req, res);
};

function shutdown(why) {
  log(`stopping: ${why}`);
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.stdin.on('end', () => shutdown('stdin closed'));
process.stdin.on('error', () => shutdown('stdin error'));
process.stdin.resume();
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

const discovery = { issuer, token_endpoint: provider.urlFor('token'), jwks_uri: provider.urlFor('jwks') };
log(`listening on ${issuer}`);
process.stdout.write(`${JSON.stringify(discovery)}\n`);
