//! Entra ID, natively (SPEC §13): the `[entra]` shorthand and Microsoft's auth sidecar variables
//! (`AzureAd__*`) fill the keys an Entra user would otherwise spell out — issuers, audiences, the token
//! endpoint, the credential — before the sections are read, so explicit keys always win and every derived
//! value is listed by `check`; and the checks that know what Entra will refuse at run time.

use toml::{Table, Value};

use super::model::{
    CallerAuth, Config, EnvLookup, Flavor, Problem, TENANT_PLACEHOLDER, TokenKind, is_loopback_addr,
};
use super::walk::{Fields, Problems};

/// An Entra cloud: its authority, its issuers' hosts, and the audience its managed identities' tokens carry
/// as federated credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cloud {
    pub(crate) name: &'static str,
    /// Where tokens are requested (`AZURE_AUTHORITY_HOST` overrides it).
    pub(crate) authority: &'static str,
    /// The host of v2.0 issuers (`https://<host>/<tenant>/v2.0`).
    v2_issuer_host: &'static str,
    /// The v1 issuer's prefix (`<prefix><tenant>/`).
    v1_issuer: &'static str,
    /// `api://AzureADTokenExchange` and its sovereign-cloud twins.
    pub(crate) token_exchange_audience: &'static str,
    /// Every host that belongs to this cloud's Entra.
    hosts: &'static [&'static str],
}

/// The clouds `[entra] cloud` names. The v1 issuer of the US Government cloud is its authority host, the way
/// its v1 discovery document names it; set `inbound.issuers` explicitly if a tenant's tokens say otherwise.
pub(crate) const CLOUDS: [Cloud; 3] = [
    Cloud {
        name: "public",
        authority: "https://login.microsoftonline.com",
        v2_issuer_host: "login.microsoftonline.com",
        v1_issuer: "https://sts.windows.net/",
        token_exchange_audience: "api://AzureADTokenExchange",
        hosts: &[
            "login.microsoftonline.com",
            "login.microsoft.com",
            "login.windows.net",
            "sts.windows.net",
        ],
    },
    Cloud {
        name: "usgov",
        authority: "https://login.microsoftonline.us",
        v2_issuer_host: "login.microsoftonline.us",
        v1_issuer: "https://login.microsoftonline.us/",
        token_exchange_audience: "api://AzureADTokenExchangeUSGov",
        hosts: &["login.microsoftonline.us", "login.usgovcloudapi.net"],
    },
    Cloud {
        name: "china",
        authority: "https://login.chinacloudapi.cn",
        v2_issuer_host: "login.partner.microsoftonline.cn",
        v1_issuer: "https://sts.chinacloudapi.cn/",
        token_exchange_audience: "api://AzureADTokenExchangeChina",
        hosts: &[
            "login.chinacloudapi.cn",
            "login.partner.microsoftonline.cn",
            "sts.chinacloudapi.cn",
        ],
    },
];

/// The cloud a URL's host belongs to, if it is an Entra host.
pub(crate) fn cloud_of(url: &str) -> Option<&'static Cloud> {
    let host = url::Url::parse(&url.replace(TENANT_PLACEHOLDER, "t"))
        .ok()?
        .host_str()?
        .to_ascii_lowercase();
    CLOUDS.iter().find(|c| c.hosts.contains(&host.as_str()))
}

/// The audience a managed identity's token must carry to be a federated credential at `token_endpoint`'s
/// cloud (public when the host is not an Entra one).
pub(crate) fn token_exchange_audience(token_endpoint: &str) -> &'static str {
    cloud_of(token_endpoint).map_or(CLOUDS[0].token_exchange_audience, |c| {
        c.token_exchange_audience
    })
}

/// The prefix of Microsoft's auth sidecar's settings (ASP.NET Core configuration from the environment).
const AZURE_AD: &str = "AzureAd__";
/// How many `AzureAd__ClientCredentials__N__*` are looked at.
const MAX_CREDENTIAL_DESCRIPTIONS: usize = 10;

/// The `[entra]` settings, from the file or from `AzureAd__*`.
struct Shorthand {
    tenant_id: String,
    client_id: String,
    cloud: &'static Cloud,
    authority: String,
    app_id_uri: String,
    /// The credential Microsoft's variables describe, as `[identity]` keys.
    credential: Option<(String, Value)>,
}

