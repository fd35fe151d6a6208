//! The `[entra]` shorthand and the `AzureAd__*` variables derive what the explicit keys say, per cloud; and
//! each Entra error and warning of `check`, with its key and its fix.

use super::*;
use crate::config::{AuthMethod, Config, Credential, Flavor};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "0ab2c1f4-6d0e-4c8e-9a55-6f0e1c2b3a4d";

const ROUTES: &str = r#"
[[routes]]
name = "graph"
path_prefix = "/graph/"
upstream = "https://graph.microsoft.com/v1.0/"
token = "obo"
scopes = ["https://graph.microsoft.com/User.Read"]
"#;

fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name: &str| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

const SECRET_ENV: &[(&str, &str)] = &[("OBO_CLIENT_SECRET", "s3cret")];

fn parse(text: &str, vars: &'static [(&'static str, &'static str)]) -> Config {
    match Config::parse(text, &env_of(vars)) {
        Ok(config) => config,
        Err(e) => panic!("{text}\n{e}"),
    }
}

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, &env_of(SECRET_ENV)) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

fn warnings(text: &str) -> Vec<String> {
    parse(text, SECRET_ENV)
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn shorthand(cloud: &str) -> String {
    format!(
        "[entra]\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT}\"\ncloud = \"{cloud}\"\n\n[identity]\nclient_secret = {{ env = \"OBO_CLIENT_SECRET\" }}\n{ROUTES}"
    )
}

fn explicit(v2_host: &str, v1: &str, authority: &str) -> String {
    format!(
        r#"[inbound]
issuers = ["https://{v2_host}/{TENANT}/v2.0", "{v1}{TENANT}/"]
audiences = ["{CLIENT}", "api://{CLIENT}"]

[identity]
flavor = "entra"
client_id = "{CLIENT}"
token_endpoint = "{authority}/{TENANT}/oauth2/v2.0/token"
client_secret = {{ env = "OBO_CLIENT_SECRET" }}
{ROUTES}"#
    )
}

/// What the shorthand derives, side by side with what the explicit keys say.
fn assert_same(derived: &Config, explicit: &Config) {
    assert_eq!(derived.inbound.issuers, explicit.inbound.issuers);
    assert_eq!(derived.inbound.audiences, explicit.inbound.audiences);
    let (d, e) = (
        &derived.identities["default"],
        &explicit.identities["default"],
    );
    assert_eq!(d.flavor, e.flavor);
    assert_eq!(d.client_id, e.client_id);
    assert_eq!(d.token_endpoint, e.token_endpoint);
    assert_eq!(d.auth_method, e.auth_method);
}

#[test]
fn the_shorthand_derives_the_explicit_config_in_each_cloud() {
    for (cloud, v2_host, v1, authority) in [
        (
            "public",
            "login.microsoftonline.com",
            "https://sts.windows.net/",
            "https://login.microsoftonline.com",
        ),
        (
            "usgov",
            "login.microsoftonline.us",
            "https://sts.windows.net/",
            "https://login.microsoftonline.us",
        ),
        (
            "china",
            "login.partner.microsoftonline.cn",
            "https://sts.chinacloudapi.cn/",
            "https://login.chinacloudapi.cn",
        ),
    ] {
        let derived = parse(&shorthand(cloud), SECRET_ENV);
        let spelled = parse(&explicit(v2_host, v1, authority), SECRET_ENV);
        assert_same(&derived, &spelled);
        assert!(spelled.derived.is_empty());
        let keys: Vec<&str> = derived.derived.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "inbound.issuers",
                "inbound.audiences",
                "identity.flavor",
                "identity.client_id",
                "identity.token_endpoint"
            ],
            "{cloud}"
        );
        assert!(
            derived.warnings.is_empty(),
            "{cloud}: {:?}",
            derived.warnings
        );
    }
}

#[test]
fn the_authority_host_variable_and_app_id_uri_are_used() {
    static VARS: &[(&str, &str)] = &[
        ("OBO_CLIENT_SECRET", "s3cret"),
        ("AZURE_AUTHORITY_HOST", "https://login.example-proxy.test/"),
    ];
    let text = shorthand("public").replace(
        "cloud = \"public\"",
        "cloud = \"public\"\napp_id_uri = \"https://contoso.example/api\"",
    );
    let config = parse(&text, VARS);
    assert_eq!(
        config.identities["default"].token_endpoint,
        format!("https://login.example-proxy.test/{TENANT}/oauth2/v2.0/token")
    );
    assert_eq!(
        config.inbound.audiences,
        [CLIENT.to_owned(), "https://contoso.example/api".to_owned()]
    );
}

