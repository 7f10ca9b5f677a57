//! The HTTPS front door end to end, on a private node: TLS with the node's own CA,
//! default-deny auth (401 / 200 / 403), routing (404 unknown service, 503 stopped
//! guest), the guest's own apps at `http-<port>` (bound to 0.0.0.0 and to 127.0.0.1),
//! a WebSocket echo through the proxy, HTTP/2 by ALPN, capability links, public
//! services, the REST API over HTTPS and the access log. Needs root and the Debian
//! mirror (the guest installs python3-minimal); cleans up on drop (see `TestNode`).

use hearth_tests::node::{https_port, is_root, TestNode};
use serde_json::Value;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

struct Front {
    port: u16,
    ca: String,
}

struct Answer {
    status: u16,
    headers: String,
    body: String,
    version: String,
}

impl Front {
    fn url(&self, label: &str, path: &str) -> String {
        format!("https://{label}.e2e.localhost:{}{path}", self.port)
    }

    /// curl with the node's CA; `extra` are more curl arguments.
    fn curl(&self, url: &str, extra: &[&str]) -> Answer {
        let dir = tempfile::tempdir().expect("tempdir");
        let hdr = dir.path().join("h");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert", &self.ca, "-D"])
            .arg(&hdr)
            .args(["-w", "\n%{http_code} %{http_version}"])
            .args(extra)
            .arg(url)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
        let mut tail = tail.split_whitespace();
        let status = tail.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let version = tail.next().unwrap_or_default().to_string();
        Answer {
            status,
            headers: std::fs::read_to_string(&hdr).unwrap_or_default(),
            body: body.to_string(),
            version,
        }
    }

    fn get(&self, label: &str, path: &str, token: Option<&str>) -> Answer {
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let mut extra = vec![];
        if let Some(a) = &auth {
            extra.extend(["-H", a.as_str()]);
        }
        self.curl(&self.url(label, path), &extra)
    }

    fn api(&self, method: &str, path: &str, token: &str, body: Option<&str>) -> (u16, Value) {
        let auth = format!("Authorization: Bearer {token}");
        let mut extra = vec!["-X", method, "-H", auth.as_str()];
        if let Some(b) = body {
            extra.extend(["-H", "Content-Type: application/json", "--data", b]);
        }
        let a = self.curl(&self.url("api", path), &extra);
        let v = serde_json::from_str(&a.body).unwrap_or(Value::Null);
        (a.status, v)
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A minimal WebSocket echo server (RFC 6455 handshake, unfragmented frames) for the
/// guest's Python, which has no WebSocket module.
const WS_ECHO: &str = r#"
import base64, hashlib, socket, struct, threading
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    def read(n):
        b = b""
        while len(b) < n:
            d = c.recv(n - len(b))
            if not d: raise EOFError
            b += d
        return b
    try:
        while True:
            h = read(2); op = h[0] & 15; n = h[1] & 127
            if n == 126: n = struct.unpack(">H", read(2))[0]
            elif n == 127: n = struct.unpack(">Q", read(8))[0]
            mask = read(4) if h[1] & 128 else b"\0\0\0\0"
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(read(n)))
            if op == 8: break
            hdr = bytes([0x80 | op]) + (bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n))
            c.sendall(hdr + data)
    except EOFError:
        pass
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8765)); s.listen(8)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A WebSocket round trip through the proxy over TLS (HTTP/1.1 by ALPN): handshake, one
/// masked text frame out, the same text back.
fn websocket_echo(front: &Front, host: &str, token: &str, text: &str) -> Result<String, String> {
    let pem = std::fs::read(&front.ca).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name =
        rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(("127.0.0.1", front.port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}:{}\r\nAuthorization: Bearer {token}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        front.port
    );
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut b)
            .map_err(|e| format!("reading the 101: {e}"))?;
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {head}"));
    }
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, c)| c ^ mask[i % 4]));
    tls.write_all(&frame).map_err(|e| e.to_string())?;
    let mut h = [0u8; 2];
    tls.read_exact(&mut h)
        .map_err(|e| format!("reading the echo: {e}"))?;
    let mut data = vec![0u8; usize::from(h[1] & 127)];
    tls.read_exact(&mut data).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

