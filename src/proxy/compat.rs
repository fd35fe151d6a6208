//! Microsoft's auth sidecar API (SPEC §16), served on the proxy listener with `[compat] microsoft_sidecar`:
//! what its endpoints are, how their query overrides read, and how their answers look. The proxy serves them
//! with its own validation, policy, cache and errors (one `admit` for every way of using a route).
//!
//! Where Microsoft's answers lose information, these keep it: a refusal carries the proxy's
//! `WWW-Authenticate` (a claims challenge included) as well as its problem body; `/DownstreamApi` returns every
//! header of the downstream answer, and its body whatever its framing (chunked too); an override that is not
//! applied is named in `X-Obo-Ignored-Overrides` besides the log line.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, header};
use http_body_util::Full;

use crate::config::{CompatOverride, Route, TokenKind};
use crate::route::RequestPath;

/// The header that names the `optionsOverride.*` (and agent) parameters a call carried but that were not
/// applied: not allowed on the route (`compat_overrides`), `BaseUrl` (never), or not supported.
pub(super) const IGNORED_OVERRIDES: &str = "x-obo-ignored-overrides";

/// The most of a downstream answer `/DownstreamApi` reads into its JSON.
pub(super) const MAX_DOWNSTREAM_BODY_BYTES: usize = 10 * 1024 * 1024;

/// Downstream answers read at once; a call beyond waits for a permit until its deadline, then is 503 with
/// `Retry-After`. With [`MAX_DOWNSTREAM_BODY_BYTES`], at most 160 MiB of bodies are held (their JSON aside).
pub(super) const MAX_BUFFERED_DOWNSTREAM_ANSWERS: usize = 16;

/// The methods `/DownstreamApi` calls with (an `HttpMethod` override naming another, `CONNECT` or `TRACE`, is
/// ignored).
const DOWNSTREAM_METHODS: [Method; 7] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::HEAD,
    Method::OPTIONS,
];

/// The most query parameters of one call that are read.
const MAX_QUERY_PARAMETERS: usize = 64;

/// One of Microsoft's sidecar endpoints.
pub(super) enum Endpoint<'a> {
    /// `GET /Validate`.
    Validate,
    /// `GET /AuthorizationHeader/{api}`, or `…Unauthenticated/{api}` (`authenticated: false`).
    AuthorizationHeader { api: &'a str, authenticated: bool },
    /// `POST|GET /DownstreamApi/{api}`, or `…Unauthenticated/{api}`.
    DownstreamApi { api: &'a str, authenticated: bool },
}

/// The endpoint `path` names, matched as ASP.NET Core routes are (letter case aside); `None` for any other
/// path or method, which routing then serves.
pub(super) fn endpoint<'a>(method: &Method, path: &'a RequestPath) -> Option<Endpoint<'a>> {
    let mut segments = path.segments().map(|s| s.name);
    let (first, second, third) = (segments.next()?, segments.next(), segments.next());
    let read = matches!(*method, Method::GET | Method::HEAD);
    let api = || {
        std::str::from_utf8(second?)
            .ok()
            .filter(|_| third.is_none())
    };
    let is = |name: &str| first.eq_ignore_ascii_case(name.as_bytes());
    if is("validate") && second.is_none() && read {
        Some(Endpoint::Validate)
    } else if (is("authorizationheader") || is("authorizationheaderunauthenticated")) && read {
        Some(Endpoint::AuthorizationHeader {
            api: api()?,
            authenticated: is("authorizationheader"),
        })
    } else if (is("downstreamapi") || is("downstreamapiunauthenticated"))
        && matches!(*method, Method::GET | Method::POST)
    {
        Some(Endpoint::DownstreamApi {
            api: api()?,
            authenticated: is("downstreamapi"),
        })
    } else {
        None
    }
}

/// The `optionsOverride.*` parameters of one call, as far as the route allows them.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    pub(super) scopes: Vec<String>,
    pub(super) request_app_token: bool,
    pub(super) relative_path: Option<String>,
    pub(super) http_method: Option<Method>,
    pub(super) accept: Option<String>,
    pub(super) content_type: Option<String>,
    /// Parameters present but not applied, by name (each once).
    pub(super) ignored: Vec<String>,
    /// A `Scopes` value outside the route's `compat_scopes`.
    denied_scope: bool,
}

