//! `[identity]` and `[identities.NAME]`: the sidecar's own client registrations at IdPs, and their
//! credentials. The only place secrets and keys are read from files and the environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::{Table, Value};

use super::credential::{AuthMethod, CertificateKey, Credential};
use super::model::{
    DEFAULT_AZURE_AUTHORITY_HOST, DEFAULT_IDENTITY, DEFAULT_IDP_TIMEOUT, DEFAULT_MAX_CONCURRENT,
    EnvLookup, Flavor, Identity, MAX_IDP_TIMEOUT,
};
use super::walk::{Fields, Problems, is_name, require_https, template_url};
use crate::secret::Secret;

pub(super) fn read_secret(
    f: &Fields<'_>,
    key: &str,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Secret> {
    let at = f.at(key);
    match f.value(key)? {
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
                    Some(value) if !value.trim().is_empty() => Some(Secret::new(value.trim())),
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
                (None, Some(path)) => match std::fs::read_to_string(path) {
                    Ok(value) if !value.trim().is_empty() => Some(Secret::new(value.trim())),
                    Ok(_) => {
                        p.add(&sf.at("file"), format!("{path} is empty"));
                        None
                    }
                    Err(e) => {
                        p.add(&sf.at("file"), format!("cannot read {path}: {e}"));
                        None
                    }
                },
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
        other => {
            p.add(
                &f.at("flavor"),
                format!("unknown flavor {other:?}: \"entra\" or \"rfc8693\""),
            );
            None
        }
    };
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
                        | (None, _)
                );
                if !fits {
                    p.add(
                    &f.at("auth_method"),
                    format!("{text:?} does not fit the credential given (client_secret: client_secret_post or client_secret_basic; client_certificate: private_key_jwt; client_assertion_file: client_assertion_file)"),
                );
                }
                Some(method)
            } else {
                p.add(
                &f.at("auth_method"),
                format!("unknown auth_method {text:?}: client_secret_post, client_secret_basic, private_key_jwt or client_assertion_file"),
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

/// Exactly one of `client_secret`, `client_certificate`, `client_assertion_file` (for Entra, the last falls
/// back to `AZURE_FEDERATED_TOKEN_FILE`). Loaded now, so `check` reports what cannot be read.
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
    ]
    .into_iter()
    .filter(|k| f.value(k).is_some())
    .collect();
    match given.as_slice() {
        [] => {
            if let Some(path) = env("AZURE_FEDERATED_TOKEN_FILE").filter(|_| entra) {
                return Some(Credential::AssertionFile(PathBuf::from(path)));
            }
            p.add(
                &f.path,
                "no client credential: set client_secret, client_certificate or client_assertion_file",
            );
            None
        }
        ["client_secret"] => read_secret(f, "client_secret", env, p).map(Credential::Secret),
        ["client_certificate"] => {
            let t = f.table("client_certificate", p)?;
            let cf = Fields::new(t, f.at("client_certificate"), &["cert_file", "key_file"], p);
            let cert = cf.required_string("cert_file", p);
            let key = cf.required_string("key_file", p);
            match CertificateKey::load(Path::new(cert?), Path::new(key?)) {
                Ok(loaded) => Some(Credential::Certificate(std::sync::Arc::new(loaded))),
                Err(e) => {
                    p.add(&f.at("client_certificate"), e.to_string());
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
            Some(Credential::AssertionFile(PathBuf::from(path)))
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