#[test]
fn a_multi_tenant_app_gets_tenant_templates() {
    for tenant in ["common", "organizations"] {
        let config = parse(&shorthand("public").replace(TENANT, tenant), SECRET_ENV);
        assert_eq!(
            config.inbound.issuers,
            [
                "https://login.microsoftonline.com/{tenantid}/v2.0",
                "https://sts.windows.net/{tenantid}/"
            ]
        );
        assert_eq!(
            config.identities["default"].token_endpoint,
            "https://login.microsoftonline.com/{tenantid}/oauth2/v2.0/token"
        );
    }
}

#[test]
fn explicit_keys_win_over_derived_ones() {
    let text = shorthand("public").replace(
        "[identity]\n",
        "[inbound]\naudiences = [\"api://only-this\"]\n\n[identity]\ntoken_endpoint = \"https://login.microsoftonline.com/other/oauth2/v2.0/token\"\n",
    );
    let config = parse(&text, SECRET_ENV);
    assert_eq!(config.inbound.audiences, ["api://only-this"]);
    assert_eq!(
        config.identities["default"].token_endpoint,
        "https://login.microsoftonline.com/other/oauth2/v2.0/token"
    );
    assert!(
        config
            .derived
            .iter()
            .all(|(k, _)| k != "inbound.audiences" && k != "identity.token_endpoint"),
        "{:?}",
        config.derived
    );
    assert!(config.derived.iter().any(|(k, _)| k == "inbound.issuers"));
}

#[test]
fn bad_shorthand_values_are_named() {
    let bad = shorthand("public")
        .replace(TENANT, "contoso.onmicrosoft.com")
        .replace("cloud = \"public\"", "cloud = \"germany\"");
    let found = problems(&bad);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("entra.cloud: unknown cloud \"germany\"")),
        "{found:?}"
    );
    let found = problems(&shorthand("public").replace(TENANT, "contoso.onmicrosoft.com"));
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("entra.tenant_id: a tenant id is a GUID")),
        "{found:?}"
    );
    let found = problems(&format!("[entra]\ntenant_id = \"{TENANT}\"\n{ROUTES}"));
    assert!(
        found.iter().any(|p| p.starts_with("entra.client_id")),
        "{found:?}"
    );
}

// -------------------------------------------------------------------------------------------------------
// Microsoft's auth sidecar's variables

static AZURE_AD_SECRET: &[(&str, &str)] = &[
    ("AzureAd__Instance", "https://login.microsoftonline.com/"),
    ("AzureAd__TenantId", TENANT),
    ("AzureAd__ClientId", CLIENT),
    ("AzureAd__ClientCredentials__0__SourceType", "ClientSecret"),
    (
        "AzureAd__ClientCredentials__0__ClientSecret",
        "from-azure-ad",
    ),
];

#[test]
fn azure_ad_variables_and_routes_alone_make_a_config() {
    let config = parse(ROUTES, AZURE_AD_SECRET);
    let spelled = parse(
        &explicit(
            "login.microsoftonline.com",
            "https://sts.windows.net/",
            "https://login.microsoftonline.com",
        ),
        SECRET_ENV,
    );
    assert_same(&config, &spelled);
    let identity = &config.identities["default"];
    assert!(
        matches!(&identity.credential, Credential::Secret(s) if s.get().expose() == "from-azure-ad")
    );
    let credential = config
        .derived
        .iter()
        .find(|(k, _)| k == "identity.client_secret")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        credential,
        Some("{ env = \"AzureAd__ClientCredentials__0__ClientSecret\" }"),
        "the variable's name, never its value"
    );
}

#[test]
fn azure_ad_audience_and_sovereign_instance_are_read() {
    static VARS: &[(&str, &str)] = &[
        ("AzureAd__Instance", "https://login.chinacloudapi.cn/"),
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__Audience", "api://reports-api"),
        ("AzureAd__ClientCredentials__0__SourceType", "ClientSecret"),
        ("AzureAd__ClientCredentials__0__ClientSecret", "x"),
    ];
    let config = parse(ROUTES, VARS);
    assert_eq!(
        config.inbound.issuers,
        [
            format!("https://login.partner.microsoftonline.cn/{TENANT}/v2.0"),
            format!("https://sts.chinacloudapi.cn/{TENANT}/")
        ]
    );
    assert_eq!(config.inbound.audiences, [CLIENT, "api://reports-api"]);
    assert_eq!(
        config.identities["default"].token_endpoint,
        format!("https://login.chinacloudapi.cn/{TENANT}/oauth2/v2.0/token")
    );
}

