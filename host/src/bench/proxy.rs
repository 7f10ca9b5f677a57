//! `hearth bench proxy`: requests per second and tail latency through the node's HTTPS
//! front door, beside nginx (Debian's package) set up as the usual TLS-terminating
//! reverse proxy to the same app in the same guest, in the same run.
//!
//! What makes the two figures comparable:
//!
//! - One backend for both: a small HTTP/1.1 server (this binary's hidden `bench serve`,
//!   a fixed 1 KiB answer) copied into the guest and bound to `0.0.0.0`, so hearth reaches
//!   it over the agent channel and nginx over the guest's bridge address. It is far
//!   faster than either proxy, so the proxies are what is measured.
//! - The same TLS: nginx serves hearth's own server certificate and key, and the load
//!   generator trusts the node CA and sends the same SNI and headers (including the
//!   bearer token) to both; the negotiated cipher suites are reported.
//! - Connection reuse on both sides of each proxy: HTTP/1.1 keep-alive from the client,
//!   and an upstream keep-alive pool in nginx like hyper's pool in hearthd. nginx's
//!   per-connection request caps are lifted so it never pays a handshake hearth does not.
//! - The same load: N keep-alive connections spread over the same number of client
//!   threads for the same time, after the same warm-up, targets alternating
//!   (hearth, nginx, hearth, nginx, ...) so drift on the machine hits both; medians over
//!   rounds are reported.
//!
//! On a small machine the load generator, the proxy and the app share the CPUs, so the
//! request rate is really a measure of CPU per request. That is reported too, per
//! component (the proxy process, the guest's agent, the app, the load generator), which
//! says where the time goes when hearth is behind.
//!
//! Everything it makes goes again, also on error and on Ctrl-C: the project with its
//! container and token (through the API), nginx (stopped by PID) and its directory.

use super::lifecycle::{blocking, control_agent, pct, wait_for_systemd, BenchProject};
use super::stats::round3;
use crate::config::Config;
use crate::control::client::ControlClient;
use anyhow::{anyhow, bail, ensure, Context};
use bytes::Bytes;
use hearth_protocol::files::WriteOptions;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The app's answer: small enough that the proxies' per-request work dominates, large
/// enough to be a real page rather than an empty 200.
const BODY_LEN: usize = 1024;
static BODY: [u8; BODY_LEN] = [b'h'; BODY_LEN];

/// Where the app binary goes in the guest. Its name is also how its CPU time is found
/// on the host (`comm` keeps 15 bytes: all of `hearth-benchsrv`).
const GUEST_APP: &str = "/usr/local/bin/hearth-benchsrv";
const GUEST_APP_COMM: &str = "hearth-benchsrv";
const GUEST_UNIT: &str = "hearth-benchsrv";
/// The shared libraries this binary needs beyond the C library (liblxc, and what it
/// pulls in), copied from the host: the guest's Debian does not have them all.
const GUEST_LIB_DIR: &str = "/usr/local/lib/hearth-benchsrv";

/// A request that has not completed by then counts as an error and its connection is
/// replaced: a stuck proxy must not hang the benchmark.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the app and nginx get to start listening.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// Which load generator drives both targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadTool {
    /// In this binary: hyper over rustls, latencies of every request kept.
    Builtin,
    /// `wrk` from Debian (`wrk --latency`), as an outside cross-check.
    Wrk,
}

impl std::str::FromStr for LoadTool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "builtin" => Ok(LoadTool::Builtin),
            "wrk" => Ok(LoadTool::Wrk),
            _ => Err(format!("unknown load generator {s:?} (builtin or wrk)")),
        }
    }
}

