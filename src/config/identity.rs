//! `[identity]` and `[identities.NAME]`: the sidecar's own client registrations at IdPs, and their
//! credentials. The only place secrets and keys are read from files and the environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use toml::{Table, Value};

use super::credential::{
    AssertionFile, AuthMethod, Credential, ManagedIdentity, ManagedIdentityEndpoint, Watched,
    load_certificate, load_secret_file,
};
use super::model::{
    DEFAULT_AZURE_AUTHORITY_HOST, DEFAULT_IDENTITY, DEFAULT_IDP_TIMEOUT, DEFAULT_MAX_CONCURRENT,
    EnvLookup, Flavor, Identity, MAX_IDP_TIMEOUT,
};
use super::walk::{Fields, Problems, is_name, require_https, template_url};
use crate::secret::Secret;

/// A secret from `{ env = "NAME" }` (fixed) or `{ file = "/path" }` (watched: re-read when it changes).
pub(super) fn read_secret(
    f: &Fields<'_>,
    key: &str,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Watched<Secret>> {
    read_secret_value(f.value(key)?, &f.at(key), env, p)
}

/// [`read_secret`] of a value at `at` (an element of a list, say).
pub(super) fn read_secret_value(
    value: &Value,
    at: &str,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Watched<Secret>> {
    let at = at.to_owned();
    match value {
        Value::String(_) => {
            p.add(
                &at,
                "secrets are never written inline: use { env = \"NAME\" } or { file = \"/path\" }",
            );
            None
        }
        Value::Table(t) => {
            let sf = Fields::new(t, at.clone(), &["env", "file"], p);
            match (sf.string("env", p), sf.string("file", p)) {
                (Some(name), None) => match env(name) {
                    Some(value) if !value.trim().is_empty() => {
                        Some(Watched::fixed(Secret::new(value.trim())))
                    }
                    Some(_) => {
                        p.add(
                            &sf.at("env"),
                            format!("environment variable {name} is empty"),
                        );
                        None
                    }
                    None => {
                        p.add(
                            &sf.at("env"),
                            format!("environment variable {name} is not set"),
                        );
                        None
                    }
                },
                (None, Some(path)) => {
                    match Watched::from_files(vec![PathBuf::from(path)], load_secret_file) {
                        Ok(watched) => Some(watched),
                        Err(e) => {
                            p.add(&sf.at("file"), crate::error::chain(&e));
                            None
                        }
                    }
                }
                (Some(_), Some(_)) => {
                    p.add(&at, "set env or file, not both");
                    None
                }
                (None, None) => {
                    p.add(&at, "expected { env = \"NAME\" } or { file = \"/path\" }");
                    None
                }
            }
        }
        other => {
            p.add(
                &at,
                format!(
                    "expected {{ env = \"NAME\" }} or {{ file = \"/path\" }}, found {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// Where a managed identity's tokens come from: `IDENTITY_ENDPOINT` with `IDENTITY_HEADER` (App Service,
/// Container Apps, Functions), else IMDS (`AZURE_POD_IDENTITY_AUTHORITY_HOST` overrides its host, as the
/// Azure SDKs let it).
fn managed_identity_endpoint(
    env: EnvLookup<'_>,
    at: &str,
    p: &mut Problems,
) -> Option<ManagedIdentityEndpoint> {
    let var = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let (Some(endpoint), Some(header)) = (var("IDENTITY_ENDPOINT"), var("IDENTITY_HEADER")) {
        if http::HeaderValue::from_str(&header).is_err() {
            p.add(at, "IDENTITY_HEADER is not a valid HTTP header value");
            return None;
        }
        return match url::Url::parse(&endpoint) {
            Ok(url) => Some(ManagedIdentityEndpoint::AppService {
                url,
                header: Secret::new(header),
            }),
            Err(e) => {
                p.add(at, format!("IDENTITY_ENDPOINT is not a URL: {e}"));
                None
            }
        };
    }
    let host =
        var("AZURE_POD_IDENTITY_AUTHORITY_HOST").unwrap_or_else(|| DEFAULT_IMDS_HOST.to_owned());
    match url::Url::parse(&format!(
        "{}/metadata/identity/oauth2/token",
        host.trim_end_matches('/')
    )) {
        Ok(url) => Some(ManagedIdentityEndpoint::Imds { url }),
        Err(e) => {
            p.add(
                at,
                format!("AZURE_POD_IDENTITY_AUTHORITY_HOST is not a URL: {e}"),
            );
            None
        }
    }
}

/// The instance metadata service, where every Azure VM finds its managed identity.
const DEFAULT_IMDS_HOST: &str = "http://169.254.169.254";

/// `managed_identity = {}` or `{ client_id = "…" }`.
fn read_managed_identity(
    f: &Fields<'_>,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<ManagedIdentity> {
    let t = f.table("managed_identity", p)?;
    let mf = Fields::new(t, f.at("managed_identity"), &["client_id"], p);
    let client_id = mf.string("client_id", p).map(str::to_owned);
    Some(ManagedIdentity {
        client_id,
        endpoint: managed_identity_endpoint(env, &f.at("managed_identity"), p)?,
    })
}

fn read_identity(
    table: &Table,
    name: &str,
    at: &str,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Identity> {
    let f = Fields::new(
        table,
        at,
        &[
            "flavor",
            "token_endpoint",
            "client_id",
            "client_secret",
            "client_certificate",
            "client_assertion_file",
            "managed_identity",
            "auth_method",
            "client_capabilities",
            "ca_file",
            "timeout",
            "max_concurrent",
        ],
        p,
    );
    let flavor = match f.string("flavor", p).unwrap_or("entra") {
        "entra" => Some(Flavor::Entra),
        "rfc8693" => Some(Flavor::Rfc8693),
        "managed_identity" => Some(Flavor::ManagedIdentity),
        other => {
            p.add(
                &f.at("flavor"),
                format!("unknown flavor {other:?}: \"entra\", \"rfc8693\" or \"managed_identity\""),
            );
            None
        }
    };
    if flavor == Some(Flavor::ManagedIdentity) {
        return read_managed_identity_flavor(&f, name, env, p);
    }
    let entra = flavor == Some(Flavor::Entra);
    // Entra: unset keys fall back to what the Azure workload-identity webhook injects.
    let token_endpoint = match f.string("token_endpoint", p) {
        Some(text) => Some(text.to_owned()),
        None if f.value("token_endpoint").is_some() => None,
        None => {
            if let (true, Some(tenant)) = (entra, env("AZURE_TENANT_ID")) {
                let host = env("AZURE_AUTHORITY_HOST")
                    .unwrap_or_else(|| DEFAULT_AZURE_AUTHORITY_HOST.to_owned());
                Some(format!(
                    "{}/{}/oauth2/v2.0/token",
                    host.trim_end_matches('/'),
                    tenant.trim()
                ))
            } else {
                p.add(&f.at("token_endpoint"), "missing");
                None
            }
        }
    };
    let token_endpoint = token_endpoint.and_then(|template| {
        let at = f.at("token_endpoint");
        let url = template_url(&template, &at, p)?;
        require_https(&url, &at, p);
        Some(template)
    });
    let client_id = match f.string("client_id", p) {
        Some(id) if !id.trim().is_empty() => Some(id.to_owned()),
        Some(_) => {
            p.add(&f.at("client_id"), "must not be empty");
            None
        }
        None if f.value("client_id").is_some() => None,
        None => {
            if let Some(id) = env("AZURE_CLIENT_ID").filter(|_| entra) {
                Some(id)
            } else {
                p.add(&f.at("client_id"), "missing");
                None
            }
        }
    };
    let credential = read_credential(&f, entra, env, p);
    let auth_method = match f.string("auth_method", p) {
        None => credential.as_ref().map(|c| match c {
            Credential::Secret(_) => AuthMethod::ClientSecretPost,
            Credential::Certificate(_) => AuthMethod::PrivateKeyJwt,
            Credential::AssertionFile(_) => AuthMethod::ClientAssertionFile,
            Credential::ManagedIdentity(_) => AuthMethod::ManagedIdentity,
        }),
        Some(text) => {
            if let Some(method) = AuthMethod::parse(text) {
                let fits = matches!(
                    (&credential, method),
                    (
                        Some(Credential::Secret(_)),
                        AuthMethod::ClientSecretPost | AuthMethod::ClientSecretBasic,
                    ) | (Some(Credential::Certificate(_)), AuthMethod::PrivateKeyJwt)
                        | (
                            Some(Credential::AssertionFile(_)),
                            AuthMethod::ClientAssertionFile
                        )
                        | (
                            Some(Credential::ManagedIdentity(_)),
                            AuthMethod::ManagedIdentity
                        )
                        | (None, _)
                );
                if !fits {
                    p.add(
                    &f.at("auth_method"),
                    format!("{text:?} does not fit the credential given (client_secret: client_secret_post or client_secret_basic; client_certificate: private_key_jwt; client_assertion_file: client_assertion_file; managed_identity: managed_identity)"),
                );
                }
                Some(method)
            } else {
                p.add(
                &f.at("auth_method"),
                format!("unknown auth_method {text:?}: client_secret_post, client_secret_basic, private_key_jwt, client_assertion_file or managed_identity"),
            );
                None
            }
        }
    };
    let client_capabilities = f.strings("client_capabilities", p).unwrap_or_default();
    if !client_capabilities.is_empty() && !entra {
        p.add(
            &f.at("client_capabilities"),
            "client capabilities are an Entra feature (flavor = \"entra\")",
        );
    }
    let ca_file = f.pem_roots("ca_file", p);
    let timeout = f.bounded_duration(
        "timeout",
        DEFAULT_IDP_TIMEOUT,
        Duration::from_millis(100),
        MAX_IDP_TIMEOUT,
        p,
    );
    let max_concurrent = f.integer("max_concurrent", DEFAULT_MAX_CONCURRENT, 1, 10_000, p);
    Some(Identity {
        name: name.to_owned(),
        flavor: flavor?,
        token_endpoint: token_endpoint?,
        client_id: client_id?,
        credential: credential?,
        auth_method: auth_method?,
        client_capabilities,
        ca_file,
        timeout,
        max_concurrent,
    })
}

/// An identity with `flavor = "managed_identity"`: the managed identity itself, whose tokens `app` routes
/// send. `client_id` (or `managed_identity.client_id`) picks a user-assigned identity; no token endpoint.
fn read_managed_identity_flavor(
    f: &Fields<'_>,
    name: &str,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Identity> {
    for key in [
        "token_endpoint",
        "client_secret",
        "client_certificate",
        "client_assertion_file",
        "client_capabilities",
        "auth_method",
    ] {
        if f.value(key).is_some() {
            p.add(
                &f.at(key),
                "a managed identity has no client registration: leave it out",
            );
        }
    }
    let client_id = f.string("client_id", p).map(str::to_owned);
    let mut identity = match f.value("managed_identity") {
        Some(_) => read_managed_identity(f, env, p)?,
        None => ManagedIdentity {
            client_id: None,
            endpoint: managed_identity_endpoint(env, &f.path, p)?,
        },
    };
    match (&identity.client_id, &client_id) {
        (None, _) => identity.client_id.clone_from(&client_id),
        (Some(a), Some(b)) if a != b => p.add(
            &f.at("client_id"),
            format!("names {b:?}, but managed_identity.client_id names {a:?}: set one of them"),
        ),
        (Some(_), _) => {}
    }
    let timeout = f.bounded_duration(
        "timeout",
        DEFAULT_IDP_TIMEOUT,
        Duration::from_millis(100),
        MAX_IDP_TIMEOUT,
        p,
    );
    Some(Identity {
        name: name.to_owned(),
        flavor: Flavor::ManagedIdentity,
        token_endpoint: String::new(),
        client_id: identity.client_id.clone().unwrap_or_default(),
        credential: Credential::ManagedIdentity(identity),
        auth_method: AuthMethod::ManagedIdentity,
        client_capabilities: Vec::new(),
        ca_file: f.pem_roots("ca_file", p),
        timeout,
        max_concurrent: f.integer("max_concurrent", DEFAULT_MAX_CONCURRENT, 1, 10_000, p),
    })
}

/// Exactly one of `client_secret`, `client_certificate`, `client_assertion_file`, `managed_identity` (for
/// Entra, the assertion file falls back to `AZURE_FEDERATED_TOKEN_FILE`). Loaded now, so `check` reports
/// what cannot be read.
fn read_credential(
    f: &Fields<'_>,
    entra: bool,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Credential> {
    let given: Vec<&str> = [
        "client_secret",
        "client_certificate",
        "client_assertion_file",
        "managed_identity",
    ]
    .into_iter()
    .filter(|k| f.value(k).is_some())
    .collect();
    match given.as_slice() {
        [] => {
            if let Some(path) = env("AZURE_FEDERATED_TOKEN_FILE").filter(|_| entra) {
                return Some(Credential::AssertionFile(Arc::new(AssertionFile::new(
                    PathBuf::from(path),
                ))));
            }
            p.add(
                &f.path,
                "no client credential: set client_secret, client_certificate, client_assertion_file or managed_identity",
            );
            None
        }
        ["client_secret"] => {
            read_secret(f, "client_secret", env, p).map(|w| Credential::Secret(Arc::new(w)))
        }
        ["client_certificate"] => {
            let t = f.table("client_certificate", p)?;
            let cf = Fields::new(t, f.at("client_certificate"), &["cert_file", "key_file"], p);
            let cert = cf.required_string("cert_file", p);
            let key = cf.required_string("key_file", p);
            let files = vec![PathBuf::from(cert?), PathBuf::from(key?)];
            match Watched::from_files(files, load_certificate) {
                Ok(watched) => Some(Credential::Certificate(Arc::new(watched))),
                Err(e) => {
                    p.add(&f.at("client_certificate"), crate::error::chain(&e));
                    None
                }
            }
        }
        ["client_assertion_file"] => {
            let path = f.string("client_assertion_file", p)?;
            if let Err(e) = std::fs::metadata(path) {
                p.add(
                    &f.at("client_assertion_file"),
                    format!("cannot read {path}: {e}"),
                );
            }
            Some(Credential::AssertionFile(Arc::new(AssertionFile::new(
                PathBuf::from(path),
            ))))
        }
        ["managed_identity"] => {
            if !entra {
                p.add(
                    &f.at("managed_identity"),
                    "a managed identity is an Entra federated credential (flavor = \"entra\")",
                );
            }
            read_managed_identity(f, env, p).map(Credential::ManagedIdentity)
        }
        several => {
            p.add(
                &f.path,
                format!("set one client credential, not {}", several.join(" and ")),
            );
            None
        }
    }
}

pub(super) fn read_identities(
    top: &Fields<'_>,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> BTreeMap<String, Arc<Identity>> {
    let mut identities = BTreeMap::new();
    if let Some(table) = top.table("identity", p)
        && let Some(identity) = read_identity(table, DEFAULT_IDENTITY, "identity", env, p)
    {
        identities.insert(DEFAULT_IDENTITY.to_owned(), Arc::new(identity));
    }
    if let Some(named) = top.table("identities", p) {
        for (name, value) in named {
            let at = format!("identities.{name}");
            if name == DEFAULT_IDENTITY {
                p.add(&at, "\"default\" is the name of [identity]; choose another");
                continue;
            }
            if !is_name(name) {
                p.add(
                    &at,
                    "use letters, digits, '-' and '_' (it names the identity in logs and metrics)",
                );
                continue;
            }
            let Value::Table(table) = value else {
                p.add(&at, format!("expected a table, found {}", value.type_str()));
                continue;
            };
            if let Some(identity) = read_identity(table, name, &at, env, p) {
                identities.insert(name.clone(), Arc::new(identity));
            }
        }
    }
    identities
}