#[test]
fn azure_ad_credential_descriptions_map_to_credentials() {
    static MANAGED: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        (
            "AzureAd__ClientCredentials__0__SourceType",
            "SignedAssertionFromManagedIdentity",
        ),
        (
            "AzureAd__ClientCredentials__0__ManagedIdentityClientId",
            "11111111-2222-3333-4444-555555555555",
        ),
    ];
    static FILE: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        (
            "AzureAd__ClientCredentials__0__SourceType",
            "SignedAssertionFilePath",
        ),
        // Any file that exists: the configuration checks that it can be read.
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ),
    ];
    static UNUSABLE_FIRST: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__ClientCredentials__0__SourceType", "KeyVault"),
        ("AzureAd__ClientCredentials__1__SourceType", "ClientSecret"),
        ("AzureAd__ClientCredentials__1__ClientSecret", "second"),
    ];
    static ONLY_UNUSABLE: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__ClientCredentials__0__SourceType", "KeyVault"),
    ];
    static PASSWORD: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__ClientCredentials__0__SourceType", "Path"),
        (
            "AzureAd__ClientCredentials__0__CertificateDiskPath",
            "/certs/app.pfx",
        ),
        (
            "AzureAd__ClientCredentials__0__CertificatePassword",
            "pfx-password",
        ),
    ];
    let config = parse(ROUTES, MANAGED);
    let identity = &config.identities["default"];
    assert_eq!(identity.auth_method, AuthMethod::ManagedIdentity);
    assert!(
        matches!(&identity.credential, Credential::ManagedIdentity(mi)
        if mi.client_id.as_deref() == Some("11111111-2222-3333-4444-555555555555"))
    );

    let config = parse(ROUTES, FILE);
    assert!(
        matches!(&config.identities["default"].credential, Credential::AssertionFile(f)
        if f.path.ends_with("Cargo.toml"))
    );

    // An entry this sidecar cannot use is skipped with a warning when a later one can be used...
    let config = parse(ROUTES, UNUSABLE_FIRST);
    assert!(
        matches!(&config.identities["default"].credential, Credential::Secret(s)
        if s.get().expose() == "second")
    );
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.iter().any(|p| p.starts_with(
            "AzureAd__ClientCredentials__0__SourceType: \"KeyVault\" is not supported"
        )),
        "{warnings:?}"
    );
    // ...and is an error when none can.
    let found = match Config::parse(ROUTES, &env_of(ONLY_UNUSABLE)) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    };
    assert!(
        found.iter().any(|p| p.starts_with(
            "AzureAd__ClientCredentials__0__SourceType: \"KeyVault\" is not supported"
        )),
        "{found:?}"
    );

    let error = match Config::parse(ROUTES, &env_of(PASSWORD)) {
        Ok(_) => panic!("a password-protected certificate is refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("AzureAd__ClientCredentials__0__CertificatePassword"),
        "{error}"
    );
    assert!(
        !error.contains("pfx-password"),
        "the password is never shown"
    );
}

#[test]
fn a_half_set_azure_ad_pair_is_named() {
    static HALF: &[(&str, &str)] = &[("AzureAd__ClientId", CLIENT)];
    let found = match Config::parse(ROUTES, &env_of(HALF)) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    };
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("AzureAd__TenantId: missing")),
        "{found:?}"
    );
}

// -------------------------------------------------------------------------------------------------------
// check knows Entra

#[test]
fn an_app_route_needs_one_resource_default_scope() {
    let text = shorthand("public")
        + "\n[[routes]]\nname = \"reports\"\npath_prefix = \"/reports/\"\nupstream = \"https://reports.example/\"\ntoken = \"app\"\nscopes = [\"api://reports/Reports.Read\"]\n";
    assert_eq!(
        problems(&text),
        [
            "routes[1].scopes: route \"reports\": Entra needs `<resource>/.default` for app tokens: use `api://reports/.default`"
        ]
    );
    let two = text.replace(
        "[\"api://reports/Reports.Read\"]",
        "[\"api://reports/.default\", \"api://other/.default\"]",
    );
    assert_eq!(problems(&two).len(), 1);
    let good = text.replace("api://reports/Reports.Read", "api://reports/.default");
    assert!(problems(&good).is_empty());
}