impl LoadTool {
    fn name(self) -> &'static str {
        match self {
            LoadTool::Builtin => "builtin",
            LoadTool::Wrk => "wrk",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyBenchOptions {
    /// Measured time per run.
    pub duration: Duration,
    /// Unmeasured load before each run: connections open, pools fill, caches warm.
    pub warmup: Duration,
    /// Keep-alive connections held open by the load generator.
    pub concurrency: usize,
    /// Load generator threads (the same for both targets).
    pub threads: usize,
    /// Runs per target, alternating.
    pub rounds: usize,
    pub tool: LoadTool,
    /// The app's port in the guest.
    pub port: u16,
}

impl Default for ProxyBenchOptions {
    fn default() -> Self {
        ProxyBenchOptions {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            concurrency: 32,
            threads: 2,
            rounds: 2,
            tool: LoadTool::Builtin,
            port: 8080,
        }
    }
}

/// `10s`, `500ms`, `2m`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The guest app: answers every request with the same 1 KiB, keep-alive, on all
/// addresses (the agent reaches it on the guest's loopback, nginx on its bridge address).
/// Runs until killed, on a multi-threaded runtime of its own so the app is never the
/// bottleneck of a proxy measured through it.
pub async fn serve(port: u16) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-serve".into())
        .spawn(move || {
            let _ = tx.send(serve_on_own_runtime(port));
        })
        .context("start the server thread")?;
    rx.await.context("the server thread died")?
}

fn serve_on_own_runtime(port: u16) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("listen on port {port}"))?;
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, most likely: back off rather than spin.
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut r = Response::new(Full::new(Bytes::from_static(&BODY)));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

/// Runs the benchmark against the node `ctl` talks to; returns the report.
pub async fn run_proxy_bench(
    cfg: &Config,
    ctl: &ControlClient,
    opts: &ProxyBenchOptions,
) -> anyhow::Result<Value> {
    ensure!(opts.concurrency >= 1, "concurrency must be at least 1");
    ensure!(opts.threads >= 1, "threads must be at least 1");
    ensure!(opts.rounds >= 1, "rounds must be at least 1");
    ensure!(
        cfg.proxy.cert.is_none() && cfg.proxy.key.is_none(),
        "this node serves an operator certificate; the benchmark trusts the node CA only"
    );
    ctl.call(Method::GET, "/api/v1/health", None)
        .await
        .context("hearthd must be running for this benchmark")?;
    let nginx_bin = find_program("nginx")
        .context("nginx is not installed (`just setup` installs Debian's package)")?;
    if opts.tool == LoadTool::Wrk {
        find_program("wrk").context("wrk is not installed (`just setup` installs it)")?;
    }
    let hearthd_pid = std::fs::read_to_string(cfg.run_dir.join("hearthd.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .context("cannot read hearthd's PID file")?;
    let project = BenchProject::create(ctl, format!("benchproxy-{}", std::process::id())).await?;
    let env = Env {
        cfg,
        ctl,
        project: project.name().to_string(),
        nginx_bin,
        hearthd_pid,
    };
    let outcome = tokio::select! {
        r = measure(&env, opts) => r,
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => Err(anyhow!("interrupted; cleaning up")),
            Err(e) => Err(anyhow!("waiting for Ctrl-C failed: {e}")),
        },
    };
    let cleanup = project.cleanup().await;
    let v = outcome?;
    cleanup.context("clean up the benchmark's project")?;
    Ok(v)
}

struct Env<'a> {
    cfg: &'a Config,
    ctl: &'a ControlClient,
    project: String,
    nginx_bin: PathBuf,
    hearthd_pid: u32,
}

