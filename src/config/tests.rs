use super::routes::normalize_prefix;
use super::*;
use jsonwebtoken::Algorithm;

fn env(name: &str) -> Option<String> {
    (name == "OBO_CLIENT_SECRET").then(|| "s3cret".to_owned())
}

const GOOD: &str = r#"
[inbound]
issuers = ["https://login.example.com/tenant/v2.0"]
audiences = ["api://my-api"]

[identity]
token_endpoint = "https://login.example.com/tenant/oauth2/v2.0/token"
client_id = "my-api"
client_secret = { env = "OBO_CLIENT_SECRET" }

[[routes]]
name = "graph"
path_prefix = "/graph/"
upstream = "https://graph.example.com/v1.0/"
token = "obo"
scopes = ["https://graph.example.com/.default"]
"#;

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, &env) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

/// The default ports stay out of what meshes reserve: Istio 15000–15090, Linkerd 4140–4191 (SPEC §3).
#[test]
fn default_ports_are_outside_the_ranges_meshes_reserve() {
    for address in [DEFAULT_PROXY_LISTEN, DEFAULT_ADMIN_LISTEN] {
        let port = address
            .parse::<std::net::SocketAddr>()
            .expect("an address")
            .port();
        assert!(
            !(15000..=15090).contains(&port) && !(4140..=4191).contains(&port),
            "{address} is in a mesh's reserved range"
        );
    }
}

#[test]
fn good_config_parses_with_defaults() {
    let config = Config::parse(GOOD, &env).expect("valid");
    assert_eq!(config.listen.proxy.to_string(), DEFAULT_PROXY_LISTEN);
    assert_eq!(config.routes[0].match_prefix, "/graph");
    assert_eq!(config.cache.expiry_margin, DEFAULT_EXPIRY_MARGIN);
    assert_eq!(config.inbound.algorithms, vec![Algorithm::RS256]);
    let identity = &config.identities["default"];
    assert!(matches!(&identity.credential, Credential::Secret(s) if s.get().expose() == "s3cret"));
    assert_eq!(identity.auth_method, AuthMethod::ClientSecretPost);
    assert_eq!(
        config
            .identity_for(&config.routes[0])
            .map(|i| i.name.as_str()),
        Some("default")
    );
}

#[test]
fn claims_cannot_set_sidecar_headers_and_none_routes_have_no_token_api() {
    let claims = GOOD.replace(
            "token = \"obo\"",
            "token = \"obo\"\nforward_claims = { \"X_Request-Id\" = \"sub\", \"keep-alive\" = \"oid\" }",
        );
    let refused = problems(&claims);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|p| p.ends_with("this header is set by the sidecar itself"))
    );
    let none = GOOD
        .replace("token = \"obo\"", "token = \"none\"\ntoken_api = true")
        .replace("scopes = [\"https://graph.example.com/.default\"]", "");
    assert_eq!(
            problems(&none),
            vec![
                "routes[0].token_api: a route with token = \"none\" has no Authorization header to hand out"
                    .to_owned()
            ]
        );
}

#[test]
fn a_scope_or_role_name_with_a_space_is_refused() {
    let text = GOOD.replace(
        "scopes = [\"https://graph.example.com/.default\"]",
        "scopes = [\"https://graph.example.com/.default\"]\nrequired_roles = [\"Realm Admin\"]",
    );
    assert_eq!(
        problems(&text),
        vec!["routes[0].required_roles[0]: a scope or role name cannot contain a space".to_owned()]
    );
}

