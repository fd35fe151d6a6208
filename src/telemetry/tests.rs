use super::*;

use super::exposition::{Sample, parse, value};

fn samples(metrics: &Metrics) -> Vec<Sample> {
    let text = metrics.encode();
    parse(&text).unwrap_or_else(|e| panic!("unparsable metrics: {e}\n{text}"))
}

const MS: Duration = Duration::from_millis(1);

/// The sample names of SPEC §6 and §15.
const SPEC_NAMES: [&str; 14] = [
    "obo_requests_total",
    "obo_request_duration_seconds",
    "obo_token_cache_requests_total",
    "obo_token_cache_entries",
    "obo_idp_requests_total",
    "obo_idp_request_duration_seconds",
    "obo_jwks_refresh_total",
    "obo_upstream_errors_total",
    "obo_config_reload_total",
    "obo_credential_reload_total",
    "obo_shared_cache_requests_total",
    "obo_shared_cache_up",
    "obo_build_info",
    "obo_requests_in_flight",
];

fn record_one_of_each(metrics: &Metrics) {
    let api = metrics.route("api");
    api.record_request(200, 3 * MS);
    api.record_cache(CacheKind::Obo, CacheResult::Hit);
    api.record_upstream_error(UpstreamErrorKind::Timeout);
    metrics.record_request(NO_ROUTE, 404, MS);
    metrics.set_cache_entries(7);
    metrics.record_idp("default", Grant::Obo, IdpOutcome::Ok, 40 * MS);
    metrics.record_jwks("https://login.microsoftonline.com/{tenantid}/v2.0", true);
    metrics.record_reload(false);
    metrics.record_credential_reload("default", true);
    metrics.record_shared_cache(SharedResult::Hit);
    metrics.set_shared_cache_up(true);
}

#[test]
fn metrics_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Metrics>();
    assert_send_sync::<RouteMetrics>();
}

#[test]
fn fresh_metrics_list_every_family() {
    let metrics = Metrics::new();
    let text = metrics.encode();
    for family in [
        "obo_requests counter",
        "obo_request_duration_seconds histogram",
        "obo_token_cache_requests counter",
        "obo_token_cache_entries gauge",
        "obo_idp_requests counter",
        "obo_idp_request_duration_seconds histogram",
        "obo_jwks_refresh counter",
        "obo_upstream_errors counter",
        "obo_config_reload counter",
        "obo_credential_reload counter",
        "obo_shared_cache_requests counter",
        "obo_shared_cache_up gauge",
        "obo_build_info gauge",
        "obo_requests_in_flight gauge",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family}\n")),
            "{family}:\n{text}"
        );
    }
    assert!(
        text.contains("# UNIT obo_request_duration_seconds seconds\n"),
        "{text}"
    );
    let samples = parse(&text).unwrap();
    assert_eq!(value(&samples, "obo_token_cache_entries", &[]), Some(0.0));
    assert_eq!(
        value(&samples, "obo_config_reload_total", &[("outcome", "ok")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &samples,
            "obo_config_reload_total",
            &[("outcome", "rejected")]
        ),
        Some(0.0)
    );
}

#[test]
fn one_of_each_yields_every_spec_name_with_its_labels() {
    let metrics = Metrics::new();
    record_one_of_each(&metrics);
    let samples = samples(&metrics);
    for name in SPEC_NAMES {
        let sample_name = |s: &Sample| {
            s.name == name
                || s.name.strip_suffix("_bucket") == Some(name)
                || s.name.strip_suffix("_count") == Some(name)
        };
        assert!(samples.iter().any(sample_name), "no sample of {name}");
    }

    let expect = |name: &str, labels: &[(&str, &str)], want: f64| {
        assert_eq!(
            value(&samples, name, labels),
            Some(want),
            "{name} {labels:?}"
        );
    };
    expect(
        "obo_requests_total",
        &[("route", "api"), ("status", "200")],
        1.0,
    );
    expect(
        "obo_requests_total",
        &[("route", "-"), ("status", "404")],
        1.0,
    );
    expect(
        "obo_request_duration_seconds_count",
        &[("route", "api")],
        1.0,
    );
    expect("obo_request_duration_seconds_count", &[("route", "-")], 1.0);
    expect(
        "obo_token_cache_requests_total",
        &[("route", "api"), ("kind", "obo"), ("result", "hit")],
        1.0,
    );
    expect("obo_token_cache_entries", &[], 7.0);
    expect(
        "obo_idp_requests_total",
        &[("identity", "default"), ("grant", "obo"), ("outcome", "ok")],
        1.0,
    );
    expect(
        "obo_idp_request_duration_seconds_count",
        &[("identity", "default"), ("grant", "obo")],
        1.0,
    );
    expect(
        "obo_jwks_refresh_total",
        &[
            (
                "issuer",
                "https://login.microsoftonline.com/{tenantid}/v2.0",
            ),
            ("outcome", "ok"),
        ],
        1.0,
    );
    expect(
        "obo_upstream_errors_total",
        &[("route", "api"), ("kind", "timeout")],
        1.0,
    );
    expect("obo_config_reload_total", &[("outcome", "rejected")], 1.0);
    expect("obo_config_reload_total", &[("outcome", "ok")], 0.0);
}