async fn measure(env: &Env<'_>, opts: &ProxyBenchOptions) -> anyhow::Result<Value> {
    let (ctl, project) = (env.ctl, env.project.as_str());
    let v = ctl
        .call(
            Method::POST,
            &format!("/api/v1/projects/{project}/containers"),
            Some(json!({ "name": "web" })),
        )
        .await
        .context("create the guest")?;
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let ip: Ipv4Addr = v["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the new container has no IPv4 address: {v}"))?;
    let app = SocketAddr::from((ip, opts.port));

    let agent = control_agent(ctl, &id);
    wait_for_systemd(&agent, &id, Duration::from_millis(50)).await?;
    let mut files = vec![(PathBuf::from("/proc/self/exe"), GUEST_APP.to_string())];
    for (soname, path) in blocking(shared_libraries).await? {
        files.push((path, format!("{GUEST_LIB_DIR}/{soname}")));
    }
    for (local, remote) in &files {
        let mut f = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("open {}", local.display()))?;
        let len = f.metadata().await?.len();
        agent
            .put(
                remote,
                &mut f,
                WriteOptions {
                    perm: Some(0o755),
                    expected_len: Some(len),
                    create_parents: true,
                    ..WriteOptions::default()
                },
            )
            .await
            .with_context(|| format!("copy {} into the guest", local.display()))?;
    }
    let port = opts.port.to_string();
    let out = agent
        .run(&[
            "systemd-run",
            &format!("--unit={GUEST_UNIT}"),
            "--collect",
            &format!("--setenv=LD_LIBRARY_PATH={GUEST_LIB_DIR}"),
            GUEST_APP,
            "bench",
            "serve",
            "--port",
            &port,
        ])
        .await
        .context("start the app in the guest")?;
    ensure!(
        out.code() == 0,
        "systemd-run in the guest: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Err(e) = wait_listening(app, None).await {
        let log = agent
            .run(&[
                "journalctl",
                "--no-pager",
                "-n",
                "20",
                "-u",
                &format!("{GUEST_UNIT}.service"),
            ])
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        return Err(e).context(format!(
            "the app in the guest, at its bridge address; its journal:\n{log}"
        ));
    }

    let token = ctl
        .call(
            Method::POST,
            &format!("/api/v1/projects/{project}/tokens"),
            Some(json!({ "name": "bench-proxy" })),
        )
        .await
        .context("create a project token")?;
    let secret = token["token"]
        .as_str()
        .context("the token answer has no token")?
        .to_string();

    let dir = std::env::temp_dir().join(format!("hearth-bench-proxy-{}", std::process::id()));
    let tls_dir = env.cfg.tls_dir();
    let nginx = Nginx::start(
        &env.nginx_bin,
        dir,
        &tls_dir.join("server.pem"),
        &tls_dir.join("server.key"),
        app,
    )?;
    wait_listening(nginx.addr, Some(&nginx))
        .await
        .context("nginx")?;

    let proxy = &env.cfg.proxy;
    let label = format!("{project}-web-http-{}", opts.port);
    let sni = format!("{label}.{}.{}", proxy.node, proxy.domain);
    let hearth_addr = SocketAddr::new(loopback_for(proxy.listen.ip()), proxy.listen.port());
    let authorization = format!("Bearer {secret}");
    let hearth = Target::new(
        "hearth",
        hearth_addr,
        &sni,
        proxy.url_for(&label).trim_start_matches("https://"),
        &authorization,
    )?;
    // The same names and headers as for hearth: the client's work is identical, and
    // nginx passes them on like hearth does.
    let nginx_target = Target::new(
        "nginx",
        nginx.addr,
        &sni,
        &format!("{sni}:{}", nginx.addr.port()),
        &authorization,
    )?;
    let tls = client_tls(&crate::tls::ca_path(&tls_dir))?;
    for t in [&hearth, &nginx_target] {
        probe(t, &tls)
            .await
            .with_context(|| format!("a first request through {}", t.name))?;
    }

    let procs = Procs {
        hearthd: env.hearthd_pid,
        nginx: nginx.pid(),
        container_id: id.clone(),
    };
    let load = Load {
        concurrency: opts.concurrency,
        threads: opts.threads.min(opts.concurrency),
        duration: opts.duration,
        warmup: opts.warmup,
    };
    let (hearth, nginx_target) = (Arc::new(hearth), Arc::new(nginx_target));
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..opts.rounds {
        for t in [&hearth, &nginx_target] {
            let r = match opts.tool {
                LoadTool::Builtin => run_builtin(t.clone(), tls.clone(), &load, &procs).await,
                LoadTool::Wrk => run_wrk(t, &load, &procs).await,
            }
            .with_context(|| format!("load through {} (round {round})", t.name))?;
            runs.push(Run {
                target: t.name,
                round,
                ..r
            });
        }
    }
    let nginx_version = nginx_version(&env.nginx_bin);
    drop(nginx);
    if let Some(tid) = token["id"].as_str() {
        // The project's deletion would take it too; revoking says it is done with.
        let _ = ctl
            .call(
                Method::DELETE,
                &format!("/api/v1/projects/{project}/tokens/{tid}"),
                None,
            )
            .await;
    }
    report(&runs, opts, &load, nginx_version)
}

