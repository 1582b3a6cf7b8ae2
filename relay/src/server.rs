//! `domauth serve`: opens the store, starts the queue, the verifier and the
//! admin API, owns the accept loops and the connection limits, and shuts
//! down gracefully on SIGTERM / SIGINT (stop accepting, let sessions finish
//! within `server.shutdown_timeout`, flush, exit 0).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use domauth_store::{Queue, Store, StoreError};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    signal::unix::{SignalKind, signal},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};

use crate::{
    admin,
    config::Config,
    policy::StorePolicy,
    queue::{self, QueueSettings},
    smtp::{
        auth::{AuthSettings, Authenticator},
        conn::{self, ConnContext},
        reply,
        session::{Listener, SessionConfig},
    },
    spool::Spool,
    tls,
    upstream::Upstream,
    verify::Verifier,
    verify_dns::DnsChecker,
};

/// Connections per client IP (SPEC §4 limits). The guard gives the slot
/// back when the connection ends.
#[derive(Clone)]
struct PerIpLimit {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

struct IpSlot {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIpLimit {
    fn acquire(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

pub async fn run(config: Config) -> Result<(), String> {
    let s = &config.server;
    // Before anything starts: a passwd-file that cannot be read stops start-up.
    let passwords = crate::passwords::Backend::from_config(&config.auth)?;
    std::fs::create_dir_all(&s.data_dir).map_err(|e| {
        format!(
            "server.data_dir: cannot create {}: {e}",
            s.data_dir.display()
        )
    })?;
    let store_dir = s.data_dir.join("store");
    // `[store] backend = "postgres"`: the shared database (SPEC §11) instead of sled.
    let store = match crate::store_open::shared(&config.store)? {
        Some(shared) => shared,
        None => Store::open(&store_dir).map_err(|e| match &e {
            StoreError::DiskFull(_) => format!(
                "server.data_dir: the disk is full: cannot open the store in {} ({e})",
                store_dir.display()
            ),
            StoreError::Locked(_) => format!(
                "server.data_dir: the store in {} is locked: is another domauth running on it?",
                store_dir.display()
            ),
            _ => format!(
                "server.data_dir: cannot open the store in {}: {e}",
                store_dir.display()
            ),
        })?,
    };
    let queue_dir = s.data_dir.join("queue");
    let (queue, opened) = Queue::open(&queue_dir, config.queue.sync).map_err(|e| match &e {
        StoreError::DiskFull(_) => format!(
            "server.data_dir: the disk is full: cannot open the queue in {} ({e})",
            queue_dir.display()
        ),
        _ => format!(
            "server.data_dir: cannot open the queue in {}: {e}",
            queue_dir.display()
        ),
    })?;
    // What a crash left half-written is swept; damaged files are kept and held.
    tracing::info!(
        event = "queue_opened",
        messages = opened.messages.len(),
        damaged = opened.damaged.len(),
        incomplete_removed = opened.incomplete_removed,
        orphan_states_removed = opened.orphan_states_removed,
        "queue opened"
    );
    for (id, why) in &opened.damaged {
        tracing::error!(event = "message_held", id = %id, error = %why, "queued message damaged; held, see `domauth queue show`");
    }
    let (tls, certs) = tls::reloadable_acceptor(&config.tls, &s.hostname)?;
    let dns = dns_checker(&config)?;
    let upstream = Upstream::from_config(&config)?;

    let (shutdown_tx, shutdown) = watch::channel(false);
    let (queue_handle, queue_rx) = queue::channel();
    let signer = config
        .deliverability
        .dkim
        .then(|| crate::dkim::Signer::new(store.clone()));
    let spool = Spool::start(queue.clone(), queue_handle.clone(), signer)?;
    let workers = queue::start(
        queue.clone(),
        opened.messages,
        spool.clone(),
        upstream,
        QueueSettings {
            retry_initial: config.queue.retry_initial.get(),
            retry_max: config.queue.retry_max.get(),
            max_lifetime: config.queue.max_lifetime.get(),
            concurrency: config.queue.concurrency,
            hostname: s.hostname.clone(),
            dead_after: config.queue.dead_after,
            probe_interval: config.queue.probe_interval.get(),
        },
        queue_rx,
        shutdown.clone(),
    );
    let dkim_keys = crate::dkim_keys::DkimKeys::new(
        store.clone(),
        dns.clone(),
        config.verification.clone(),
        config.deliverability.dkim,
    );
    let dkim_task = tokio::spawn(dkim_keys.clone().run(shutdown.clone()));
    let verifier = Verifier::with_spf_include(
        store.clone(),
        dns,
        config.verification.clone(),
        config.deliverability.spf_include.clone(),
    );
    let verifier_task = tokio::spawn(verifier.clone().run(shutdown.clone()));
    let ops = crate::ops::Ops::new(
        store.clone(),
        verifier.clone(),
        passwords.clone(),
        dkim_keys.clone(),
    );
    let admin_task = admin::server::serve(
        &s.admin_socket,
        admin::server::AdminState {
            store: store.clone(),
            verifier,
            queue,
            scheduler: queue_handle,
            passwords: passwords.clone(),
            dkim: dkim_keys,
            ops: ops.clone(),
        },
        shutdown.clone(),
    )
    .await?;

    let l = &config.limits;
    let auth = Authenticator::new(
        store.clone(),
        AuthSettings {
            failures: l.auth_failures,
            window: l.auth_window.get(),
            failure_delay: l.auth_failure_delay.get(),
            cache_ttl: Duration::from_secs(300),
            passwords,
        },
    )?;
    let ctx = Arc::new(ConnContext {
        session: Arc::new(SessionConfig {
            hostname: s.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_errors: l.max_errors,
            smtputf8: config.upstream.smtputf8,
        }),
        policy: Arc::new(StorePolicy {
            store: store.clone(),
        }),
        auth,
        spool,
        tls,
        idle_timeout: l.idle_timeout.get(),
        data_timeout: l.data_timeout.get(),
        max_line_length: l.max_line_length,
    });
    let connections = Arc::new(Semaphore::new(l.max_connections));
    let per_ip = PerIpLimit {
        max: l.max_connections_per_ip,
        counts: Arc::default(),
    };

    let mut accept_loops = Vec::new();
    // The panel and the API (SPEC §8), bound before the SMTP listeners.
    accept_loops.extend(crate::panel::serve(&config, ops, shutdown.clone()).await?);
    for (addrs, kind, key) in [
        (&s.submission, Listener::Submission, "server.submission"),
        (&s.submissions, Listener::Submissions, "server.submissions"),
    ] {
        for addr in addrs {
            let listener = listen(*addr, l.max_connections)
                .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
            tracing::info!(event = "listening", addr = %addr, listener = ?kind, "listening");
            accept_loops.push(tokio::spawn(accept_loop(
                listener,
                kind,
                ctx.clone(),
                connections.clone(),
                per_ip.clone(),
                shutdown.clone(),
            )));
        }
    }
    crate::reload::on_sighup(certs, shutdown.clone())?;
    crate::notify::spawn(
        crate::notify::StatusSource {
            connections: connections.clone(),
            max_connections: l.max_connections,
            queue_dir: queue_dir.clone(),
        },
        shutdown.clone(),
    );
    crate::notify::ready();
    let metrics_tasks = crate::metrics::serve(&config.metrics.listen, shutdown.clone()).await;
    tracing::info!(
        event = "started",
        admin_socket = %s.admin_socket.display(),
        upstream = %format!("{}:{}", config.upstream.host, config.upstream.port),
        "domauth is ready"
    );

    wait_for_signal().await?;
    crate::notify::stopping();
    tracing::info!(
        event = "shutdown",
        "stopping: no new connections; open sessions may finish"
    );
    // Everything below fits in `shutdown_timeout`, whatever clients and the
    // upstream do: what is cut short is still on disk and goes out next time.
    let deadline = tokio::time::Instant::now()
        .checked_add(s.shutdown_timeout.get())
        .unwrap_or_else(tokio::time::Instant::now);
    let _ = shutdown_tx.send(true);
    for task in accept_loops {
        let _ = task.await;
    }
    // Every connection holds a permit: having them all back means every
    // session has ended.
    let all = u32::try_from(l.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout_at(deadline, connections.acquire_many(all)).await;
    if drained.is_err() {
        tracing::warn!(
            event = "shutdown_timeout",
            "sessions still open after the shutdown timeout; closing them"
        );
    }
    // Deliveries in progress may finish until the deadline; then they are
    // dropped (the connection closes before the final dot, so upstream
    // discards the message, which stays queued).
    for w in workers {
        let abort = w.abort_handle();
        if tokio::time::timeout_at(deadline, w).await.is_err() {
            abort.abort();
        }
    }
    verifier_task.abort();
    dkim_task.abort();
    metrics_tasks.iter().for_each(|t| t.abort());
    let _ = tokio::time::timeout_at(deadline, admin_task).await;
    store
        .flush()
        .map_err(|e| format!("final flush failed: {e}"))?;
    let _ = std::fs::remove_file(&s.admin_socket);
    tracing::info!(event = "stopped", "domauth stopped");
    Ok(())
}

/// DNS only serves domain verification, so a machine without a usable
/// resolv.conf (a bare container) still relays mail: the checks then go to
/// 127.0.0.1:53 and report `dns error` until `dns.nameservers` is set.
/// With `dns.nameservers` empty the checks ask the authoritative servers
/// (SPEC §9), found through the nameservers of `dns.resolv_conf`.
fn dns_checker(config: &Config) -> Result<DnsChecker, String> {
    let timeout = config.dns.timeout.get();
    let checker = if config.dns.nameservers.is_empty() {
        crate::verify_dns::system_nameservers_from(&config.dns.resolv_conf)
            .and_then(|bootstrap| DnsChecker::authoritative(&bootstrap, timeout))
    } else {
        DnsChecker::new(&config.dns.nameservers, timeout)
    };
    match checker {
        Ok(dns) => Ok(dns),
        Err(e) if config.dns.nameservers.is_empty() => {
            tracing::warn!(
                event = "no_nameserver",
                error = %e,
                "no system nameserver; domain checks use 127.0.0.1:53 until dns.nameservers is set"
            );
            DnsChecker::authoritative(&[SocketAddr::from(([127, 0, 0, 1], 53))], timeout)
                .map_err(|e| format!("dns.nameservers: {e}"))
        }
        Err(e) => Err(format!("dns.nameservers: {e}")),
    }
}

async fn wait_for_signal() -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signals: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signals: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A listening socket whose accept queue holds a burst of `max_connections`
/// clients. `TcpListener::bind` asks for 128, as std does: 500 clients
/// connecting at once while both cores are busy with TLS handshakes overflowed
/// it, and the kernel then completed those connections only at the fifth SYN-ACK
/// retransmission, 31 s later (`nstat` TcpExtListenOverflows; bench/run's
/// concurrency sweep saw it as sessions without a greeting). The kernel caps the
/// value at `net.core.somaxconn` (4096 on current Linux).
fn listen(addr: SocketAddr, max_connections: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As TcpListener::bind does: a restarted relay can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections.clamp(128, 65_535)).unwrap_or(4096))
}

/// The next connection on `listener`, or `None` at shutdown. An accept error (EMFILE
/// and friends) is logged and retried after a pause instead of spinning.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return None,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    ctx: Arc<ConnContext>,
    connections: Arc<Semaphore>,
    per_ip: PerIpLimit,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((tcp, peer)) = next_connection(&listener, &mut shutdown, "smtp").await {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                refuse(tcp, peer, kind, "max_connections");
                continue;
            }
        };
        let Some(slot) = per_ip.acquire(peer.ip()) else {
            refuse(tcp, peer, kind, "max_connections_per_ip");
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            conn::serve(tcp, peer, kind, ctx, shutdown).await;
            drop(slot);
            drop::<OwnedSemaphorePermit>(permit);
        });
    }
}

/// Over a connection limit: `421 4.7.0` at once and close (plaintext
/// listener; on the implicit-TLS one a plaintext line would be noise, so
/// the connection is just closed).
fn refuse(mut tcp: TcpStream, peer: SocketAddr, kind: Listener, limit: &'static str) {
    tracing::warn!(event = "connection_refused", peer = %peer, limit, "connection limit reached");
    crate::metrics::connection_refused(limit);
    if kind == Listener::Submissions {
        return;
    }
    tokio::spawn(async move {
        let mut out = Vec::new();
        reply::too_many_connections().write_to(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&out)).await;
        let _ = tcp.shutdown().await;
    });
}
