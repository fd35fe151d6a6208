//! The deployment files agree with each other and with the configuration parser: every Kubernetes YAML
//! document under `deploy/kubernetes/` has an expected kind; in each kustomization the native sidecar's
//! probes reach the admin port of the `sidecar.toml` it mounts and the app calls that file's proxy port;
//! the workload-identity variant projects the Azure token; every `sidecar.toml` under `deploy/` passes
//! [`Config::parse`]; the systemd unit and the Dockerfile run what the files expect.
//!
//! Secrets: the files name secret files that exist only where they are deployed (a mounted Secret, a
//! projected token, a systemd credential), and the parser reads them. The test swaps those paths, in the
//! parsed TOML, for stand-in files it writes, and requires a clean parse: any other problem fails, and the
//! typed [`Config`] is what the manifests are checked against. The original paths must lie under a volume
//! the sidecar mounts (Kubernetes) or in the unit's credentials directory (systemd).
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use obo_sidecar::config::Credential;
use obo_sidecar::config::{Config, DEFAULT_IDENTITY};
use serde::Deserialize;
use yaml_serde::Value;

/// The kinds the manifests may contain; anything else is a mistake or needs adding here.
const EXPECTED_KINDS: [&str; 5] = [
    "Kustomization",
    "Deployment",
    "Service",
    "ServiceAccount",
    "NetworkPolicy",
];
const SIDECAR: &str = "obo-sidecar";
/// Where the workload-identity webhook (v1) mounted the token; the manifests project it there themselves.
const AZURE_TOKEN_FILE: &str = "/var/run/secrets/azure/tokens/azure-identity-token";
const AZURE_TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Files under `dir` (recursively) that `wanted` accepts, sorted.
fn files_under(dir: &Path, wanted: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if wanted(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn named_file(path: &Path, name: &str) -> bool {
    path.file_name().is_some_and(|n| n == name)
}

fn is_yaml(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// Every YAML document in a file (empty documents between `---` skipped).
fn documents(path: &Path) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(&read(path))
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn str_at<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map_or(&[], Vec::as_slice)
}

/// A secret file named by a `sidecar.toml`, and where it sits in the file.
#[derive(Debug)]
struct SecretFile {
    key: String,
    path: String,
}

/// Parses a `sidecar.toml` with no environment, its secret files replaced by stand-ins (see the module
/// comment). Returns the configuration and the secret files as the file names them.
fn parse_deployed(path: &Path) -> (Config, Vec<SecretFile>) {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let scratch = std::env::temp_dir().join(format!(
        "obo-sidecar-deploy-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut table: toml::Table = read(path)
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut secrets = Vec::new();
    if let Some(identity) = table
        .get_mut("identity")
        .and_then(toml::Value::as_table_mut)
    {
        stand_in_secrets(identity, "identity", &scratch, &mut secrets);
    }
    if let Some(named) = table
        .get_mut("identities")
        .and_then(toml::Value::as_table_mut)
    {
        for (name, identity) in named.iter_mut() {
            if let Some(identity) = identity.as_table_mut() {
                let at = format!("identities.{name}");
                stand_in_secrets(identity, &at, &scratch, &mut secrets);
            }
        }
    }
    if let Some(shared) = table
        .get_mut("cache")
        .and_then(|cache| cache.get_mut("shared"))
        .and_then(toml::Value::as_table_mut)
    {
        for (key, content) in [
            ("url", "rediss://:stand-in@cache.example.net:6380/0"),
            ("password", "stand-in/with+slashes="),
            (
                "encryption_key",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
        ] {
            if let Some(file) = shared
                .get_mut(key)
                .and_then(toml::Value::as_table_mut)
                .and_then(|secret| secret.get_mut("file"))
            {
                stand_in_with(
                    file,
                    format!("cache.shared.{key}.file"),
                    content,
                    &scratch,
                    &mut secrets,
                );
            }
        }
    }
    let parsed = Config::parse(&table.to_string(), &|_| None);
    std::fs::remove_dir_all(&scratch).unwrap();
    match parsed {
        Ok(config) => (config, secrets),
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// Replaces an identity's `client_secret.file` and `client_assertion_file` by stand-in files in `scratch`.
fn stand_in_secrets(
    identity: &mut toml::Table,
    at: &str,
    scratch: &Path,
    secrets: &mut Vec<SecretFile>,
) {
    if let Some(file) = identity
        .get_mut("client_secret")
        .and_then(toml::Value::as_table_mut)
        .and_then(|secret| secret.get_mut("file"))
    {
        stand_in(file, format!("{at}.client_secret.file"), scratch, secrets);
    }
    if let Some(file) = identity.get_mut("client_assertion_file") {
        stand_in(
            file,
            format!("{at}.client_assertion_file"),
            scratch,
            secrets,
        );
    }
}

fn stand_in(value: &mut toml::Value, key: String, scratch: &Path, secrets: &mut Vec<SecretFile>) {
    stand_in_with(value, key, "stand-in-secret-value", scratch, secrets);
}

/// Replaces the file path `value` by a stand-in file holding `content`, and records the path it named.
fn stand_in_with(
    value: &mut toml::Value,
    key: String,
    content: &str,
    scratch: &Path,
    secrets: &mut Vec<SecretFile>,
) {
    let path = value.as_str().expect("a file path is a string").to_owned();
    let file = scratch.join(format!("secret-{}", secrets.len()));
    std::fs::write(&file, content).unwrap();
    *value = toml::Value::String(file.to_string_lossy().into_owned());
    secrets.push(SecretFile { key, path });
}

/// A directory with a `kustomization.yaml`: its resources, and the files of its `ConfigMap` generators.
struct Kustomization {
    dir: PathBuf,
    resources: Vec<Value>,
    /// (`ConfigMap` name, file names)
    config_maps: Vec<(String, Vec<String>)>,
}

fn kustomizations() -> Vec<Kustomization> {
    let root = repo().join("deploy/kubernetes");
    let mut found = Vec::new();
    for path in files_under(&root, |p| named_file(p, "kustomization.yaml")) {
        let dir = path.parent().unwrap().to_path_buf();
        let [kustomization] = documents(&path).try_into().expect("one document");
        let listed: Vec<&str> = seq(&kustomization["resources"])
            .iter()
            .map(|r| str_at(r, "resources[]"))
            .collect();
        // Kustomize-ready: every manifest beside kustomization.yaml is one of its resources.
        let mut here: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| is_yaml(Path::new(n)) && n != "kustomization.yaml")
            .collect();
        here.sort();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, here, "{}: resources", path.display());
        let resources = listed
            .iter()
            .flat_map(|file| documents(&dir.join(file)))
            .collect();
        let config_maps = seq(&kustomization["configMapGenerator"])
            .iter()
            .map(|g| {
                let files = seq(&g["files"])
                    .iter()
                    .map(|f| str_at(f, "configMapGenerator[].files[]").to_owned())
                    .collect();
                (
                    str_at(&g["name"], "configMapGenerator[].name").to_owned(),
                    files,
                )
            })
            .collect();
        found.push(Kustomization {
            dir,
            resources,
            config_maps,
        });
    }
    assert!(
        found.len() >= 2,
        "the base and the workload-identity variant"
    );
    found
}

fn of_kind<'a>(resources: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    resources
        .iter()
        .filter(move |r| r["kind"].as_str() == Some(kind))
}

fn named<'a>(items: &'a Value, name: &str) -> Option<&'a Value> {
    seq(items).iter().find(|c| c["name"].as_str() == Some(name))
}

/// A probe's or Service's port: a number, or the name of one of `container`'s ports.
fn port_of(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).unwrap();
    }
    let name = str_at(port, "port");
    let declared = named(&container["ports"], name)
        .unwrap_or_else(|| panic!("port {name:?} is not declared by {:?}", container["name"]));
    u16::try_from(declared["containerPort"].as_u64().unwrap()).unwrap()
}