/// The libraries `ldd` resolves for this binary, as (soname, path), except the C
/// library's own (libc, libm, the loader, libgcc_s), which every guest has in a version
/// at least as new as the host's.
fn shared_libraries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    const SYSTEM: [&str; 8] = [
        "linux-vdso",
        "libc.so",
        "libm.so",
        "ld-linux",
        "libgcc_s.so",
        "libpthread.so",
        "libdl.so",
        "librt.so",
    ];
    // Not /proc/self/exe: ldd would read its own.
    let exe = std::env::current_exe().context("find this binary")?;
    let out = Command::new("ldd").arg(&exe).output().context("run ldd")?;
    ensure!(
        out.status.success(),
        "ldd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((soname, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        if SYSTEM.iter().any(|s| soname.starts_with(s)) {
            continue;
        }
        let path = rest.split_whitespace().next().unwrap_or_default();
        ensure!(path.starts_with('/'), "ldd cannot find {soname}: {line}");
        libs.push((soname.to_string(), PathBuf::from(path)));
    }
    Ok(libs)
}

/// A wildcard listen address is reached on the loopback of its family.
fn loopback_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn nginx_version(bin: &Path) -> Option<String> {
    // nginx prints its version on stderr.
    let out = Command::new(bin).arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.split_whitespace()
        .find(|w| w.starts_with("nginx/"))
        .map(str::to_string)
}

/// Waits until `addr` accepts TCP connections; with `nginx`, gives up early (with its
/// error log) when it exited.
async fn wait_listening(addr: SocketAddr, nginx: Option<&Nginx>) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let err = match TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let Some(n) = nginx {
            n.check_alive()?;
        }
        if start.elapsed() > START_DEADLINE {
            bail!("nothing listens on {addr} after {START_DEADLINE:?}: {err}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// nginx run from a directory of its own (config, PID file, logs, temp paths), not the
/// system service; stopped by PID and its directory removed when dropped.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    fn start(
        bin: &Path,
        dir: PathBuf,
        cert: &Path,
        key: &Path,
        app: SocketAddr,
    ) -> anyhow::Result<Nginx> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("remove a stale {}", dir.display()))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let spawned = Self::spawn(bin, &dir, cert, key, app);
        match spawned {
            Ok((child, addr)) => Ok(Nginx { child, dir, addr }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn spawn(
        bin: &Path,
        dir: &Path,
        cert: &Path,
        key: &Path,
        app: SocketAddr,
    ) -> anyhow::Result<(Child, SocketAddr)> {
        // Bound and released: the port is free a moment later for nginx (a race only
        // with another program binding loopback ports at that very moment).
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let conf = nginx_conf(dir, addr, cert, key, app);
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).context("write nginx.conf")?;
        let stderr = std::fs::File::create(dir.join("stderr"))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok((child, addr))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        // `try_wait` needs `&mut`; a signal 0 says the same without reaping.
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), None)
            .is_ok()
            && !is_zombie(self.pid());
        if alive {
            return Ok(());
        }
        let log = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        bail!(
            "nginx exited at start: {}{}",
            log("stderr").trim(),
            log("error.log").trim()
        )
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(true)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        // SIGQUIT: graceful; the master takes its workers along.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS-terminating reverse proxy as its documentation recommends for keep-alive to the
/// upstream (`keepalive` pool, HTTP/1.1, `Connection` cleared), passing the same
/// headers hearth adds. The request caps per connection (1000 by default, client and
/// upstream side) are lifted: hearth has none, and a cap would make nginx pay TLS
/// handshakes and upstream connects that hearth does not. TLS 1.3 is named so both
/// negotiate the same suite.
fn nginx_conf(dir: &Path, listen: SocketAddr, cert: &Path, key: &Path, app: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream app {{
        server {app};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        # As hearth (rustls); nginx 1.22 leaves TLS 1.3 off unless named.
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 100000000;
        keepalive_timeout 75s;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
",
        cert = cert.display(),
        key = key.display(),
    )
}

/// One URL under load: where to connect, the TLS name and the request headers.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    server_name: ServerName<'static>,
    headers: HeaderMap,
}

