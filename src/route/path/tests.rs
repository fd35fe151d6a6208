use super::*;

fn norm(p: &str) -> Result<String, u16> {
    RequestPath::parse(p)
        .map(|b| String::from_utf8_lossy(b.as_bytes()).into_owned())
        .map_err(|e| e.status().as_u16())
}

#[test]
fn paths_normalize_per_spec() {
    assert_eq!(norm("/graph/v1.0/me"), Ok("/graph/v1.0/me".into()));
    assert_eq!(norm("//graph///x"), Ok("/graph/x".into()));
    assert_eq!(norm("/a/./b/../c/"), Ok("/a/c/".into()));
    assert_eq!(norm("/a/b/.."), Ok("/a/".into()));
    assert_eq!(norm("/a/%2e%2e/b"), Ok("/b".into()));
    assert_eq!(norm("/graph/%252e%252e/x"), Ok("/graph/%2e%2e/x".into()));
    assert_eq!(norm("/"), Ok("/".into()));
    assert_eq!(norm("/%41"), Ok("/A".into()));
    assert_eq!(norm("/caf%C3%A9"), Ok("/café".into()));
}

#[test]
fn path_parameters_and_dot_segments_with_parameters() {
    // Parameters stay on ordinary segments; dot and empty segments lose theirs.
    assert_eq!(norm("/admin;x/users"), Ok("/admin;x/users".into()));
    assert_eq!(norm("/admin%3Bx/users"), Ok("/admin;x/users".into()));
    assert_eq!(norm("/legacy/..;/admin/users"), Ok("/admin/users".into()));
    assert_eq!(norm("/legacy/..;x=1/admin"), Ok("/admin".into()));
    assert_eq!(norm("/a/.;x/b"), Ok("/a/b".into()));
    assert_eq!(norm("/;x/admin"), Ok("/admin".into()));
    assert_eq!(norm("/a/%2e%2e;/b"), Ok("/b".into()));
    assert_eq!(norm("/a/..;"), Ok("/".into()));
    assert_eq!(norm("/..;/admin"), Err(400));
}

#[test]
fn dangerous_paths_are_400() {
    for p in [
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a\\b",
        "/a%00",
        "/..",
        "/a/../..",
        "/%zz",
        "/%4",
        "*",
        "/a%09",
        "/a%0d%0a",
        "/a%7f",
        "/%C0%AE%C0%AE/admin",
        "/%ff",
        "/%u002e",
    ] {
        assert_eq!(norm(p), Err(400), "{p}");
    }
}

fn prefix(p: &str) -> Prefix {
    Prefix::new(p.trim_end_matches('/'))
}

fn path(p: &str) -> RequestPath {
    RequestPath::parse(p).expect("valid path")
}

#[test]
fn prefixes_match_at_segment_boundaries() {
    assert!(prefix("/graph").matches(&path("/graph")));
    assert!(prefix("/graph/").matches(&path("/graph/x")));
    assert!(!prefix("/graph").matches(&path("/graphql")));
    assert!(prefix("/").matches(&path("/anything")));
    assert!(prefix("/a/b").matches(&path("/a/b/c")));
    assert!(!prefix("/a/b").matches(&path("/a/bc")));
    assert!(!prefix("/a/b").matches(&path("/a")));
}

#[test]
fn prefixes_match_parameters_and_case_as_the_frameworks_do() {
    let admin = prefix("/admin/");
    for p in [
        "/admin/users",
        "/admin;x/users",
        "/admin%3Bx/users",
        "/ADMIN/users",
        "/AdMiN;jsessionid=1/users",
        "/public/..;/admin/users",
        "/adm%69n/users",
        "/adm%C4%B1n/users", // dotless ı upper-cases to I
        "/%C5%BFecret/../admin",
    ] {
        assert!(admin.matches(&path(p)), "{p}");
    }
    assert!(!admin.matches(&path("/administrator")));
    assert!(!admin.matches(&path("/admin.x")));
    assert!(prefix("/ſtats").matches(&path("/STATS/x")));
    assert!(prefix("/class").matches(&path("/cla%C3%9F")));
}

#[test]
fn what_follows_a_prefix() {
    let after = |p: &str, n| String::from_utf8_lossy(path(p).after(n)).into_owned();
    assert_eq!(after("/graph/v1.0/me", 1), "/v1.0/me");
    assert_eq!(after("/graph", 1), "");
    assert_eq!(after("/graph/", 1), "/");
    assert_eq!(after("/graph;x/me;y", 1), "/me;y");
    assert_eq!(after("/a/b/", 2), "/");
    assert_eq!(after("/a/b", 0), "/a/b");
    assert_eq!(after("/", 0), "/");
}

/// An independent model of SPEC §4's routing rules, written the way a servlet container reads a path
/// rather than the way the sidecar computes it: decode, cut each segment at `;`, merge `//`, remove dot
/// segments with RFC 3986 §5.2.4's buffer algorithm, fold case; then the longest prefix wins.
mod oracle {
    pub(super) fn read(raw: &str) -> Option<String> {
        let decoded = percent_decode(raw)?;
        let text = String::from_utf8(decoded).ok()?;
        let cut: Vec<&str> = text
            .split('/')
            .map(|segment| segment.split(';').next().unwrap_or(""))
            .collect();
        let mut joined = cut.join("/");
        while joined.contains("//") {
            joined = joined.replace("//", "/");
        }
        Some(
            remove_dot_segments(&joined)
                .chars()
                .flat_map(char::to_uppercase)
                .flat_map(char::to_lowercase)
                .collect(),
        )
    }