/// The pod's sidecar, its configuration as mounted, and the secret files that configuration names.
struct Pod<'a> {
    spec: &'a Value,
    sidecar: &'a Value,
    config: Config,
    secrets: Vec<SecretFile>,
}

fn pod(k: &Kustomization) -> Pod<'_> {
    let deployments: Vec<&Value> = of_kind(&k.resources, "Deployment").collect();
    let [deployment] = deployments[..] else {
        panic!("{}: one Deployment", k.dir.display())
    };
    let spec = &deployment["spec"]["template"]["spec"];
    let sidecar = named(&spec["initContainers"], SIDECAR)
        .unwrap_or_else(|| panic!("{}: {SIDECAR} is not an init container", k.dir.display()));
    assert!(
        named(&spec["containers"], SIDECAR).is_none(),
        "{SIDECAR} runs as a native sidecar only"
    );
    // The configuration file named on the command line is a key of a generated ConfigMap mounted there.
    let args: Vec<&str> = seq(&sidecar["args"])
        .iter()
        .map(|a| str_at(a, "args[]"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "-c" || *a == "--config")
        .expect("the sidecar's args name its configuration with -c");
    let config_path = Path::new(args[at + 1]);
    let mount = seq(&sidecar["volumeMounts"])
        .iter()
        .find(|m| Some(Path::new(str_at(&m["mountPath"], "mountPath"))) == config_path.parent())
        .unwrap_or_else(|| panic!("nothing is mounted at {}", config_path.display()));
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees ConfigMap updates"
    );
    let volume = named(
        &spec["volumes"],
        str_at(&mount["name"], "volumeMounts[].name"),
    )
    .unwrap();
    let config_map = str_at(&volume["configMap"]["name"], "volumes[].configMap.name");
    let key = config_path.file_name().unwrap().to_string_lossy();
    let (_, files) = k
        .config_maps
        .iter()
        .find(|(name, _)| name == config_map)
        .unwrap_or_else(|| panic!("ConfigMap {config_map:?} is not generated"));
    assert!(
        files.iter().any(|f| *f == key),
        "{config_map} has no key {key}"
    );
    let (config, secrets) = parse_deployed(&k.dir.join(&*key));
    Pod {
        spec,
        sidecar,
        config,
        secrets,
    }
}

