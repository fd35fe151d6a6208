//! Microsoft's auth sidecar API (SPEC §16): the request and answer pairs of its documentation and tests
//! (`tests/fixtures/microsoft-sidecar.json`) replayed against obo-sidecar, then what the fixtures cannot say:
//! `DownstreamApis__*` variables as routes, a chunked downstream body, a claims challenge, and the
//! endpoints staying off without `[compat]`.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failed expectation is a failed test"
)]
#![cfg(feature = "dev")]

mod support;

use serde_json::Value;
use support::{Harness, RecordingServer};

/// The routes Microsoft's endpoints name: `graph` (every override allowed, on a recording downstream),
/// `strict` (no override, by name only), `open` (no scopes of its own: its callers name them, from a list),
/// `jobs` (an app token, no caller).
fn config(idp: &obo_sidecar::dev::DevIdp, echo: &str, downstream: &str) -> String {
    support::inbound_config(idp)
        + &format!(
            r#"
[identity]
token_endpoint = "{token_endpoint}"
client_id = "{client_id}"
client_secret = {{ env = "{secret}" }}

[compat]
microsoft_sidecar = true

[[routes]]
name = "graph"
path_prefix = "/graph/"
upstream = "{downstream}/v1.0/"
token = "obo"
scopes = ["api://downstream/.default"]
compat_overrides = ["Scopes", "RequestAppToken", "RelativePath", "HttpMethod", "AcceptHeader", "ContentType"]

[[routes]]
name = "strict"
proxy = false
upstream = "{echo}/strict/"
token = "obo"
token_api = true
scopes = ["api://strict/.default"]

[[routes]]
name = "open"
proxy = false
upstream = "{echo}/open/"
token = "obo"
token_api = true
compat_overrides = ["Scopes"]
compat_scopes = ["api://open/.default"]

[[routes]]
name = "jobs"
path_prefix = "/jobs/"
upstream = "{echo}/jobs/"
token = "app"
caller_auth = "none"
scopes = ["api://jobs/.default"]
"#,
            token_endpoint = idp.token_endpoint(),
            client_id = obo_sidecar::dev::DEFAULT_CLIENT_ID,
            secret = support::SECRET_VARIABLE,
        )
}

/// Whether `actual` matches `expected`: objects key by key (extra keys allowed), arrays element by element,
/// and the placeholders `<caller>`, `<any>`, `<starts:X>`, `<contains:X>`.
fn matches(expected: &Value, actual: &Value, caller: &str) -> bool {
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => want
            .iter()
            .all(|(k, v)| got.get(k).is_some_and(|a| matches(v, a, caller))),
        (Value::Array(want), Value::Array(got)) => {
            want.len() == got.len() && want.iter().zip(got).all(|(w, g)| matches(w, g, caller))
        }
        (Value::String(want), actual) => text_matches(want, actual.as_str(), caller),
        (want, got) => want == got,
    }
}