#[test]
fn an_obo_route_names_one_resource() {
    let text = shorthand("public").replace(
        "scopes = [\"https://graph.microsoft.com/User.Read\"]",
        "scopes = [\"https://graph.microsoft.com/User.Read\", \"api://reports/Reports.Read\", \"offline_access\"]",
    );
    assert_eq!(
        problems(&text),
        [
            "routes[0].scopes: route \"graph\": an Entra token is for one resource; these scopes name api://reports and https://graph.microsoft.com: split them into one route per resource"
        ]
    );
    // Bare names are Graph's, and the sign-in scopes name no resource.
    let graph = shorthand("public").replace(
        "scopes = [\"https://graph.microsoft.com/User.Read\"]",
        "scopes = [\"User.Read\", \"https://graph.microsoft.com/Mail.Read\", \"openid\"]",
    );
    assert!(problems(&graph).is_empty());
}

#[test]
fn a_multi_tenant_app_with_fixed_issuers_is_refused() {
    let text = shorthand("public").replace(TENANT, "common").replace(
        "[identity]\n",
        &format!("[inbound]\nissuers = [\"https://login.microsoftonline.com/{TENANT}/v2.0\"]\n\n[identity]\n"),
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(
            "inbound.issuers[0]: a multi-tenant app (tenant \"common\" or \"organizations\")"
        ),
        "{found:?}"
    );
    assert!(found[0].contains("{tenantid} templates"));
    // The same from explicit keys alone: a /common/ token endpoint.
    let explicit = explicit(
        "login.microsoftonline.com",
        "https://sts.windows.net/",
        "https://login.microsoftonline.com",
    )
    .replace(&format!("{TENANT}/oauth2"), "common/oauth2");
    assert_eq!(problems(&explicit).len(), 2, "both issuers are fixed");
}

#[test]
fn an_issuer_from_another_cloud_than_the_token_endpoint_is_refused() {
    let text = explicit(
        "login.microsoftonline.com",
        "https://sts.windows.net/",
        "https://login.chinacloudapi.cn",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with(&format!(
            "inbound.issuers[0]: https://login.microsoftonline.com/{TENANT}/v2.0 is the public cloud's, the token endpoint the china cloud's"
        )),
        "{found:?}"
    );
}

#[test]
fn a_fully_qualified_required_scope_is_a_warning() {
    let text = shorthand("public").replace(
        "[identity]\n",
        "[inbound]\nrequired_scopes = [\"api://my-api/access_as_user\"]\n\n[identity]\n",
    );
    assert_eq!(
        warnings(&text),
        [
            "inbound.required_scopes[0]: \"api://my-api/access_as_user\" looks fully qualified; Entra's scp holds only the scope's name: use \"access_as_user\""
        ]
    );
    let per_route = shorthand("public").replace(
        "token = \"obo\"",
        "token = \"obo\"\nrequired_scopes = [\"https://contoso.example/api/Files.Read\"]",
    );
    assert_eq!(warnings(&per_route).len(), 1);
    assert!(warnings(&per_route)[0].starts_with("routes[0].required_scopes[0]"));
}

#[test]
fn a_network_facing_proxy_without_tls_is_a_warning() {
    let text = format!(
        "[listen]\nproxy = \"0.0.0.0:7080\"\n\n{}",
        shorthand("public")
    );
    let found = warnings(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("listen.proxy: network-facing proxy listener without TLS"));
    assert!(
        warnings(&shorthand("public")).is_empty(),
        "loopback is fine"
    );
}

#[test]
fn resources_of_scopes() {
    assert_eq!(resource_of("api://reports/Reports.Read"), "api://reports");
    assert_eq!(
        resource_of("https://graph.microsoft.com/.default"),
        "https://graph.microsoft.com"
    );
    assert_eq!(resource_of("User.Read"), "https://graph.microsoft.com");
    assert_eq!(resource_of("api://reports"), "https://graph.microsoft.com");
}