/// Every YAML document under deploy/kubernetes/ parses and has an expected kind, name and API version.
#[test]
fn kubernetes_manifests_parse_with_expected_kinds() {
    let files = files_under(&repo().join("deploy/kubernetes"), is_yaml);
    assert!(!files.is_empty());
    let mut kinds = BTreeSet::new();
    for path in &files {
        for doc in documents(path) {
            let kind = str_at(&doc["kind"], "kind");
            assert!(
                EXPECTED_KINDS.contains(&kind),
                "{}: kind {kind}",
                path.display()
            );
            assert!(
                doc["apiVersion"].is_string(),
                "{}: apiVersion",
                path.display()
            );
            if kind != "Kustomization" {
                assert!(
                    doc["metadata"]["name"].is_string(),
                    "{}: name",
                    path.display()
                );
            }
            kinds.insert(kind.to_owned());
        }
    }
    assert_eq!(kinds.len(), EXPECTED_KINDS.len(), "{kinds:?}");
}

/// In each kustomization the native sidecar's probes and ports match the sidecar.toml it mounts, the app
/// calls that file's proxy routes, and the Service exposes the app alone.
#[test]
fn native_sidecar_probes_and_ports_match_its_sidecar_toml() {
    for k in &kustomizations() {
        let Pod {
            spec,
            sidecar,
            config,
            secrets,
        } = pod(k);
        let dir = k.dir.display();
        assert_eq!(sidecar["restartPolicy"].as_str(), Some("Always"), "{dir}");
        // The kubelet probes the pod IP; the proxy is for this pod's containers only.
        assert!(
            config.listen.admin.ip().is_unspecified(),
            "{dir}: admin must bind 0.0.0.0"
        );
        assert!(
            config.listen.proxy.ip().is_loopback(),
            "{dir}: proxy must be loopback"
        );
        let admin = config.listen.admin.port();
        assert!(
            seq(&sidecar["ports"])
                .iter()
                .any(|p| p["containerPort"].as_u64() == Some(u64::from(admin))),
            "{dir}: the admin port is declared"
        );
        for (probe, path) in [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            let get = &sidecar[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{dir}: {probe}");
            assert_eq!(port_of(sidecar, &get["port"]), admin, "{dir}: {probe}");
        }
        let security = &sidecar["securityContext"];
        assert_eq!(security["runAsNonRoot"].as_bool(), Some(true), "{dir}");
        assert_eq!(
            security["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{dir}"
        );
        assert_eq!(
            security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{dir}"
        );
        assert_eq!(
            security["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{dir}"
        );
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    sidecar["resources"][bound][resource].is_string(),
                    "{dir}: {bound}.{resource}"
                );
            }
        }
        // Each secret file the configuration reads is on a volume the sidecar mounts.
        for secret in &secrets {
            assert!(
                seq(&sidecar["volumeMounts"])
                    .iter()
                    .any(|m| Path::new(&secret.path)
                        .starts_with(str_at(&m["mountPath"], "mountPath"))),
                "{dir}: {} = {} is not mounted",
                secret.key,
                secret.path
            );
        }
        // The app's calls go to the proxy port, under a route's prefix.
        let proxy = config.listen.proxy.port();
        let mut calls = 0;
        for container in seq(&spec["containers"]) {
            for env in seq(&container["env"]) {
                let Some(value) = env["value"].as_str() else {
                    continue;
                };
                let Ok(url) = url::Url::parse(value) else {
                    continue;
                };
                if !matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) {
                    continue;
                }
                assert_eq!(url.port(), Some(proxy), "{dir}: {value}");
                let path = url.path();
                assert!(
                    config.routes.iter().any(|r| path == r.match_prefix
                        || path.starts_with(&format!("{}/", r.match_prefix))),
                    "{dir}: {value} matches no route"
                );
                calls += 1;
            }
        }
        assert!(calls > 0, "{dir}: the app calls the sidecar");
        // The Service targets app ports only.
        for service in of_kind(&k.resources, "Service") {
            for port in seq(&service["spec"]["ports"]) {
                let target = &port["targetPort"];
                let app = seq(&spec["containers"]).iter().find(|c| {
                    target.as_u64().is_some()
                        || named(&c["ports"], str_at(target, "targetPort")).is_some()
                });
                let app = app.unwrap_or_else(|| panic!("{dir}: {target:?} is no app port"));
                let number = port_of(app, target);
                assert!(
                    number != admin && number != proxy,
                    "{dir}: the Service exposes the sidecar"
                );
            }
        }
    }
}

