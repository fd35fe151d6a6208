//! Entra ID, natively (SPEC §13): the `[entra]` shorthand and Microsoft's auth sidecar variables
//! (`AzureAd__*`) fill the keys an Entra user would otherwise spell out — issuers, audiences, the token
//! endpoint, the credential — before the sections are read, so explicit keys always win and every derived
//! value is listed by `check`; and the checks that know what Entra will refuse at run time.

use toml::{Table, Value};

use super::credential::Credential;
use super::model::{
    CallerAuth, Config, DEFAULT_IDENTITY, EnvLookup, Flavor, Problem, TENANT_PLACEHOLDER,
    TokenKind, is_loopback_addr,
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

/// The clouds `[entra] cloud` names. v1 tokens of the US Government cloud carry the public cloud's v1 issuer
/// host (`https://sts.windows.net/<tenant>/`), so that host belongs to both; set `inbound.issuers` explicitly
/// if a tenant's tokens say otherwise.
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
        v1_issuer: "https://sts.windows.net/",
        token_exchange_audience: "api://AzureADTokenExchangeUSGov",
        hosts: &[
            "login.microsoftonline.us",
            "login.usgovcloudapi.net",
            "sts.windows.net",
        ],
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

/// The cloud a URL's host belongs to, if it is an Entra host (the first, for a host two clouds share).
pub(crate) fn cloud_of(url: &str) -> Option<&'static Cloud> {
    clouds_of(url).next()
}

/// Every cloud a URL's host belongs to.
fn clouds_of(url: &str) -> impl Iterator<Item = &'static Cloud> {
    let host = url::Url::parse(&url.replace(TENANT_PLACEHOLDER, "t"))
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    CLOUDS
        .iter()
        .filter(move |c| host.as_deref().is_some_and(|h| c.hosts.contains(&h)))
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
/// The same, as `Config::load` matches it (in any letter case).
pub(super) const AZURE_AD_LOWER: &str = "azuread__";
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
    /// More `[inbound]` keys Microsoft's variables set (`Scopes`, ACL-authorized callers).
    inbound: Vec<(&'static str, Value)>,
    /// More audiences (`AzureAd__Audiences__N`).
    audiences: Vec<String>,
}

/// What [`apply`] derived: every key it filled with its value (for `check`), its warnings, and whether the
/// tenant is `common` or `organizations` (multi-tenant).
#[derive(Default)]
pub(super) struct Derivation {
    pub(super) derived: Vec<(String, String)>,
    pub(super) warnings: Vec<Problem>,
    pub(super) multi_tenant: bool,
}

/// True when some `obo` or `app` route uses the default identity (`[identity]`).
fn default_identity_used(table: &Table) -> bool {
    let Some(Value::Array(routes)) = table.get("routes") else {
        return false;
    };
    routes.iter().any(|route| {
        let token = route.get("token").and_then(Value::as_str);
        let identity = route.get("identity").and_then(Value::as_str);
        matches!(token, Some("obo" | "app")) && matches!(identity, None | Some("default"))
    })
}