fn text_matches(want: &str, got: Option<&str>, caller: &str) -> bool {
    if want == "<any>" {
        return got.is_some();
    }
    let Some(got) = got else { return false };
    if want == "<caller>" {
        return got == caller;
    }
    if let Some(prefix) = want
        .strip_prefix("<starts:")
        .and_then(|w| w.strip_suffix('>'))
    {
        return got.starts_with(prefix);
    }
    if let Some(part) = want
        .strip_prefix("<contains:")
        .and_then(|w| w.strip_suffix('>'))
    {
        return got.contains(part);
    }
    want == got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microsoft_sidecar_fixtures_pass() {
    let fixtures: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/microsoft-sidecar.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let downstream = RecordingServer::start().await;
    let downstream_url = downstream.url("");
    let h =
        Harness::start_custom(|idp, echo| config(idp, echo, downstream_url.trim_end_matches('/')))
            .await;
    let caller = h.token("alice", "access_as_user");
    for case in fixtures["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let request = &case["request"];
        if let Some(answer) = case.get("downstream") {
            let body = answer["body"].as_str().unwrap().to_owned();
            let status = u16::try_from(answer["status"].as_u64().unwrap()).unwrap();
            match answer["header"].as_array() {
                Some(header) => {
                    let name: &'static str = header[0].as_str().unwrap().to_owned().leak();
                    let value: &'static str = header[1].as_str().unwrap().to_owned().leak();
                    downstream.answer_with_header(
                        status,
                        &serde_json::from_str(&body).unwrap(),
                        (name, value),
                    );
                }
                None if body.is_empty() => downstream.answer_raw(status, ""),
                None => downstream.answer_raw(status, &body),
            }
        }
        let method =
            http::Method::from_bytes(request["method"].as_str().unwrap().as_bytes()).unwrap();
        let mut call = h
            .http
            .request(method, h.url(request["path"].as_str().unwrap()));
        match request["authorization"].as_str().unwrap() {
            "caller" => call = call.bearer_auth(&caller),
            "none" => {}
            other => call = call.header("authorization", other),
        }
        if let Some(content_type) = request["content_type"].as_str() {
            call = call.header("content-type", content_type);
        }
        if let Some(body) = request["body"].as_str() {
            call = call.body(body.to_owned());
        }
        let idp_before = h.idp.recorded_requests().len();
        let downstream_before = downstream.requests().len();
        let response = call.send().await.unwrap();
        let expect = &case["expect"];
        assert_eq!(
            response.status().as_u16(),
            u16::try_from(expect["status"].as_u64().unwrap()).unwrap(),
            "{name}"
        );
        if let Some(headers) = expect["headers"].as_object() {
            for (header, want) in headers {
                let got = response.headers().get(header).and_then(|v| v.to_str().ok());
                assert!(
                    text_matches(want.as_str().unwrap(), got, &caller),
                    "{name}: {header} = {got:?}, expected {want}"
                );
            }
        }
        let text = response.text().await.unwrap();
        if let Some(json) = expect.get("json") {
            let got: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
            assert!(
                matches(json, &got, &caller),
                "{name}: {got:#}\nexpected {json:#}"
            );
        }
        if let Some(scope) = expect["idp_scope"].as_str() {
            let recorded = h.idp.recorded_requests();
            assert_eq!(recorded.len(), idp_before + 1, "{name}: one token request");
            let sent = recorded.last().and_then(|r| {
                r.form
                    .iter()
                    .find(|(k, _)| k == "scope")
                    .map(|(_, v)| v.clone())
            });
            assert_eq!(sent.as_deref(), Some(scope), "{name}");
        }
        if let Some(grant) = expect["idp_grant"].as_str() {
            let recorded = h.idp.recorded_requests();
            assert_eq!(
                recorded.last().and_then(|r| r.grant_type.as_deref()),
                Some(grant),
                "{name}"
            );
        }
        if let Some(want) = expect["downstream_request"].as_object() {
            let requests = downstream.requests();
            assert_eq!(requests.len(), downstream_before + 1, "{name}");
            let seen = requests.last().unwrap();
            for (key, value) in want {
                let got = match key.as_str() {
                    "method" => Some(seen.method.as_str()),
                    "path" => Some(seen.path.as_str()),
                    header => seen.header(header),
                };
                assert!(
                    text_matches(value.as_str().unwrap(), got, &caller),
                    "{name}: downstream {key} = {got:?}, expected {value}"
                );
            }
            // The caller's own token never goes downstream.
            assert!(
                seen.headers.iter().all(|(_, v)| !v.contains(&caller)),
                "{name}"
            );
        }
    }
}

/// `DownstreamApis__<Name>__*` become a route of that name (not proxied, on the token API): its base URL,
/// scopes (`Scopes__N`), relative path and method, as `/DownstreamApi/{name}` uses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_apis_variables_are_read_as_routes() {
    let downstream = RecordingServer::start().await;
    let base = downstream.url("/beta/");
    let vars = [
        ("DownstreamApis__Mail__BaseUrl", base.as_str()),
        ("DownstreamApis__Mail__Scopes__0", "api://mail/Mail.Read"),
        ("downstreamapis__mail__scopes__1", "api://mail/Mail.Send"),
        ("DownstreamApis__Mail__RelativePath", "me/messages"),
        ("DownstreamApis__Mail__HttpMethod", "post"),
    ];
    let h = Harness::start_custom_downstream_apis(
        |idp, _| support::inbound_config(idp) + &identity(idp) + COMPAT_ON + &catch_all_route(idp),
        &vars,
    )
    .await;
    downstream.answer_raw(202, "{\"queued\":true}");
    let response = h
        .http
        .post(h.url("/DownstreamApi/Mail"))
        .bearer_auth(h.token("alice", "access_as_user"))
        .header("content-type", "application/json")
        .body("{\"to\":\"bob\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["statusCode"], 202);
    assert_eq!(result["content"], "{\"queued\":true}");
    let seen = downstream.requests();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/beta/me/messages");
    let scope = h.idp.recorded_requests()[0]
        .form
        .iter()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone());
    assert_eq!(
        scope.as_deref(),
        Some("api://mail/Mail.Read api://mail/Mail.Send")
    );
    // On the token API too, by its name.
    let header = h
        .get(
            "/.obo/authorization-header/Mail",
            Some(&h.token("alice", "access_as_user")),
        )
        .await;
    assert_eq!(header.status(), 200);
    // Reachable by name only: no proxy path leads to it.
    assert_eq!(
        h.get(
            "/beta/me/messages",
            Some(&h.token("alice", "access_as_user"))
        )
        .await
        .status(),
        404
    );
}