#[test]
fn every_closed_label_value_is_its_lowercase_word() {
    let metrics = Metrics::new();
    let route = metrics.route("r");
    for kind in [CacheKind::Obo, CacheKind::App, CacheKind::Passthrough] {
        for result in [CacheResult::Hit, CacheResult::Miss, CacheResult::Stale] {
            route.record_cache(kind, result);
        }
    }
    for kind in [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Tls,
    ] {
        route.record_upstream_error(kind);
    }
    let outcomes = [
        IdpOutcome::Ok,
        IdpOutcome::InvalidGrant,
        IdpOutcome::ClaimsChallenge,
        IdpOutcome::ConsentRequired,
        IdpOutcome::Misconfigured,
        IdpOutcome::Unavailable,
        IdpOutcome::Throttled,
    ];
    for grant in [Grant::Obo, Grant::TokenExchange, Grant::ClientCredentials] {
        for outcome in outcomes {
            metrics.record_idp("kc", grant, outcome, MS);
        }
    }
    metrics.record_jwks("https://idp.example/realms/a", false);
    let samples = samples(&metrics);

    let values = |name: &str, key: &str| {
        let mut seen: Vec<String> = samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.label(key).map(str::to_owned))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    assert_eq!(
        values("obo_token_cache_requests_total", "kind"),
        ["app", "obo", "passthrough"]
    );
    assert_eq!(
        values("obo_token_cache_requests_total", "result"),
        ["hit", "miss", "stale"]
    );
    assert_eq!(
        values("obo_upstream_errors_total", "kind"),
        ["connect", "reset", "timeout", "tls"]
    );
    assert_eq!(
        values("obo_idp_requests_total", "grant"),
        ["client_credentials", "obo", "token_exchange"]
    );
    assert_eq!(
        values("obo_idp_requests_total", "outcome"),
        [
            "claims_challenge",
            "consent_required",
            "invalid_grant",
            "misconfigured",
            "ok",
            "throttled",
            "unavailable"
        ]
    );
    assert_eq!(values("obo_jwks_refresh_total", "outcome"), ["error"]);
    // Each (kind, result) pair has its own slot in the handle: 9 series, one count each.
    let cache: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "obo_token_cache_requests_total")
        .collect();
    assert_eq!(cache.len(), 9);
    assert!(cache.iter().all(|s| (s.value - 1.0).abs() < f64::EPSILON));
}

