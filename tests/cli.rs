//! The binary's `check` command: the repository's `sidecar.toml` passes; bad configs exit 64 naming every
//! problem with its key path.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::process::Command;

fn check(config: &std::path::Path, secret: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(support::sidecar_binary());
    command
        .arg("check")
        .arg("-c")
        .arg(config)
        .env_remove("OBO_CLIENT_SECRET");
    if let Some(secret) = secret {
        command.env("OBO_CLIENT_SECRET", secret);
    }
    let output = command.output().expect("run obo-sidecar");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The example `sidecar.toml` passes `check` when its secret is set, and prints the route table.
#[test]
fn repository_sidecar_toml_passes_check() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.toml");
    let (code, stdout, stderr) = check(&path, Some("from-the-environment"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ROUTE"), "{stdout}");
    assert!(stdout.contains("graph"), "{stdout}");
    assert!(!stdout.contains("from-the-environment") && !stderr.contains("from-the-environment"));
}

/// Without its secret, the same file fails `check` with 64 naming the key.
#[test]
fn unset_secret_fails_check_with_64() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.toml");
    let (code, _, stderr) = check(&path, None);
    assert_eq!(code, 64);
    assert!(
        stderr.contains(
            "identity.client_secret.env: environment variable OBO_CLIENT_SECRET is not set"
        ),
        "{stderr}"
    );
}

/// Every problem of a bad config is listed with its key path, not only the first.
#[test]
fn bad_config_lists_every_problem_and_exits_64() {
    let dir = std::env::temp_dir().join(format!("obo-sidecar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        r#"
[listen]
proxy = "not an address"

[inbound]
issuers = ["https://login.example.com/t/v2.0"]
audiences = []
algorithms = ["none"]
clock_skew = "forever"

[identity]
token_endpoint = "http://login.example.com/t/oauth2/v2.0/token"
client_id = "x"
client_secret = "inline"
colour = "blue"

[[routes]]
name = "a"
path_prefix = "/a"
upstream = "graph/v1.0"
token = "obo"

[[routes]]
name = "a"
path_prefix = "b"
upstream = "https://example.com/"
token = "sometimes"
"#,
    )
    .expect("write");
    let (code, _, stderr) = check(&path, Some("x"));
    assert_eq!(code, 64);
    let run = Command::new(support::sidecar_binary())
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run obo-sidecar");
    assert_eq!(
        run.status.code(),
        Some(64),
        "`run` is the default command and refuses a bad config"
    );
    for expected in [
        "listen.proxy: not an IP:port address",
        "inbound.audiences: at least one audience is required",
        "inbound.algorithms[0]: \"none\" is never accepted",
        "inbound.clock_skew: not a duration",
        "identity.token_endpoint: an IdP URL must use https",
        "identity.client_secret: secrets are never written inline",
        "identity.colour: unknown key",
        "routes[0].upstream: relative URL without a base",
        "routes[0].scopes: required",
        "routes[1].name: duplicate route name",
        "routes[1].path_prefix: \"b\" must start with '/'",
        "routes[1].token: unknown token kind",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("obo-sidecar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "0ab2c1f4-6d0e-4c8e-9a55-6f0e1c2b3a4d";

/// `check` prints every value `[entra]` derived and the credential kind each identity uses; a secret by its
/// variable's name only.
#[test]
fn check_prints_what_the_entra_shorthand_derived() {
    let path = write_config(
        "entra.toml",
        &format!(
            r#"
[entra]
tenant_id = "{TENANT}"
client_id = "{CLIENT}"

[identity]
client_secret = {{ env = "OBO_CLIENT_SECRET" }}

[identities.vm]
flavor = "managed_identity"

[[routes]]
name = "graph"
path_prefix = "/graph/"
upstream = "https://graph.microsoft.com/"
token = "obo"
scopes = ["https://graph.microsoft.com/User.Read"]

[[routes]]
name = "vault"
path_prefix = "/vault/"
upstream = "https://contoso.vault.azure.net/"
token = "app"
identity = "vm"
scopes = ["https://vault.azure.net/.default"]
"#
        ),
    );
    let (code, stdout, stderr) = check(&path, Some("the-secret-value"));
    assert_eq!(code, 0, "{stderr}");
    for expected in [
        format!(
            "derived: inbound.issuers = [\"https://login.microsoftonline.com/{TENANT}/v2.0\", \"https://sts.windows.net/{TENANT}/\"]"
        ),
        format!("derived: inbound.audiences = [\"{CLIENT}\", \"api://{CLIENT}\"]"),
        "derived: identity.flavor = \"entra\"".to_owned(),
        format!("derived: identity.client_id = \"{CLIENT}\""),
        format!(
            "derived: identity.token_endpoint = \"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token\""
        ),
        format!(
            "identity default: entra at https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token, credential: client secret from the environment"
        ),
        "identity vm: managed_identity at its managed identity endpoint, credential: system-assigned managed identity via IMDS".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "{expected}\n{stdout}");
    }
    assert!(!stdout.contains("the-secret-value") && !stderr.contains("the-secret-value"));
}

/// A config of routes alone, with Microsoft's auth sidecar's `AzureAd__*` variables, passes `check`; the
/// derived credential is named by its variable, never shown.
#[test]
fn routes_alone_and_azure_ad_variables_pass_check() {
    let path = write_config(
        "routes-only.toml",
        "[[routes]]\nname = \"graph\"\npath_prefix = \"/graph/\"\nupstream = \"https://graph.microsoft.com/\"\ntoken = \"obo\"\nscopes = [\"https://graph.microsoft.com/.default\"]\n",
    );
    let output = Command::new(support::sidecar_binary())
        .args(["check", "-c"])
        .arg(&path)
        .env("AzureAd__Instance", "https://login.microsoftonline.com/")
        // .NET reads configuration keys in any letter case, and so does the sidecar.
        .env("AZUREAD__TENANTID", TENANT)
        .env("AzureAd__ClientId", CLIENT)
        .env("AzureAd__ClientCredentials__0__SourceType", "clientSecret")
        .env(
            "AzureAD__ClientCredentials__0__ClientSecret",
            "azure-ad-secret-value",
        )
        .output()
        .expect("run obo-sidecar");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains(
            "derived: identity.client_secret = { env = \"AzureAd__ClientCredentials__0__ClientSecret\" }"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("azure-ad-secret-value") && !stderr.contains("azure-ad-secret-value"));
}

/// The three Entra mistakes a new user makes (issue 14): an `app` route with a non-`.default` scope and an
/// issuer of another cloud than the token endpoint are errors, each with its key and fix; a fully qualified
/// `required_scopes` entry is a warning.
#[test]
fn check_knows_what_entra_refuses() {
    let path = write_config(
        "entra-mistakes.toml",
        &format!(
            r#"
[inbound]
issuers = ["https://login.microsoftonline.com/{TENANT}/v2.0"]
audiences = ["api://my-api"]
required_scopes = ["api://my-api/access_as_user"]

[identity]
token_endpoint = "https://login.chinacloudapi.cn/{TENANT}/oauth2/v2.0/token"
client_id = "{CLIENT}"
client_secret = {{ env = "OBO_CLIENT_SECRET" }}

[[routes]]
name = "reports"
path_prefix = "/reports/"
upstream = "https://reports.example.com/"
token = "app"
scopes = ["api://reports/Reports.Read"]
"#
        ),
    );
    let (code, _, stderr) = check(&path, Some("x"));
    assert_eq!(code, 64, "{stderr}");
    for expected in [
        "routes[0].scopes: route \"reports\": Entra needs `<resource>/.default` for app tokens: use `api://reports/.default`",
        "inbound.issuers[0]: https://login.microsoftonline.com/",
    ] {
        assert!(stderr.contains(expected), "{expected}\n{stderr}");
    }
    let fixed = std::fs::read_to_string(&path)
        .unwrap()
        .replace("Reports.Read", ".default")
        .replace("login.chinacloudapi.cn", "login.microsoftonline.com");
    std::fs::write(&path, fixed).unwrap();
    let (code, stdout, stderr) = check(&path, Some("x"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("warning: inbound.required_scopes[0]: \"api://my-api/access_as_user\" looks fully qualified; Entra's scp holds only the scope's name: use \"access_as_user\""),
        "{stdout}"
    );
}

/// `check` names the file, line and column of a TOML syntax error, and suggests the key an unknown one
/// was meant to be.
#[test]
fn check_names_the_line_of_a_syntax_error_and_suggests_keys() {
    let path = write_config(
        "syntax.toml",
        "[listen]\nproxy = \"127.0.0.1:7080\"\n[inbound\nissuers = []\n",
    );
    let (code, _, stderr) = check(&path, None);
    assert_eq!(code, 64);
    assert!(
        stderr.starts_with(&format!("{}: ", path.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("TOML syntax error at line 3, column 9: "),
        "{stderr}"
    );
    let path = write_config(
        "suggest.toml",
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sidecar.toml"))
            .expect("sidecar.toml")
            .replacen("audiences", "audience", 1),
    );
    let (code, _, stderr) = check(&path, Some("x"));
    assert_eq!(code, 64);
    assert!(
        stderr.contains("inbound.audience: unknown key (did you mean `audiences`?)"),
        "{stderr}"
    );
}

/// `completions <shell>` prints a completion script that knows the commands.
#[test]
fn completions_print_a_script() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(support::sidecar_binary())
            .args(["completions", shell])
            .output()
            .expect("runs");
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains("obo-sidecar") && script.contains("check"),
            "{shell}: {script}"
        );
    }
}

/// `--version` names the version and the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let output = Command::new(support::sidecar_binary())
        .arg("--version")
        .output()
        .expect("runs");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    // The binary may come from another build than this test (the production build): its commit is one.
    let commit = text
        .trim()
        .strip_prefix(&format!("obo-sidecar {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{text}"));
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(
        commit == "unknown" || (hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())),
        "{text}"
    );
}