/// Fills the keys `[entra]` (or the `AzureAd__*` variables) derive, where the file does not set them, and
/// removes `[entra]`. Each derived key and its value is added to `derived`. True when the tenant is
/// `common` or `organizations` (multi-tenant).
pub(super) fn apply(
    table: &mut Table,
    env: EnvLookup<'_>,
    p: &mut Problems,
    derived: &mut Vec<(String, String)>,
) -> bool {
    let shorthand = match table.remove("entra") {
        Some(Value::Table(entra)) => read_section(&entra, env, p),
        Some(other) => {
            p.add(
                "entra",
                format!("expected a table, found {}", other.type_str()),
            );
            return false;
        }
        None => from_azure_ad(env, p),
    };
    let Some(shorthand) = shorthand else {
        return false;
    };
    let multi_tenant = matches!(shorthand.tenant_id.as_str(), "common" | "organizations");
    let tenant = if multi_tenant {
        TENANT_PLACEHOLDER.to_owned()
    } else {
        shorthand.tenant_id.clone()
    };
    let mut fill = |section: &str, key: &str, value: Value| {
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(section_table) = entry else {
            return;
        };
        if section_table.contains_key(key) {
            return;
        }
        derived.push((format!("{section}.{key}"), value.to_string()));
        section_table.insert(key.to_owned(), value);
    };
    let issuers = vec![
        Value::from(format!(
            "https://{}/{tenant}/v2.0",
            shorthand.cloud.v2_issuer_host
        )),
        Value::from(format!("{}{tenant}/", shorthand.cloud.v1_issuer)),
    ];
    fill("inbound", "issuers", Value::Array(issuers));
    let mut audiences = vec![Value::from(shorthand.client_id.clone())];
    if shorthand.app_id_uri != shorthand.client_id {
        audiences.push(Value::from(shorthand.app_id_uri.clone()));
    }
    fill("inbound", "audiences", Value::Array(audiences));
    fill("identity", "flavor", Value::from("entra"));
    fill(
        "identity",
        "client_id",
        Value::from(shorthand.client_id.clone()),
    );
    fill(
        "identity",
        "token_endpoint",
        Value::from(format!(
            "{}/{tenant}/oauth2/v2.0/token",
            shorthand.authority.trim_end_matches('/')
        )),
    );
    if let Some((key, value)) = shorthand.credential {
        let has_credential = matches!(table.get("identity"), Some(Value::Table(identity))
            if ["client_secret", "client_certificate", "client_assertion_file", "managed_identity"]
                .iter()
                .any(|k| identity.contains_key(*k)));
        if !has_credential {
            let mut fill = |section: &str, key: &str, value: Value| {
                if let Some(Value::Table(t)) = table.get_mut(section) {
                    derived.push((format!("{section}.{key}"), describe(key, &value)));
                    t.insert(key.to_owned(), value);
                }
            };
            fill("identity", &key, value);
        }
    }
    multi_tenant
}

/// A derived credential key's value as `check` shows it: a secret by its variable's name only.
fn describe(key: &str, value: &Value) -> String {
    match (key, value) {
        ("client_secret", Value::Table(t)) => t.get("env").and_then(Value::as_str).map_or_else(
            || "[redacted]".to_owned(),
            |name| format!("{{ env = {name:?} }}"),
        ),
        _ => value.to_string(),
    }
}

fn read_section(entra: &Table, env: EnvLookup<'_>, p: &mut Problems) -> Option<Shorthand> {
    let f = Fields::new(
        entra,
        "entra",
        &["tenant_id", "client_id", "cloud", "app_id_uri"],
        p,
    );
    let tenant_id = f.required_string("tenant_id", p);
    let client_id = f.required_string("client_id", p);
    let name = f.string("cloud", p).unwrap_or("public");
    let cloud = CLOUDS.iter().find(|c| c.name == name);
    if cloud.is_none() {
        p.add(
            &f.at("cloud"),
            format!("unknown cloud {name:?}: \"public\", \"usgov\" or \"china\""),
        );
    }
    let app_id_uri = f.string("app_id_uri", p).map(str::to_owned);
    let (tenant_id, client_id, cloud) = (tenant_id?, client_id?, cloud?);
    check_tenant(tenant_id, &f.at("tenant_id"), p);
    let authority = env("AZURE_AUTHORITY_HOST").unwrap_or_else(|| cloud.authority.to_owned());
    Some(Shorthand {
        tenant_id: tenant_id.to_ascii_lowercase(),
        app_id_uri: app_id_uri.unwrap_or_else(|| format!("api://{client_id}")),
        client_id: client_id.to_owned(),
        cloud,
        authority,
        credential: None,
    })
}

fn check_tenant(tenant_id: &str, at: &str, p: &mut Problems) {
    if !crate::oauth::is_guid(tenant_id) && !matches!(tenant_id, "common" | "organizations") {
        p.add(
            at,
            "a tenant id is a GUID (as in the tokens' tid), or \"organizations\"/\"common\" for a multi-tenant app",
        );
    }
}