#[test]
fn every_problem_is_reported_with_its_key_path() {
    let text = GOOD
        .replace("https://graph.example.com/v1.0/", "graph/v1.0")
        .replace(
            "client_id = \"my-api\"",
            "client_id = \"my-api\"\nfavourite = 1",
        )
        .replace("OBO_CLIENT_SECRET", "UNSET_VARIABLE")
        + "\n[[routes]]\nname = \"graph\"\npath_prefix = \"/graph\"\nupstream = \"http://10.0.0.1/\"\ntoken = \"bogus\"\ntimeout = \"soon\"\n";
    let found = problems(&text);
    for expected in [
        "routes[0].upstream: relative URL without a base",
        "identity.favourite: unknown key",
        "identity.client_secret.env: environment variable UNSET_VARIABLE is not set",
        "routes[1].token: unknown token kind \"bogus\"",
        "routes[1].timeout: not a duration",
        "routes[1].name: duplicate route name \"graph\"",
        "routes[1].path_prefix: \"/graph\" is also the prefix of route \"graph\"",
    ] {
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "missing {expected:?} in {found:#?}"
        );
    }
}

#[test]
fn inline_secret_none_algorithm_and_plain_idp_are_refused() {
    let text = GOOD
        .replace("{ env = \"OBO_CLIENT_SECRET\" }", "\"inline\"")
        .replace(
            "audiences = [\"api://my-api\"]",
            "audiences = [\"api://my-api\"]\nalgorithms = [\"none\", \"HS256\"]",
        )
        .replace(
            "https://login.example.com/tenant/oauth2",
            "http://login.example.com/tenant/oauth2",
        );
    let found = problems(&text);
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("identity.client_secret: secrets are never written inline"))
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("inbound.algorithms[0]: \"none\" is never accepted"))
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("inbound.algorithms[1]: \"HS256\" is never accepted"))
    );
    assert!(
        found
            .iter()
            .any(|p| p.starts_with("identity.token_endpoint: an IdP URL must use https"))
    );
}

#[test]
fn token_over_plain_http_to_a_remote_upstream_is_refused() {
    let text = GOOD.replace(
        "https://graph.example.com/v1.0/",
        "http://graph.example.com/",
    );
    assert!(problems(&text).iter().any(|p| {
        p.starts_with("routes[0].upstream: a route that sends a token needs an https upstream")
    }));
    let loopback = GOOD.replace("https://graph.example.com/v1.0/", "http://127.0.0.1:8080/");
    assert!(problems(&loopback).is_empty());
}

#[test]
fn environment_overrides_set_keys_and_address_routes_by_name() {
    let overrides = vec![
        (
            "OBO_SIDECAR__LISTEN__PROXY".to_owned(),
            "127.0.0.1:9999".to_owned(),
        ),
        (
            "OBO_SIDECAR__IDENTITY__CLIENT_ID".to_owned(),
            "from-env".to_owned(),
        ),
        (
            "OBO_SIDECAR__ROUTES__GRAPH__UPSTREAM".to_owned(),
            "https://graph.example.org/beta/".to_owned(),
        ),
        (
            "OBO_SIDECAR__ROUTES__GRAPH__TIMEOUT".to_owned(),
            "\"5s\"".to_owned(),
        ),
        (
            "OBO_SIDECAR__CACHE__MAX_ENTRIES".to_owned(),
            "10".to_owned(),
        ),
    ];
    let config = Config::parse_with_overrides(GOOD, &env, &overrides).expect("valid");
    assert_eq!(config.listen.proxy.port(), 9999);
    assert_eq!(config.identities["default"].client_id, "from-env");
    assert_eq!(
        config.routes[0].upstream.as_str(),
        "https://graph.example.org/beta/"
    );
    assert_eq!(config.routes[0].timeout, Duration::from_secs(5));
    assert_eq!(config.cache.max_entries, 10);
    let bad = vec![(
        "OBO_SIDECAR__ROUTES__NOPE__UPSTREAM".to_owned(),
        "x".to_owned(),
    )];
    let problems = Config::parse_with_overrides(GOOD, &env, &bad)
        .expect_err("refused")
        .problems;
    assert!(problems[0].to_string().contains("no route named \"nope\""));
}

#[test]
fn syntax_error_is_one_problem() {
    let found = problems("[inbound\n");
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("TOML syntax"));
}

/// A syntax error names its line and column (characters, 1-based), also after multi-byte text.
#[test]
fn syntax_error_names_its_line_and_column() {
    let found = problems("# é ü\n[inbound]\nissuers = [\"a\",\n  audiences = 3\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("TOML syntax error at line 4, column "),
        "{found:?}"
    );
    assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    assert_eq!(
        line_and_column("é\nx", 1),
        (1, 1),
        "inside a character: its start"
    );
}