impl Target {
    fn new(
        name: &'static str,
        addr: SocketAddr,
        sni: &str,
        host: &str,
        authorization: &str,
    ) -> anyhow::Result<Target> {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, host.parse()?);
        headers.insert(header::AUTHORIZATION, authorization.parse()?);
        Ok(Target {
            name,
            addr,
            server_name: ServerName::try_from(sni.to_string())
                .with_context(|| format!("bad TLS name {sni}"))?,
            headers,
        })
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = hyper::Uri::from_static("/");
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Trusts the node CA only; offers HTTP/1.1 only (the load is HTTP/1.1 keep-alive).
fn client_tls(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.with_context(|| format!("parse {}", ca.display()))?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A keep-alive connection ready for requests, and the TLS suite it negotiated.
async fn connect(
    t: &Target,
    tls: &TlsConnector,
) -> anyhow::Result<(SendRequest<Empty<Bytes>>, String)> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(t.server_name.clone(), tcp).await?;
    let (_, session) = stream.get_ref();
    let suite = format!(
        "{:?} {:?}",
        session
            .protocol_version()
            .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
        session
            .negotiated_cipher_suite()
            .map(|s| s.suite())
            .unwrap_or(rustls::CipherSuite::Unknown(0))
    );
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, suite))
}

/// One request, its whole body read: the status, and the body's length.
async fn exchange(
    send: &mut SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// One request before the load, so a wrong token or route fails with its message
/// instead of as a run full of errors.
async fn probe(t: &Target, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<()> {
    let (mut send, _) = connect(t, &TlsConnector::from(tls.clone())).await?;
    let (status, body) =
        tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut send, t.request())).await??;
    ensure!(
        status == StatusCode::OK && body.len() == BODY_LEN,
        "{status}, {} bytes: {}",
        body.len(),
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    Ok(())
}

struct Load {
    concurrency: usize,
    threads: usize,
    duration: Duration,
    warmup: Duration,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
struct Errors {
    /// Answers other than 2xx.
    status: u64,
    /// Broken connections (each is replaced).
    io: u64,
    connect: u64,
    timeout: u64,
}

impl Errors {
    fn add(&mut self, o: &Errors) {
        self.status += o.status;
        self.io += o.io;
        self.connect += o.connect;
        self.timeout += o.timeout;
    }
}

/// What one connection (then one thread) saw in the measured window.
#[derive(Default)]
struct Tally {
    latency_us: Vec<u32>,
    errors: Errors,
    tls: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.latency_us.extend(o.latency_us);
        self.errors.add(&o.errors);
        if self.tls.is_none() {
            self.tls = o.tls;
        }
    }
}

/// One run through one target.
#[derive(Default)]
struct Run {
    target: &'static str,
    round: usize,
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: Errors,
    tls: Option<String>,
    cpu: CpuUse,
}

/// The built-in load generator: `threads` OS threads, each with a runtime of its own and
/// its share of the connections, each connection sending its next request as soon as
/// the previous answer is read (like wrk). Only requests that start and end inside the
/// measured window count, so connects and the warm-up stay out of the figures.
async fn run_builtin(
    t: Arc<Target>,
    tls: Arc<rustls::ClientConfig>,
    load: &Load,
    procs: &Procs,
) -> anyhow::Result<Run> {
    let start = Instant::now() + load.warmup;
    let end = start + load.duration;
    // Interrupted (this future dropped), the load stops before the project and its
    // token go: requests with a revoked token would count against the loopback address
    // in the front door's failure limiter.
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let mut threads = Vec::new();
    for i in 0..load.threads {
        let conns =
            load.concurrency / load.threads + usize::from(i < load.concurrency % load.threads);
        let (t, tls, stop) = (t.clone(), tls.clone(), stop.0.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || load_thread(t, tls, conns, start, end, stop))
                .context("start a load thread")?,
        );
    }
    tokio::time::sleep_until(start.into()).await;
    let before = procs.sample();
    tokio::time::sleep_until(end.into()).await;
    let after = procs.sample();
    let tallies = blocking(move || {
        threads
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("a load thread panicked"))?)
            .collect::<anyhow::Result<Vec<Tally>>>()
    })
    .await?;
    let mut all = Tally::default();
    for tally in tallies {
        all.merge(tally);
    }
    let requests = all.latency_us.len() as u64;
    let ms: Vec<f64> = all
        .latency_us
        .iter()
        .map(|&us| f64::from(us) / 1e3)
        .collect();
    ensure!(!ms.is_empty(), "no request succeeded: {:?}", all.errors);
    Ok(Run {
        rps: round3(requests as f64 / load.duration.as_secs_f64()),
        p50_ms: pct(&ms, 50.0)?,
        p90_ms: pct(&ms, 90.0)?,
        p99_ms: pct(&ms, 99.0)?,
        max_ms: pct(&ms, 100.0)?,
        errors: all.errors,
        tls: all.tls,
        cpu: CpuUse::between(&before, &after, t.name, requests),
        ..Run::default()
    })
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn load_thread(
    t: Arc<Target>,
    tls: Arc<rustls::ClientConfig>,
    conns: usize,
    start: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Tally> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let connector = TlsConnector::from(tls);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..conns {
            set.spawn(connection(
                t.clone(),
                connector.clone(),
                start,
                end,
                stop.clone(),
            ));
        }
        let mut all = Tally::default();
        while let Some(tally) = set.join_next().await {
            all.merge(tally.context("a connection task failed")?);
        }
        Ok(all)
    })
}

