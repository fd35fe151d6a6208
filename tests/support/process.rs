//! The real `obo-sidecar` binary as a child process, for what only a process shows: signals, exit codes, its
//! log output, and the global tracing set up by `main` (the trace exporter).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a child gets to become ready or to exit.
const PATIENCE: Duration = Duration::from_secs(15);

/// A running `obo-sidecar run`; killed when dropped (a failed test leaves no process behind).
pub(crate) struct SidecarProcess {
    child: std::process::Child,
    pub(crate) proxy: SocketAddr,
    pub(crate) admin: SocketAddr,
    log_path: PathBuf,
}

impl SidecarProcess {
    /// Writes `config` to `dir`, its `proxy = "127.0.0.1:0"` and `admin = "127.0.0.1:0"` replaced by ports picked
    /// here, and starts the binary with `args` before `run` and `env` added; returns once `/readyz` answers 200.
    ///
    /// The binary binds its listeners from the config, so this picks the ports: bind 127.0.0.1:0, note the
    /// address and release it just before the binary starts. Handing a port to another process is the one
    /// place where that small race is acceptable; every in-process test passes bound listeners instead.
    pub(crate) async fn start(
        dir: &Path,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> SidecarProcess {
        let (proxy, admin) = {
            let proxy = super::bind().await;
            let admin = super::bind().await;
            (
                proxy.local_addr().expect("addr"),
                admin.local_addr().expect("addr"),
            )
        };
        let config = config
            .replacen(
                "proxy = \"127.0.0.1:0\"",
                &format!("proxy = \"{proxy}\""),
                1,
            )
            .replacen(
                "admin = \"127.0.0.1:0\"",
                &format!("admin = \"{admin}\""),
                1,
            );
        let config_path = dir.join("sidecar.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.join("stderr.log");
        let mut command = std::process::Command::new(super::sidecar_binary());
        command
            .args(args)
            .args(["run", "-c"])
            .arg(&config_path)
            .env_remove("OBO_SIDECAR_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("log file"));
        for (name, value) in env {
            command.env(name, value);
        }
        let mut process = SidecarProcess {
            child: command.spawn().expect("start obo-sidecar"),
            proxy,
            admin,
            log_path,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let readyz = format!("http://{admin}/readyz");
        let started = Instant::now();
        loop {
            if let Some(status) = process.child.try_wait().expect("try_wait") {
                panic!("obo-sidecar exited early ({status}):\n{}", process.log());
            }
            if let Ok(response) = http.get(&readyz).send().await
                && response.status() == 200
            {
                return process;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "never ready:\n{}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the process wrote to stderr so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `http://{proxy}{path}`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// Sends SIGTERM; returns when it was delivered.
    pub(crate) fn terminate(&self) {
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(kill.success());
    }

    /// The exit status, or `None` while it runs.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, at most `patience`.
    pub(crate) async fn wait(&mut self, patience: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                started.elapsed() < patience,
                "still running after {patience:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