/// Fills the keys `[entra]` (or the `AzureAd__*` variables) derive, where the file does not set them, and
/// removes `[entra]`. `[identity]` is derived only when it is an Entra identity (its `flavor` unset or
/// `"entra"`) that the file writes or a route uses.
pub(super) fn apply(table: &mut Table, env: EnvLookup<'_>, p: &mut Problems) -> Derivation {
    let mut out = Derivation::default();
    let shorthand = match table.remove("entra") {
        Some(Value::Table(entra)) => read_section(&entra, env, p),
        Some(other) => {
            p.add(
                "entra",
                format!("expected a table, found {}", other.type_str()),
            );
            return out;
        }
        None => from_azure_ad(env, p, &mut out.warnings),
    };
    let Some(shorthand) = shorthand else {
        return out;
    };
    out.multi_tenant = matches!(shorthand.tenant_id.as_str(), "common" | "organizations");
    let tenant = if out.multi_tenant {
        TENANT_PLACEHOLDER.to_owned()
    } else {
        shorthand.tenant_id.clone()
    };
    let derived = &mut out.derived;
    let mut fill = |table: &mut Table, section: &str, key: &str, value: Value| {
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(section_table) = entry else {
            return;
        };
        if section_table.contains_key(key) {
            return;
        }
        derived.push((format!("{section}.{key}"), describe(key, &value)));
        section_table.insert(key.to_owned(), value);
    };
    let issuers = vec![
        Value::from(format!(
            "https://{}/{tenant}/v2.0",
            shorthand.cloud.v2_issuer_host
        )),
        Value::from(format!("{}{tenant}/", shorthand.cloud.v1_issuer)),
    ];
    fill(table, "inbound", "issuers", Value::Array(issuers));
    let mut audiences = vec![shorthand.client_id.clone()];
    for audience in std::iter::once(&shorthand.app_id_uri).chain(&shorthand.audiences) {
        if !audiences.contains(audience) {
            audiences.push(audience.clone());
        }
    }
    let audiences: Vec<Value> = audiences.into_iter().map(Value::from).collect();
    fill(table, "inbound", "audiences", Value::Array(audiences));
    for (key, value) in shorthand.inbound {
        fill(table, "inbound", key, value);
    }
    let explicit_flavor = table
        .get("identity")
        .and_then(|identity| identity.get("flavor"))
        .and_then(Value::as_str);
    let derive_identity = matches!(explicit_flavor, None | Some("entra"))
        && (table.contains_key("identity") || default_identity_used(table));
    if !derive_identity {
        return out;
    }
    fill(table, "identity", "flavor", Value::from("entra"));
    fill(
        table,
        "identity",
        "client_id",
        Value::from(shorthand.client_id.clone()),
    );
    fill(
        table,
        "identity",
        "token_endpoint",
        Value::from(format!(
            "{}/{tenant}/oauth2/v2.0/token",
            shorthand.authority.trim_end_matches('/')
        )),
    );
    if let Some((key, value)) = shorthand.credential {
        let has_credential = matches!(table.get("identity"), Some(Value::Table(identity))
            if CREDENTIAL_KEYS.iter().any(|k| identity.contains_key(*k)));
        if !has_credential {
            fill(table, "identity", &key, value);
        }
    }
    out
}