impl Overrides {
    /// Reads `query` as Microsoft's sidecar does: `optionsOverride.` and the keys in any letter case,
    /// `Scopes` repeated (one scope each), the last value of the others. Only the overrides in `allowed`
    /// apply; `BaseUrl` never does; `Scopes` only when each is in `scopes_allowed` (when that is not empty).
    pub(super) fn read(
        query: Option<&str>,
        allowed: &[CompatOverride],
        scopes_allowed: &[String],
    ) -> Overrides {
        let mut out = Overrides::default();
        let Some(query) = query else {
            return out;
        };
        // Microsoft's API has a dozen parameters; more than this many are not read.
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()).take(MAX_QUERY_PARAMETERS)
        {
            let lower = key.to_ascii_lowercase();
            let name = match lower.strip_prefix("optionsoverride.") {
                Some(_) => &key["optionsOverride.".len()..],
                // Agent identities are Microsoft's preview feature; obo-sidecar has none.
                None if matches!(
                    lower.as_str(),
                    "agentidentity" | "agentusername" | "agentuserid"
                ) =>
                {
                    &key
                }
                None => continue,
            };
            let known = CompatOverride::from_name(name).filter(|o| allowed.contains(o));
            let value = value.trim();
            match known {
                // Blank values are skipped, as theirs are.
                Some(CompatOverride::Scopes) if value.is_empty() => {}
                Some(CompatOverride::Scopes) => {
                    if scopes_allowed.is_empty() || scopes_allowed.iter().any(|s| s == value) {
                        out.scopes.push(value.to_owned());
                    } else {
                        out.denied_scope = true;
                    }
                }
                Some(CompatOverride::RequestAppToken) => {
                    out.request_app_token = value.eq_ignore_ascii_case("true");
                }
                Some(CompatOverride::RelativePath) => out.relative_path = Some(value.to_owned()),
                Some(CompatOverride::HttpMethod) => {
                    match Method::from_bytes(value.to_ascii_uppercase().as_bytes()) {
                        Ok(method) if DOWNSTREAM_METHODS.contains(&method) => {
                            out.http_method = Some(method);
                        }
                        _ => out.ignore(name),
                    }
                }
                Some(CompatOverride::AcceptHeader) => out.accept = Some(value.to_owned()),
                Some(CompatOverride::ContentType) => out.content_type = Some(value.to_owned()),
                None => out.ignore(name),
            }
        }
        // One scope outside the route's list voids the whole override (a token for part of what was asked is
        // not what the caller asked for).
        if out.denied_scope {
            out.scopes.clear();
            out.ignore("Scopes");
        }
        out
    }

    /// Notes `name` as not applied: as a caller wrote it, so kept to 64 characters of a parameter name (others
    /// become `?`) before it reaches a log line or a header.
    fn ignore(&mut self, name: &str) {
        let name: String = name
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if !self.ignored.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            self.ignored.push(name);
        }
    }

    /// `route` as these overrides change what its token is (scopes, or an app token instead of an OBO one);
    /// `None` when they do not.
    pub(super) fn route(&self, route: &Route) -> Option<Route> {
        let app = self.request_app_token && route.token == TokenKind::Obo;
        if self.scopes.is_empty() && !app {
            return None;
        }
        let mut changed = route.clone();
        if !self.scopes.is_empty() {
            changed.scopes.clone_from(&self.scopes);
        }
        if app {
            changed.token = TokenKind::App;
        }
        Some(changed)
    }
}