/// An unknown key close to a known one gets a suggestion; one far from every key does not.
#[test]
fn unknown_key_suggests_the_nearest() {
    let text = GOOD.replace("issuers =", "isuers =");
    assert!(
        problems(&text)
            .contains(&"inbound.isuers: unknown key (did you mean `issuers`?)".to_owned()),
        "{:?}",
        problems(&text)
    );
    let text = GOOD.replace("issuers =", "IssuerS =");
    assert!(
        problems(&text)
            .iter()
            .any(|p| p.contains("did you mean `issuers`?"))
    );
    let text = format!("{GOOD}\n[cache]\nzzzzzz = 1\n");
    assert!(
        problems(&text).contains(&"cache.zzzzzz: unknown key".to_owned()),
        "{:?}",
        problems(&text)
    );
}

#[test]
fn route_policy_overrides_inbound_policy() {
    let text = GOOD.replace(
        "audiences = [\"api://my-api\"]",
        "audiences = [\"api://my-api\"]\nrequired_scopes = [\"access_as_user\"]",
    ) + "\n[[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nupstream = \"http://127.0.0.1:9/\"\ntoken = \"none\"\nrequired_roles = [\"Admin\"]\n";
    let config = Config::parse(&text, &env).expect("valid");
    assert_eq!(
        config.routes[0].policy.required_scopes,
        Some(vec!["access_as_user".to_owned()])
    );
    assert_eq!(config.routes[1].policy.required_scopes, None);
    assert_eq!(
        config.routes[1].policy.required_roles,
        Some(vec!["Admin".to_owned()])
    );
}

#[test]
fn prefixes_normalize_to_segment_form() {
    assert_eq!(normalize_prefix("/graph/").as_deref(), Ok("/graph"));
    assert_eq!(normalize_prefix("/").as_deref(), Ok(""));
    assert!(normalize_prefix("graph").is_err());
    assert!(normalize_prefix("/a/../b").is_err());
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text is parsed into a config or a list of problems, never a panic.
        #[test]
        fn config_parser_never_panics(text in ".{0,300}") {
            let _ = Config::parse(&text, &env);
        }

        /// Mutations of a valid config (a line dropped, a value replaced) never panic either.
        #[test]
        fn mutated_config_never_panics(
            drop in 0..20usize,
            line in 0..20usize,
            value in prop_oneof![
                Just("\"\"".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()), Just("-1".to_owned()),
                Just("\"{tenantid}\"".to_owned()), Just("\"http://[::1\"".to_owned()), Just("\"9999999999999h\"".to_owned()),
                "\"[ -~]{0,20}\"",
            ],
        ) {
            let mut lines: Vec<String> = GOOD.lines().map(str::to_owned).collect();
            if drop < lines.len() {
                lines.remove(drop);
            }
            if let Some(l) = lines.get_mut(line)
                && let Some((key, _)) = l.split_once(" = ")
            {
                *l = format!("{key} = {value}");
            }
            let _ = Config::parse(&lines.join("\n"), &env);
        }
    }
}

