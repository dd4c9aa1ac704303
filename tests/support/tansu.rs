//! A tansu 0.6.0 broker (Kafka-compatible, separate process) for integration tests.
//!
//! Use it from a test file with
//!
//! ```ignore
//! #[path = "support/tansu.rs"]
//! mod tansu;
//!
//! let broker = tansu::Tansu::start()?;
//! broker.create_topic("events", 4)?;
//! // point rdkafka at broker.bootstrap()
//! ```
//!
//! The binary is `$TANSU_BIN` if set, otherwise whatever `scripts/install-tansu.sh` prints (it
//! installs a pinned, hash-checked binary into a cache outside the checkout on first use, ~2 s).
//! Each `Tansu` gets its own free port and temp dir; the broker's stdout/stderr go to
//! `broker.log` in that dir, whose tail is in every startup error and is printed if the test
//! panics. Storage is `memory://`: **everything (topics, records, committed offsets) is gone after
//! `stop`/`restart`** — recreate topics after a restart. `start_with_storage("s3://tansu/", env)`
//! keeps the data in an S3 bucket instead (see tests/service_broker_restart.rs, which serves one
//! with moto), so a restarted broker still has it; stop such a broker with `terminate` (SIGTERM):
//! after SIGKILL it has been seen to lose acknowledged records. Dropping the `Tansu` kills the broker;
//! a test process killed with SIGKILL leaves it running (std has no parent-death signal).
//!
//! Known tansu behaviour (see tests/support/README.md): a consumer-group join takes about
//! `session.timeout.ms / 2` (~23 s with librdkafka's default 45 s; set 6000 in tests for ~3 s);
//! producers and AdminClient metadata requests auto-create unknown topics, so call
//! `create_topic` first; aborted transactions are not hidden from `read_committed` readers.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL_BYTES: u64 = 4096;
/// Environment variables tansu reads as defaults; removed so the broker is the same everywhere.
const TANSU_ENV: [&str; 6] = [
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

pub struct Tansu {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    /// `--storage-engine`, and environment for it (e.g. S3 credentials and endpoint).
    storage: String,
    storage_env: Vec<(String, String)>,
    /// Advertised to clients instead of the listening port (a TLS terminator in front).
    advertised_port: Option<u16>,
    /// Extra `tansu broker` arguments (e.g. `--authentication`).
    extra_args: Vec<String>,
    // Last field: dropped after the child is killed in `Drop`.
    dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts a broker on a free 127.0.0.1 port and waits (up to 30 s) until it accepts TCP
    /// connections. Startup takes a few ms once the binary is installed.
    pub fn start() -> io::Result<Tansu> {
        Tansu::start_with_storage("memory://tansu/", &[])
    }

    /// Like [`Tansu::start`] with another `--storage-engine` (e.g. `s3://tansu/`, which keeps
    /// data across `restart`) and extra environment for the broker (`AWS_ENDPOINT`…).
    pub fn start_with_storage(storage: &str, env: &[(&str, &str)]) -> io::Result<Tansu> {
        Tansu::start_with(storage, env, None, &[])
    }

    /// A memory-storage broker that advertises `advertised_port` (on 127.0.0.1) instead of the
    /// port it listens on — for a TLS terminator there that forwards to [`Tansu::port`] — with
    /// `extra_args` for `tansu broker` (e.g. `--authentication`).
    pub fn start_behind(advertised_port: u16, extra_args: &[&str]) -> io::Result<Tansu> {
        Tansu::start_with("memory://tansu/", &[], Some(advertised_port), extra_args)
    }

    fn start_with(
        storage: &str,
        env: &[(&str, &str)],
        advertised_port: Option<u16>,
        extra_args: &[&str],
    ) -> io::Result<Tansu> {
        let bin = tansu_bin()?;
        let dir = tempfile::Builder::new().prefix("tansu-").tempdir()?;
        let log = dir.path().join("broker.log");
        let mut broker = Tansu {
            bin,
            child: None,
            port: 0,
            log,
            storage: storage.to_string(),
            storage_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            advertised_port,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            dir,
        };
        // The free port is found by binding port 0 and releasing it, so another process can take
        // it before tansu binds it; tansu then exits at once and we try another port.
        let mut attempts = 0;
        loop {
            attempts += 1;
            broker.port = free_port()?;
            match broker.spawn_and_wait() {
                Ok(()) => return Ok(broker),
                Err(e) if attempts < 3 && e.kind() != io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `tcp://127.0.0.1:PORT`, the form tansu's own subcommands take.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Creates a topic with `tansu topic create`. Fails if it already exists.
    pub fn create_topic(&self, name: &str, partitions: i32) -> io::Result<()> {
        let out = Command::new(&self.bin)
            .args(["topic", "create", "--broker", &self.url(), "--partitions"])
            .arg(partitions.to_string())
            .arg(name)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "tansu topic create {name} --partitions {partitions} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }

    /// Kills the broker (SIGKILL) and waits for it. With memory storage all data is lost.
    /// Idempotent.
    pub fn stop(&mut self) {
        self.kill_child();
    }

    /// Stops the broker with SIGTERM (as a rolling restart would), waiting up to `timeout` for it
    /// to exit before killing it. Idempotent.
    pub fn terminate(&mut self, timeout: Duration) {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill_child();
    }

    /// Stops the broker if running and starts a new one on the **same port** (clients keep their
    /// bootstrap address). The new broker is empty: memory storage loses every topic, record and
    /// committed offset, so recreate topics afterwards.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill_child();
        // The port is ours, but retry briefly in case the kernel has not released it yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && e.kind() != io::ErrorKind::TimedOut => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The last few KiB of the broker's log (all starts of this `Tansu`).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    fn spawn_and_wait(&mut self) -> io::Result<()> {
        let url = self.url();
        let advertised = match self.advertised_port {
            Some(port) => format!("tcp://127.0.0.1:{port}"),
            None => url.clone(),
        };
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "=== test harness: starting tansu broker on {url}")?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", &self.storage])
            .args(&self.extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for var in TANSU_ENV {
            cmd.env_remove(var);
        }
        for (key, value) in &self.storage_env {
            cmd.env(key, value);
        }
        let started = Instant::now();
        self.child = Some(cmd.spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot run {}: {e}", self.bin.display()))
        })?);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                return Err(io::Error::other(format!(
                    "tansu broker on {url} exited during startup ({status}); log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                self.kill_child();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "tansu broker on {url} did not accept connections within {START_TIMEOUT:?}; log {}:\n{}",
                        self.log.display(),
                        self.log_tail()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill_child();
        if thread::panicking() {
            eprintln!(
                "--- tansu broker log ({}), tail:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// `$TANSU_BIN`, else the path printed last by `scripts/install-tansu.sh` (run once per test
/// process).
pub fn tansu_bin() -> io::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TANSU_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(run_install_script)
        .clone()
        .map_err(io::Error::other)
}

fn run_install_script() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-tansu.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    match last {
        Some(path) if out.status.success() => Ok(PathBuf::from(path.trim())),
        _ => Err(format!(
            "{} failed ({}); set TANSU_BIN to a tansu 0.6.0 binary to skip it.\nstdout:\n{stdout}\nstderr:\n{stderr}",
            script.display(),
            out.status
        )),
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}
