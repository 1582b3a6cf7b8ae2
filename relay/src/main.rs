//! `domauth`: the SMTP submission relay (`serve`) and its management CLI,
//! which talks to the running server over the admin socket.

use domauth::{admin, config, server, tls};

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use admin::commands::Command as Admin;

#[derive(Parser)]
#[command(
    name = "domauth",
    version,
    about = "SMTP submission relay with DNS-verified external sender domains"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Machine-readable output (management commands).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay.
    Serve,
    /// Validate the configuration and that the TLS certificate and key load
    /// and match, without starting anything; exit 0, or 1 with one line.
    CheckConfig,
    /// Hostings (tenants) and their own domains.
    #[command(subcommand)]
    Hosting(HostingCmd),
    /// Mailboxes (SMTP AUTH logins).
    #[command(subcommand)]
    Mailbox(MailboxCmd),
    /// External domains a hosting proves it controls with a DNS TXT record.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Addresses of verified domains that every mailbox of a hosting may use.
    #[command(subcommand)]
    Account(AccountCmd),
    /// The delivery queue.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Why a login may or may not send as an address.
    Explain {
        #[arg(long)]
        login: String,
        #[arg(long)]
        sender: String,
    },
}

#[derive(Subcommand)]
enum HostingCmd {
    /// Add a hosting with its own domains.
    Add {
        name: String,
        #[arg(long = "domain", required = true)]
        domains: Vec<String>,
    },
    List,
    /// Set the dashboard password (first line of stdin).
    Passwd {
        name: String,
    },
    /// Make an API bearer token (printed once), or revoke all of them.
    Token {
        name: String,
        /// Invalidate every token of this hosting.
        #[arg(long)]
        revoke: bool,
    },
}

#[derive(Subcommand)]
enum MailboxCmd {
    /// Add a mailbox; the password is the first line of stdin.
    Add {
        address: String,
    },
    /// Change a mailbox's password (first line of stdin).
    Passwd {
        address: String,
    },
    List {
        #[arg(long)]
        hosting: Option<String>,
    },
    Delete {
        address: String,
    },
}

