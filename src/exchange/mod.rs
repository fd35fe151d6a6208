//! Upstream tokens: what a route sends upstream for a caller, from the [`cache`] or from a token request
//! to the route's identity ([`request`]: Entra On-Behalf-Of, RFC 8693 token exchange, client credentials,
//! with the client authentication of [`client_auth`]); every IdP answer is read by [`answer`] into a token
//! or an [`ExchangeError`].

mod answer;
pub(crate) mod cache;
mod client_auth;
mod managed_identity;
mod request;
mod seal;
mod shared;
#[cfg(test)]
mod tests;
mod token;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use crate::config::{CacheSettings, Identity, Route, TENANT_PLACEHOLDER, TokenKind};
use crate::error::{ProxyError, TokenDefect};
pub(crate) use cache::RequestKey;
use cache::{CacheKey, Entry, Fetch, KeyParts, Lookup, TokenCache};
use request::{Grant, IdentityClient, TokenRequest};

pub(crate) use request::IdpBackoff;
pub(crate) use shared::SharedCache;
pub use shared::SharedCacheError;
pub(crate) use token::bearer_header;

/// The validated caller a token is acquired for: its own token (the subject token of an exchange, or what
/// `passthrough` forwards), that token's digest (the cache key's part that ties a cached token to this
/// caller alone), its `exp` and its `tid`.
#[derive(Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub(crate) token: &'a crate::auth::CallerToken,
    pub(crate) digest: &'a [u8; 32],
    pub(crate) exp: u64,
    pub(crate) tid: Option<&'a str>,
}

/// What the proxy sends upstream, and the cache entry it came from (to drop it on an upstream 401).
pub(crate) struct Acquired {
    pub(crate) header: Option<HeaderValue>,
    pub(crate) sent: Option<(CacheKey, Arc<Entry>)>,
    pub(crate) lookup: Option<Lookup>,
}

impl Acquired {
    /// When the token sent expires (unix seconds; 0 when unknown or none).
    pub(crate) fn expires_on(&self, subject: Option<Subject<'_>>) -> u64 {
        match (&self.sent, subject) {
            (Some((_, entry)), _) => entry.token.expires_on,
            (None, Some(subject)) if self.header.is_some() => subject.exp,
            (None, _) => 0,
        }
    }
}

/// Acquires upstream tokens for routes, through the cache.
pub(crate) struct Exchanger {
    identities: BTreeMap<String, Arc<IdentityClient>>,
    cache: Arc<TokenCache>,
    /// The fleet's cache behind `cache` (`[cache.shared]`).
    shared: Option<Arc<SharedCache>>,
    expiry_margin: Duration,
}

impl Exchanger {
    pub(crate) fn new(
        identities: &BTreeMap<String, Arc<Identity>>,
        settings: &CacheSettings,
        cache: Arc<TokenCache>,
        shared: Option<Arc<SharedCache>>,
        backoff: &Arc<IdpBackoff>,
        metrics: &Arc<crate::telemetry::Metrics>,
    ) -> Result<Self, crate::tls::TlsError> {
        let mut clients = BTreeMap::new();
        for (name, identity) in identities {
            let roots: Vec<&std::path::Path> = identity
                .ca_file
                .iter()
                .map(std::path::PathBuf::as_path)
                .collect();
            let http = crate::tls::idp_client(&roots, identity.timeout)?;
            clients.insert(
                name.clone(),
                Arc::new(IdentityClient::new(identity, http, backoff, metrics)),
            );
        }
        Ok(Exchanger {
            identities: clients,
            cache,
            shared,
            expiry_margin: settings.expiry_margin,
        })
    }

    /// What `route`'s token requests are keyed by, computed once: `None` when its token endpoint names
    /// `{tenantid}` (each caller's tenant resolves it) or it sends no exchanged token.
    pub(crate) fn request_key(&self, route: &Route) -> Option<RequestKey> {
        if !matches!(route.token, TokenKind::Obo | TokenKind::App) {
            return None;
        }
        let client = self.identities.get(&route.identity)?;
        let endpoint = &client.identity.token_endpoint;
        (!endpoint.contains(TENANT_PLACEHOLDER)).then(|| request_key(client, route, endpoint))
    }

