//! From a request's host name to what it addresses.
//!
//! ```text
//! {project}-{container}-{slug}-{n}.{node}.{domain}     kit service instance n (from 1)
//! {project}-{container}-http-{port}.{node}.{domain}    the guest's own app on port
//! {project}-{container}-https-{port}.{node}.{domain}   same, app terminates TLS itself
//! {project}-{container}-http.{node}.{domain}           port 80 (https: 443)
//! api.{node}.{domain}                                  the REST API
//! ```
//!
//! Service and number are read from the right, so they are never ambiguous. What is left,
//! `{project}-{container}`, is: both names may contain '-'. Rather than forbid that,
//! [`parse`] hands back the prefix and [`splits`] lists the candidate pairs, for the
//! caller to resolve against the projects and containers that exist.

use crate::pool::validate_name;

/// A kit service, as the agent knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kit {
    Terminal,
    Display,
    Files,
    Sqlite,
    Exec,
    Browser,
    Workspaces,
    Code,
    Curl,
    Notifications,
    Daemon,
    Cron,
    Pipe,
    Notes,
    Watch,
    Run,
    Tunnel,
    Logs,
}

/// Every slug a host name may carry and the kit it names, the one place they are listed.
/// A kit's first entry is its canonical slug (the one hearth prints); later entries for
/// the same kit are aliases clients of the anchor API already use.
pub const KIT_SLUGS: &[(&str, Kit)] = &[
    ("terminal", Kit::Terminal),
    ("display", Kit::Display),
    ("files", Kit::Files),
    ("sqlite", Kit::Sqlite),
    ("exec", Kit::Exec),
    ("browser", Kit::Browser),
    ("workspaces", Kit::Workspaces),
    ("agent", Kit::Workspaces),
    ("code", Kit::Code),
    ("curl", Kit::Curl),
    ("n", Kit::Notifications),
    ("daemon", Kit::Daemon),
    ("cron", Kit::Cron),
    ("pipe", Kit::Pipe),
    ("notes", Kit::Notes),
    ("watch", Kit::Watch),
    ("run", Kit::Run),
    ("tunnel", Kit::Tunnel),
    ("logs", Kit::Logs),
];

impl Kit {
    pub fn from_slug(slug: &str) -> Option<Kit> {
        KIT_SLUGS
            .iter()
            .find(|(s, _)| *s == slug)
            .map(|&(_, kit)| kit)
    }

    /// The canonical slug, for URLs hearth builds.
    pub fn slug(self) -> &'static str {
        KIT_SLUGS
            .iter()
            .find(|&&(_, kit)| kit == self)
            .map(|&(slug, _)| slug)
            // Invariant: every variant has an entry (tested).
            .unwrap_or("")
    }
}

/// What a guest host name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Kit service `slug`, instance `instance` (1 and up).
    Kit { slug: Kit, instance: u16 },
    /// The guest's own listener on `port` (1-65535). `tls` is the `https-` form: the app
    /// terminates TLS itself. The proxy does not speak TLS to guests yet, so callers
    /// refuse it with a clear message for now rather than treat it as `http-`.
    Port { port: u16, tls: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `api.{node}.{domain}`.
    Api,
    /// A guest's service. `prefix` is `{project}-{container}`, lower-case; see [`splits`].
    Guest { prefix: String, service: Service },
}

/// Why a host name routes nowhere. `host` is the name as received, for the error page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not a name under this node: someone else's, or a bare IP address.
    #[error("{host} is not served by this node")]
    NotOurDomain { host: String },
    /// Well formed, but no such service: a 404, not a 400.
    #[error("{host}: no service {service:?}")]
    UnknownService { host: String, service: String },
    #[error("{host}: {what} {value:?} is not a number from 1 to 65535 without leading zeros")]
    BadNumber {
        host: String,
        what: &'static str,
        value: String,
    },
    #[error("{host}: {reason}")]
    Malformed { host: String, reason: &'static str },
}

/// A DNS label's limit; also bounds the prefix, so the names in it need no length check.
const LABEL_MAX: usize = 63;
const API_LABEL: &str = "api";

