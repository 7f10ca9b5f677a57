//! `hearth urls CONTAINER`: where a container's services are on the HTTPS front door.

use hearth_host::config::Config;
use hearth_host::control::client::ControlClient;
use hearth_host::proxy::route::KIT_SLUGS;
use hyper::Method;
use serde_json::json;

pub async fn urls(
    cfg: &Config,
    ctl: &ControlClient,
    container: &str,
    json: bool,
) -> anyhow::Result<i32> {
    let c = ctl
        .call(
            Method::GET,
            &format!("/api/v1/containers/{container}"),
            None,
        )
        .await?;
    let (project, name) = (
        c["project_id"].as_str().unwrap_or_default(),
        c["name"].as_str().unwrap_or_default(),
    );
    let p = &cfg.proxy;
    // One URL per kit service (the canonical slug; `agent` is an alias of workspaces).
    let mut seen = std::collections::HashSet::new();
    let kit: Vec<(String, String)> = KIT_SLUGS
        .iter()
        .filter(|(_, k)| seen.insert(*k))
        .map(|(slug, _)| {
            (
                slug.to_string(),
                p.url_for(&format!("{project}-{name}-{slug}-1")),
            )
        })
        .collect();
    let app = p.url_for(&format!("{project}-{name}-http-PORT"));
    let ca = hearth_host::tls::ca_path(&cfg.tls_dir());
    if json {
        let services: serde_json::Map<String, serde_json::Value> =
            kit.iter().map(|(s, u)| (s.clone(), json!(u))).collect();
        let v = json!({
            "container": c["id"], "project": project, "name": name,
            "services": services, "apps": app, "api": p.url_for("api"), "ca": ca,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for (slug, url) in &kit {
        println!("{slug:<11} {url}");
    }
    println!("{:<11} {app}   (any port the guest listens on)", "your app");
    println!("{:<11} {}/api/v1", "REST API", p.url_for("api"));
    eprintln!();
    eprintln!("Nothing answers without credentials. Either:");
    eprintln!("  TOKEN=$(hearth tokens create {project} --name me)");
    eprintln!(
        "  curl --cacert {} -H \"Authorization: Bearer $TOKEN\" {}/health",
        ca.display(),
        kit.first().map(|k| k.1.as_str()).unwrap_or_default()
    );
    eprintln!("or open a signed link in a browser (trust the CA above first):");
    eprintln!("  hearth share {project}/{name} terminal-1 --ttl 1h");
    Ok(0)
}