    /// The `Authorization` value `route` sends upstream for `subject`, which is `None` only on a route with
    /// `caller_auth = "none"` (an `app` or `none` route). `precomputed` is [`Exchanger::request_key`] of
    /// the route.
    pub(crate) async fn acquire(
        &self,
        route: &Route,
        precomputed: Option<&RequestKey>,
        subject: Option<Subject<'_>>,
    ) -> Result<Acquired, ProxyError> {
        let client = match route.token {
            TokenKind::None => {
                return Ok(Acquired {
                    header: None,
                    sent: None,
                    lookup: None,
                });
            }
            TokenKind::Passthrough => {
                let subject =
                    subject.ok_or(ProxyError::Internal("passthrough route without a caller"))?;
                return Ok(Acquired {
                    header: Some(
                        bearer_header(subject.token.expose())
                            .ok_or(ProxyError::InvalidToken(TokenDefect::Malformed))?,
                    ),
                    sent: None,
                    lookup: None,
                });
            }
            TokenKind::Obo | TokenKind::App => {
                self.identities
                    .get(&route.identity)
                    .ok_or(ProxyError::Internal(
                        "route names an identity that does not exist",
                    ))?
            }
        };
        let identity = &client.identity;
        let token_endpoint = resolve_tenant(&identity.token_endpoint, subject)?;
        let claims = client.claims.as_deref();
        let on_behalf_of = match (route.token, subject) {
            (TokenKind::Obo, Some(subject)) => Some(subject),
            (TokenKind::Obo, None) => {
                return Err(ProxyError::Internal("obo route without a caller"));
            }
            _ => None,
        };
        let request_key = match precomputed {
            Some(key) => *key,
            None => request_key(client, route, &token_endpoint),
        };
        let key = CacheKey::new(&request_key, on_behalf_of.map(|s| s.digest));
        if let Some(entry) = self.cache.fresh(&key).await {
            return Ok(Acquired {
                header: Some(entry.token.header.clone()),
                sent: Some((key, entry)),
                lookup: Some(Lookup::Hit),
            });
        }
        let request = Arc::new(TokenRequest {
            client: Arc::clone(client),
            route: route.name.clone(),
            token_endpoint: token_endpoint.into_owned(),
            grant: match on_behalf_of {
                Some(subject) => Grant::OnBehalfOf {
                    subject: subject.token.to_secret(),
                    subject_exp: subject.exp,
                },
                None => Grant::App,
            },
            scopes: route.scopes.clone(),
            audience: route.audience.clone(),
            resource: route.resource.clone(),
            requested_token_type: route.requested_token_type.clone(),
            claims: claims.map(str::to_owned),
            expiry_margin: self.expiry_margin,
        });
        let shared = self.shared.clone();
        // Waiting for another replica's exchange takes at most half the route's deadline: the rest is left
        // for an exchange of its own.
        let wait = route.timeout / 2;
        let fetch: Fetch = Arc::new(move |purpose| {
            let request = Arc::clone(&request);
            let shared = shared.clone();
            Box::pin(async move {
                match shared {
                    Some(shared) => {
                        shared
                            .fetch(key, purpose, wait, || {
                                let request = Arc::clone(&request);
                                Box::pin(async move { request.send().await })
                            })
                            .await
                    }
                    None => request.send().await,
                }
            })
        });
        let (entry, lookup) = self
            .cache
            .get_or_fetch(key, &fetch)
            .await
            .map_err(|e| e.to_proxy_error(route))?;
        Ok(Acquired {
            header: Some(entry.token.header.clone()),
            sent: Some((key, entry)),
            lookup: Some(lookup),
        })
    }

    /// The upstream answered 401 to `sent`: drop that cached token so the next request exchanges afresh.
    pub(crate) async fn forget(&self, sent: &(CacheKey, Arc<Entry>)) -> bool {
        let forgotten = self.cache.forget(sent.0, &sent.1).await;
        if forgotten && let Some(shared) = &self.shared {
            shared.forget(sent.0, sent.1.token.header.clone());
        }
        forgotten
    }
}

/// The key of `route`'s token requests through `client` at `token_endpoint` (resolved).
fn request_key(client: &IdentityClient, route: &Route, token_endpoint: &str) -> RequestKey {
    let identity = &client.identity;
    RequestKey::new(&KeyParts {
        identity: &identity.name,
        client_id: &identity.client_id,
        token_endpoint,
        flavor: identity.flavor.as_str(),
        auth_method: identity.auth_method.as_str(),
        scopes: &route.scopes,
        audience: &route.audience,
        resource: &route.resource,
        requested_token_type: route.requested_token_type.as_deref(),
        claims: client.claims.as_deref(),
    })
}

/// Fills `{tenantid}` from the caller's validated `tid`, which must be a GUID (nothing else may reach a URL).
fn resolve_tenant<'a>(
    template: &'a str,
    subject: Option<Subject<'_>>,
) -> Result<std::borrow::Cow<'a, str>, ProxyError> {
    if !template.contains(TENANT_PLACEHOLDER) {
        return Ok(std::borrow::Cow::Borrowed(template));
    }
    let tid = subject
        .ok_or(ProxyError::Internal(
            "a {tenantid} token endpoint needs a validated caller",
        ))?
        .tid
        .filter(|tid| crate::oauth::is_guid(tid))
        .ok_or(ProxyError::InvalidToken(TokenDefect::NoTenant))?;
    Ok(std::borrow::Cow::Owned(
        template.replace(TENANT_PLACEHOLDER, &tid.to_ascii_lowercase()),
    ))
}