    fn percent_decode(raw: &str) -> Option<Vec<u8>> {
        let bytes = raw.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        Some(out)
    }

    /// RFC 3986 §5.2.4, step by step.
    fn remove_dot_segments(input: &str) -> String {
        let mut input = input.to_owned();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../") {
                input = rest.to_owned();
            } else if let Some(rest) = input.strip_prefix("./") {
                input = rest.to_owned();
            } else if input.starts_with("/./") {
                input = input[2..].to_owned();
            } else if input == "/." {
                input = "/".to_owned();
            } else if input.starts_with("/../") || input == "/.." {
                input = if input == "/.." {
                    "/".to_owned()
                } else {
                    input[3..].to_owned()
                };
                match output.rfind('/') {
                    Some(i) => output.truncate(i),
                    None => output.clear(),
                }
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input = input[end..].to_owned();
            }
        }
        output
    }

    /// The longest of `prefixes` (folded, no trailing `/`) that `path` (an oracle reading) starts with.
    pub(super) fn route(prefixes: &[&str], path: &str) -> Option<usize> {
        prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                let p = crate::config::fold(p);
                p.is_empty() || path == p || path.starts_with(&format!("{p}/"))
            })
            .max_by_key(|(_, p)| p.split('/').filter(|s| !s.is_empty()).count())
            .map(|(i, _)| i)
    }
}

#[test]
fn the_oracle_reads_the_issue_examples_as_admin() {
    for raw in [
        "/admin;x/users",
        "/admin%3Bx/users",
        "/ADMIN/users",
        "/legacy/..;/admin/users",
    ] {
        assert_eq!(oracle::read(raw).as_deref(), Some("/admin/users"), "{raw}");
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Routes with overlapping prefixes, a catch-all, and a non-ASCII one.
    const PREFIXES: &[&str] = &[
        "",
        "/admin",
        "/admin/users",
        "/public",
        "/api/v1",
        "/API/v2",
        "/ſtats",
    ];

    fn product_route(path: &RequestPath) -> Option<usize> {
        PREFIXES
            .iter()
            .enumerate()
            .filter(|(_, p)| Prefix::new(p).matches(path))
            .max_by_key(|(_, p)| Prefix::new(p).len())
            .map(|(i, _)| i)
    }

    fn hostile_segment() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "admin",
            "ADMIN",
            "Admin",
            "adm%69n",
            "adm%C4%B1n",
            "public",
            "users",
            "api",
            "v1",
            "V2",
            "stats",
            "%C5%BFtats",
            "..",
            ".",
            "..;",
            ".;a",
            "..;x=1",
            "%2e%2e",
            "%2E",
            "%2e%2e%3b",
            ";x",
            "admin;x",
            "admin%3Bx",
            "admin%3bjsessionid=1",
            "",
            "x%20y",
            "%C0%AE",
            "%00",
            "%2F",
            "%5c",
            "%",
            "%zz",
            "café",
            "caf%C3%A9",
        ])
    }

    fn benign_segment() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "admin",
            "ADMIN",
            "users",
            "public",
            "api",
            "v1",
            "x%20y",
            "a;b=c",
            "caf%C3%A9",
            ".",
            "",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whatever the spelling, a path the sidecar accepts takes the route the model reading takes.
        #[test]
        fn the_route_taken_is_the_route_the_model_reads(
            segments in proptest::collection::vec(hostile_segment(), 0..8),
            trailing in any::<bool>(),
        ) {
            let raw = format!("/{}{}", segments.join("/"), if trailing { "/" } else { "" });
            if let Ok(path) = RequestPath::parse(&raw) {
                let model = oracle::read(&raw);
                prop_assert!(model.is_some(), "accepted {raw:?}, which the model cannot read");
                let model = model.unwrap_or_default();
                prop_assert_eq!(product_route(&path), oracle::route(PREFIXES, &model), "{:?} read as {:?}", raw, model);
            }
        }

        /// Normalization keeps the meaning: the normalized path reads the same as the raw one, and
        /// normalizing it again changes nothing.
        #[test]
        fn normalization_is_stable(
            segments in proptest::collection::vec(hostile_segment(), 0..8),
        ) {
            let raw = format!("/{}", segments.join("/"));
            if let Ok(path) = RequestPath::parse(&raw) {
                // The hostile segments decode to no '%', so the normalized text is its own encoding.
                let text = String::from_utf8(path.as_bytes().to_vec()).expect("UTF-8");
                let again = RequestPath::parse(&text);
                prop_assert_eq!(again.as_ref().ok().map(RequestPath::as_bytes), Some(path.as_bytes()));
                prop_assert_eq!(oracle::read(&text), oracle::read(&raw));
            }
        }

        /// Ordinary paths are never refused.
        #[test]
        fn ordinary_paths_are_accepted(
            segments in proptest::collection::vec(benign_segment(), 0..8),
        ) {
            let raw = format!("/{}", segments.join("/"));
            prop_assert!(RequestPath::parse(&raw).is_ok(), "{}", raw);
        }

        /// Any request target: normalization answers, never panics; what it accepts is absolute and has no
        /// empty, `.` or `..` segment.
        #[test]
        fn normalization_never_panics(path in "(/|%2[eEfF]|%5[cC]|%00|%[0-9a-fA-F]{2}|\\.\\.?|[a-z;=]{1,3}|//){0,12}") {
            if let Ok(normalized) = RequestPath::parse(&path) {
                prop_assert!(normalized.as_bytes().starts_with(b"/"));
                prop_assert!(normalized.segments().all(|s| !matches!(s.name, b"" | b"." | b"..")));
            }
        }
    }
}