async fn connection(
    t: Arc<Target>,
    tls: TlsConnector,
    start: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let mut send = match connect(&t, &tls).await {
            Ok((send, suite)) => {
                tally.tls.get_or_insert(suite);
                send
            }
            Err(_) => {
                if Instant::now() >= start {
                    tally.errors.connect += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        loop {
            let t0 = Instant::now();
            if t0 >= end || stop.load(Ordering::Relaxed) {
                return tally;
            }
            let res = tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut send, t.request())).await;
            let t1 = Instant::now();
            let counted = t0 >= start && t1 <= end;
            match res {
                Ok(Ok((status, _))) if status.is_success() => {
                    if counted {
                        let us = (t1 - t0).as_micros();
                        tally.latency_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                }
                Ok(Ok(_)) => tally.errors.status += u64::from(counted),
                Ok(Err(_)) => {
                    tally.errors.io += u64::from(t0 >= start);
                    break;
                }
                Err(_) => {
                    tally.errors.timeout += u64::from(t0 >= start);
                    break;
                }
            }
        }
    }
    tally
}

/// `wrk` against the same address with the same headers (it connects to the address in
/// its URL and sends that as SNI; the host name travels in the Host header).
async fn run_wrk(t: &Target, load: &Load, procs: &Procs) -> anyhow::Result<Run> {
    let url = format!("https://{}/", t.addr);
    let args = |d: Duration| {
        let mut a = vec![
            "-t".to_string(),
            load.threads.to_string(),
            "-c".to_string(),
            load.concurrency.to_string(),
            "-d".to_string(),
            format!("{}s", d.as_secs().max(1)),
            "--latency".to_string(),
        ];
        // Capitalised: wrk adds a Host of its own unless it sees exactly `Host`.
        for (name, k) in [
            ("Host", header::HOST),
            ("Authorization", header::AUTHORIZATION),
        ] {
            if let Some(v) = t.headers.get(&k).and_then(|v| v.to_str().ok()) {
                a.push("-H".into());
                a.push(format!("{name}: {v}"));
            }
        }
        a.push(url.clone());
        a
    };
    // Killed if this future is dropped (Ctrl-C): see `StopOnDrop`.
    let wrk = |args: Vec<String>| {
        tokio::process::Command::new("wrk")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
    };
    let out = wrk(args(load.warmup)).await.context("run wrk")?;
    ensure!(
        out.status.success(),
        "wrk (warm-up): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = procs.sample();
    let out = wrk(args(load.duration)).await.context("run wrk")?;
    let after = procs.sample();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "wrk: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))?;
    // wrk counts over its own run time, which it rounds to whole seconds.
    let requests = (w.rps * load.duration.as_secs().max(1) as f64) as u64;
    Ok(Run {
        rps: round3(w.rps),
        p50_ms: w.p50_ms,
        p90_ms: w.p90_ms,
        p99_ms: w.p99_ms,
        max_ms: w.max_ms,
        errors: w.errors,
        tls: None,
        cpu: CpuUse::between(&before, &after, t.name, requests),
        ..Run::default()
    })
}

#[derive(Debug, Default, PartialEq)]
struct WrkOut {
    rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: Errors,
}

fn wrk_ms(s: &str) -> Option<f64> {
    let i = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let n: f64 = s[..i].parse().ok()?;
    let scale = match &s[i..] {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        _ => return None,
    };
    Some(round3(n * scale))
}

fn parse_wrk(text: &str) -> Option<WrkOut> {
    let mut w = WrkOut::default();
    let (mut rps, mut p50, mut p90, mut p99) = (None, None, None, None);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", n] => rps = n.parse().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["90%", v] => p90 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            ["Latency", _avg, _stdev, max, ..] => w.max_ms = wrk_ms(max).unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors.status = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                let nums: Vec<u64> = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse().ok())
                    .collect();
                if let [c, r, wr, to] = nums.as_slice() {
                    w.errors.connect = *c;
                    w.errors.io = r + wr;
                    w.errors.timeout = *to;
                }
            }
            _ => {}
        }
    }
    w.rps = rps?;
    w.p50_ms = p50?;
    w.p90_ms = p90?;
    w.p99_ms = p99?;
    Some(w)
}

