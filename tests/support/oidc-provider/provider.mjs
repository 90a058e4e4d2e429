// A certified OpenID provider (panva/oidc-provider, default claim behaviour) for the tests:
//   node provider.mjs '{"port": N, "clients": [...], "accounts": {"alice": {"email": ..., "groups": [...]}}}'
// Each client is an oidc-provider client registration (client_id, client_secret, redirect_uris,
// post_logout_redirect_uris, token_endpoint_auth_method); "requireTokenAuth" (optional) refuses
// token requests that send the client secret the other way. Sign-in uses the development
// interactions: any login whose account exists, any password, then a consent page. Prints
// "ready <issuer>" once it listens on 127.0.0.1:N.
import http from 'node:http';
import Provider from 'oidc-provider';

const config = JSON.parse(process.argv[2]);
const issuer = `http://127.0.0.1:${config.port}`;
const accounts = config.accounts ?? {};

const provider = new Provider(issuer, {
  clients: config.clients.map((c) => ({ grant_types: ['authorization_code'], response_types: ['code'], ...c })),
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'], groups: ['groups'] },
  cookies: { keys: ['authplane-tests-only-cookie-key'] },
  features: {
    devInteractions: { enabled: true },
    claimsParameter: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  async findAccount(ctx, sub) {
    const claims = accounts[sub];
    if (!claims) return undefined;
    return { accountId: sub, async claims() { return { sub, ...claims }; } };
  },
});
// oidc-provider accepts either way of sending the client secret; a stricter provider accepts only
// the registered one ("requireTokenAuth": "client_secret_basic" or "client_secret_post").
if (config.requireTokenAuth) {
  provider.use(async (ctx, next) => {
    if (ctx.method === 'POST' && ctx.path === '/token') {
      const basic = (ctx.get('authorization') || '').toLowerCase().startsWith('basic ');
      if (basic !== (config.requireTokenAuth === 'client_secret_basic')) {
        ctx.status = 401;
        ctx.body = { error: 'invalid_client', error_description: `only ${config.requireTokenAuth} is accepted` };
        return;
      }
    }
    await next();
  });
}
provider.on('server_error', (ctx, err) => console.error('server_error', err));

http.createServer(provider.callback()).listen(config.port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
