//! `process_*` metrics on Linux, read from `/proc/self` at each scrape, with the names and units of the
//! Prometheus client libraries: resident and virtual memory, CPU seconds, open and maximum file descriptors,
//! threads, and the start time. prometheus-client has no process collector and the crates that add one
//! target other registries, so these few reads are written here. A value that cannot be read is left out of
//! that scrape; nothing fails.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`): 100 on every Linux architecture Rust targets
/// (reading `sysconf(_SC_CLK_TCK)` would need `libc` and `unsafe`).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<i64>()
                        .ok()
                })
                .map(|kib| kib * 1024)
        };
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of stat(5), starttime 22; `fields` starts at field 3.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());

        gauge(
            &mut encoder,
            "process_resident_memory",
            "Resident memory size",
            Some(&Unit::Bytes),
            kib("VmRSS:"),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory",
            "Virtual memory size",
            Some(&Unit::Bytes),
            kib("VmSize:"),
        )?;
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            #[allow(
                clippy::cast_precision_loss,
                reason = "ticks of a process's life fit f64 exactly"
            )]
            let seconds = (user + system) as f64 / TICKS_PER_SECOND;
            let counter = ConstCounter::new(seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                Some(&Unit::Seconds),
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        let open = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| i64::try_from(entries.count()).unwrap_or(i64::MAX));
        gauge(
            &mut encoder,
            "process_open_fds",
            "Open file descriptors",
            None,
            open,
        )?;
        let max = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                limits
                    .lines()
                    .find_map(|line| line.strip_prefix("Max open files"))
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<i64>().ok())
            });
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum open file descriptors",
            None,
            max,
        )?;
        let threads = status
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<i64>().ok());
        gauge(&mut encoder, "process_threads", "OS threads", None, threads)?;
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            stat.lines()
                .find_map(|line| line.strip_prefix("btime "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        });
        if let (Some(boot), Some(start)) = (boot, field(22)) {
            #[allow(
                clippy::cast_precision_loss,
                reason = "seconds since 1970 fit f64 exactly"
            )]
            let started = boot as f64 + start as f64 / TICKS_PER_SECOND;
            let gauge = ConstGauge::new(started);
            let metric = encoder.encode_descriptor(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Encodes one gauge family with its single sample, when there is a value.
fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Option<i64>,
) -> Result<(), std::fmt::Error> {
    let Some(value) = value else {
        return Ok(());
    };
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
    gauge.encode(metric)
}