/// The processes whose CPU time is split out.
struct Procs {
    hearthd: u32,
    nginx: u32,
    /// The guest's processes are found by this in their cgroup path.
    container_id: String,
}

/// CPU seconds consumed so far, by component.
#[derive(Debug, Default, Clone, Copy)]
struct CpuSample {
    hearthd: f64,
    nginx: f64,
    agent: f64,
    app: f64,
    loadgen: f64,
    machine_busy: f64,
    machine_total: f64,
}

impl Procs {
    /// Reads /proc: per-process user+system time (all threads) and the machine's
    /// totals. The load generator is this process plus its reaped children (wrk).
    fn sample(&self) -> CpuSample {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut s = CpuSample::default();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Some((comm, ppid, ticks)) = proc_stat(pid) else {
                    continue;
                };
                let secs = ticks as f64 / hz;
                if pid == self.hearthd {
                    s.hearthd += secs;
                } else if pid == self.nginx || ppid == self.nginx {
                    s.nginx += secs;
                } else if comm == "hearth-agent" || comm == GUEST_APP_COMM {
                    let in_guest = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                        .is_ok_and(|c| c.contains(&self.container_id));
                    if in_guest && comm == GUEST_APP_COMM {
                        s.app += secs;
                    } else if in_guest {
                        s.agent += secs;
                    }
                }
            }
        }
        s.loadgen = rusage_secs(libc::RUSAGE_SELF) + rusage_secs(libc::RUSAGE_CHILDREN);
        if let Some((busy, total)) = machine_ticks() {
            s.machine_busy = busy as f64 / hz;
            s.machine_total = total as f64 / hz;
        }
        s
    }
}

/// `comm`, parent PID and user+system ticks of a process.
fn proc_stat(pid: u32) -> Option<(String, u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s.get(open + 1..close)?.to_string();
    // Fields from the 3rd (state) on; utime and stime are the 14th and 15th.
    let f: Vec<&str> = s.get(close + 2..)?.split(' ').collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((comm, ppid, ticks))
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Busy and total ticks of all CPUs (idle and iowait are not busy).
fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// CPU microseconds per request in a window, by component, and how busy the machine
/// was.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct CpuUse {
    /// hearthd or nginx, whichever carried this run.
    proxy: f64,
    /// The guest's agent, which relays hearth's streams to the app (idle for nginx).
    guest_agent: f64,
    app: f64,
    loadgen: f64,
    machine_busy_pct: f64,
}

impl CpuUse {
    fn between(a: &CpuSample, b: &CpuSample, target: &str, requests: u64) -> CpuUse {
        let per = |x: f64, y: f64| round3((y - x) * 1e6 / requests.max(1) as f64);
        let proxy = if target == "hearth" {
            per(a.hearthd, b.hearthd)
        } else {
            per(a.nginx, b.nginx)
        };
        let total = b.machine_total - a.machine_total;
        CpuUse {
            proxy,
            guest_agent: per(a.agent, b.agent),
            app: per(a.app, b.app),
            loadgen: per(a.loadgen, b.loadgen),
            machine_busy_pct: if total > 0.0 {
                round3((b.machine_busy - a.machine_busy) / total * 100.0)
            } else {
                0.0
            },
        }
    }
}

/// The middle value (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let m = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    round3(m)
}

