//! The management commands of SPEC §6: each sends one admin request and
//! prints the answer for a person, or as JSON with `--json`. Exit status:
//! 0 success, 1 the operation failed (message on stderr).

use std::io::{BufRead, Write};

use hyper::Method;
use serde_json::{Value, json};

use super::client::{AdminClient, segment};

/// A management command, parsed by clap in `main.rs`.
#[derive(Debug, Clone)]
pub enum Command {
    HostingAdd {
        name: String,
        domains: Vec<String>,
    },
    HostingList,
    HostingPasswd {
        name: String,
    },
    HostingToken {
        name: String,
        revoke: bool,
    },
    MailboxAdd {
        address: String,
    },
    MailboxPasswd {
        address: String,
    },
    MailboxList {
        hosting: Option<String>,
    },
    MailboxDelete {
        address: String,
    },
    DomainAdd {
        domain: String,
        hosting: String,
    },
    DomainShow {
        domain: String,
        hosting: String,
    },
    DomainList {
        hosting: String,
    },
    DomainVerify {
        domain: String,
        hosting: String,
    },
    DomainDelete {
        domain: String,
        hosting: String,
        yes: bool,
    },
    DomainDkimRotate {
        domain: String,
        hosting: String,
    },
    AccountAdd {
        addresses: Vec<String>,
        hosting: String,
        mailboxes: Vec<String>,
    },
    AccountList {
        hosting: String,
        domain: Option<String>,
    },
    AccountDelete {
        address: String,
        hosting: String,
    },
    QueueList,
    QueueShow {
        id: String,
    },
    QueueRetry {
        id: String,
    },
    QueueDelete {
        id: String,
    },
    Explain {
        login: String,
        sender: String,
    },
}

/// Outcome of a command: printed output and the exit status.
pub struct Done {
    pub ok: bool,
}

/// Reads a password from the first line of stdin (never from argv, where
/// `ps` would show it).
fn read_password() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err("no password: give it as the first line of stdin".into());
    }
    Ok(password)
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn domain_path(hosting: &str, domain: &str) -> String {
    format!("/hostings/{}/domains/{}", segment(hosting), segment(domain))
}

fn record_line(d: &Value) -> String {
    let r = &d["record"];
    format!("{}  TXT  \"{}\"", s(r, "name"), s(r, "value"))
}

fn print_domain_detail(d: &Value) {
    println!(
        "Domain:       {} (hosting {})",
        s(d, "domain"),
        s(d, "hosting")
    );
    println!("Status:       {}", s(d, "status"));
    println!("Record:       {}", record_line(d));
    println!("Added:        {}", s(d, "created_at"));
    println!("Verified at:  {}", s(d, "verified_at"));
    println!("Last check:   {}", s(d, "last_check"));
    println!("Last error:   {}", s(d, "last_error"));
    if !d["record_missing_since"].is_null() {
        println!(
            "Warning:      record missing since {}: the domain fails when the grace period ends",
            s(d, "record_missing_since")
        );
    }
    if let Some(n) = d.get("accounts") {
        println!("Accounts:     {n}");
    }
    for line in super::dns_report::text_lines(d) {
        println!("{line}");
    }
    print_dkim(d);
}

/// The DKIM part of a domain for a person (SPEC §9): status and the records to publish.
fn print_dkim(d: &Value) {
    let k = &d["dkim"];
    if k.is_null() {
        return;
    }
    println!();
    println!("DKIM:         {}", s(k, "status"));
    println!("DKIM check:   {}", s(k, "last_check"));
    if !k["last_error"].is_null() {
        println!("DKIM error:   {}", s(k, "last_error"));
    }
    match &k["signing"] {
        Value::Null => {
            println!("Signing:      not yet (signs once the domain and these records are verified)")
        }
        v => println!(
            "Signing:      with selectors {} and {}",
            s(v, "ed25519"),
            s(v, "rsa")
        ),
    }
    if k["enabled"] == Value::Bool(false) {
        println!("              (signing is off: [deliverability] dkim = false)");
    }
    let records: Vec<&Value> = k["records"].as_array().into_iter().flatten().collect();
    if records.is_empty() {
        return;
    }
    println!("DKIM records to publish (TXT):");
    for r in records {
        println!("  {}  TXT  \"{}\"", s(r, "name"), s(r, "value"));
    }
    println!("  A TXT string holds at most 255 bytes: DNS panels usually split a long value");
    println!("  themselves; in a zone file write it as several quoted strings on one line:");
    for r in k["records"].as_array().into_iter().flatten() {
        let strings: Vec<String> = r["strings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|p| format!("\"{p}\""))
            .collect();
        if strings.len() > 1 {
            println!("  {} IN TXT ( {} )", s(r, "name"), strings.join(" "));
        }
    }
}