/// `[entra]` from Microsoft's auth sidecar's variables, when `AzureAd__TenantId` or `AzureAd__ClientId` is
/// set: `Instance`, `TenantId`, `ClientId`, `Audience`, and the first usable `ClientCredentials__N`.
fn from_azure_ad(env: EnvLookup<'_>, p: &mut Problems) -> Option<Shorthand> {
    let var = |name: &str| {
        env(&format!("{AZURE_AD}{name}"))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let (tenant_id, client_id) = match (var("TenantId"), var("ClientId")) {
        (None, None) => return None,
        (Some(tenant), Some(client)) => (tenant, client),
        (None, _) => {
            p.add("AzureAd__TenantId", "missing (AzureAd__ClientId is set)");
            return None;
        }
        (_, None) => {
            p.add("AzureAd__ClientId", "missing (AzureAd__TenantId is set)");
            return None;
        }
    };
    check_tenant(&tenant_id, "AzureAd__TenantId", p);
    let instance = var("Instance");
    let cloud = match instance.as_deref().map(|i| (i, cloud_of(i))) {
        None => &CLOUDS[0],
        Some((_, Some(cloud))) => cloud,
        Some((instance, None)) => {
            p.add(
                "AzureAd__Instance",
                format!("{instance:?} is not an Entra authority (login.microsoftonline.com, .us or chinacloudapi.cn)"),
            );
            return None;
        }
    };
    let authority = env("AZURE_AUTHORITY_HOST")
        .or(instance)
        .unwrap_or_else(|| cloud.authority.to_owned());
    Some(Shorthand {
        tenant_id: tenant_id.to_ascii_lowercase(),
        app_id_uri: var("Audience").unwrap_or_else(|| format!("api://{client_id}")),
        client_id,
        cloud,
        authority,
        credential: azure_ad_credential(env, p),
    })
}

/// The first `AzureAd__ClientCredentials__N` this sidecar can use, as the `[identity]` key it means
/// (Microsoft.Identity.Web's `CredentialDescription` names).
fn azure_ad_credential(env: EnvLookup<'_>, p: &mut Problems) -> Option<(String, Value)> {
    for n in 0..MAX_CREDENTIAL_DESCRIPTIONS {
        let prefix = format!("{AZURE_AD}ClientCredentials__{n}__");
        let field = |name: &str| {
            env(&format!("{prefix}{name}"))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let Some(source) = field("SourceType") else {
            continue;
        };
        let at = format!("{prefix}SourceType");
        match source.as_str() {
            "ClientSecret" => {
                let mut t = Table::new();
                t.insert("env".into(), Value::from(format!("{prefix}ClientSecret")));
                return Some(("client_secret".into(), Value::Table(t)));
            }
            "SignedAssertionFilePath" => {
                let path = field("SignedAssertionFileDiskPath")
                    .or_else(|| env("AZURE_FEDERATED_TOKEN_FILE"));
                match path {
                    Some(path) => return Some(("client_assertion_file".into(), Value::from(path))),
                    None => p.add(
                        &format!("{prefix}SignedAssertionFileDiskPath"),
                        "missing, and AZURE_FEDERATED_TOKEN_FILE is not set",
                    ),
                }
            }
            "SignedAssertionFromManagedIdentity" => {
                let mut t = Table::new();
                if let Some(id) = field("ManagedIdentityClientId") {
                    t.insert("client_id".into(), Value::from(id));
                }
                return Some(("managed_identity".into(), Value::Table(t)));
            }
            "Path" => {
                if field("CertificatePassword").is_some() {
                    p.add(
                        &format!("{prefix}CertificatePassword"),
                        "password-protected certificates are not read: export the certificate and its key as unencrypted PEM (openssl pkcs12 -in cert.pfx -nodes -out cert.pem) and name that file",
                    );
                    return None;
                }
                let Some(path) = field("CertificateDiskPath") else {
                    p.add(&format!("{prefix}CertificateDiskPath"), "missing");
                    return None;
                };
                let mut t = Table::new();
                t.insert("cert_file".into(), Value::from(path.clone()));
                t.insert("key_file".into(), Value::from(path));
                return Some(("client_certificate".into(), Value::Table(t)));
            }
            other => p.add(
                &at,
                format!("{other:?} is not supported: use ClientSecret, SignedAssertionFilePath, SignedAssertionFromManagedIdentity or Path (a PEM file with the certificate and its key)"),
            ),
        }
    }
    None
}

/// What Entra would refuse at run time (errors), and what is probably a mistake (warnings): SPEC §13.
pub(super) fn check(config: &Config, multi_tenant: bool) -> (Vec<Problem>, Vec<Problem>) {
    let entra_endpoints = || {
        config
            .identities
            .values()
            .filter(|i| i.flavor == Flavor::Entra)
            .map(|i| i.token_endpoint.as_str())
    };
    let tenant_common = multi_tenant
        || entra_endpoints().any(|e| {
            cloud_of(e).is_some() && (e.contains("/common/") || e.contains("/organizations/"))
        });
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let problem = |path: String, message: String| Problem { path, message };
    for (i, route) in config.routes.iter().enumerate() {
        let Some(identity) = config.identities.get(&route.identity) else {
            continue;
        };
        let at = format!("routes[{i}].scopes");
        match (identity.flavor, route.token) {
            (Flavor::Entra | Flavor::ManagedIdentity, TokenKind::App) => {
                let single_default =
                    matches!(route.scopes.as_slice(), [scope] if scope.ends_with("/.default"));
                if !single_default {
                    let resource = route
                        .scopes
                        .first()
                        .map_or("<resource>", |s| resource_of(s));
                    errors.push(problem(
                        at,
                        format!(
                            "route {:?}: Entra needs `<resource>/.default` for app tokens: use `{resource}/.default`",
                            route.name
                        ),
                    ));
                }
            }
            (Flavor::Entra, TokenKind::Obo) => {
                let mut resources: Vec<&str> = route
                    .scopes
                    .iter()
                    .filter(|s| !OIDC_SCOPES.contains(&s.as_str()))
                    .map(|s| resource_of(s))
                    .collect();
                resources.sort_unstable();
                resources.dedup();
                if resources.len() > 1 {
                    errors.push(problem(
                        at,
                        format!(
                            "route {:?}: an Entra token is for one resource; these scopes name {}: split them into one route per resource",
                            route.name,
                            resources.join(" and ")
                        ),
                    ));
                }
            }
            (
                Flavor::ManagedIdentity,
                TokenKind::Obo | TokenKind::Passthrough | TokenKind::None,
            )
            | (Flavor::Entra | Flavor::Rfc8693, _) => {}
        }
    }
    let endpoint_cloud = entra_endpoints().find_map(cloud_of);
    for (i, issuer) in config.inbound.issuers.iter().enumerate() {
        if tenant_common && !issuer.contains(TENANT_PLACEHOLDER) {
            errors.push(problem(
                format!("inbound.issuers[{i}]"),
                format!("a multi-tenant app (tenant \"common\" or \"organizations\") has callers of many tenants: {issuer} names one; use {{tenantid}} templates (https://login.microsoftonline.com/{{tenantid}}/v2.0)"),
            ));
        }
        if let (Some(issuer_cloud), Some(endpoint_cloud)) = (cloud_of(issuer), endpoint_cloud)
            && issuer_cloud != endpoint_cloud
        {
            errors.push(problem(
                format!("inbound.issuers[{i}]"),
                format!(
                    "{issuer} is the {} cloud's, the token endpoint the {} cloud's: a token of one cloud is never exchanged in another",
                    issuer_cloud.name, endpoint_cloud.name
                ),
            ));
        }
    }
    let mut policies = vec![("inbound".to_owned(), &config.inbound.policy)];
    // A route without a policy of its own carries `[inbound]`'s, which is already looked at.
    policies.extend(
        config
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.policy.required_scopes != config.inbound.policy.required_scopes)
            .map(|(i, r)| (format!("routes[{i}]"), &r.policy)),
    );
    for (at, policy) in policies {
        for (j, scope) in policy.required_scopes.iter().flatten().enumerate() {
            if scope.contains("://") {
                let short = scope.rsplit('/').next().unwrap_or(scope);
                warnings.push(problem(
                    format!("{at}.required_scopes[{j}]"),
                    format!("{scope:?} looks fully qualified; Entra's scp holds only the scope's name: use {short:?}"),
                ));
            }
        }
    }
    let needs_caller = config
        .routes
        .iter()
        .any(|r| r.caller_auth == CallerAuth::Required);
    if !is_loopback_addr(&config.listen.proxy) && config.listen.tls.is_none() && needs_caller {
        warnings.push(problem(
            "listen.proxy".to_owned(),
            "network-facing proxy listener without TLS: callers' tokens cross the network in clear text; set listen.tls or terminate TLS in front".to_owned(),
        ));
    }
    (errors, warnings)
}

/// Scopes that ask for sign-in, not for a resource.
const OIDC_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

/// The resource a scope is for: the part before the scope's name (`api://reports/Reports.Read` ->
/// `api://reports`); a bare name is Microsoft Graph's, as Entra reads it.
fn resource_of(scope: &str) -> &str {
    match scope.rfind('/') {
        Some(i) if scope.contains("://") && i > scope.find("://").unwrap_or(0) + 2 => &scope[..i],
        _ => "https://graph.microsoft.com",
    }
}

#[cfg(test)]
mod tests;