/// `[cache.shared]`: defaults, `rediss://` off loopback, no password inline, keys of 32 bytes in base64.
#[test]
fn shared_cache_settings_are_checked() {
    let key = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";
    let env = |name: &str| match name {
        "OBO_CLIENT_SECRET" => Some("s3cret".to_owned()),
        "REDIS_URL" => Some("rediss://obo:pa55@cache.example.net:6380/0".to_owned()),
        "CACHE_KEYS" => Some(format!(
            "{key}\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        )),
        "SHORT_KEY" => Some("c2hvcnQ=".to_owned()),
        _ => None,
    };
    let with = |shared: &str| format!("{GOOD}\n[cache.shared]\n{shared}\n");
    let config = Config::parse(
        &with("url = { env = \"REDIS_URL\" }\nencryption_key = { env = \"CACHE_KEYS\" }"),
        &env,
    )
    .expect("valid");
    let shared = config.cache.shared.expect("shared");
    assert_eq!(shared.display, "rediss://cache.example.net:6380/0");
    assert_eq!(shared.keys.0.len(), 2);
    assert_eq!(shared.key_prefix, "obo:");
    assert_eq!(shared.timeout, Duration::from_millis(50));
    assert_eq!(shared.lease, Duration::from_secs(5));
    assert!(!format!("{shared:?}").contains("pa55"), "{shared:?}");
    assert!(!format!("{shared:?}").contains(key), "{shared:?}");

    let problems = |shared: &str| match Config::parse(&with(shared), &env) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    };
    let remote = problems(
        "url = \"redis://cache.example.net:6379/\"\nencryption_key = { env = \"CACHE_KEYS\" }",
    );
    assert_eq!(remote.len(), 1, "{remote:?}");
    assert!(
        remote[0].starts_with(
            "cache.shared.url: redis://cache.example.net:6379/: redis:// off loopback"
        )
    );
    assert!(
        problems("url = \"redis://127.0.0.1:6379/\"\nencryption_key = { env = \"CACHE_KEYS\" }")
            .is_empty()
    );
    let inline = problems(
        "url = \"rediss://u:secret@cache.example.net/\"\nencryption_key = { env = \"CACHE_KEYS\" }",
    );
    assert!(
        inline[0].starts_with("cache.shared.url: a URL with a password is a secret"),
        "{inline:?}"
    );
    assert!(!inline[0].contains("secret@"));
    let short = problems("url = \"redis://localhost/\"\nencryption_key = { env = \"SHORT_KEY\" }");
    assert_eq!(
        short,
        [
            "cache.shared.encryption_key: key 1 is not 32 bytes in base64 (openssl rand -base64 32)",
            "cache.shared.encryption_key: no key: one per line, 32 random bytes in base64 (openssl rand -base64 32)"
        ]
    );
    assert!(
        !short.iter().any(|p| p.contains("c2hvcnQ")),
        "the key is never shown"
    );
    let query = problems(
        "url = \"redis+unix:///run/redis.sock?pass=hunter2\"\nencryption_key = { env = \"CACHE_KEYS\" }",
    );
    assert!(
        query[0].starts_with("cache.shared.url: a URL with a password is a secret"),
        "{query:?}"
    );
    assert!(!query[0].contains("hunter2"));
    let fragment = problems(
        "url = \"rediss://cache.example.net:6380/#insecure\"\nencryption_key = { env = \"CACHE_KEYS\" }",
    );
    assert_eq!(
        fragment,
        [
            "cache.shared.url: rediss://cache.example.net:6380/: no #fragment (certificate checks cannot be turned off; use ca_file)"
        ]
    );
    let bad_db = problems(
        "url = \"redis://127.0.0.1:6379/not-a-number\"\nencryption_key = { env = \"CACHE_KEYS\" }",
    );
    assert!(
        bad_db[0].starts_with("cache.shared.url: redis://127.0.0.1:6379/not-a-number: "),
        "{bad_db:?}"
    );
    let missing = problems("url = \"redis://localhost/\"");
    assert!(
        missing[0].starts_with("cache.shared.encryption_key: required"),
        "{missing:?}"
    );
    let twice = problems(
        "url = \"redis://localhost/\"\nencryption_key = [{ env = \"CACHE_KEYS\" }, { env = \"CACHE_KEYS\" }]\ntimeout = \"10s\"",
    );
    assert!(
        twice
            .iter()
            .any(|p| p == "cache.shared.encryption_key: the same key twice"),
        "{twice:?}"
    );
    assert!(
        twice.iter().any(|p| p.starts_with("cache.shared.timeout")),
        "{twice:?}"
    );
}

/// Microsoft's `DownstreamApis__<Name>__*` (any letter case) become a route reached by name only; a route of
/// that name in the file keeps what it sets and takes the rest.
#[test]
fn downstream_apis_variables_become_routes() {
    let vars: Vec<(String, String)> = [
        (
            "DownstreamApis__Mail__BaseUrl",
            "https://graph.example.com/beta/",
        ),
        ("DOWNSTREAMAPIS__Mail__Scopes__1", "Mail.Send"),
        ("DownstreamApis__Mail__Scopes__0", "Mail.Read"),
        ("DownstreamApis__Mail__RequestAppToken", "false"),
        ("DownstreamApis__Mail__RelativePath", "me/messages"),
        ("DownstreamApis__Mail__HttpMethod", "post"),
        ("DownstreamApis__graph__Scopes", "User.Read"),
        (
            "DownstreamApis__graph__BaseUrl",
            "https://elsewhere.example.com/",
        ),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let unread = Config::parse_with_overrides(GOOD, &env, &vars).expect("valid");
    assert!(unread.routes.iter().all(|r| r.name != "Mail"));
    assert!(
        unread.warnings.iter().any(|w| w
            .to_string()
            .contains("not read: [compat] microsoft_sidecar is off")),
        "{:?}",
        unread.warnings
    );
    let compat = format!("{GOOD}\n[compat]\nmicrosoft_sidecar = true\n");
    let config = Config::parse_with_overrides(&compat, &env, &vars).expect("valid");
    let mail = config
        .routes
        .iter()
        .find(|r| r.name == "Mail")
        .expect("Mail");
    assert!(!mail.proxy && mail.token_api);
    assert_eq!(mail.compat.overrides, CompatOverride::ALL);
    assert_eq!(mail.token, TokenKind::Obo);
    assert_eq!(mail.upstream.as_str(), "https://graph.example.com/beta/");
    assert_eq!(mail.scopes, ["Mail.Read", "Mail.Send"]);
    assert_eq!(mail.compat.relative_path, "me/messages");
    assert_eq!(mail.compat.http_method, http::Method::POST);
    let graph = config
        .routes
        .iter()
        .find(|r| r.name == "graph")
        .expect("graph");
    assert!(graph.proxy);
    assert_eq!(graph.upstream.as_str(), "https://graph.example.com/v1.0/");
    assert_eq!(graph.scopes, ["https://graph.example.com/.default"]);

    let bad: Vec<(String, String)> = [
        (
            "DownstreamApis__Mail__BaseUrl",
            "https://graph.example.com/",
        ),
        ("DownstreamApis__Mail__Scopes__0", "Mail.Read"),
        ("DownstreamApis__Mail__RequestAppToken", "maybe"),
        ("DownstreamApis__Mail__ExtraHeaderParameters__X", "1"),
        (
            "DownstreamApis__Bad.Name__BaseUrl",
            "https://x.example.com/",
        ),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let problems: Vec<String> = Config::parse_with_overrides(&compat, &env, &bad)
        .expect_err("invalid")
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("RequestAppToken") && p.contains("true or false")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ExtraHeaderParameters") && p.contains("not read")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("DownstreamApis__Bad.Name")),
        "{problems:?}"
    );

    // An app token for an API: served as Microsoft's sidecar serves it, with a warning; and an API without
    // scopes of its own takes them from its callers.
    let app: Vec<(String, String)> = [
        ("DownstreamApis__Jobs__BaseUrl", "https://jobs.example.com/"),
        ("DownstreamApis__Jobs__Scopes", "api://jobs/.default"),
        ("DownstreamApis__Jobs__RequestAppToken", "TRUE"),
        ("DownstreamApis__Open__BaseUrl", "https://open.example.com/"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let config = Config::parse_with_overrides(&compat, &env, &app).expect("valid");
    let jobs = config
        .routes
        .iter()
        .find(|r| r.name == "Jobs")
        .expect("Jobs");
    assert_eq!(jobs.token, TokenKind::App);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.to_string().contains("app token to any caller"))
    );
    let open = config
        .routes
        .iter()
        .find(|r| r.name == "Open")
        .expect("Open");
    assert!(open.scopes.is_empty());
}

/// `compat_overrides` names only overrides obo-sidecar honours; a route with `proxy = false` has no
/// `path_prefix` and no forward-auth; `[compat]` knows its one key.
#[test]
fn compat_keys_are_checked() {
    let route = |extra: &str| GOOD.replace("token = \"obo\"", &format!("token = \"obo\"\n{extra}"));
    assert!(problems(&route("compat_overrides = [\"Scopes\", \"relativepath\"]")).is_empty());
    let unknown = problems(&route("compat_overrides = [\"Scope\", \"BaseUrl\"]"));
    assert!(
        unknown
            .iter()
            .any(|p| p.contains("\"Scope\"") && p.contains("did you mean `Scopes`?")),
        "{unknown:?}"
    );
    assert!(
        unknown
            .iter()
            .any(|p| p.contains("\"BaseUrl\" is not an override")),
        "{unknown:?}"
    );
    assert!(
        problems(&route("compat_scopes = [\"api://x/.default\"]"))
            .iter()
            .any(|p| p.contains("compat_scopes") && p.contains("does not allow Scopes"))
    );
    assert!(
        problems(&route(
            "compat_overrides = [\"Scopes\"]\ncompat_scopes = [\"api://x/.default\"]"
        ))
        .is_empty()
    );
    let hidden = problems(&route("proxy = false"));
    assert!(
        hidden
            .iter()
            .any(|p| p.contains("routes[0].path_prefix") && p.contains("by name only")),
        "{hidden:?}"
    );
    let no_prefix = GOOD.replace(
        "path_prefix = \"/graph/\"",
        "proxy = false\nforward_auth = true",
    );
    assert!(
        problems(&no_prefix)
            .iter()
            .any(|p| p.contains("forward-auth needs a proxied route"))
    );
    assert!(
        problems(&route("http_method = \"GE T\""))
            .iter()
            .any(|p| p.contains("not an HTTP method"))
    );
    assert!(
        problems(&route("relative_path = \"../admin\""))
            .iter()
            .any(|p| p.contains("relative_path"))
    );
    let compat = format!("{GOOD}\n[compat]\nmicrosoft_sidecar = true\n");
    assert!(
        Config::parse(&compat, &env)
            .expect("valid")
            .compat
            .microsoft_sidecar
    );
    assert!(!problems(&format!("{GOOD}\n[compat]\nmicrosoft = true\n")).is_empty());
}

/// Forward-auth answers with the route's token: on an `app` route only where no one but the ingress beside
/// the sidecar can ask (a loopback proxy listener).
#[test]
fn forward_auth_of_an_app_token_needs_a_loopback_listener() {
    let app = GOOD
        .replace("token = \"obo\"", "token = \"app\"\nforward_auth = true")
        .replace(
            "[inbound]",
            "[listen]\nproxy = \"0.0.0.0:7080\"\n\n[inbound]",
        );
    assert!(
        problems(&app)
            .iter()
            .any(|p| p.contains("forward_auth") && p.contains("loopback")),
        "{:?}",
        problems(&app)
    );
    let loopback = app.replace("0.0.0.0:7080", "127.0.0.1:7080");
    assert!(problems(&loopback).is_empty(), "{:?}", problems(&loopback));
}

/// With Microsoft's endpoints on, a route under one of their paths is never reached: `check` says so.
#[test]
fn routes_under_microsofts_paths_are_reported_when_compat_is_on() {
    let shadowed = GOOD.replace("path_prefix = \"/graph/\"", "path_prefix = \"/Validate/\"");
    let off = Config::parse(&shadowed, &env).expect("valid");
    assert!(off.warnings.is_empty(), "{:?}", off.warnings);
    let on = Config::parse(
        &format!("{shadowed}\n[compat]\nmicrosoft_sidecar = true\n"),
        &env,
    )
    .expect("valid");
    assert!(
        on.warnings
            .iter()
            .any(|w| w.to_string().contains("routes[0].path_prefix")
                && w.to_string().contains("Microsoft's sidecar endpoints")),
        "{:?}",
        on.warnings
    );
}
