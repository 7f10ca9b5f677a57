//! A private hearth node for end-to-end tests: its own state directory, loop-file btrfs
//! pool, nftables table, veth prefix, address range and uid blocks, so it never touches
//! a node running on the same machine. Everything it made is removed on drop, even when
//! the test failed half-way.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VETH_PREFIX: &str = "he";

pub struct TestNode {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub bin: PathBuf,
    pub table: String,
    pub cidr_prefix: String,
    daemon: Option<Child>,
}

/// The directory holding this workspace's binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["hearth", "hearthd", "hearth-agent"] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: build the workspace binaries first (cargo test --workspace does)",
            dir.join(b).display()
        );
    }
    dir
}

/// The private node's HTTPS port: one per test process, away from a dev node's 8443.
pub fn https_port(pid: u32) -> u16 {
    (20_000 + pid % 20_000) as u16
}

pub fn is_root() -> bool {
    nix::unistd::getuid().is_root()
}

impl TestNode {
    /// Builds a node from nothing: config, image (debootstrap with the shared .deb cache,
    /// ~40 s), daemon.
    pub fn start() -> TestNode {
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/hearth-e2e-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let table = format!("hearth-e2e-{pid}");
        let third = 100 + (pid % 100);
        let cidr_prefix = format!("10.89.{third}.");
        let config = dir.join("hearthd.toml");
        let text = format!(
            r#"state_dir = "{d}/state"
run_dir = "{d}/run"
[pool]
loop_file = "{d}/pool.img"
size = "8G"
mountpoint = "{d}/pool"
[network]
cidr = "10.89.{third}.0/24"
table = "{table}"
veth_prefix = "{VETH_PREFIX}"
[idmap]
base = {base}
blocks = 100
[defaults]
memory_mb = 1024
[proxy]
listen = "127.0.0.1:{port}"
node = "e2e"
"#,
            port = https_port(pid),
            d = dir.display(),
            base = 1_000_000u64 + 15_000 * 65_536,
        );
        std::fs::write(&config, text).expect("config");
        let mut node = TestNode {
            dir,
            config,
            bin: bin_dir(),
            table,
            cidr_prefix,
            daemon: None,
        };
        let t = Instant::now();
        let out = node.hearth(&["image", "build", "debian-13"]);
        assert!(
            out.status.success(),
            "image build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("e2e: image built in {:.1} s", t.elapsed().as_secs_f64());
        node.start_daemon();
        node
    }

    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hearthd.log"))
            .expect("log");
        let child = Command::new(self.bin.join("hearthd"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start hearthd");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.hearth(&["projects", "list"]).status.success() {
                return;
            }
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(|c| c.try_wait()) {
                panic!("hearthd exited with {st}:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("hearthd did not come up:\n{}", self.log_tail());
    }

    /// SIGKILL the daemon: the crash-only path.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `hearth ARGS` and SIGKILLs the daemon `delay` into it (the crash-only path);
    /// returns once the command has ended. The daemon stays down.
    pub fn kill_during(&mut self, args: &[&str], delay: Duration) {
        let mut cmd = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run hearth");
        std::thread::sleep(delay);
        self.kill9();
        let _ = cmd.wait();
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("hearthd.log")).unwrap_or_default();
        let lines: Vec<_> = t.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("hearth"));
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    pub fn hearth(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hearth")
    }

    /// Runs `hearth --json ARGS`, asserting success; returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.hearth(&all);
        assert!(
            out.status.success(),
            "hearth {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "hearth {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `hearth containers exec ID -- sh -c SCRIPT`: (exit code, stdout, stderr).
    pub fn sh(&self, id: &str, script: &str) -> (i32, String, String) {
        let out = self.hearth(&["containers", "exec", id, "--", "sh", "-c", script]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn pool(&self) -> PathBuf {
        self.dir.join("pool")
    }

    /// What the machine holds, to compare with the store: LXC definitions, rootfs
    /// subvolumes, agent directories, veths.
    pub fn machine(&self) -> Machine {
        let names = |p: PathBuf| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| !n.starts_with('.'))
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        // Container ids, whichever runtime slot (or both, mid-restore) they are in.
        let mut lxc: Vec<String> = names(self.state_dir().join("lxc"))
            .into_iter()
            .filter_map(|n| {
                hearth_host::node::Node::parse_lxc_name(&n).map(|(id, _)| id.to_string())
            })
            .collect();
        lxc.dedup();
        Machine {
            lxc,
            rootfs: names(self.pool().join("containers")),
            agent_dirs: names(self.state_dir().join("agents")),
            veths: links_with_prefix(VETH_PREFIX),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Machine {
    pub lxc: Vec<String>,
    pub rootfs: Vec<String>,
    pub agent_dirs: Vec<String>,
    pub veths: Vec<String>,
}

pub fn links_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Through the API first (the normal path), then by hand for whatever is left.
        if self.daemon.is_some() {
            let v = self.json_quiet(&["containers", "list"]);
            for c in v["containers"].as_array().into_iter().flatten() {
                if let Some(id) = c["id"].as_str() {
                    let _ = self.hearth(&["containers", "delete", id]);
                }
            }
        }
        self.kill9();
        let lxcpath = self.state_dir().join("lxc");
        if let Ok(rd) = std::fs::read_dir(&lxcpath) {
            for e in rd.flatten() {
                let _ = Command::new("lxc-stop")
                    .arg("-P")
                    .arg(&lxcpath)
                    .arg("-n")
                    .arg(e.file_name())
                    .arg("-k")
                    .output();
            }
        }
        for l in links_with_prefix(VETH_PREFIX) {
            let _ = Command::new("ip").args(["link", "del", &l]).output();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
        let _ = hearth_host::pool::loopfile::teardown(&self.dir.join("pool.img"), &self.pool());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestNode {
    fn json_quiet(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.hearth(&all);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}