#[test]
fn clouds_by_host() {
    assert_eq!(
        cloud_of("https://sts.windows.net/t/").map(|c| c.name),
        Some("public")
    );
    assert_eq!(
        cloud_of("https://login.microsoftonline.us/{tenantid}/v2.0").map(|c| c.name),
        Some("usgov")
    );
    assert_eq!(
        cloud_of("https://login.partner.microsoftonline.cn/t/v2.0").map(|c| c.name),
        Some("china")
    );
    assert_eq!(cloud_of("https://idp.example/"), None);
    assert_eq!(
        token_exchange_audience("https://login.chinacloudapi.cn/t/oauth2/v2.0/token"),
        "api://AzureADTokenExchangeChina"
    );
    let _ = Flavor::Entra;
}

#[test]
fn the_us_government_cloud_accepts_the_shared_v1_issuer_host() {
    // v1 tokens of the US Government cloud carry https://sts.windows.net/<tenant>/.
    let text = explicit(
        "login.microsoftonline.us",
        "https://sts.windows.net/",
        "https://login.microsoftonline.us",
    );
    assert!(problems(&text).is_empty(), "{:?}", problems(&text));
    let config = parse(
        &shorthand("usgov").replace(TENANT, "organizations"),
        SECRET_ENV,
    );
    assert_eq!(
        config.inbound.issuers,
        [
            "https://login.microsoftonline.us/{tenantid}/v2.0",
            "https://sts.windows.net/{tenantid}/"
        ]
    );
    assert_eq!(
        token_exchange_audience(&config.identities["default"].token_endpoint),
        "api://AzureADTokenExchangeUSGov"
    );
    // A China issuer next to a US Government token endpoint is refused, with the fix.
    let mixed = explicit(
        "login.partner.microsoftonline.cn",
        "https://sts.chinacloudapi.cn/",
        "https://login.microsoftonline.us",
    );
    let found = problems(&mixed);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].ends_with(
            "use https://login.microsoftonline.us/<tenant>/v2.0 (with [entra], set cloud = \"usgov\")"
        ),
        "{found:?}"
    );
}

#[test]
fn the_cloud_follows_the_authority_host_variable_and_a_conflict_is_named() {
    static US: &[(&str, &str)] = &[
        ("OBO_CLIENT_SECRET", "s3cret"),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
    ];
    let text = shorthand("public").replace("cloud = \"public\"\n", "");
    let config = parse(&text, US);
    assert_eq!(
        config.inbound.issuers[0],
        format!("https://login.microsoftonline.us/{TENANT}/v2.0")
    );
    let found = match Config::parse(&shorthand("china"), &env_of(US)) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    };
    assert!(
        found.iter().any(|p| p.starts_with(
            "entra.cloud: \"china\", but AZURE_AUTHORITY_HOST=https://login.microsoftonline.us/ is the usgov cloud's"
        )),
        "{found:?}"
    );
}

#[test]
fn a_tenant_name_in_any_letter_case_is_read() {
    let config = parse(
        &shorthand("public").replace(TENANT, "Organizations"),
        SECRET_ENV,
    );
    assert!(config.inbound.issuers[0].contains("{tenantid}"));
}

#[test]
fn identity_is_derived_only_for_an_entra_identity_in_use() {
    // Validation only: no [identity] is made up, so no credential is asked for.
    let validate_only = format!(
        "[entra]\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT}\"\n\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:8080/\"\ntoken = \"passthrough\"\n"
    );
    let config = parse(&validate_only, SECRET_ENV);
    assert!(
        config.identities.is_empty(),
        "{:?}",
        config.identities.keys()
    );
    assert_eq!(
        config.inbound.audiences,
        [CLIENT.to_owned(), format!("api://{CLIENT}")]
    );
    // An [identity] that is a managed identity is left as written.
    let managed = format!(
        "[entra]\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT}\"\n\n[identity]\nflavor = \"managed_identity\"\n\n[[routes]]\nname = \"vault\"\npath_prefix = \"/vault/\"\nupstream = \"https://contoso.vault.azure.net/\"\ntoken = \"app\"\nscopes = [\"https://vault.azure.net/.default\"]\n"
    );
    let config = parse(&managed, SECRET_ENV);
    assert_eq!(config.identities["default"].flavor, Flavor::ManagedIdentity);
    assert!(
        config
            .derived
            .iter()
            .all(|(k, _)| !k.starts_with("identity."))
    );
}