/// The workload-identity variant labels the pod, and sets the AZURE_* variables and the projected token on
/// the sidecar itself; its sidecar.toml names the same identity explicitly as its AZURE_* fallbacks would.
#[test]
fn workload_identity_variant_projects_the_azure_token_into_the_sidecar() {
    let kustomizations = kustomizations();
    let variants: Vec<&Kustomization> = kustomizations
        .iter()
        .filter(|k| k.dir.ends_with("workload-identity"))
        .collect();
    assert_eq!(variants.len(), 1);
    let k = variants[0];
    let Pod {
        spec,
        sidecar,
        config,
        secrets,
    } = pod(k);
    let deployment = of_kind(&k.resources, "Deployment").next().unwrap();
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["azure.workload.identity/use"].as_str(), Some("true"));
    let account = str_at(&spec["serviceAccountName"], "serviceAccountName");
    let account = of_kind(&k.resources, "ServiceAccount")
        .find(|a| a["metadata"]["name"].as_str() == Some(account))
        .unwrap_or_else(|| panic!("ServiceAccount {account} is not a resource"));
    let client_id = str_at(
        &account["metadata"]["annotations"]["azure.workload.identity/client-id"],
        "client-id annotation",
    );

    let env = |name: &str| {
        let var = named(&sidecar["env"], name).unwrap_or_else(|| panic!("{name} is not set"));
        str_at(&var["value"], name).to_owned()
    };
    assert_eq!(env("AZURE_CLIENT_ID"), client_id);
    assert_eq!(env("AZURE_FEDERATED_TOKEN_FILE"), AZURE_TOKEN_FILE);
    let tenant = env("AZURE_TENANT_ID");
    let authority = env("AZURE_AUTHORITY_HOST");
    assert!(authority.starts_with("https://"), "{authority}");

    // The projected token, mounted in the sidecar where AZURE_FEDERATED_TOKEN_FILE points.
    let token = Path::new(AZURE_TOKEN_FILE);
    let mount = seq(&sidecar["volumeMounts"])
        .iter()
        .find(|m| Some(Path::new(str_at(&m["mountPath"], "mountPath"))) == token.parent())
        .expect("the token's directory is mounted in the sidecar");
    let volume = named(&spec["volumes"], str_at(&mount["name"], "name")).unwrap();
    let projection = seq(&volume["projected"]["sources"])
        .iter()
        .map(|s| &s["serviceAccountToken"])
        .find(|t| !t.is_null())
        .expect("a projected service-account token");
    assert_eq!(projection["audience"].as_str(), Some(AZURE_TOKEN_AUDIENCE));
    assert_eq!(
        projection["path"].as_str(),
        token.file_name().and_then(|n| n.to_str())
    );

    // sidecar.toml authenticates with that file, as that client, at that tenant.
    let identity = &config.identities[DEFAULT_IDENTITY];
    assert!(matches!(identity.credential, Credential::AssertionFile(_)));
    assert!(
        secrets
            .iter()
            .any(|s| s.key == "identity.client_assertion_file" && s.path == AZURE_TOKEN_FILE),
        "{secrets:?}"
    );
    assert_eq!(identity.client_id, client_id);
    assert_eq!(
        identity.token_endpoint,
        format!(
            "{}/{tenant}/oauth2/v2.0/token",
            authority.trim_end_matches('/')
        )
    );

    // Without those keys, the Deployment's AZURE_* variables give the same identity (SPEC §3 fallbacks).
    let mut table: toml::Table = read(&k.dir.join("sidecar.toml")).parse().unwrap();
    let written = table["identity"].as_table_mut().unwrap();
    for key in ["client_id", "token_endpoint", "client_assertion_file"] {
        written.remove(key);
    }
    let vars = [
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_AUTHORITY_HOST",
        "AZURE_FEDERATED_TOKEN_FILE",
    ]
    .map(|name| (name, env(name)));
    let lookup = |name: &str| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    let fallback = Config::parse(&table.to_string(), &lookup).unwrap_or_else(|e| panic!("{e}"));
    let fallback = &fallback.identities[DEFAULT_IDENTITY];
    assert_eq!(fallback.client_id, identity.client_id);
    assert_eq!(fallback.token_endpoint, identity.token_endpoint);
    assert!(
        matches!(&fallback.credential, Credential::AssertionFile(f) if f.path == token),
        "{:?}",
        fallback.credential
    );
}