fn report(
    runs: &[Run],
    opts: &ProxyBenchOptions,
    load: &Load,
    nginx_version: Option<String>,
) -> anyhow::Result<Value> {
    let of = |target: &'static str| runs.iter().filter(move |r| r.target == target);
    let med = |target: &'static str, f: &dyn Fn(&Run) -> f64| median(of(target).map(f).collect());
    let errors = |target: &'static str| {
        let mut e = Errors::default();
        for r in of(target) {
            e.add(&r.errors);
        }
        e
    };
    let cpu = |target: &'static str| {
        json!({
            "proxy": med(target, &|r| r.cpu.proxy),
            "guest_agent": med(target, &|r| r.cpu.guest_agent),
            "app": med(target, &|r| r.cpu.app),
            "loadgen": med(target, &|r| r.cpu.loadgen),
        })
    };
    let (hearth_rps, nginx_rps) = (med("hearth", &|r| r.rps), med("nginx", &|r| r.rps));
    let (hearth_p99, nginx_p99) = (med("hearth", &|r| r.p99_ms), med("nginx", &|r| r.p99_ms));
    ensure!(nginx_rps > 0.0, "nginx served nothing");
    let ratio = round3(hearth_rps / nginx_rps);
    let tls = |target: &'static str| of(target).find_map(|r| r.tls.clone());
    Ok(json!({
        "hearth_rps": hearth_rps,
        "nginx_rps": nginx_rps,
        "ratio": ratio,
        "hearth_p50_ms": med("hearth", &|r| r.p50_ms),
        "hearth_p90_ms": med("hearth", &|r| r.p90_ms),
        "hearth_p99_ms": hearth_p99,
        "nginx_p50_ms": med("nginx", &|r| r.p50_ms),
        "nginx_p90_ms": med("nginx", &|r| r.p90_ms),
        "nginx_p99_ms": nginx_p99,
        "target_met": ratio >= 1.0 && hearth_p99 <= nginx_p99,
        "errors": { "hearth": errors("hearth"), "nginx": errors("nginx") },
        // CPU time per request, medians over the rounds: where the time goes.
        "cpu_us_per_request": { "hearth": cpu("hearth"), "nginx": cpu("nginx") },
        "machine_cpu_busy_pct": {
            "hearth": med("hearth", &|r| r.cpu.machine_busy_pct),
            "nginx": med("nginx", &|r| r.cpu.machine_busy_pct),
        },
        "tls": { "hearth": tls("hearth"), "nginx": tls("nginx") },
        "runs": runs.iter().map(|r| json!({
            "target": r.target,
            "round": r.round,
            "rps": r.rps,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "max_ms": r.max_ms,
            "proxy_cpu_us_per_request": r.cpu.proxy,
        })).collect::<Vec<_>>(),
        "concurrency": load.concurrency,
        "threads": load.threads,
        "duration_s": load.duration.as_secs_f64(),
        "warmup_s": load.warmup.as_secs_f64(),
        "rounds": opts.rounds,
        "tool": opts.tool.name(),
        "body_bytes": BODY_LEN,
        "nginx_version": nginx_version,
        "machine_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ https://127.0.0.1:8443/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.39ms  512.77us  22.13ms   84.02%
    Req/Sec    11.70k     1.05k   13.58k    70.50%
  Latency Distribution
     50%    1.27ms
     75%    1.55ms
     90%    1.93ms
     99%    3.11ms
  232779 requests in 10.00s, 270.18MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  23275.06
Transfer/sec:     27.01MB
";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.rps, 23275.06);
        assert_eq!((w.p50_ms, w.p90_ms, w.p99_ms), (1.27, 1.93, 3.11));
        assert_eq!(w.max_ms, 22.13);
        assert_eq!(w.errors.status, 7);
        assert_eq!((w.errors.connect, w.errors.io, w.errors.timeout), (0, 4, 2));
        assert_eq!(wrk_ms("512.77us"), Some(0.513));
        assert_eq!(wrk_ms("1.5s"), Some(1500.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn nginx_conf_names_its_own_paths() {
        let c = nginx_conf(
            Path::new("/tmp/x"),
            "127.0.0.1:9000".parse().unwrap(),
            Path::new("/s/server.pem"),
            Path::new("/s/server.key"),
            "10.0.0.2:8080".parse().unwrap(),
        );
        assert!(c.contains("listen 127.0.0.1:9000 ssl;"));
        assert!(c.contains("server 10.0.0.2:8080;"));
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(c.contains("proxy_set_header Connection \"\";"));
    }
}