#[test]
fn route_handle_and_route_name_share_series() {
    let metrics = Metrics::new();
    let handle = metrics.route("api");
    handle.record_request(200, MS);
    metrics.record_request("api", 200, MS);
    metrics.route("api").record_request(200, MS);
    handle.record_cache(CacheKind::App, CacheResult::Miss);
    metrics.record_cache("api", CacheKind::App, CacheResult::Miss);
    handle.record_upstream_error(UpstreamErrorKind::Reset);
    metrics.record_upstream_error("api", UpstreamErrorKind::Reset);
    assert_eq!(handle.name(), "api");

    let samples = samples(&metrics);
    assert_eq!(
        value(
            &samples,
            "obo_requests_total",
            &[("route", "api"), ("status", "200")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &samples,
            "obo_request_duration_seconds_count",
            &[("route", "api")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &samples,
            "obo_token_cache_requests_total",
            &[("route", "api"), ("kind", "app"), ("result", "miss")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "obo_upstream_errors_total",
            &[("route", "api"), ("kind", "reset")]
        ),
        Some(2.0)
    );
}

#[test]
fn new_route_handle_lists_its_empty_duration_histogram() {
    let metrics = Metrics::new();
    let _handle = metrics.route("quiet");
    let samples = samples(&metrics);
    assert_eq!(
        value(
            &samples,
            "obo_request_duration_seconds_count",
            &[("route", "quiet")]
        ),
        Some(0.0)
    );
    assert!(!samples.iter().any(|s| s.name == "obo_requests_total"));
}

#[test]
fn status_outside_the_table_is_still_counted() {
    let metrics = Metrics::new();
    let handle = metrics.route("api");
    for status in [100, 599, 600, 999, 99] {
        handle.record_request(status, MS);
    }
    handle.record_request(600, MS);
    let samples = samples(&metrics);
    for (status, want) in [
        ("100", 1.0),
        ("599", 1.0),
        ("600", 2.0),
        ("999", 1.0),
        ("99", 1.0),
    ] {
        assert_eq!(
            value(
                &samples,
                "obo_requests_total",
                &[("route", "api"), ("status", status)]
            ),
            Some(want),
            "status {status}"
        );
    }
}

#[test]
fn request_duration_lands_in_cumulative_buckets() {
    let metrics = Metrics::new();
    metrics.record_request("api", 200, 3 * MS);
    metrics.record_request("api", 200, Duration::from_secs(30));
    let samples = samples(&metrics);
    let bucket = |le: &str| {
        value(
            &samples,
            "obo_request_duration_seconds_bucket",
            &[("route", "api"), ("le", le)],
        )
    };
    assert_eq!(bucket("0.0005"), Some(0.0));
    assert_eq!(bucket("0.0025"), Some(0.0));
    assert_eq!(bucket("0.005"), Some(1.0));
    assert_eq!(bucket("10.0"), Some(1.0));
    assert_eq!(bucket("+Inf"), Some(2.0));
    let sum = value(
        &samples,
        "obo_request_duration_seconds_sum",
        &[("route", "api")],
    );
    assert!(sum.is_some_and(|s| (s - 30.003).abs() < 1e-9), "{sum:?}");
    let les = samples
        .iter()
        .filter(|s| s.name == "obo_request_duration_seconds_bucket")
        .count();
    assert_eq!(les, DURATION_BUCKETS.len() + 1);
}

#[test]
fn cache_entries_gauge_is_set_not_added() {
    let metrics = Metrics::new();
    metrics.set_cache_entries(10);
    metrics.set_cache_entries(3);
    assert_eq!(
        value(&samples(&metrics), "obo_token_cache_entries", &[]),
        Some(3.0)
    );
}

#[test]
fn reload_outcomes_count_separately() {
    let metrics = Metrics::new();
    metrics.record_reload(true);
    metrics.record_reload(true);
    metrics.record_reload(false);
    let samples = samples(&metrics);
    assert_eq!(
        value(&samples, "obo_config_reload_total", &[("outcome", "ok")]),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "obo_config_reload_total",
            &[("outcome", "rejected")]
        ),
        Some(1.0)
    );
}

#[test]
fn concurrent_recording_loses_no_count() {
    let metrics = Arc::new(Metrics::new());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let metrics = Arc::clone(&metrics);
            std::thread::spawn(move || {
                let handle = metrics.route("api");
                for _ in 0..1000 {
                    handle.record_request(200, MS);
                    metrics.record_request(if i % 2 == 0 { "api" } else { "other" }, 503, MS);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let samples = samples(&metrics);
    let count = |route: &str, status: &str| {
        value(
            &samples,
            "obo_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(count("api", "200"), Some(4000.0));
    assert_eq!(count("api", "503"), Some(2000.0));
    assert_eq!(count("other", "503"), Some(2000.0));
}

#[test]
fn exposition_has_one_type_line_per_family_and_valid_samples() {
    let metrics = Metrics::new();
    record_one_of_each(&metrics);
    let text = metrics.encode();
    let types = text
        .lines()
        .filter(|l| l.starts_with("# TYPE obo_"))
        .count();
    assert_eq!(types, SPEC_NAMES.len());
    // `parse` checks every line's shape; every sample belongs to an obo_ family or is a process_ one.
    assert!(
        parse(&text)
            .unwrap()
            .iter()
            .all(|s| s.name.starts_with("obo_") || s.name.starts_with("process_"))
    );
}

/// On Linux the process metrics are there, with plausible values.
#[cfg(target_os = "linux")]
#[test]
fn process_metrics_are_read_from_proc() {
    let samples = samples(&Metrics::new());
    let get = |name: &str| value(&samples, name, &[]).unwrap_or_else(|| panic!("{name} missing"));
    assert!(get("process_resident_memory_bytes") > 1_000_000.0);
    assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
    assert!(get("process_cpu_seconds_total") >= 0.0);
    assert!(get("process_open_fds") >= 3.0);
    assert!(get("process_max_fds") >= get("process_open_fds"));
    assert!(get("process_threads") >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    let started = get("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 86_400.0,
        "{started} vs {now}"
    );
}

#[test]
fn parser_rejects_malformed_lines() {
    for bad in [
        "1bad 1\n# EOF\n",
        "ok{a=\"x\" 1\n# EOF\n",
        "ok{a=x} 1\n# EOF\n",
        "ok{a=\"x\"} one\n# EOF\n",
        "ok 1\n",
        "# FOO ok\n# EOF\n",
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
    let good = parse("a:b_c{x=\"q\\\"u\\\\o\\nte\",y=\"\"} +Inf\nplain 2.5\n# EOF\n").unwrap();
    assert_eq!(good[0].label("x"), Some("q\"u\\o\nte"));
    assert!(good[0].value.is_infinite());
    assert!((good[1].value - 2.5).abs() < f64::EPSILON);
}

/// `obo_build_info` is 1 with the version and commit; `obo_requests_in_flight` counts live guards.
#[test]
fn build_info_and_requests_in_flight() {
    let metrics = Metrics::new();
    let build = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", env!("OBO_SIDECAR_COMMIT")),
    ];
    assert_eq!(
        value(&samples(&metrics), "obo_build_info", &build),
        Some(1.0)
    );
    assert_eq!(
        value(&samples(&metrics), "obo_requests_in_flight", &[]),
        Some(0.0)
    );
    let first = metrics.request_started();
    let second = metrics.request_started();
    assert_eq!(
        value(&samples(&metrics), "obo_requests_in_flight", &[]),
        Some(2.0)
    );
    drop(first);
    drop(second);
    assert_eq!(
        value(&samples(&metrics), "obo_requests_in_flight", &[]),
        Some(0.0)
    );
}