#[test]
fn a_managed_identity_never_acts_on_behalf_of_a_caller() {
    let text = format!(
        "{}\n[identities.vm]\nflavor = \"managed_identity\"\n\n[[routes]]\nname = \"as-user\"\npath_prefix = \"/as-user/\"\nupstream = \"https://graph.microsoft.com/\"\ntoken = \"obo\"\nidentity = \"vm\"\nscopes = [\"https://graph.microsoft.com/.default\"]\n",
        shorthand("public")
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("routes[1].identity: route \"as-user\": identity \"vm\" is a managed identity, which cannot act on behalf of a caller"),
        "{found:?}"
    );
}

#[test]
fn a_managed_identity_identity_names_one_client_id_and_no_auth_method() {
    let text = format!(
        "{}\n[identities.vm]\nflavor = \"managed_identity\"\nclient_id = \"a\"\nmanaged_identity = {{ client_id = \"b\" }}\nauth_method = \"client_secret_post\"\n",
        shorthand("public")
    );
    let found = problems(&text);
    assert!(
        found.iter().any(|p| p.starts_with(
            "identities.vm.client_id: names \"a\", but managed_identity.client_id names \"b\""
        )),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.starts_with(
            "identities.vm.auth_method: a managed identity has no client registration"
        )),
        "{found:?}"
    );
}

#[test]
fn multi_tenant_without_allowed_tenants_and_a_system_assigned_federated_credential_are_warnings() {
    let text = shorthand("public").replace(TENANT, "common").replace(
        "client_secret = { env = \"OBO_CLIENT_SECRET\" }",
        "managed_identity = {}",
    );
    let found = warnings(&text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().any(|w| {
        w.starts_with("identity.managed_identity: Entra accepts a user-assigned managed identity")
    }));
    assert!(found.iter().any(|w| w.starts_with(
        "inbound.allowed_tenants: a multi-tenant app accepts callers of every Entra tenant"
    )));
    let fixed = text
        .replace(
            "managed_identity = {}",
            "managed_identity = { client_id = \"c\" }",
        )
        .replace(
            "[identity]\n",
            &format!("[inbound]\nallowed_tenants = [\"{TENANT}\"]\n\n[identity]\n"),
        );
    assert!(warnings(&fixed).is_empty(), "{:?}", warnings(&fixed));
}

#[test]
fn azure_ad_scopes_audiences_and_acl_setting_are_read() {
    static VARS: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__Scopes", "access_as_user Files.Read"),
        ("AzureAd__Audiences__0", "api://legacy-name"),
        ("AzureAd__AllowWebApiToBeAuthorizedByACL", "True"),
        ("AzureAd__ClientCredentials__0__SourceType", "clientsecret"),
        ("AzureAd__ClientCredentials__0__ClientSecret", "x"),
    ];
    let config = parse(ROUTES, VARS);
    assert_eq!(
        config.inbound.policy.required_scopes.as_deref(),
        Some(&["access_as_user".to_owned(), "Files.Read".to_owned()][..])
    );
    assert_eq!(
        config.inbound.audiences,
        [
            CLIENT.to_owned(),
            format!("api://{CLIENT}"),
            "api://legacy-name".to_owned()
        ]
    );
    assert!(config.inbound.allow_acl_tokens);
}

#[test]
fn azure_ad_certificates_are_one_pem_file_and_a_pfx_is_named() {
    static PFX: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__ClientCredentials__0__SourceType", "Path"),
        (
            "AzureAd__ClientCredentials__0__CertificateDiskPath",
            "/certs/app.pfx",
        ),
    ];
    static PEM: &[(&str, &str)] = &[
        ("AzureAd__TenantId", TENANT),
        ("AzureAd__ClientId", CLIENT),
        ("AzureAd__ClientCredentials__0__SourceType", "Path"),
        (
            "AzureAd__ClientCredentials__0__CertificateDiskPath",
            "/certs/app.pem",
        ),
    ];
    let error = match Config::parse(ROUTES, &env_of(PFX)) {
        Ok(_) => panic!("a .pfx is refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains(
            "AzureAd__ClientCredentials__0__CertificateDiskPath: /certs/app.pfx: PKCS#12 files are not read"
        ),
        "{error}"
    );
    let error = match Config::parse(ROUTES, &env_of(PEM)) {
        Ok(_) => panic!("the file does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("identity.client_certificate: cannot read certificate /certs/app.pem"),
        "{error}"
    );
}