#[derive(Subcommand)]
enum DomainCmd {
    /// Add an external domain; prints the TXT record to publish.
    Add {
        domain: String,
        #[arg(long)]
        hosting: String,
    },
    /// Status and the TXT record to publish.
    Show {
        domain: String,
        #[arg(long)]
        hosting: String,
    },
    List {
        #[arg(long)]
        hosting: String,
    },
    /// Check DNS now; exit 0 only when verified.
    Verify {
        domain: String,
        #[arg(long)]
        hosting: String,
    },
    /// Delete the domain and its accounts.
    Delete {
        domain: String,
        #[arg(long)]
        hosting: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Make a new DKIM selector pair; the old one signs until the new records are verified.
    #[command(name = "dkim-rotate")]
    DkimRotate {
        domain: String,
        #[arg(long)]
        hosting: String,
    },
}

#[derive(Subcommand)]
enum AccountCmd {
    /// `'*@DOMAIN'` grants every address of the domain.
    Add {
        #[arg(required = true)]
        addresses: Vec<String>,
        #[arg(long)]
        hosting: String,
        /// Only this mailbox of the hosting may use the account (repeatable).
        #[arg(long = "mailbox")]
        mailboxes: Vec<String>,
    },
    List {
        #[arg(long)]
        hosting: String,
        #[arg(long)]
        domain: Option<String>,
    },
    Delete {
        address: String,
        #[arg(long)]
        hosting: String,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    List,
    Show { id: String },
    Retry { id: String },
    Delete { id: String },
}

fn admin_command(cmd: Cmd) -> Option<Admin> {
    Some(match cmd {
        // `check-config` never gets here: `main` answers it first.
        Cmd::Serve | Cmd::CheckConfig => return None,
        Cmd::Hosting(c) => match c {
            HostingCmd::Add { name, domains } => Admin::HostingAdd { name, domains },
            HostingCmd::List => Admin::HostingList,
            HostingCmd::Passwd { name } => Admin::HostingPasswd { name },
            HostingCmd::Token { name, revoke } => Admin::HostingToken { name, revoke },
        },
        Cmd::Mailbox(c) => match c {
            MailboxCmd::Add { address } => Admin::MailboxAdd { address },
            MailboxCmd::Passwd { address } => Admin::MailboxPasswd { address },
            MailboxCmd::List { hosting } => Admin::MailboxList { hosting },
            MailboxCmd::Delete { address } => Admin::MailboxDelete { address },
        },
        Cmd::Domain(c) => match c {
            DomainCmd::Add { domain, hosting } => Admin::DomainAdd { domain, hosting },
            DomainCmd::Show { domain, hosting } => Admin::DomainShow { domain, hosting },
            DomainCmd::List { hosting } => Admin::DomainList { hosting },
            DomainCmd::Verify { domain, hosting } => Admin::DomainVerify { domain, hosting },
            DomainCmd::Delete {
                domain,
                hosting,
                yes,
            } => Admin::DomainDelete {
                domain,
                hosting,
                yes,
            },
            DomainCmd::DkimRotate { domain, hosting } => {
                Admin::DomainDkimRotate { domain, hosting }
            }
        },
        Cmd::Account(c) => match c {
            AccountCmd::Add {
                addresses,
                hosting,
                mailboxes,
            } => Admin::AccountAdd {
                addresses,
                hosting,
                mailboxes,
            },
            AccountCmd::List { hosting, domain } => Admin::AccountList { hosting, domain },
            AccountCmd::Delete { address, hosting } => Admin::AccountDelete { address, hosting },
        },
        Cmd::Queue(c) => match c {
            QueueCmd::List => Admin::QueueList,
            QueueCmd::Show { id } => Admin::QueueShow { id },
            QueueCmd::Retry { id } => Admin::QueueRetry { id },
            QueueCmd::Delete { id } => Admin::QueueDelete { id },
        },
        Cmd::Explain { login, sender } => Admin::Explain { login, sender },
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("domauth: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let config = match config::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("domauth: {e}");
            return ExitCode::from(1);
        }
    };
    if let Cmd::CheckConfig = cli.command {
        return check_config(&cli.config, &config);
    }
    let Some(command) = admin_command(cli.command) else {
        let log_format = config.log.format;
        init_logging(log_format);
        bound_malloc_retention();
        return match runtime.block_on(server::run(config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // One line on stderr (where the log goes too), nothing else;
                // in the log's own format, so a JSON reader parses it too.
                match log_format {
                    config::LogFormat::Text => eprintln!("domauth: {e}"),
                    config::LogFormat::Json => {
                        tracing::error!(event = "fatal", error = %e, "domauth: {e}")
                    }
                }
                ExitCode::from(1)
            }
        };
    };
    restore_sigpipe();
    let client = admin::client::AdminClient::new(&config.server.admin_socket);
    match runtime.block_on(admin::commands::run(&client, command, cli.json)) {
        Ok(done) if done.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("domauth: {e}");
            ExitCode::from(1)
        }
    }
}

/// Rust ignores SIGPIPE, so `domauth domain list | head -1` would panic on
/// the closed pipe. A management command behaves like any Unix tool and ends
/// quietly instead. (`serve` keeps ignoring it: a client closing its socket
/// must not kill the server.)
fn restore_sigpipe() {
    // SAFETY: resetting a signal disposition before any thread writes.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// glibc raises its mmap threshold each time a large block is freed, after
/// which Argon2's 19 MiB buffers come from per-thread arenas that keep the
/// memory: a few dozen logins on different blocking threads left hundreds
/// of MiB resident. A fixed threshold sends every block of 1 MiB or more
/// straight back to the OS when freed.
fn bound_malloc_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread
    // of ours allocates large blocks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// One line per event on stderr (journald adds the timestamp under
/// systemd); `RUST_LOG` adjusts the level, default `info`. `[log] format =
/// "json"`: one JSON object a line, the event's fields at the top level.
fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        config::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// `domauth check-config`: the file parsed and validated already (else
/// `main` printed its one line); the TLS pair and the upstream password
/// file must load too. Nothing is created, bound or started.
fn check_config(path: &std::path::Path, config: &config::Config) -> ExitCode {
    let checked = tls::check(&config.tls).and_then(|()| config.upstream_password().map(|_| ()));
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("domauth: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}
