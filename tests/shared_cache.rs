//! The fleet's shared token cache (SPEC §14) on a real `redis-server`: replicas share exchanges (one per
//! caller for the fleet, also when a cold caller hits every replica at once), Redis holds nothing readable,
//! Redis going away fails no request and sharing comes back by itself, rotated keys still open, a value that
//! does not open is a miss and is overwritten, and an upstream 401 drops the shared entry too.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test failure is the point"
)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use obo_sidecar::Sidecar;
use obo_sidecar::dev::{DevIdp, DevIdpConfig, EchoUpstream, Failure, TokenClaims};
use support::redis::RedisServer;

const PATIENCE: Duration = Duration::from_secs(15);
const KEY_A: [u8; 32] = [0xA1; 32];
const KEY_B: [u8; 32] = [0xB2; 32];

/// An IdP, an echo upstream and `n` sidecars sharing `redis`, each with these encryption keys.
struct Fleet {
    idp: DevIdp,
    _upstream: EchoUpstream,
    replicas: Vec<Sidecar>,
    http: reqwest::Client,
}

fn key_file(dir: &std::path::Path, name: &str, keys: &[[u8; 32]]) -> std::path::PathBuf {
    let path = dir.join(name);
    let text: Vec<String> = keys
        .iter()
        .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
        .collect();
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

fn config(idp: &DevIdp, upstream: &str, shared: &str, keys: &std::path::Path) -> String {
    format!(
        "{}\n[cache.shared]\n{shared}\nencryption_key = {{ file = \"{}\" }}\ntimeout = \"200ms\"\nlease = \"5s\"\n",
        support::base_config(
            idp,
            upstream,
            &idp.token_endpoint(),
            "127.0.0.1:9".parse().unwrap()
        ),
        keys.display()
    )
}

impl Fleet {
    /// Replicas sharing `redis`, each connected to it: a replica serves its first requests before its
    /// connection is up, unshared, and the tests count exchanges exactly.
    async fn start(redis: &RedisServer, keys: &[&[[u8; 32]]]) -> Fleet {
        let shared = format!("url = \"{}\"", redis.url());
        let fleet = Fleet::start_with(&vec![shared; keys.len()], keys).await;
        for replica in 0..keys.len() {
            fleet.wait_for_up(replica, true).await;
        }
        fleet
    }

    /// Replicas with these `[cache.shared]` connection keys and encryption keys.
    async fn start_with(shared: &[String], keys: &[&[[u8; 32]]]) -> Fleet {
        support::captured_logs();
        let idp = DevIdp::start(support::bind().await, DevIdpConfig::default())
            .await
            .expect("idp");
        let upstream = EchoUpstream::start(support::bind().await)
            .await
            .expect("upstream");
        let dir = support::temp_dir("shared-cache");
        let mut replicas = Vec::new();
        for (i, keys) in keys.iter().enumerate() {
            let file = key_file(&dir, &format!("keys-{i}"), keys);
            let text = config(&idp, &upstream.url(), &shared[i], &file);
            let sidecar = support::start_sidecar(support::parse(&text)).await;
            sidecar.ready().await;
            replicas.push(sidecar);
        }
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Fleet {
            idp,
            _upstream: upstream,
            replicas,
            http,
        }
    }

    fn caller(&self, sub: &str) -> String {
        self.idp.mint(&TokenClaims {
            scp: Some("access_as_user".into()),
            ..TokenClaims::user(sub)
        })
    }

    async fn get(&self, replica: usize, token: &str) -> reqwest::Response {
        self.get_with(replica, token, &[]).await
    }

    async fn get_with(
        &self,
        replica: usize,
        token: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .http
            .get(format!(
                "http://{}/obo/x",
                self.replicas[replica].proxy_addr
            ))
            .bearer_auth(token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request")
    }

    /// The sum of one metric over the replicas' `/metrics`, filtered by a label.
    async fn metric(&self, replica: usize, name: &str, label: Option<(&str, &str)>) -> f64 {
        let url = format!("http://{}/metrics", self.replicas[replica].admin_addr);
        support::metric_sum(&self.http, &url, name, label).await
    }

    /// Waits until `obo_shared_cache_up` of `replica` is `up`.
    async fn wait_for_up(&self, replica: usize, up: bool) {
        let started = std::time::Instant::now();
        loop {
            let value = self.metric(replica, "obo_shared_cache_up", None).await;
            if (value > 0.5) == up {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "obo_shared_cache_up never {up}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// 3 replicas × 60 callers, each caller calling every replica: one exchange per caller for the fleet.
#[tokio::test]
async fn replicas_share_one_exchange_per_caller() {
    let redis = RedisServer::start();
    let fleet = Fleet::start(&redis, &[&[KEY_A], &[KEY_A], &[KEY_A]]).await;
    let callers: Vec<String> = (0..60)
        .map(|n| fleet.caller(&format!("user-{n}")))
        .collect();
    for token in &callers {
        for replica in 0..3 {
            let echo = support::echoed(fleet.get(replica, token).await).await;
            assert!(support::seen_authorization(&echo).is_some());
        }
    }
    assert_eq!(fleet.idp.token_requests(), 60, "not 180");
    let hits = fleet
        .metric(
            1,
            "obo_shared_cache_requests_total",
            Some(("result", "hit")),
        )
        .await
        + fleet
            .metric(
                2,
                "obo_shared_cache_requests_total",
                Some(("result", "hit")),
            )
            .await;
    assert!(
        hits >= 110.0,
        "replicas 1 and 2 found the entries ({hits} hits)"
    );
    assert_nothing_readable(&redis, &callers);
}

/// A cold caller sending 16 concurrent requests to each of 3 replicas, the IdP slow: one exchange (two at
/// most, should two replicas race for the lease).
#[tokio::test]
async fn a_cold_caller_on_every_replica_at_once_is_exchanged_once() {
    let redis = RedisServer::start();
    let fleet = Fleet::start(&redis, &[&[KEY_A], &[KEY_A], &[KEY_A]]).await;
    fleet
        .idp
        .fail_next(Failure::Delay(Duration::from_millis(300)), 1);
    let token = fleet.caller("cold");
    let requests = (0..48).map(|i| fleet.get(i % 3, &token));
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    let exchanges = fleet.idp.token_requests();
    assert!(exchanges <= 2, "{exchanges} exchanges");
    assert_eq!(exchanges, 1, "the lease holds the others back");
}

/// Requests of fresh callers to each replica, `concurrency` at a time per replica, until `stop`; counts the
/// requests and the failures.
fn load(
    fleet: &Fleet,
    tokens: &Arc<Vec<String>>,
    concurrency: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u32, u32)>> {
    let mut tasks = Vec::new();
    let next = Arc::new(AtomicUsize::new(0));
    for replica in &fleet.replicas {
        for _ in 0..concurrency {
            let (http, url) = (
                fleet.http.clone(),
                format!("http://{}/obo/x", replica.proxy_addr),
            );
            let (tokens, next, stop) = (Arc::clone(tokens), Arc::clone(&next), Arc::clone(stop));
            tasks.push(tokio::spawn(async move {
                let (mut sent, mut failed) = (0, 0);
                while !stop.load(Ordering::SeqCst) {
                    let token = &tokens[next.fetch_add(1, Ordering::SeqCst) % tokens.len()];
                    let ok = http
                        .get(&url)
                        .bearer_auth(token)
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    sent += 1;
                    failed += u32::from(!ok);
                }
                (sent, failed)
            }));
        }
    }
    tasks
}

async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<(u32, u32)>>) -> (u32, u32) {
    stop.store(true, Ordering::SeqCst);
    let mut totals = (0, 0);
    for task in tasks {
        let (sent, failed) = task.await.unwrap();
        totals = (totals.0 + sent, totals.1 + failed);
    }
    totals
}

/// Redis killed while three replicas are under load: no request fails, the cache says it is degraded;
/// Redis back: sharing resumes by itself.
#[tokio::test]
async fn redis_killed_under_load_fails_nothing_and_sharing_comes_back() {
    let mut redis = RedisServer::start();
    let fleet = Fleet::start(&redis, &[&[KEY_A], &[KEY_A], &[KEY_A]]).await;
    let tokens = Arc::new(
        (0..600)
            .map(|i| fleet.caller(&format!("load-{i}")))
            .collect::<Vec<_>>(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&fleet, &tokens, 4, &stop);
    let exchanges = fleet.idp.token_requests();
    while fleet.idp.token_requests() < exchanges + 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill();
    for replica in 0..3 {
        fleet.wait_for_up(replica, false).await;
    }
    let during = fleet.idp.token_requests();
    while fleet.idp.token_requests() < during + 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (sent, failed) = finish(&stop, tasks).await;
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert!(
        fleet
            .metric(
                0,
                "obo_shared_cache_requests_total",
                Some(("result", "error"))
            )
            .await
            >= 1.0
    );
    assert!(
        support::captured_logs()
            .text()
            .contains("shared cache degraded")
    );
    redis.restart();
    for replica in 0..3 {
        fleet.wait_for_up(replica, true).await;
    }
    let exchanges = fleet.idp.token_requests();
    for i in 0..10 {
        let token = fleet.caller(&format!("after-{i}"));
        for replica in 0..3 {
            assert_eq!(fleet.get(replica, &token).await.status(), 200);
        }
    }
    assert_eq!(fleet.idp.token_requests() - exchanges, 10, "shared again");
}

/// Redis paused (SIGSTOP: connections open, nothing answers) under load: no request fails or waits long;
/// resumed, sharing comes back.
#[tokio::test]
async fn a_paused_redis_fails_nothing_and_adds_at_most_its_timeout() {
    let redis = RedisServer::start();
    let fleet = Fleet::start(&redis, &[&[KEY_A], &[KEY_A]]).await;
    redis.pause();
    let started = std::time::Instant::now();
    for i in 0..20 {
        let token = fleet.caller(&format!("paused-{i}"));
        let one = std::time::Instant::now();
        assert_eq!(fleet.get(i % 2, &token).await.status(), 200);
        assert!(
            one.elapsed() < Duration::from_secs(2),
            "{:?}",
            one.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    fleet.wait_for_up(0, false).await;
    redis.resume();
    fleet.wait_for_up(0, true).await;
    fleet.wait_for_up(1, true).await;
    let exchanges = fleet.idp.token_requests();
    let token = fleet.caller("resumed");
    assert_eq!(fleet.get(0, &token).await.status(), 200);
    assert_eq!(fleet.get(1, &token).await.status(), 200);
    assert_eq!(fleet.idp.token_requests() - exchanges, 1, "shared again");
}

/// A "Redis" that answers everything with well-formed nonsense: every request is served (from the IdP),
/// none hangs, and the cache says it is degraded.
#[tokio::test]
async fn a_redis_answering_nonsense_fails_nothing() {
    let (addr, _server) = support::redis::garbage_server().await;
    let shared = format!("url = \"redis://{addr}/\"");
    let fleet = Fleet::start_with(&[shared.clone(), shared], &[&[KEY_A], &[KEY_A]]).await;
    for i in 0..6 {
        let token = fleet.caller(&format!("nonsense-{i}"));
        let response = tokio::time::timeout(Duration::from_secs(5), fleet.get(i % 2, &token))
            .await
            .expect("no hang");
        assert_eq!(response.status(), 200);
    }
    fleet.wait_for_up(0, false).await;
    assert_eq!(fleet.idp.token_requests(), 6);
}

/// A replica whose new key seals but whose old key still opens reads what the old key sealed; a replica
/// with an unrelated key shares nothing. A value that does not open is a miss, and is overwritten.
#[tokio::test]
async fn rotated_keys_still_open_and_an_unreadable_value_is_overwritten() {
    const GARBAGE: &[u8] = b"\x01garbage that does not open";
    let redis = RedisServer::start();
    let fleet = Fleet::start(&redis, &[&[KEY_A], &[KEY_B, KEY_A], &[KEY_B], &[KEY_B]]).await;
    // A replica answers its caller before its write to Redis lands; replicas whose first keys differ take
    // different leases, so only the written value is shared between them: wait for it.
    let readable = |n: usize| wait_for_entries(&redis, n, GARBAGE);
    let token = fleet.caller("rotating");
    assert_eq!(fleet.get(0, &token).await.status(), 200);
    readable(1).await;
    assert_eq!(fleet.get(1, &token).await.status(), 200);
    assert_eq!(fleet.idp.token_requests(), 1, "the old key still opens");
    assert_eq!(fleet.get(2, &token).await.status(), 200);
    assert_eq!(
        fleet.idp.token_requests(),
        2,
        "another key names other entries"
    );
    readable(2).await;
    // Every value garbled: the next replica misses and writes a good one, which the last one reads.
    redis.overwrite_values(GARBAGE);
    let other = fleet.caller("garbled");
    assert_eq!(fleet.get(2, &other).await.status(), 200);
    readable(1).await;
    let exchanges = fleet.idp.token_requests();
    redis.overwrite_values(GARBAGE);
    assert_eq!(fleet.get(3, &other).await.status(), 200);
    assert_eq!(
        fleet.idp.token_requests(),
        exchanges + 1,
        "a garbled value is a miss"
    );
    readable(1).await;
    let third = fleet.caller("third");
    assert_eq!(fleet.get(2, &third).await.status(), 200);
    assert_eq!(fleet.get(3, &third).await.status(), 200);
    assert_eq!(
        fleet.idp.token_requests(),
        exchanges + 2,
        "overwritten, then shared"
    );
}

/// Waits until Redis holds `n` token entries whose value is not `garbage`.
async fn wait_for_entries(redis: &RedisServer, n: usize, garbage: &[u8]) {
    let started = std::time::Instant::now();
    loop {
        let readable = redis
            .dump()
            .iter()
            .filter(|(key, value)| key.windows(2).any(|w| w == b"t:") && value != garbage)
            .count();
        if readable == n {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "Redis never held {n} readable entries ({readable})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream 401 drops the token that was sent from the shared cache too: the next request, at once, on
/// this replica or another, exchanges afresh instead of sending the refused token.
#[tokio::test]
async fn an_upstream_401_drops_the_shared_entry() {
    let redis = RedisServer::start();
    let fleet = Fleet::start(&redis, &[&[KEY_A], &[KEY_A]]).await;
    let token = fleet.caller("refused");
    let refused = support::seen_authorization(&support::echoed(fleet.get(0, &token).await).await);
    assert_eq!(
        fleet
            .get_with(0, &token, &[("x-echo-status", "401")])
            .await
            .status(),
        401
    );
    // No waiting for the background delete.
    let again = support::seen_authorization(&support::echoed(fleet.get(0, &token).await).await);
    assert_ne!(again, refused, "this replica exchanged afresh");
    assert_eq!(fleet.idp.token_requests(), 2);
    let other = support::seen_authorization(&support::echoed(fleet.get(1, &token).await).await);
    assert_ne!(
        other, refused,
        "another replica never takes the refused token"
    );
}

/// `rediss://`: replicas share through TLS (the CA from `ca_file`); a replica that does not trust the
/// server's certificate fails no request, it only shares nothing.
#[tokio::test]
async fn replicas_share_over_tls_and_an_untrusted_server_fails_nothing() {
    let pki = support::TestPki::new();
    let redis = RedisServer::start_tls(&pki);
    let trusted = format!(
        "url = \"{}\"\nca_file = \"{}\"",
        redis.tls_url(),
        pki.ca_file().display()
    );
    let untrusted = format!("url = \"{}\"", redis.tls_url());
    let fleet = Fleet::start_with(
        &[trusted.clone(), trusted, untrusted],
        &[&[KEY_A], &[KEY_A], &[KEY_A]],
    )
    .await;
    let token = fleet.caller("over-tls");
    assert_eq!(fleet.get(0, &token).await.status(), 200);
    assert_eq!(fleet.get(1, &token).await.status(), 200);
    assert_eq!(fleet.idp.token_requests(), 1, "shared over TLS");
    assert_eq!(fleet.get(2, &token).await.status(), 200);
    assert_eq!(
        fleet.idp.token_requests(),
        2,
        "the untrusting replica exchanged itself"
    );
    fleet.wait_for_up(2, false).await;
}

/// No key or value in Redis holds a JWT, a fragment of a token, or the digest of a caller's token.
fn assert_nothing_readable(redis: &RedisServer, callers: &[String]) {
    let dump = redis.dump();
    assert!(!dump.is_empty());
    // Values are ciphertext, so a needle must be long enough not to turn up by chance ("eyJ" alone matched
    // one value in a few thousand). Every token of the dev IdP, the upstream tokens too, starts with the same
    // encoded JWT header: each caller token's first 16 bytes below stand for it.
    let mut forbidden: Vec<Vec<u8>> = vec![b"Bearer ".to_vec()];
    for token in callers {
        let digest = sha256(token.as_bytes());
        forbidden.push(digest.to_vec());
        forbidden.push(hex(&digest).into_bytes());
        forbidden.push(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(digest)
                .into_bytes(),
        );
        // Any 16-character run of the token itself (its signature included).
        let bytes = token.as_bytes();
        forbidden.extend(bytes.windows(16).step_by(16).map(<[u8]>::to_vec));
    }
    for (key, value) in &dump {
        for needle in &forbidden {
            assert!(
                !contains(key, needle),
                "a key holds {:?}",
                String::from_utf8_lossy(needle)
            );
            assert!(
                !contains(value, needle),
                "a value holds {:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }
}

/// SHA-256, through the crypto library the sidecar uses.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