#[test]
fn https_front_door_end_to_end() {
    if !is_root() {
        eprintln!("skipped: the front door end-to-end test needs root (CI runs it as root)");
        return;
    }
    let node = TestNode::start();
    let ca = node.json(&["ca"]);
    let front = Front {
        port: https_port(std::process::id()),
        ca: s(&ca, "path"),
    };
    let web = node.json(&["containers", "create", "--name", "web"]);
    let web_id = s(&web, "id");
    node.json(&["projects", "create", "beta"]);
    let token = node.json(&["tokens", "create", "default", "--name", "e2e"]);
    let token = s(&token, "token");
    let beta = node.json(&["tokens", "create", "beta", "--name", "e2e"]);
    let beta = s(&beta, "token");
    assert!(token.starts_with("hth_") && beta.starts_with("hth_"));

    // Default deny, then the token's own project only.
    let a = front.get("default-web-files-1", "/health", None);
    assert_eq!(a.status, 401, "no credentials: {}", a.body);
    assert!(a
        .headers
        .to_ascii_lowercase()
        .contains("www-authenticate: bearer"));
    let a = front.get(
        "default-web-files-1",
        "/health",
        Some("hth_not-a-real-token"),
    );
    assert_eq!(a.status, 401, "a made-up token: {}", a.body);
    let a = front.get("default-web-files-1", "/health", Some(&token));
    assert_eq!(a.status, 200, "{}", a.body);
    let health: Value = serde_json::from_str(&a.body).expect("health JSON");
    assert_eq!(
        (s(&health, "service"), &health["instance"]),
        ("files".into(), &Value::from(1))
    );
    assert_eq!(a.version, "2", "HTTP/2 is negotiated by ALPN");
    let a = front.get("default-web-terminal-3", "/health", Some(&token));
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("\"instance\":3"), "{}", a.body);
    let a = front.get("default-web-files-1", "/health", Some(&beta));
    assert_eq!(a.status, 403, "another project's token: {}", a.body);
    let a = front.get("default-web-bogus-1", "/health", Some(&token));
    assert_eq!(a.status, 404, "unknown service: {}", a.body);
    let a = front.get("default-nosuch-files-1", "/health", None);
    assert_eq!(
        a.status, 401,
        "unknown container, no credentials: {}",
        a.body
    );

    // The guest's own apps, on 0.0.0.0 and on 127.0.0.1, and a WebSocket echo.
    let (code, out, err) = node.sh(
        &web_id,
        "apt-get update -q >/dev/null 2>&1; apt-get install -y -q python3-minimal >/dev/null 2>&1 \
         || { echo install failed; exit 1; }; mkdir -p /srv/a /srv/b && echo served-a > /srv/a/index.html \
         && echo served-b > /srv/b/index.html",
    );
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(node.dir.join("ws.py"), WS_ECHO).unwrap();
    let remote = format!("{web_id}:/srv/ws.py");
    let out = node.hearth(&[
        "containers",
        "cp",
        &node.dir.join("ws.py").display().to_string(),
        &remote,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, out, err) = node.sh(
        &web_id,
        "systemd-run -q --unit=app-a -p WorkingDirectory=/srv/a python3 -m http.server --bind 0.0.0.0 8000 \
         && systemd-run -q --unit=app-b -p WorkingDirectory=/srv/b python3 -m http.server --bind 127.0.0.1 8001 \
         && systemd-run -q --unit=app-ws python3 /srv/ws.py",
    );
    assert_eq!(code, 0, "{out}{err}");
    wait_for("the guest's apps", Duration::from_secs(30), || {
        front.get("default-web-http-8001", "/", Some(&token)).status == 200
            && front.get("default-web-http-8000", "/", Some(&token)).status == 200
    });
    let a = front.get("default-web-http-8000", "/index.html", Some(&token));
    assert_eq!((a.status, a.body.trim()), (200, "served-a"));
    let a = front.get("default-web-http-8001", "/index.html", Some(&token));
    assert_eq!(
        (a.status, a.body.trim()),
        (200, "served-b"),
        "an app bound to 127.0.0.1"
    );
    let a = front.get("default-web-http-8000", "/", None);
    assert_eq!(a.status, 401, "apps are default-deny too");
    let a = front.get("default-web-http-7600", "/", Some(&token));
    assert_eq!(a.status, 403, "a port reserved for the kit: {}", a.body);
    let a = front.get("default-web-http-8009", "/", Some(&token));
    assert_eq!(a.status, 502, "nothing listens there: {}", a.body);
    let host = "default-web-http-8765.e2e.localhost";
    let mut echoed = Err(String::new());
    wait_for("the WebSocket echo", Duration::from_secs(20), || {
        echoed = websocket_echo(&front, host, &token, "hello through the proxy");
        echoed.is_ok()
    });
    assert_eq!(echoed.unwrap(), "hello through the proxy");

    // A capability link: no token, a cookie for exactly that service.
    let share = node.json(&["share", "web", "http-8000", "--ttl", "1h"]);
    let url = s(&share, "url");
    assert!(url.contains("/.hearth/auth?"), "{url}");
    let a = front.curl(&url, &[]);
    assert_eq!(a.status, 302, "{}", a.body);
    let cookie = a
        .headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .expect("a Set-Cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(
        !cookie.to_ascii_lowercase().contains("domain="),
        "host-only: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let with_cookie = |label: &str| {
        front.curl(
            &front.url(label, "/index.html"),
            &["-H", &format!("Cookie: {pair}")],
        )
    };
    let a = with_cookie("default-web-http-8000");
    assert_eq!((a.status, a.body.trim()), (200, "served-a"));
    assert_eq!(
        with_cookie("default-web-http-8001").status,
        401,
        "another service"
    );
    let tampered = front.curl(
        &front.url("default-web-http-8000", "/"),
        &["-H", &format!("Cookie: {pair}x")],
    );
    assert_eq!(tampered.status, 401);

    // Public on purpose, and private again.
    node.json(&["public", "web", "http-8000"]);
    assert_eq!(front.get("default-web-http-8000", "/", None).status, 200);
    node.json(&["public", "web", "http-8000", "--off"]);
    assert_eq!(front.get("default-web-http-8000", "/", None).status, 401);

    // The access log saw those requests.
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(node.dir.join("run/control.sock"))
        .arg(format!("http://node/api/v1/containers/{web_id}/access-log"))
        .output()
        .expect("curl the control socket");
    let log: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let entries = log["data"]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        entries
            .iter()
            .any(|e| s(e, "service") == "http-8000" && e["status"] == 200),
        "{log}"
    );

    // The REST API over HTTPS with a project token.
    let (code, _) = front.api("GET", "/api/v1/containers", "hth_wrong", None);
    assert_eq!(code, 401);
    let (code, v) = front.api("GET", "/api/v1/containers", &token, None);
    assert_eq!(code, 200, "{v}");
    let (code, v) = front.api("GET", &format!("/api/v1/containers/{web_id}"), &beta, None);
    assert_eq!(code, 403, "another project's container: {v}");
    let (code, v) = front.api(
        "POST",
        "/api/v1/projects/default/containers",
        &token,
        Some(r#"{"name":"viaapi"}"#),
    );
    assert!(code == 200 || code == 201, "create over HTTPS: {v}");
    let api_id = s(&v["data"], "id");
    let (code, v) = front.api(
        "POST",
        &format!("/api/v1/containers/{api_id}/snapshots"),
        &token,
        Some(r#"{"alias":"first"}"#),
    );
    assert!(code == 200 || code == 201, "snapshot over HTTPS: {v}");
    let (code, v) = front.api(
        "GET",
        &format!("/api/v1/containers/{api_id}/snapshots"),
        &token,
        None,
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"]["snapshot_count"], 1, "{v}");
    let (code, v) = front.api(
        "PUT",
        &format!("/api/v1/containers/{api_id}/snapshots/first"),
        &token,
        None,
    );
    assert_eq!(code, 200, "restore over HTTPS: {v}");
    let (code, v) = front.api(
        "POST",
        &format!("/api/v1/containers/{api_id}/copy"),
        &token,
        Some(r#"{"name":"stolen","target_project_id":"beta"}"#),
    );
    assert_eq!(
        code, 403,
        "a copy into a project the token does not own: {v}"
    );
    let (code, v) = front.api(
        "POST",
        &format!("/api/v1/containers/{api_id}/exec"),
        &token,
        Some(r#"{"command":"echo over-https; echo err >&2; exit 3"}"#),
    );
    assert_eq!(code, 200, "exec over HTTPS: {v}");
    assert_eq!(
        (s(&v["data"], "stdout"), s(&v["data"], "stderr")),
        ("over-https\n".to_string(), "err\n".to_string()),
        "{v}"
    );
    assert_eq!(v["data"]["exit_code"], 3, "{v}");
    let payload = node.dir.join("payload.txt");
    std::fs::write(&payload, "file over https\n").unwrap();
    let auth = format!("Authorization: Bearer {token}");
    let files = front.url(
        "api",
        &format!("/api/v1/containers/{api_id}/files?path=/root/p.txt"),
    );
    let upload = format!("@{}", payload.display());
    let a = front.curl(
        &files,
        &["-X", "PUT", "-H", &auth, "--data-binary", &upload],
    );
    assert!(
        a.status == 200 || a.status == 201,
        "put a file over HTTPS: {}",
        a.body
    );
    let a = front.curl(&files, &["-H", &auth]);
    assert_eq!((a.status, a.body.as_str()), (200, "file over https\n"));
    let (code, v) = front.api(
        "DELETE",
        &format!("/api/v1/containers/{api_id}"),
        &token,
        None,
    );
    assert!(code == 200 || code == 204, "delete over HTTPS: {v}");

    // A stopped guest is 503 with Retry-After.
    node.json(&["containers", "stop", "web"]);
    let a = front.get("default-web-files-1", "/health", Some(&token));
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(
        a.headers.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        a.headers
    );
}
