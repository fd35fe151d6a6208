//! What the server tasks and the handle share: clients, keys, recorded requests, injected failures, and
//! the issuers (root and per tenant) the IdP speaks for.

use crate::oauth::{GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, is_guid};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::keys::SigningKey;
use super::types::{
    DEFAULT_CLIENT_ID, DevClient, DevIdpConfig, Failure, RecordedTokenRequest, TokenClaims,
    derive_oid, lock, now_secs,
};

/// Everything the server tasks and the handle share.
pub(super) struct State {
    /// The configuration, its `clients` moved to `clients`.
    pub(super) config: DevIdpConfig,
    pub(super) clients: RwLock<Vec<Arc<DevClient>>>,
    pub(super) issuer: String,
    /// Every published key; the last one signs.
    pub(super) keys: RwLock<Vec<Arc<SigningKey>>>,
    pub(super) token_requests: AtomicU64,
    pub(super) recorded: Mutex<Vec<RecordedTokenRequest>>,
    pub(super) failures: Mutex<VecDeque<(Failure, u32)>>,
    pub(super) jti_counter: AtomicU64,
    /// The `jti` of every accepted `private_key_jwt` assertion, keyed by `(client_id, jti)`, with its `exp`:
    /// an entry is dropped once its assertion has expired, since an expired assertion is refused anyway.
    pub(super) seen_client_assertions: Mutex<HashMap<(String, String), f64>>,
    /// `GET` requests on any discovery path, root or tenant, whatever the answer.
    pub(super) discovery_requests: AtomicU64,
    /// `GET /jwks` requests, whatever the answer.
    pub(super) jwks_requests: AtomicU64,
    /// While set, `/jwks` and every discovery document answer 503.
    pub(super) jwks_unavailable: AtomicBool,
    /// The `max-age` of `/jwks`; `None`: no `Cache-Control`.
    pub(super) jwks_max_age: Mutex<Option<u64>>,
}

impl State {
    pub(super) fn current_key(&self) -> Arc<SigningKey> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // Invariant: `start` publishes one key and keys are only ever added, so `last` is always `Some`.
        #[allow(clippy::expect_used)]
        Arc::clone(keys.last().expect("the key set is never empty"))
    }

    pub(super) fn published_keys(&self) -> Vec<Arc<SigningKey>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn fail_next(&self, failure: Failure, count: u32) {
        if count > 0 {
            lock(&self.failures).push_back((failure, count));
        }
    }

    pub(super) fn take_failure(&self) -> Option<Failure> {
        let mut failures = lock(&self.failures);
        let (failure, remaining) = failures.front_mut()?;
        let failure = failure.clone();
        *remaining -= 1;
        if *remaining == 0 {
            failures.pop_front();
        }
        Some(failure)
    }

    pub(super) fn default_audience(&self) -> String {
        self.clients
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .map_or_else(
                || format!("api://{DEFAULT_CLIENT_ID}"),
                |client| client.audience(),
            )
    }

    pub(super) fn client(&self, client_id: &str) -> Option<Arc<DevClient>> {
        self.clients
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|client| client.client_id == client_id)
            .cloned()
    }

    pub(super) fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }

    pub(super) fn tenant_issuer(&self, tenant_id: &str) -> String {
        format!("{}/{tenant_id}/v2.0", self.issuer)
    }

    pub(super) fn tenant_token_endpoint(&self, tenant_id: &str) -> String {
        format!("{}/{tenant_id}/oauth2/v2.0/token", self.issuer)
    }

    /// The root authority, `POST /token`.
    pub(super) fn root(&self) -> Authority {
        Authority {
            issuer: self.issuer.clone(),
            token_endpoint: self.token_endpoint(),
            tenant: None,
        }
    }

    /// The authority of one tenant, `POST /{tenant_id}/oauth2/v2.0/token`.
    pub(super) fn tenant(&self, tenant_id: &str) -> Authority {
        Authority {
            issuer: self.tenant_issuer(tenant_id),
            token_endpoint: self.tenant_token_endpoint(tenant_id),
            tenant: Some(tenant_id.to_owned()),
        }
    }

    /// Whether `iss` is the root issuer or the issuer of a tenant whose id is a GUID.
    pub(super) fn is_own_issuer(&self, iss: &str) -> bool {
        iss == self.issuer
            || iss
                .strip_prefix(self.issuer.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .and_then(|rest| rest.strip_suffix("/v2.0"))
                .is_some_and(is_guid)
    }

    pub(super) fn jti(&self) -> String {
        let serial = self.jti_counter.fetch_add(1, Ordering::Relaxed);
        derive_oid(&format!("{}#{serial}#{}", self.issuer, now_secs()))
    }

    /// Signs `claims` with the current key after adding `iss` = `issuer`, `iat`, `nbf`, `exp`, `ver` and
    /// `jti`, then `extra` (which may override any of them).
    pub(super) fn issue(
        &self,
        issuer: &str,
        mut claims: Map<String, Value>,
        lifetime: Duration,
        extra: &Map<String, Value>,
    ) -> String {
        let now = now_secs();
        claims.insert("iss".into(), json!(issuer));
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("exp".into(), json!(now.saturating_add(lifetime.as_secs())));
        claims.insert("ver".into(), json!("2.0"));
        claims.insert("jti".into(), json!(self.jti()));
        for (name, value) in extra {
            claims.insert(name.clone(), value.clone());
        }
        let key = self.current_key();
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": key.kid});
        key.sign_jwt(&header, &Value::Object(claims))
    }

    pub(super) fn mint(&self, caller: &TokenClaims) -> String {
        let mut claims = Map::new();
        claims.insert(
            "aud".into(),
            json!(
                caller
                    .aud
                    .clone()
                    .unwrap_or_else(|| self.default_audience())
            ),
        );
        claims.insert("sub".into(), json!(caller.sub));
        claims.insert(
            "oid".into(),
            json!(
                caller
                    .oid
                    .clone()
                    .unwrap_or_else(|| derive_oid(&caller.sub))
            ),
        );
        claims.insert(
            "tid".into(),
            json!(caller.tid.as_deref().unwrap_or(&self.config.tenant_id)),
        );
        if let Some(scp) = &caller.scp {
            claims.insert("scp".into(), json!(scp));
        }
        if !caller.roles.is_empty() {
            claims.insert("roles".into(), json!(caller.roles));
        }
        self.issue(&self.issuer, claims, caller.lifetime, &caller.extra)
    }

    /// The discovery document of `authority`: its own `issuer` and `token_endpoint`, the shared `jwks_uri`.
    pub(super) fn discovery(&self, authority: &Authority) -> Value {
        json!({
            "issuer": authority.issuer,
            "jwks_uri": format!("{}/jwks", self.issuer),
            "token_endpoint": authority.token_endpoint,
            "authorization_endpoint": format!("{}/authorize", self.issuer),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": [GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["PS256", "RS256"],
        })
    }

    pub(super) fn jwks(&self) -> Value {
        let keys: Vec<Value> = self.published_keys().iter().map(|key| key.jwk()).collect();
        json!({ "keys": keys })
    }
}

/// Which issuer a token request or discovery document speaks for: the root one, or one tenant's (Entra's
/// `/{tenant}/v2.0`), whose tokens carry its `iss` and `tid`.
pub(super) struct Authority {
    pub(super) issuer: String,
    pub(super) token_endpoint: String,
    pub(super) tenant: Option<String>,
}