/// The `[identity]` keys that name a credential: one of them set in the file wins over Microsoft's.
const CREDENTIAL_KEYS: [&str; 4] = [
    "client_secret",
    "client_certificate",
    "client_assertion_file",
    "managed_identity",
];

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
    let authority_host = env("AZURE_AUTHORITY_HOST")
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty());
    let host_cloud = authority_host.as_deref().and_then(cloud_of);
    let cloud = match f.string("cloud", p) {
        None => Some(host_cloud.unwrap_or(&CLOUDS[0])),
        Some(name) => match CLOUDS.iter().find(|c| c.name == name) {
            None => {
                p.add(
                    &f.at("cloud"),
                    format!("unknown cloud {name:?}: \"public\", \"usgov\" or \"china\""),
                );
                None
            }
            Some(cloud) => {
                if let (Some(host), Some(host_cloud)) = (&authority_host, host_cloud)
                    && host_cloud.name != cloud.name
                {
                    p.add(
                        &f.at("cloud"),
                        format!(
                            "{name:?}, but AZURE_AUTHORITY_HOST={host} is the {} cloud's: set cloud = {:?} or unset the variable",
                            host_cloud.name, host_cloud.name
                        ),
                    );
                }
                Some(cloud)
            }
        },
    };
    let app_id_uri = f.string("app_id_uri", p).map(str::to_owned);
    let (tenant_id, client_id, cloud) = (tenant_id?, client_id?, cloud?);
    let tenant_id = tenant_id.to_ascii_lowercase();
    check_tenant(&tenant_id, &f.at("tenant_id"), p);
    let authority = authority_host.unwrap_or_else(|| cloud.authority.to_owned());
    Some(Shorthand {
        tenant_id,
        app_id_uri: app_id_uri.unwrap_or_else(|| format!("api://{client_id}")),
        client_id: client_id.to_owned(),
        cloud,
        authority,
        credential: None,
        inbound: Vec::new(),
        audiences: Vec::new(),
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
/// set: `Instance`, `TenantId`, `ClientId`, `Audience`, `Audiences__N`, `Scopes`,
/// `AllowWebApiToBeAuthorizedByACL`, and the first usable `ClientCredentials__N`. (`Config::load` reads the
/// `AzureAd__` names case-insensitively, as .NET configuration does.)
fn from_azure_ad(
    env: EnvLookup<'_>,
    p: &mut Problems,
    warnings: &mut Vec<Problem>,
) -> Option<Shorthand> {
    let var = |name: &str| {
        env(&format!("{AZURE_AD}{name}"))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let (tenant_id, client_id) = match (var("TenantId"), var("ClientId")) {
        (None, None) => return None,
        (Some(tenant), Some(client)) => (tenant.to_ascii_lowercase(), client),
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
    // Microsoft.Identity.Web's authority is `Instance`; AZURE_AUTHORITY_HOST only stands in for it.
    let instance = var("Instance").or_else(|| {
        env("AZURE_AUTHORITY_HOST")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    });
    let cloud = match instance.as_deref().map(|i| (i, cloud_of(i))) {
        None => &CLOUDS[0],
        Some((_, Some(cloud))) => cloud,
        Some((instance, None)) => {
            p.add(
                "AzureAd__Instance",
                format!("{instance:?} is not an Entra authority (https://login.microsoftonline.com/, .us or login.chinacloudapi.cn)"),
            );
            return None;
        }
    };
    let mut inbound = Vec::new();
    let audiences: Vec<String> = (0..MAX_LIST_ENTRIES)
        .filter_map(|n| var(&format!("Audiences__{n}")))
        .collect();
    if let Some(scopes) = var("Scopes") {
        let scopes: Vec<Value> = scopes
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(Value::from)
            .collect();
        inbound.push(("required_scopes", Value::Array(scopes)));
    }
    match var("AllowWebApiToBeAuthorizedByACL").map(|v| v.to_ascii_lowercase()) {
        None => {}
        Some(v) if v == "true" => inbound.push(("allow_acl_tokens", Value::Boolean(true))),
        Some(v) if v == "false" => {}
        Some(_) => p.add(
            "AzureAd__AllowWebApiToBeAuthorizedByACL",
            "expected true or false",
        ),
    }
    let app_id_uri = var("Audience").unwrap_or_else(|| format!("api://{client_id}"));
    Some(Shorthand {
        tenant_id,
        app_id_uri,
        client_id,
        cloud,
        authority: instance.unwrap_or_else(|| cloud.authority.to_owned()),
        credential: azure_ad_credential(env, cloud, p, warnings),
        inbound,
        audiences,
    })
}

/// How many `AzureAd__…__N` list entries are looked at.
const MAX_LIST_ENTRIES: usize = 10;

/// The first `AzureAd__ClientCredentials__N` this sidecar can use, as the `[identity]` key it means
/// (Microsoft.Identity.Web's `CredentialDescription` names; `SourceType` in any letter case). Entries it
/// cannot use are skipped with a warning when a later one is usable, as Microsoft.Identity.Web skips them;
/// they are errors when none is.
fn azure_ad_credential(
    env: EnvLookup<'_>,
    cloud: &Cloud,
    p: &mut Problems,
    warnings: &mut Vec<Problem>,
) -> Option<(String, Value)> {
    let mut skipped = Vec::new();
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
        match credential_description(&prefix, &source, &field, env, cloud) {
            Ok(credential) => {
                warnings.extend(skipped);
                return Some(credential);
            }
            Err(problem) => skipped.push(problem),
        }
    }
    for problem in skipped {
        p.add(&problem.path, problem.message);
    }
    None
}

/// One `CredentialDescription` as an `[identity]` credential key, or why it cannot be used.
fn credential_description(
    prefix: &str,
    source: &str,
    field: &dyn Fn(&str) -> Option<String>,
    env: EnvLookup<'_>,
    cloud: &Cloud,
) -> Result<(String, Value), Problem> {
    let problem = |name: &str, message: String| Problem {
        path: format!("{prefix}{name}"),
        message,
    };
    match source.to_ascii_lowercase().as_str() {
        "clientsecret" => {
            let mut t = Table::new();
            t.insert("env".into(), Value::from(format!("{prefix}ClientSecret")));
            Ok(("client_secret".into(), Value::Table(t)))
        }
        "signedassertionfilepath" => field("SignedAssertionFileDiskPath")
            .or_else(|| field("SignedAssertionFilePath"))
            .or_else(|| env("AZURE_FEDERATED_TOKEN_FILE"))
            .or_else(|| env("AZURE_ACCESS_TOKEN_FILE"))
            .map(|path| ("client_assertion_file".into(), Value::from(path)))
            .ok_or_else(|| {
                problem(
                    "SignedAssertionFileDiskPath",
                    "missing, and neither AZURE_FEDERATED_TOKEN_FILE nor AZURE_ACCESS_TOKEN_FILE is set"
                        .to_owned(),
                )
            }),
        "signedassertionfrommanagedidentity" => {
            if let Some(url) = field("TokenExchangeUrl")
                && url.trim_end_matches("/.default") != cloud.token_exchange_audience
            {
                return Err(problem(
                    "TokenExchangeUrl",
                    format!(
                        "{url:?}: the managed identity's token is requested for {} (the {} cloud's); another audience is not supported",
                        cloud.token_exchange_audience, cloud.name
                    ),
                ));
            }
            let mut t = Table::new();
            if let Some(id) = field("ManagedIdentityClientId") {
                t.insert("client_id".into(), Value::from(id));
            }
            Ok(("managed_identity".into(), Value::Table(t)))
        }
        "path" => {
            if field("CertificatePassword").is_some() {
                return Err(problem(
                    "CertificatePassword",
                    "password-protected certificates are not read: export the certificate and its key as unencrypted PEM (openssl pkcs12 -in cert.pfx -nodes -out cert.pem) and name that file".to_owned(),
                ));
            }
            let path = field("CertificateDiskPath")
                .ok_or_else(|| problem("CertificateDiskPath", "missing".to_owned()))?;
            let pkcs12 = std::path::Path::new(&path)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("pfx") || e.eq_ignore_ascii_case("p12"));
            if pkcs12 {
                return Err(problem(
                    "CertificateDiskPath",
                    format!("{path}: PKCS#12 files are not read: convert it to one PEM file with the certificate and its key (openssl pkcs12 -in {path} -nodes -out cert.pem) and name that file"),
                ));
            }
            let mut t = Table::new();
            t.insert("cert_file".into(), Value::from(path.clone()));
            t.insert("key_file".into(), Value::from(path));
            Ok(("client_certificate".into(), Value::Table(t)))
        }
        _ => Err(problem(
            "SourceType",
            format!("{source:?} is not supported: use ClientSecret, SignedAssertionFilePath, SignedAssertionFromManagedIdentity or Path (a PEM file with the certificate and its key)"),
        )),
    }
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
            (Flavor::ManagedIdentity, TokenKind::Obo) => errors.push(problem(
                format!("routes[{i}].identity"),
                format!(
                    "route {:?}: identity {:?} is a managed identity, which cannot act on behalf of a caller: use an identity with flavor = \"entra\" and managed_identity = {{ client_id = \"…\" }} as its credential",
                    route.name, identity.name
                ),
            )),
            (Flavor::ManagedIdentity, TokenKind::Passthrough | TokenKind::None)
            | (Flavor::Entra | Flavor::Rfc8693, _) => {}
        }
    }
    for identity in config.identities.values() {
        if identity.flavor == Flavor::Entra
            && let Credential::ManagedIdentity(mi) = &identity.credential
            && mi.client_id.is_none()
        {
            warnings.push(problem(
                format!("{}.managed_identity", identity_path(&identity.name)),
                "Entra accepts a user-assigned managed identity as an app's federated credential, not a system-assigned one: name it with managed_identity = { client_id = \"<its client id>\" }".to_owned(),
            ));
        }
    }
    if tenant_common && config.inbound.allowed_tenants.is_empty() {
        warnings.push(problem(
            "inbound.allowed_tenants".to_owned(),
            "a multi-tenant app accepts callers of every Entra tenant: list the tenants you serve (their tid GUIDs)".to_owned(),
        ));
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
            && !clouds_of(issuer).any(|c| c == endpoint_cloud)
        {
            let tenant = if issuer.contains(TENANT_PLACEHOLDER) {
                TENANT_PLACEHOLDER
            } else {
                "<tenant>"
            };
            errors.push(problem(
                format!("inbound.issuers[{i}]"),
                format!(
                    "{issuer} is the {} cloud's, the token endpoint the {} cloud's: a token of one cloud is never exchanged in another; use https://{}/{tenant}/v2.0 (with [entra], set cloud = {:?})",
                    issuer_cloud.name, endpoint_cloud.name, endpoint_cloud.v2_issuer_host, endpoint_cloud.name
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

/// An identity's table: `identity` for the default one, `identities.NAME` for the others.
fn identity_path(name: &str) -> String {
    if name == DEFAULT_IDENTITY {
        "identity".to_owned()
    } else {
        format!("identities.{name}")
    }
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
