//! Forward-auth (SPEC §16) behind a real nginx: `auth_request` asks the sidecar, `auth_request_set` copies the
//! exchanged `Authorization` into the request nginx proxies. nginx is Debian's package (`.ci/run` installs
//! it); without it the nginx test says so and passes without running.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failed expectation is a failed test"
)]
#![cfg(feature = "dev")]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{Harness, echoed, seen_authorization, seen_header};

/// The `forward_auth` route the ingress's `/api/` location asks about, beside the base configuration.
const ORDERS: &str = r#"
[[routes]]
name = "orders"
path_prefix = "/api/"
upstream = "UPSTREAM/"
token = "obo"
scopes = ["api://downstream/.default"]
required_scopes = ["access_as_user"]
forward_auth = true
forward_claims = { "X-Caller" = "sub", "X-Caller-Group" = "groups" }

[[routes]]
name = "public"
path_prefix = "/public/"
upstream = "UPSTREAM/"
token = "none"
forward_auth = true
"#;

async fn harness() -> Harness {
    Harness::start_custom(|idp, upstream| {
        let dead = "127.0.0.1:9".parse().unwrap();
        support::base_config(idp, upstream, &idp.token_endpoint(), dead)
            + &ORDERS.replace("UPSTREAM", upstream)
    })
    .await
}