/// A 200 JSON answer with Microsoft's no-cache headers (theirs set them on every 2xx).
pub(super) fn answer(body: &serde_json::Value, ignored: &[String]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    headers.insert(header::EXPIRES, HeaderValue::from_static("0"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    name_ignored(headers, ignored);
    response
}

/// Adds [`IGNORED_OVERRIDES`] when some parameters were not applied.
pub(super) fn name_ignored(headers: &mut HeaderMap, ignored: &[String]) {
    if let Ok(value) = HeaderValue::from_str(&ignored.join(", "))
        && !ignored.is_empty()
    {
        headers.insert(IGNORED_OVERRIDES, value);
    }
}

/// `/DownstreamApi`'s JSON: the downstream status, **every** header (values grouped by name), and the body as
/// text (`null` when empty; `contentBase64` instead when it is not UTF-8).
pub(super) fn downstream_result(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
) -> serde_json::Value {
    let mut grouped = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<serde_json::Value> = headers
            .get_all(name)
            .iter()
            .map(|v| serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        grouped.insert(canonical(name.as_str()), serde_json::Value::Array(values));
    }
    let mut result = serde_json::json!({
        "statusCode": status,
        "headers": grouped,
        "content": serde_json::Value::Null,
    });
    if !body.is_empty() {
        if let Ok(text) = std::str::from_utf8(body) {
            result["content"] = serde_json::Value::from(text);
        } else {
            use base64::Engine as _;
            result["contentBase64"] =
                serde_json::Value::from(base64::engine::general_purpose::STANDARD.encode(body));
        }
    }
    result
}

/// A header name as .NET writes it (`content-type` → `Content-Type`).
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_match_in_any_letter_case_and_only_with_their_methods() {
        let path = |p: &str| RequestPath::parse(p).unwrap();
        let validate = path("/VALIDATE");
        assert!(matches!(
            endpoint(&Method::GET, &validate),
            Some(Endpoint::Validate)
        ));
        assert!(endpoint(&Method::POST, &validate).is_none());
        let header = path("/authorizationHeader/Graph");
        assert!(matches!(
            endpoint(&Method::GET, &header),
            Some(Endpoint::AuthorizationHeader {
                api: "Graph",
                authenticated: true
            })
        ));
        let anonymous = path("/AuthorizationHeaderUnauthenticated/jobs");
        assert!(matches!(
            endpoint(&Method::GET, &anonymous),
            Some(Endpoint::AuthorizationHeader {
                api: "jobs",
                authenticated: false
            })
        ));
        let downstream = path("/DownstreamApi/graph");
        assert!(matches!(
            endpoint(&Method::POST, &downstream),
            Some(Endpoint::DownstreamApi {
                api: "graph",
                authenticated: true
            })
        ));
        assert!(endpoint(&Method::DELETE, &downstream).is_none());
        assert!(endpoint(&Method::GET, &path("/DownstreamApi/graph/more")).is_none());
        assert!(endpoint(&Method::GET, &path("/AuthorizationHeader")).is_none());
        assert!(endpoint(&Method::GET, &path("/api/orders")).is_none());
    }

    #[test]
    fn overrides_apply_only_where_allowed_and_base_url_never() {
        let all = CompatOverride::ALL;
        let read = Overrides::read(
            Some(
                "OptionsOverride.Scopes=user.read&optionsOverride.scopes=mail.read&optionsOverride.Scopes=&\
                 optionsOverride.RequestAppToken=True&optionsOverride.RelativePath=me/messages&\
                 optionsOverride.HttpMethod=patch&optionsOverride.AcceptHeader=text/plain&\
                 optionsOverride.ContentType=application/xml&optionsOverride.BaseUrl=https://evil.example&\
                 optionsOverride.AcquireTokenOptions.Tenant=x&AgentIdentity=a&other=1",
            ),
            &all,
            &[],
        );
        assert_eq!(read.scopes, ["user.read", "mail.read"]);
        assert!(read.request_app_token);
        assert_eq!(read.relative_path.as_deref(), Some("me/messages"));
        assert_eq!(read.http_method, Some(Method::PATCH));
        assert_eq!(read.accept.as_deref(), Some("text/plain"));
        assert_eq!(read.content_type.as_deref(), Some("application/xml"));
        assert_eq!(
            read.ignored,
            ["BaseUrl", "AcquireTokenOptions.Tenant", "AgentIdentity"]
        );

        let gated = Overrides::read(
            Some("optionsOverride.Scopes=user.read&optionsOverride.RelativePath=x"),
            &[CompatOverride::RelativePath],
            &[],
        );
        assert!(gated.scopes.is_empty());
        assert_eq!(gated.relative_path.as_deref(), Some("x"));
        assert_eq!(gated.ignored, ["Scopes"]);
        let hostile = Overrides::read(Some("optionsOverride.A%0Aforged%3D1=x"), &all, &[]);
        assert_eq!(hostile.ignored, ["A?forged?1"]);

        let listed = ["api://a/.default".to_owned(), "api://b/.default".to_owned()];
        let within = Overrides::read(
            Some("optionsOverride.Scopes=api://b/.default"),
            &all,
            &listed,
        );
        assert_eq!(within.scopes, ["api://b/.default"]);
        let beyond = Overrides::read(
            Some(
                "optionsOverride.Scopes=api://a/.default&optionsOverride.Scopes=https://management.azure.com/.default",
            ),
            &all,
            &listed,
        );
        assert!(beyond.scopes.is_empty());
        assert_eq!(beyond.ignored, ["Scopes"]);
    }

    #[test]
    fn downstream_results_keep_every_header_and_binary_bodies() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        headers.insert(
            "www-authenticate",
            HeaderValue::from_static("Bearer claims=\"x\""),
        );
        let text = downstream_result(401, &headers, b"{\"error\":1}");
        assert_eq!(text["statusCode"], 401);
        assert_eq!(text["headers"]["Content-Type"][0], "application/json");
        assert_eq!(text["headers"]["Set-Cookie"].as_array().unwrap().len(), 2);
        assert_eq!(
            text["headers"]["Www-Authenticate"][0],
            "Bearer claims=\"x\""
        );
        assert_eq!(text["content"], "{\"error\":1}");
        let empty = downstream_result(204, &HeaderMap::new(), b"");
        assert_eq!(empty["content"], serde_json::Value::Null);
        let binary = downstream_result(200, &HeaderMap::new(), &[0xff, 0x00]);
        assert_eq!(binary["content"], serde_json::Value::Null);
        assert_eq!(binary["contentBase64"], "/wA=");
    }
}