/// Every sidecar.toml under deploy/ passes the parser with no environment and only stand-ins for its
/// secret files.
#[test]
fn every_deploy_sidecar_toml_passes_config_parse() {
    let files = files_under(&repo().join("deploy"), |p| named_file(p, "sidecar.toml"));
    assert!(files.len() >= 3, "{files:?}");
    for path in &files {
        let (config, secrets) = parse_deployed(path);
        assert!(!config.routes.is_empty(), "{}", path.display());
        let managed_identity = config
            .identities
            .values()
            .any(|i| matches!(i.credential, Credential::ManagedIdentity(_)));
        assert!(
            !secrets.is_empty() || managed_identity,
            "{}: a credential from a file, or a managed identity",
            path.display()
        );
    }
}

/// The Azure VM example needs no secret: its identity is the VM's managed identity (through IMDS), the
/// `[entra]` shorthand derives the rest, and its systemd drop-in clears the base unit's `LoadCredential=`.
#[test]
fn azure_vm_example_uses_the_managed_identity_and_no_secret() {
    let dir = repo().join("deploy/azure-vm");
    let (config, secrets) = parse_deployed(&dir.join("sidecar.toml"));
    assert!(secrets.is_empty(), "{secrets:?}");
    let default = &config.identities["default"];
    assert_eq!(
        default.auth_method,
        obo_sidecar::config::AuthMethod::ManagedIdentity
    );
    assert!(
        default
            .token_endpoint
            .starts_with("https://login.microsoftonline.com/"),
        "derived by [entra]"
    );
    assert_eq!(
        config.identities["vm"].flavor,
        obo_sidecar::config::Flavor::ManagedIdentity
    );
    for route in &config.routes {
        assert!(
            obo_sidecar::config::is_loopback(&route.upstream),
            "{}",
            route.name
        );
    }
    let drop_in = read(&dir.join("managed-identity.conf"));
    assert!(
        drop_in.lines().any(|line| line == "LoadCredential="),
        "the drop-in clears the base unit's LoadCredential"
    );
    assert!(drop_in.contains("deploy/systemd/obo-sidecar.service"));
}