/// nginx from `OBO_TEST_NGINX`, `PATH` or `/usr/sbin`.
fn nginx_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("OBO_TEST_NGINX") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// nginx in the foreground on a loopback port, killed when dropped.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts `binary` with `deploy/forward-auth/nginx.conf`: a `/api/` location guarded by `auth_request`
    /// against `sidecar`, proxying to `upstream`; returns once it accepts connections.
    async fn start(binary: &Path, sidecar: SocketAddr, upstream: &str) -> Nginx {
        let dir = support::temp_dir("nginx");
        // nginx binds its own port: pick one and release it (the accepted race of handing a port to a child).
        let addr = support::bind().await.local_addr().expect("addr");
        // The documented server block, as written but for its three addresses.
        let documented = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/forward-auth/nginx.conf"),
        )
        .expect("deploy/forward-auth/nginx.conf");
        for placeholder in ["listen 8080;", "http://orders-api:8080", "127.0.0.1:7080"] {
            assert!(documented.contains(placeholder), "{placeholder}");
        }
        let server = documented
            .replace("listen 8080;", &format!("listen {addr};"))
            .replace("http://orders-api:8080", upstream)
            .replace("127.0.0.1:7080", &sidecar.to_string());
        std::fs::write(dir.join("server.conf"), server).expect("server.conf");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                r"daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/server.conf;
}}
",
                dir = dir.display(),
            ),
        )
        .expect("nginx.conf");
        let child = std::process::Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { child, addr, dir };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = nginx.child.try_wait().expect("try_wait") {
                panic!("nginx exited ({status}):\n{}", nginx.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx never listened:\n{}",
                nginx.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// nginx `auth_request` in front of the echo upstream: a caller with the scope reaches the upstream with the
/// exchanged token and the claim header; no token is 401 with the challenge, a token without the scope 403,
/// and neither reaches the upstream. The caller's own token never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_sends_the_exchanged_token_upstream() {
    let Some(binary) = nginx_binary() else {
        eprintln!("SKIPPED: nginx is not installed (apt-get install nginx-light; .ci/run does)");
        return;
    };
    let h = harness().await;
    let nginx = Nginx::start(&binary, h.sidecar.proxy_addr, &h.upstream.url()).await;
    let caller = h.token("alice", "access_as_user");

    let allowed = h
        .http
        .get(nginx.url("/api/orders/42?expand=lines"))
        .bearer_auth(&caller)
        .send()
        .await
        .expect("through nginx");
    assert_eq!(allowed.status(), 200, "{}", nginx.log());
    let echo = echoed(allowed).await;
    let upstream_token = seen_authorization(&echo).expect("upstream Authorization");
    assert_ne!(upstream_token, format!("Bearer {caller}"));
    assert!(
        echo["headers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|pair| !pair[1].as_str().unwrap().contains(&caller)),
        "the caller's token reached the upstream: {echo}"
    );
    assert_eq!(echo["authorization"]["claims"]["sub"], "alice", "{echo}");
    assert_eq!(
        echo["authorization"]["claims"]["aud"], "api://downstream",
        "{echo}"
    );
    assert_eq!(seen_header(&echo, "x-caller"), ["alice"]);
    assert_eq!(echo["uri"], "/api/orders/42?expand=lines", "{echo}");

    let before = h.upstream.requests();
    let anonymous = h
        .http
        .get(nginx.url("/api/orders/42"))
        .send()
        .await
        .expect("no token");
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"),
        "{:?}",
        anonymous.headers()
    );
    let unscoped = h
        .http
        .get(nginx.url("/api/orders/42"))
        .bearer_auth(h.token("bob", "something_else"))
        .send()
        .await
        .expect("no scope");
    assert_eq!(unscoped.status(), 403);
    assert_eq!(
        h.upstream.requests(),
        before,
        "a refused request reached the upstream"
    );

    // A second allowed call: the token comes from the sidecar's cache, and again only it goes upstream.
    let again = h
        .http
        .get(nginx.url("/api/orders/43"))
        .bearer_auth(&caller)
        .send()
        .await
        .expect("again");
    let echo = echoed(again).await;
    assert_eq!(seen_authorization(&echo), Some(upstream_token));
    assert_eq!(h.idp.token_requests(), 1);
}

/// The endpoint's own rules, without an ingress: the answer's headers, `no-store`, the original request
/// from nginx's, Traefik's or Envoy's way of naming it, a missing, unsafe or contradicted original (400), an
/// original request that another route serves, and a route without `forward_auth` (404); the IdP's back-off
/// (503 with `Retry-After`) and no token (401 with the challenge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_answers_like_the_proxy_for_the_original_request() {
    let h = harness().await;
    let caller = h.token("alice", "access_as_user");
    let ask = |path: &str, headers: &[(&str, &str)]| {
        let mut request = h.http.get(h.url(path)).bearer_auth(&caller);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    let nginx = ask(
        "/.obo/forward-auth/orders",
        &[
            ("x-original-uri", "/api/orders/42?x=1"),
            ("x-original-method", "POST"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(nginx.status(), 200);
    assert_eq!(nginx.headers()["cache-control"], "no-store");
    assert_eq!(nginx.headers()["x-caller"], "alice");
    // A claim the token lacks is answered empty, so the ingress overwrites what a caller sent under its name.
    assert_eq!(nginx.headers()["x-caller-group"], "");
    let authorization = nginx.headers()["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(authorization.starts_with("Bearer ") && !authorization.contains(&caller));
    assert_eq!(nginx.bytes().await.unwrap().len(), 0);

    let traefik = ask(
        "/.obo/forward-auth/orders",
        &[
            ("x-forwarded-uri", "/API/orders"),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-host", "shop.example.com"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(traefik.status(), 200);
    assert_eq!(traefik.headers()["authorization"], authorization.as_str());
    // Envoy's ext_authz appends the original path and keeps the method.
    let envoy = ask("/.obo/forward-auth/orders/api/orders/42", &[])
        .await
        .unwrap();
    assert_eq!(envoy.status(), 200);

    // A route that sends no token asks Envoy to remove the caller's.
    let public = ask(
        "/.obo/forward-auth/public",
        &[("x-original-uri", "/public/x")],
    )
    .await
    .unwrap();
    assert_eq!(public.status(), 200);
    assert!(public.headers().get("authorization").is_none());
    assert_eq!(
        public.headers()["x-envoy-auth-headers-to-remove"],
        "authorization"
    );

    for (path, headers, status) in [
        ("/.obo/forward-auth/orders", vec![], 400),
        // Envoy appends a caller's path: dot segments in it cannot climb into the route name, nor out of the
        // token API to a proxied route.
        ("/.obo/forward-auth/orders/api/..;/..;/obo/x", vec![], 400),
        ("/.obo/forward-auth/orders/..;/..;/..;/obo/x", vec![], 400),
        // (reqwest resolves `%2e%2e` itself, so this asks for route `obo`, which has no forward-auth; the
        // bytes as written are refused with 400: `forward_auth_paths_from_a_raw_socket_fail_closed`.)
        (
            "/.obo/forward-auth/orders/api/%2e%2e/%2e%2e/obo/x",
            vec![],
            404,
        ),
        // A caller's X-Original-* against the ingress's X-Forwarded-* (Traefik passes a caller's headers on).
        (
            "/.obo/forward-auth/orders",
            vec![("x-original-uri", "/api/x"), ("x-forwarded-uri", "/obo/x")],
            400,
        ),
        (
            "/.obo/forward-auth/orders",
            vec![("x-original-uri", "/api/%2e%2e/obo/x")],
            404,
        ),
        (
            "/.obo/forward-auth/orders",
            vec![("x-original-uri", "/api/..%2fobo")],
            400,
        ),
        (
            "/.obo/forward-auth/orders",
            vec![("x-original-uri", "/obo/x")],
            404,
        ),
        (
            "/.obo/forward-auth/obo",
            vec![("x-original-uri", "/obo/x")],
            404,
        ),
        (
            "/.obo/forward-auth/nope",
            vec![("x-original-uri", "/api/x")],
            404,
        ),
    ] {
        let response = ask(path, &headers).await.unwrap();
        assert_eq!(response.status(), status, "{path} {headers:?}");
        assert!(response.headers().get("authorization").is_none());
    }
    // The IdP asks to back off: the proxy's 503 with its Retry-After.
    h.idp.fail_next(
        obo_sidecar::dev::Failure::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    let throttled = h
        .http
        .get(h.url("/.obo/forward-auth/orders"))
        .bearer_auth(h.token("carol", "access_as_user"))
        .header("x-original-uri", "/api/orders")
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 503);
    assert_eq!(throttled.headers()["retry-after"], "7");
    assert!(throttled.headers().get("authorization").is_none());

    let unauthenticated = h
        .http
        .get(h.url("/.obo/forward-auth/orders"))
        .header("x-original-uri", "/api/orders")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert!(unauthenticated.headers().contains_key("www-authenticate"));
}

/// The same rules from a raw socket, where no client normalizes the path first (reqwest resolves `%2e%2e`
/// itself): every way a path could rename the route, climb out of the token API or hide a segment is 400,
/// and only the plain forms get the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_paths_from_a_raw_socket_fail_closed() {
    let h = harness().await;
    let caller = h.token("alice", "access_as_user");
    for (path, status) in [
        ("/.obo/forward-auth/orders/api/x", 200),
        ("/.OBO/forward-auth/orders/api/x", 200),
        ("/.obo/forward-auth/orders/api/%2e%2e/%2e%2e/obo/x", 400),
        (
            "/.obo/forward-auth/orders/api/%2E%2E/%2e%2e/%2e%2e/%2e%2e/obo/x",
            400,
        ),
        ("/.obo/forward-auth/orders/..;/..;/..;/obo/x", 400),
        ("/.obo/forward-auth/orders/api/..;/..;/obo/x", 400),
        ("/.obo/../.obo/forward-auth/orders/api/x", 400),
        ("/.obo//forward-auth/orders/api/x", 400),
        ("/.obo/forward-auth/%6frders/api/x", 400),
        ("/.obo/forward-auth/orders;x/api/x", 400),
        ("/.obo/%2e%2e/obo/x", 400),
        ("/%2eobo/forward-auth/orders/api/x", 400),
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {caller}\r\nConnection: close\r\n\r\n"
        );
        let (got, text) = support::raw_request(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert_eq!(got, status, "{path}");
        let token = text
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("authorization:"));
        assert_eq!(token, status == 200, "{path}");
    }
}
