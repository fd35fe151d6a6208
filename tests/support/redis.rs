//! A real `redis-server` (the Debian package; `.ci/run` installs it) on a loopback port, without
//! persistence, for the shared-cache tests: started, killed and restarted on the same port.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};

/// A running `redis-server`, killed on drop.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    child: Option<Child>,
    /// For a TLS-only server: its certificate, key and CA files.
    tls: Option<[std::path::PathBuf; 3]>,
}

impl RedisServer {
    /// Starts one on a free loopback port (another port if that one is taken meanwhile).
    pub(crate) fn start() -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(port, None) {
                return RedisServer {
                    port,
                    child: Some(child),
                    tls: None,
                };
            }
        }
        panic!("redis-server did not start on a free port");
    }

    /// Starts one that speaks TLS only, with `pki`'s server certificate (for `localhost`).
    pub(crate) fn start_tls(pki: &super::TestPki) -> RedisServer {
        let dir = super::temp_dir("redis-tls");
        let files = [
            dir.join("redis.crt"),
            dir.join("redis.key"),
            dir.join("ca.crt"),
        ];
        std::fs::write(&files[0], &pki.leaf_pem).expect("cert");
        std::fs::write(&files[1], &pki.leaf_key_pem).expect("key");
        std::fs::write(&files[2], &pki.ca_pem).expect("ca");
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(port, Some(&files)) {
                return RedisServer {
                    port,
                    child: Some(child),
                    tls: Some(files),
                };
            }
        }
        panic!("redis-server (TLS) did not start on a free port");
    }

    /// `rediss://localhost:<port>/`.
    pub(crate) fn tls_url(&self) -> String {
        format!("rediss://localhost:{}/", self.port)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (SIGSTOP): connections stay open and nothing answers.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process go on (SIGCONT).
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
        }
    }

    /// Starts it again on the same port, empty.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.child =
            Some(spawn(self.port, self.tls.as_ref()).expect("redis-server restarts on its port"));
    }

    /// Every key and its value (the scan a curious operator would make).
    pub(crate) fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let client = redis::Client::open(self.url()).expect("url");
        let mut connection = client.get_connection().expect("connect");
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg("*")
            .query(&mut connection)
            .expect("KEYS");
        keys.into_iter()
            .filter_map(|key| {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query(&mut connection)
                    .expect("GET");
                value.map(|v| (key, v))
            })
            .collect()
    }

    /// Replaces every value with `value`, keeping keys and expiries.
    pub(crate) fn overwrite_values(&self, value: &[u8]) {
        let client = redis::Client::open(self.url()).expect("url");
        let mut connection = client.get_connection().expect("connect");
        for (key, _) in self.dump() {
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("KEEPTTL")
                .query(&mut connection)
                .expect("SET");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// A server that answers every read with the same well-formed but meaningless RESP reply (an array of an
/// integer, a string and an integer): a broken or hostile "Redis".
pub(crate) async fn garbage_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    if stream
                        .write_all(b"*3\r\n:1\r\n$1\r\nx\r\n:60000\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `redis-server` on `port` (TLS only, with these certificate, key and CA files), once it says it accepts
/// connections; `None` if it exits first (the port was taken).
fn spawn(port: u16, tls: Option<&[std::path::PathBuf; 3]>) -> Option<Child> {
    let mut command = Command::new("redis-server");
    match tls {
        None => command.args(["--port", &port.to_string()]),
        Some([cert, key, ca]) => command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args(["--tls-auth-clients", "no"]),
    };
    let mut child = command
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--loglevel",
            "notice",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("redis-server: {e} (install it: apt-get install redis-server; .ci/run does)")
        });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("Ready to accept connections") => break,
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    // The rest of its log is not needed, but the pipe must not fill up.
    std::thread::spawn(move || for _ in lines {});
    Some(child)
}