pub async fn run(client: &AdminClient, cmd: Command, as_json: bool) -> Result<Done, String> {
    use Command::*;
    let ok = Done { ok: true };
    match cmd {
        HostingAdd { name, domains } => {
            let v = client
                .call(
                    Method::POST,
                    "/hostings",
                    Some(json!({ "name": name, "domains": domains })),
                )
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!(
                    "hosting {} added (own domains: {})",
                    s(&v, "name"),
                    join(&v["domains"])
                );
            }
        }
        HostingList => {
            let v = client.call(Method::GET, "/hostings", None).await?;
            if as_json {
                print_json(&v);
            } else {
                for h in v.as_array().into_iter().flatten() {
                    println!("{}\t{}", s(h, "name"), join(&h["domains"]));
                }
            }
        }
        HostingPasswd { name } => {
            let password = read_password()?;
            let path = format!("/hostings/{}/password", segment(&name));
            let v = client
                .call(Method::PUT, &path, Some(json!({ "password": password })))
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!("password of hosting {name} changed");
            }
        }
        HostingToken { name, revoke } => {
            let path = format!("/hostings/{}/tokens", segment(&name));
            let method = if revoke { Method::DELETE } else { Method::POST };
            let v = client.call(method, &path, None).await?;
            if as_json {
                print_json(&v);
            } else if revoke {
                println!(
                    "{} API token(s) of hosting {name} revoked",
                    s(&v, "revoked")
                );
            } else {
                // The token alone on stdout, so scripts can capture it; it is
                // shown this once and stored only as a hash.
                println!("{}", s(&v, "token"));
            }
        }
        MailboxAdd { address } => {
            let password = read_password()?;
            let v = client
                .call(
                    Method::POST,
                    "/mailboxes",
                    Some(json!({ "address": address, "password": password })),
                )
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!(
                    "mailbox {} added to hosting {}",
                    s(&v, "address"),
                    s(&v, "hosting")
                );
            }
        }
        MailboxPasswd { address } => {
            let password = read_password()?;
            let path = format!("/mailboxes/{}/password", segment(&address));
            let v = client
                .call(Method::PUT, &path, Some(json!({ "password": password })))
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!("password of {} changed", s(&v, "address"));
            }
        }
        MailboxList { hosting } => {
            let path = match &hosting {
                Some(h) => format!("/mailboxes?hosting={}", segment(h)),
                None => "/mailboxes".to_string(),
            };
            let v = client.call(Method::GET, &path, None).await?;
            if as_json {
                print_json(&v);
            } else {
                for m in v.as_array().into_iter().flatten() {
                    println!("{}\t{}", s(m, "address"), s(m, "hosting"));
                }
            }
        }
        MailboxDelete { address } => {
            let v = client
                .call(
                    Method::DELETE,
                    &format!("/mailboxes/{}", segment(&address)),
                    None,
                )
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!("mailbox {address} deleted");
            }
        }
        DomainAdd { domain, hosting } => {
            let path = format!("/hostings/{}/domains", segment(&hosting));
            let v = client
                .call(Method::POST, &path, Some(json!({ "domain": domain })))
                .await?;
            if as_json {
                print_json(&v);
            } else {
                let d = s(&v, "domain");
                println!(
                    "Domain {d} added for hosting {hosting}: status {}.",
                    s(&v, "status")
                );
                println!();
                println!("To prove that you control {d}, publish this DNS record:");
                println!();
                println!("  {}", record_line(&v));
                print_dkim(&v);
                println!();
                println!("DNS changes can take from a few minutes to a few hours to propagate.");
                println!("The record is checked automatically; to check it now, run:");
                println!("  domauth domain verify {d} --hosting {hosting}");
            }
        }
        DomainShow { domain, hosting } => {
            let v = client
                .call(Method::GET, &domain_path(&hosting, &domain), None)
                .await?;
            if as_json {
                print_json(&v);
            } else {
                print_domain_detail(&v);
                if s(&v, "status") != "verified" {
                    println!();
                    println!("Publish: {}", record_line(&v));
                    println!(
                        "DNS changes can take from a few minutes to a few hours to propagate."
                    );
                }
            }
        }
        DomainList { hosting } => {
            let path = format!("/hostings/{}/domains", segment(&hosting));
            let v = client.call(Method::GET, &path, None).await?;
            if as_json {
                print_json(&v);
            } else {
                let rows: Vec<&Value> = v.as_array().into_iter().flatten().collect();
                if rows.is_empty() {
                    println!("hosting {hosting} has no authorized domains");
                }
                for d in rows {
                    let mut line = format!(
                        "{}\t{}\tlast check {}",
                        s(d, "domain"),
                        s(d, "status"),
                        s(d, "last_check")
                    );
                    if !d["record_missing_since"].is_null() {
                        line.push_str(&format!(
                            "\trecord missing since {}",
                            s(d, "record_missing_since")
                        ));
                    }
                    if !d["last_error"].is_null() {
                        line.push_str(&format!("\t{}", s(d, "last_error")));
                    }
                    println!("{line}");
                }
            }
        }
        DomainDkimRotate { domain, hosting } => {
            let path = format!("{}/dkim-rotate", domain_path(&hosting, &domain));
            let v = client.call(Method::POST, &path, None).await?;
            if as_json {
                print_json(&v);
            } else {
                println!(
                    "New DKIM keys for {}: publish the records below; the current keys sign until they are verified.",
                    s(&v, "domain")
                );
                print_dkim(&v);
            }
        }
        DomainVerify { domain, hosting } => {
            let path = format!("{}/verify", domain_path(&hosting, &domain));
            let v = client.call(Method::POST, &path, None).await?;
            let found = v["check"]["found"].as_bool().unwrap_or(false);
            if as_json {
                print_json(&v);
            } else if found {
                println!("{}: verified", s(&v, "domain"));
            } else {
                println!(
                    "{}: {} — {}",
                    s(&v, "domain"),
                    s(&v, "status"),
                    s(&v["check"], "outcome")
                );
                println!("expected: {}", record_line(&v));
                for line in super::dns_report::server_lines(&v) {
                    println!("{line}");
                }
            }
            return Ok(Done { ok: found });
        }
        DomainDelete {
            domain,
            hosting,
            yes,
        } => {
            let path = domain_path(&hosting, &domain);
            if !yes {
                let v = client.call(Method::GET, &path, None).await?;
                let n = v["accounts"].as_u64().unwrap_or(0);
                eprint!(
                    "Delete {} and its {n} authorized account{}? [y/N] ",
                    s(&v, "domain"),
                    if n == 1 { "" } else { "s" }
                );
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                let _ = std::io::stdin().lock().read_line(&mut answer);
                if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
                    return Err("not deleted".into());
                }
            }
            let v = client.call(Method::DELETE, &path, None).await?;
            if as_json {
                print_json(&v);
            } else {
                println!(
                    "{} deleted with {} authorized account(s)",
                    s(&v, "domain"),
                    v["accounts_deleted"]
                );
            }
        }
        AccountAdd {
            addresses,
            hosting,
            mailboxes,
        } => {
            let path = format!("/hostings/{}/accounts", segment(&hosting));
            let body = json!({ "addresses": addresses, "mailboxes": mailboxes });
            let v = client.call(Method::POST, &path, Some(body)).await?;
            if as_json {
                print_json(&v);
            } else {
                for a in v.as_array().into_iter().flatten() {
                    println!("{}", account_granted(a, &hosting));
                }
            }
        }
        AccountList { hosting, domain } => {
            let mut path = format!("/hostings/{}/accounts", segment(&hosting));
            if let Some(d) = &domain {
                path.push_str(&format!("?domain={}", segment(d)));
            }
            let v = client.call(Method::GET, &path, None).await?;
            if as_json {
                print_json(&v);
            } else {
                for a in v.as_array().into_iter().flatten() {
                    println!(
                        "{}\t{}\t{}",
                        s(a, "address"),
                        s(a, "created_at"),
                        account_scope(a)
                    );
                }
            }
        }
        AccountDelete { address, hosting } => {
            let path = format!(
                "/hostings/{}/accounts/{}",
                segment(&hosting),
                segment(&address)
            );
            let v = client.call(Method::DELETE, &path, None).await?;
            if as_json {
                print_json(&v);
            } else {
                println!("account {address} deleted");
            }
        }
        QueueList => {
            let v = client.call(Method::GET, "/queue", None).await?;
            if as_json {
                print_json(&v);
            } else {
                let rows: Vec<&Value> = v.as_array().into_iter().flatten().collect();
                if rows.is_empty() {
                    println!("queue is empty");
                }
                for m in rows {
                    let from = match s(m, "from").as_str() {
                        "" => "<>".to_string(),
                        f => f.to_string(),
                    };
                    println!(
                        "{}\t{} bytes\t{} attempts\tnext {}\t{} -> {}",
                        s(m, "id"),
                        m["size"],
                        m["attempts"],
                        s(m, "next_attempt"),
                        from,
                        join(&m["recipients"])
                    );
                    if !m["last_error"].is_null() {
                        println!("\t{}", s(m, "last_error"));
                    }
                }
            }
        }
        QueueShow { id } => {
            let v = client
                .call(Method::GET, &format!("/queue/{}", segment(&id)), None)
                .await?;
            if as_json {
                print_json(&v);
            } else {
                for key in [
                    "id",
                    "from",
                    "login",
                    "size",
                    "received_at",
                    "attempts",
                    "next_attempt",
                    "last_error",
                ] {
                    println!("{key:13} {}", s(&v, key));
                }
                for r in v["recipient_status"].as_array().into_iter().flatten() {
                    println!(
                        "recipient     {}\t{}\t{}",
                        s(r, "address"),
                        s(r, "status"),
                        s(r, "last_reply")
                    );
                }
                if v["dsn"].as_object().is_some_and(|o| !o.is_empty()) {
                    println!("{:13} {}", "dsn", v["dsn"]);
                }
            }
        }
        QueueRetry { id } => {
            let v = client
                .call(
                    Method::POST,
                    &format!("/queue/{}/retry", segment(&id)),
                    None,
                )
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!("{id} scheduled for delivery now");
            }
        }
        QueueDelete { id } => {
            let v = client
                .call(Method::DELETE, &format!("/queue/{}", segment(&id)), None)
                .await?;
            if as_json {
                print_json(&v);
            } else {
                println!("{id} deleted from the queue");
            }
        }
        Explain { login, sender } => {
            let path = format!(
                "/explain?login={}&sender={}",
                segment(&login),
                segment(&sender)
            );
            let v = client.call(Method::GET, &path, None).await?;
            let allowed = v["allowed"].as_bool().unwrap_or(false);
            if as_json {
                print_json(&v);
            } else {
                let verdict = if allowed { "allowed" } else { "refused" };
                println!("{verdict}: {}", s(&v, "reason"));
            }
            return Ok(Done { ok: allowed });
        }
    }
    Ok(ok)
}

fn join(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Who may use an account (SPEC §9 wider grants), from its JSON.
fn account_scope(a: &Value) -> String {
    let mailboxes: Vec<&str> = a["mailboxes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let who = if mailboxes.is_empty() {
        "every mailbox".to_string()
    } else {
        format!("only {}", mailboxes.join(", "))
    };
    if a["wildcard"] == true {
        format!("whole domain {}, {who}", s(a, "domain"))
    } else {
        who
    }
}

fn account_granted(a: &Value, hosting: &str) -> String {
    let mailboxes: Vec<&str> = a["mailboxes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let what = if a["wildcard"] == true {
        format!("every address of {}", s(a, "domain"))
    } else {
        s(a, "address")
    };
    if mailboxes.is_empty() {
        format!("{what} may now be used as sender by every mailbox of {hosting}")
    } else {
        format!(
            "{what} may now be used as sender by {} (hosting {hosting})",
            mailboxes.join(", ")
        )
    }
}
