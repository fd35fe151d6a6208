//! `oha`, the external load generator of the full run: one invocation per scenario, its JSON summary read back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::Error;
use crate::servers::find_program;

/// What one `oha` run measured.
pub(crate) struct Summary {
    pub rps: f64,
    /// Latency percentiles, in ms.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub non_200: u64,
}

impl Summary {
    /// `N rps, p50 …, p99 …` and any failures.
    pub(crate) fn line(&self) -> String {
        format!(
            "{:.0} rps, p50 {:.2} ms, p99 {:.2} ms{}",
            self.rps,
            self.p50_ms,
            self.p99_ms,
            if self.non_200 > 0 {
                format!(", {} not 200", self.non_200)
            } else {
                String::new()
            }
        )
    }

    /// The latency percentiles in ms, in the order of [`crate::charts::PERCENTILES`]: p50, p90, p99, p99.9.
    pub(crate) fn percentiles(&self) -> [f64; 4] {
        [self.p50_ms, self.p90_ms, self.p99_ms, self.p99_9_ms]
    }
}

/// The run of median throughput.
pub(crate) fn median(mut runs: Vec<Summary>) -> Option<Summary> {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

pub(crate) struct Oha {
    pub binary: PathBuf,
}

impl Oha {
    /// `oha` from `OBO_BENCH_OHA`, else from `PATH` or cargo's bin directory; `None` when there is none.
    pub(crate) fn find() -> Option<Oha> {
        let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/oha"));
        find_program("OBO_BENCH_OHA", "oha", cargo_bin.as_slice()).map(|binary| Oha { binary })
    }

    /// `connections` keep-alive HTTP/1.1 connections on `addr{path}` for `duration`, at most `rate` requests
    /// per second in all when given, with `token` as the bearer token when given.
    pub(crate) fn run(
        &self,
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        connections: usize,
        duration: Duration,
        rate: Option<u64>,
    ) -> Result<Summary, Error> {
        let mut command = Command::new(&self.binary);
        command
            .args([
                "--no-tui",
                "--output-format",
                "json",
                "--disable-compression",
            ])
            .args(["-c", &connections.to_string()])
            .args(["-z", &format!("{}ms", duration.as_millis())]);
        if let Some(rate) = rate {
            command.args(["-q", &rate.to_string()]);
        }
        if let Some(token) = token {
            command.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        command.arg(format!("http://{addr}{path}"));
        // oha runs for seconds: off the harness's async workers, which serve the in-process upstream.
        let output = tokio::task::block_in_place(|| command.output())?;
        if !output.status.success() {
            return Err(format!(
                "oha failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let json: Value = serde_json::from_slice(&output.stdout)?;
        let ms = |name: &str| {
            json["latencyPercentiles"][name]
                .as_f64()
                .unwrap_or(f64::NAN)
                * 1000.0
        };
        let non_200 = json["statusCodeDistribution"]
            .as_object()
            .map_or(0, |codes| {
                codes
                    .iter()
                    .filter(|(code, _)| code.as_str() != "200")
                    .map(|(_, n)| n.as_u64().unwrap_or(0))
                    .sum()
            })
            + json["errorDistribution"].as_object().map_or(0, |errors| {
                // Requests still in flight when the time is up are not failures.
                errors
                    .iter()
                    .filter(|(error, _)| error.as_str() != "aborted due to deadline")
                    .map(|(_, n)| n.as_u64().unwrap_or(0))
                    .sum()
            });
        Ok(Summary {
            rps: json["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
            p50_ms: ms("p50"),
            p90_ms: ms("p90"),
            p99_ms: ms("p99"),
            p99_9_ms: ms("p99.9"),
            non_200,
        })
    }
}