/// Parses a `Host` header (or SNI name) for node `node` under `domain`. Case does not
/// matter, and a trailing dot and a `:port` are allowed, as clients send them.
pub fn parse(host: &str, node: &str, domain: &str) -> Result<Target, RouteError> {
    let malformed = |reason| RouteError::Malformed {
        host: host.to_string(),
        reason,
    };
    let name = match host.rsplit_once(':') {
        // IPv6 literals (`[::1]:8443`) carry no name to route by.
        Some((name, _)) if name.contains(':') => {
            return Err(RouteError::NotOurDomain {
                host: host.to_string(),
            })
        }
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return Err(malformed("a port that is not a number")),
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let label = strip_dot_suffix(&name, domain)
        .and_then(|rest| strip_dot_suffix(rest, node))
        .ok_or_else(|| RouteError::NotOurDomain {
            host: host.to_string(),
        })?;

    if label.contains('.') {
        return Err(malformed("more than one label before the node name"));
    }
    if label.len() > LABEL_MAX {
        return Err(malformed("a label longer than 63 characters"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(malformed("characters other than a-z, 0-9 and '-'"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(malformed("a label starting or ending with '-'"));
    }
    if label == API_LABEL {
        return Ok(Target::Api);
    }

    let (rest, last) = label
        .rsplit_once('-')
        .ok_or_else(|| malformed("no service in the name"))?;
    let (prefix, service) = if last.bytes().all(|b| b.is_ascii_digit()) && !last.is_empty() {
        let (prefix, word) = rest
            .rsplit_once('-')
            .ok_or_else(|| malformed("no service in the name"))?;
        let bad_number = |what| RouteError::BadNumber {
            host: host.to_string(),
            what,
            value: last.to_string(),
        };
        let service = match word {
            "http" | "https" => Service::Port {
                port: number(last).ok_or_else(|| bad_number("port"))?,
                tls: word == "https",
            },
            _ => Service::Kit {
                slug: kit(host, word)?,
                instance: number(last).ok_or_else(|| bad_number("instance"))?,
            },
        };
        (prefix, service)
    } else {
        // Per the anchor API, a port-less `http`/`https` means the scheme's default port.
        let service = match last {
            "http" => Service::Port {
                port: 80,
                tls: false,
            },
            "https" => Service::Port {
                port: 443,
                tls: true,
            },
            _ => {
                kit(host, last)?;
                return Err(malformed(
                    "a kit service needs an instance number, as in terminal-1",
                ));
            }
        };
        (rest, service)
    };

    if splits(prefix).next().is_none() {
        return Err(malformed(
            "the name does not start with {project}-{container}",
        ));
    }
    Ok(Target::Guest {
        prefix: prefix.to_string(),
        service,
    })
}

/// Every way to read `prefix` as `{project}-{container}` with both valid names, the
/// shortest project first. Usually one is right; the caller checks which exist.
pub fn splits(prefix: &str) -> impl Iterator<Item = (&str, &str)> {
    prefix
        .match_indices('-')
        .map(move |(i, _)| (&prefix[..i], &prefix[i + 1..]))
        .filter(|(project, container)| {
            validate_name("project", project).is_ok()
                && validate_name("container", container).is_ok()
        })
}

fn kit(host: &str, word: &str) -> Result<Kit, RouteError> {
    Kit::from_slug(word).ok_or_else(|| RouteError::UnknownService {
        host: host.to_string(),
        service: word.to_string(),
    })
}

/// 1-65535 in canonical decimal: one spelling per number, so one URL per service.
fn number(digits: &str) -> Option<u16> {
    if digits.starts_with('0') || digits.len() > 5 {
        return None;
    }
    digits.parse().ok().filter(|&n| n != 0)
}

/// `name` without `.suffix` (compared case-insensitively; `name` is lower-case already).
fn strip_dot_suffix<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = name.len().checked_sub(suffix.len() + 1)?;
    let (rest, tail) = name.split_at_checked(cut)?;
    (!suffix.is_empty() && tail.as_bytes()[0] == b'.' && tail[1..].eq_ignore_ascii_case(suffix))
        .then_some(rest)
        .filter(|rest| !rest.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "node1";
    const DOMAIN: &str = "localhost";

    fn guest(host: &str) -> (String, Service) {
        match parse(host, NODE, DOMAIN) {
            Ok(Target::Guest { prefix, service }) => (prefix, service),
            other => panic!("{host}: {other:?}"),
        }
    }

    fn kit_of(slug: Kit, instance: u16) -> Service {
        Service::Kit { slug, instance }
    }

    #[test]
    fn kit_hosts() {
        assert_eq!(
            guest("proj-box-terminal-1.node1.localhost"),
            ("proj-box".to_string(), kit_of(Kit::Terminal, 1))
        );
        assert_eq!(
            guest("proj-box-display-7.node1.localhost").1,
            kit_of(Kit::Display, 7)
        );
        assert_eq!(
            guest("proj-box-code-65535.node1.localhost").1,
            kit_of(Kit::Code, 65535)
        );
        assert_eq!(
            guest("p-c-n-2.node1.localhost").1,
            kit_of(Kit::Notifications, 2)
        );
    }

    #[test]
    fn every_slug_in_the_table_parses_and_every_kit_has_one() {
        for &(slug, kit) in KIT_SLUGS {
            assert_eq!(
                guest(&format!("p-c-{slug}-1.node1.localhost")).1,
                kit_of(kit, 1)
            );
            assert!(!kit.slug().is_empty());
            assert_eq!(Kit::from_slug(kit.slug()), Some(kit));
        }
        let kits: std::collections::HashSet<Kit> = KIT_SLUGS.iter().map(|&(_, k)| k).collect();
        assert_eq!(kits.len(), 18, "the kit has 18 services");
    }

    #[test]
    fn agent_is_workspaces() {
        assert_eq!(
            guest("p-c-agent-1.node1.localhost").1,
            kit_of(Kit::Workspaces, 1)
        );
        assert_eq!(Kit::Workspaces.slug(), "workspaces");
    }

    #[test]
    fn ports() {
        let port = |host| guest(host).1;
        assert_eq!(
            port("p-c-http-8080.node1.localhost"),
            Service::Port {
                port: 8080,
                tls: false
            }
        );
        assert_eq!(
            port("p-c-https-8443.node1.localhost"),
            Service::Port {
                port: 8443,
                tls: true
            }
        );
        assert_eq!(
            port("p-c-http-1.node1.localhost"),
            Service::Port {
                port: 1,
                tls: false
            }
        );
        assert_eq!(
            port("p-c-http-65535.node1.localhost"),
            Service::Port {
                port: 65535,
                tls: false
            }
        );
        assert_eq!(
            port("p-c-http.node1.localhost"),
            Service::Port {
                port: 80,
                tls: false
            }
        );
        assert_eq!(
            port("p-c-https.node1.localhost"),
            Service::Port {
                port: 443,
                tls: true
            }
        );
    }

    #[test]
    fn bad_numbers() {
        for (host, what) in [
            ("p-c-http-0.node1.localhost", "port"),
            ("p-c-http-65536.node1.localhost", "port"),
            ("p-c-http-08080.node1.localhost", "port"),
            ("p-c-http-00.node1.localhost", "port"),
            ("p-c-https-99999999999999999999.node1.localhost", "port"),
            ("p-c-terminal-0.node1.localhost", "instance"),
            ("p-c-terminal-01.node1.localhost", "instance"),
            ("p-c-files-70000.node1.localhost", "instance"),
        ] {
            match parse(host, NODE, DOMAIN) {
                Err(RouteError::BadNumber { what: w, .. }) => assert_eq!(w, what, "{host}"),
                other => panic!("{host}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_services() {
        for (host, service) in [
            ("p-c-ssh-1.node1.localhost", "ssh"),
            ("p-c-desktop-1.node1.localhost", "desktop"),
            ("p-c-web-1.node1.localhost", "web"),
            ("p-c-ssh.node1.localhost", "ssh"),
            // Without a number the last word before it is the service.
            ("p-c-1.node1.localhost", "c"),
        ] {
            match parse(host, NODE, DOMAIN) {
                Err(RouteError::UnknownService { service: s, .. }) => {
                    assert_eq!(s, service, "{host}")
                }
                other => panic!("{host}: {other:?}"),
            }
        }
    }

    #[test]
    fn dashes_in_names() {
        let (prefix, service) = guest("my-proj-my-box-files-1.node1.localhost");
        assert_eq!(prefix, "my-proj-my-box");
        assert_eq!(service, kit_of(Kit::Files, 1));
        assert_eq!(
            splits(&prefix).collect::<Vec<_>>(),
            [
                ("my", "proj-my-box"),
                ("my-proj", "my-box"),
                ("my-proj-my", "box")
            ]
        );
        // A container named like a service: service and number come from the right.
        let (prefix, service) = guest("p-x-terminal-1-http-3000.node1.localhost");
        assert_eq!(prefix, "p-x-terminal-1");
        assert_eq!(
            service,
            Service::Port {
                port: 3000,
                tls: false
            }
        );
    }

    #[test]
    fn splits_yield_only_valid_names() {
        let all = |p| splits(p).collect::<Vec<_>>();
        assert_eq!(all("a-b"), [("a", "b")]);
        assert_eq!(all("a--b"), [("a-", "b")]);
        assert_eq!(all("a-b-"), [("a", "b-")]);
        assert!(all("ab").is_empty());
        assert!(all("-a").is_empty());
        assert!(all("a-").is_empty());
        assert!(all("").is_empty());
    }

    #[test]
    fn case_trailing_dot_and_port() {
        let want = ("proj-box".to_string(), kit_of(Kit::Terminal, 2));
        for host in [
            "Proj-Box-TERMINAL-2.NODE1.LocalHost",
            "proj-box-terminal-2.node1.localhost.",
            "proj-box-terminal-2.node1.localhost:8443",
            "proj-box-terminal-2.node1.localhost.:8443",
            "PROJ-BOX-terminal-2.node1.localhost:443",
        ] {
            assert_eq!(guest(host), want, "{host}");
        }
        // Node and domain as configured, in any case and with a trailing dot.
        assert!(parse("p-c-exec-1.node1.localhost", "Node1", "LOCALHOST.").is_ok());
    }

    #[test]
    fn api_host() {
        for host in [
            "api.node1.localhost",
            "API.Node1.localhost",
            "api.node1.localhost.",
            "api.node1.localhost:8443",
        ] {
            assert_eq!(parse(host, NODE, DOMAIN), Ok(Target::Api), "{host}");
        }
        assert_eq!(
            parse("api.n1.example.com", "n1", "example.com"),
            Ok(Target::Api)
        );
    }

    #[test]
    fn other_domains_and_nodes() {
        for host in [
            "p-c-terminal-1.othernode.localhost",
            "p-c-terminal-1.xnode1.localhost",
            "p-c-terminal-1.node1.localhost.evil.com",
            "p-c-terminal-1.node1.example.com",
            "node1.localhost",
            "localhost",
            "",
            "127.0.0.1:8443",
            "[::1]:8443",
            ".node1.localhost",
        ] {
            assert!(
                matches!(
                    parse(host, NODE, DOMAIN),
                    Err(RouteError::NotOurDomain { .. })
                ),
                "{host}: {:?}",
                parse(host, NODE, DOMAIN)
            );
        }
        assert_eq!(guest("p-c-code-3.node1.localhost").1, kit_of(Kit::Code, 3));
        assert!(matches!(
            parse("p-c-code-3.n1.example.com", "n1", "example.com"),
            Ok(Target::Guest { .. })
        ));
    }

    #[test]
    fn malformed() {
        let long = format!("{}-c-terminal-1.node1.localhost", "p".repeat(60));
        for host in [
            "terminal-1.node1.localhost",
            "box-terminal-1.node1.localhost",
            "-c-terminal-1.node1.localhost",
            "a.p-c-terminal-1.node1.localhost",
            "p_c-terminal-1.node1.localhost",
            "p-c-terminal.node1.localhost",
            "p-c-terminal-.node1.localhost",
            "p-c-tërminal-1.node1.localhost",
            "p-c-terminal-1.node1.localhost:https",
            &long,
        ] {
            let got = parse(host, NODE, DOMAIN);
            assert!(
                matches!(got, Err(RouteError::Malformed { .. })),
                "{host}: {got:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_host() {
        let err = parse("p-c-ssh-1.node1.localhost:8443", NODE, DOMAIN).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p-c-ssh-1.node1.localhost:8443: no service \"ssh\""
        );
    }
}