/// The systemd unit runs the configuration it installs, hands it the secret it reads, reloads on SIGHUP and
/// waits out the drain; the legacy API behind it is reached on loopback only.
#[test]
fn systemd_unit_passes_the_secret_its_sidecar_toml_reads() {
    let dir = repo().join("deploy/systemd");
    let unit = read(&dir.join("obo-sidecar.service"));
    let setting = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    assert_eq!(
        setting("ExecStart"),
        ["/usr/local/bin/obo-sidecar run -c /etc/obo-sidecar/sidecar.toml"]
    );
    assert_eq!(setting("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(setting("KillSignal"), ["SIGTERM"]);
    assert_eq!(setting("CapabilityBoundingSet"), [""]);
    let [credential] = setting("LoadCredential")[..] else {
        panic!("one LoadCredential")
    };
    let (name, _) = credential.split_once(':').unwrap();

    let (config, secrets) = parse_deployed(&dir.join("sidecar.toml"));
    let stop: u64 = setting("TimeoutStopSec")[0].parse().unwrap();
    let drain = config.listen.drain_delay + config.listen.drain_timeout;
    assert!(
        stop > drain.as_secs(),
        "TimeoutStopSec={stop} leaves no room for the {drain:?} drain"
    );
    let expected = format!("/run/credentials/obo-sidecar.service/{name}");
    assert!(
        secrets.iter().any(|s| s.path == expected),
        "the config reads {secrets:?}, systemd provides {expected}"
    );
    for route in &config.routes {
        assert!(
            obo_sidecar::config::is_loopback(&route.upstream),
            "route {}: the legacy API is on loopback",
            route.name
        );
    }
}

/// The Dockerfile builds the production binary (`--no-default-features`: no development IdP) on a Rust at
/// least as new as `rust-version`, and starts the configuration path the Kubernetes manifests mount.
#[test]
fn dockerfile_builds_the_production_binary() {
    let dockerfile = read(&repo().join("Dockerfile"));
    let builds = dockerfile.matches("cargo build").count();
    assert!(builds > 0, "no cargo build");
    assert_eq!(
        dockerfile
            .matches("cargo build --release --locked --no-default-features")
            .count(),
        builds,
        "every build is the production `cargo build --release --locked --no-default-features`"
    );
    assert!(dockerfile.contains(r#"CMD ["run", "-c", "/etc/obo-sidecar/sidecar.toml"]"#));
    let manifest: toml::Table = read(&repo().join("Cargo.toml")).parse().unwrap();
    let required = manifest["package"]["rust-version"].as_str().unwrap();
    let builder = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust builder stage");
    let version = |v: &str| -> Vec<u32> {
        v.split(['.', '-', ' '])
            .map_while(|part| part.parse().ok())
            .collect()
    };
    assert!(
        version(builder) >= version(required),
        "{builder} < {required}"
    );
    let exposed: Vec<&str> = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap()
        .split_whitespace()
        .collect();
    let (config, _) = parse_deployed(&repo().join("deploy/kubernetes/sidecar.toml"));
    for port in [config.listen.proxy.port(), config.listen.admin.port()] {
        assert!(
            exposed.contains(&port.to_string().as_str()),
            "EXPOSE {port}"
        );
    }
}

/// The shared-cache variant: several replicas, the Redis URL and cache key from a Secret the sidecar mounts
/// (checked for every variant above), `rediss://`, and a `NetworkPolicy` that lets the pods reach Redis's TLS
/// port.
#[test]
fn shared_cache_variant_reads_redis_from_a_secret_and_may_reach_it() {
    let kustomizations = kustomizations();
    let k = kustomizations
        .iter()
        .find(|k| k.dir.ends_with("shared-cache"))
        .expect("the shared-cache variant");
    let Pod {
        config, secrets, ..
    } = pod(k);
    let shared = config.cache.shared.as_ref().expect("[cache.shared]");
    assert!(
        shared.display.starts_with("rediss://"),
        "{}",
        shared.display
    );
    for key in [
        "cache.shared.password.file",
        "cache.shared.encryption_key.file",
    ] {
        assert!(
            secrets.iter().any(|s| s.key == key),
            "{key} from a mounted Secret"
        );
    }
    let deployment = of_kind(&k.resources, "Deployment").next().unwrap();
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() > 1);
    let policy = of_kind(&k.resources, "NetworkPolicy")
        .next()
        .expect("a NetworkPolicy");
    let egress_ports: Vec<u64> = seq(&policy["spec"]["egress"])
        .iter()
        .flat_map(|rule| {
            seq(&rule["ports"])
                .iter()
                .filter_map(|p| p["port"].as_u64())
        })
        .collect();
    assert!(egress_ports.contains(&6380), "{egress_ports:?}");
    assert!(egress_ports.contains(&443) && egress_ports.contains(&53));
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

/// The release workflow (untried: our CI cannot reach GitHub) is well-formed YAML that builds the production
/// binary for both musl targets on a tag, checksums it, makes an SBOM and a multi-arch image.
#[test]
fn release_workflow_has_its_parts() {
    let path = repo().join(".github/workflows/release.yml");
    let text = read(&path);
    assert!(text.contains("UNTRIED"), "says it has never run");
    let docs = documents(&path);
    let [workflow] = docs.as_slice() else {
        panic!("one YAML document")
    };
    assert_eq!(
        seq(&workflow["on"]["push"]["tags"])
            .iter()
            .map(|t| str_at(t, "tag"))
            .collect::<Vec<_>>(),
        ["v*"]
    );
    let jobs = &workflow["jobs"];
    let targets: Vec<&str> = seq(&jobs["binaries"]["strategy"]["matrix"]["target"])
        .iter()
        .map(|t| str_at(t, "target"))
        .collect();
    assert_eq!(
        targets,
        ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"]
    );
    let steps = |job: &str| -> String {
        seq(&jobs[job]["steps"])
            .iter()
            .map(|s| yaml_serde::to_string(s).unwrap())
            .collect()
    };
    assert!(steps("binaries").contains("--release --locked --no-default-features"));
    assert!(steps("binaries").contains("sha256sum"));
    assert!(steps("sbom").contains("cyclonedx"));
    assert!(steps("image").contains("linux/amd64,linux/arm64"));
    assert!(steps("image").contains("OBO_SIDECAR_COMMIT"));
    assert_eq!(seq(&jobs["release"]["needs"]).len(), 3);
}

/// The forward-auth examples ask the route that their sidecar.toml opens to forward-auth, for the path its
/// `path_prefix` covers, and copy its `Authorization` over the caller's; Envoy's refuses when the sidecar is
/// unreachable. (`tests/forward_auth.rs` runs the nginx one against a real nginx.)
#[test]
fn forward_auth_examples_ask_the_route_their_sidecar_toml_opens() {
    let dir = repo().join("deploy/forward-auth");
    let (config, _) = parse_deployed(&dir.join("sidecar.toml"));
    let route = config
        .routes
        .iter()
        .find(|r| r.forward_auth)
        .expect("a forward_auth route");
    let endpoint = format!("/.obo/forward-auth/{}", route.name);

    let nginx = read(&dir.join("nginx.conf"));
    assert!(nginx.contains(&format!("{endpoint};")), "{nginx}");
    assert!(nginx.contains(&format!("location {} {{", route.path_prefix)));
    assert!(nginx.contains("auth_request_set $obo_authorization $upstream_http_authorization;"));
    assert!(nginx.contains("proxy_set_header Authorization $obo_authorization;"));

    let envoy = &documents(&dir.join("envoy.yaml"))[0];
    let manager = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let route_prefix = &manager["route_config"]["virtual_hosts"][0]["routes"][0]["match"]["prefix"];
    assert_eq!(
        str_at(route_prefix, "envoy route prefix"),
        route.path_prefix
    );
    let ext_authz = seq(&manager["http_filters"])
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ext_authz")
        .expect("ext_authz filter");
    let ext_authz = &ext_authz["typed_config"];
    assert_eq!(ext_authz["failure_mode_allow"], Value::Bool(false));
    let service = &ext_authz["http_service"];
    assert_eq!(str_at(&service["path_prefix"], "path_prefix"), endpoint);
    let upstream_headers: Vec<&str> =
        seq(&service["authorization_response"]["allowed_upstream_headers"]["patterns"])
            .iter()
            .map(|p| str_at(&p["exact"], "pattern"))
            .collect();
    assert!(
        upstream_headers.contains(&"authorization"),
        "{upstream_headers:?}"
    );

    let traefik = &documents(&dir.join("traefik.yml"))[0];
    let forward = &traefik["http"]["middlewares"]["obo-sidecar"]["forwardAuth"];
    assert!(str_at(&forward["address"], "address").ends_with(&endpoint));
    assert_eq!(forward["trustForwardHeader"], Value::Bool(false));
    assert!(seq(&forward["authResponseHeaders"]).contains(&Value::from("Authorization")));
    let rule = str_at(&traefik["http"]["routers"]["orders"]["rule"], "rule");
    assert!(rule.contains(&route.path_prefix), "{rule}");
}