/// What Microsoft's sidecar loses, kept: a chunked downstream body arrives whole, and an IdP claims challenge
/// is a `WWW-Authenticate` challenge, not only a problem body. Without `[compat]` none of the endpoints exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_and_claims_challenges_are_kept() {
    let chunked = support::bind().await;
    let chunked_url = format!("http://{}", chunked.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = chunked.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut buffer = [0_u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
                    .await;
            });
        }
    });
    let h = Harness::start_custom(|idp, echo| config(idp, echo, &chunked_url)).await;
    let caller = h.token("alice", "access_as_user");
    let result: Value = h
        .http
        .post(h.url("/DownstreamApi/graph"))
        .bearer_auth(&caller)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["content"], "hello world", "{result}");
    assert_eq!(result["headers"]["Transfer-Encoding"][0], "chunked");

    h.idp.fail_next(
        obo_sidecar::dev::Failure::InteractionRequired {
            claims: "{\"access_token\":{\"acrs\":{\"essential\":true,\"value\":\"c1\"}}}"
                .to_owned(),
        },
        1,
    );
    let challenged = h
        .http
        .get(h.url("/AuthorizationHeader/strict"))
        .bearer_auth(&caller)
        .send()
        .await
        .unwrap();
    assert_eq!(challenged.status(), 401);
    let challenge = challenged.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        challenge.contains("insufficient_claims") && challenge.contains("claims=\""),
        "{challenge}"
    );
    // Theirs answers a problem body only; this one has both.
    let problem: Value = challenged.json().await.unwrap();
    assert_eq!(problem["status"], 401, "{problem}");

    let off = Harness::start().await;
    for path in [
        "/Validate",
        "/AuthorizationHeader/obo",
        "/AuthorizationHeaderUnauthenticated/obo",
        "/DownstreamApi/obo",
        "/DownstreamApiUnauthenticated/obo",
    ] {
        let response = off
            .get(path, Some(&off.token("alice", "access_as_user")))
            .await;
        assert_eq!(response.status(), 404, "{path}");
    }
}

const COMPAT_ON: &str = "\n[compat]\nmicrosoft_sidecar = true\n";

fn identity(idp: &obo_sidecar::dev::DevIdp) -> String {
    format!(
        "\n[identity]\ntoken_endpoint = \"{}\"\nclient_id = \"{}\"\nclient_secret = {{ env = \"{}\" }}\n",
        idp.token_endpoint(),
        obo_sidecar::dev::DEFAULT_CLIENT_ID,
        support::SECRET_VARIABLE
    )
}

/// A route elsewhere, so the configuration has a proxied one.
fn catch_all_route(idp: &obo_sidecar::dev::DevIdp) -> String {
    let _ = idp;
    "\n[[routes]]\nname = \"other\"\npath_prefix = \"/other/\"\nupstream = \"http://127.0.0.1:9/\"\ntoken = \"none\"\n"
        .to_owned()
}

/// `optionsOverride.RelativePath` from a raw socket (no client normalizes it): climbing above the upstream
/// URL's path, doubly encoded dots and control characters are 400 and reach no downstream; a leading `//` stays
/// a path on the configured host; an `HttpMethod` outside the list is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_path_overrides_from_a_raw_socket_stay_below_the_base_url() {
    let downstream = RecordingServer::start().await;
    let url = downstream.url("");
    let h = Harness::start_custom(|idp, echo| config(idp, echo, url.trim_end_matches('/'))).await;
    downstream.answer_raw(200, "{}");
    let caller = h.token("alice", "access_as_user");
    for (target, status, seen) in [
        ("RelativePath=..%2f..%2fadmin", 400, None),
        ("RelativePath=%252e%252e/%252e%252e/admin", 400, None),
        ("RelativePath=a/../../admin", 400, None),
        ("RelativePath=x%0d%0aHost:%20evil", 400, None),
        (
            "RelativePath=//evil.example/x",
            200,
            Some("GET /v1.0/evil.example/x"),
        ),
        ("HttpMethod=CONNECT", 200, Some("GET /v1.0/")),
    ] {
        let request = format!(
            "POST /DownstreamApi/graph?optionsOverride.{target} HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {caller}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let before = downstream.requests().len();
        let (got, _) = support::raw_request(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert_eq!(got, status, "{target}");
        let requests = downstream.requests();
        let went = requests
            .get(before)
            .map(|r| format!("{} {}", r.method, r.path));
        assert_eq!(went.as_deref(), seen, "{target}");
    }
}
