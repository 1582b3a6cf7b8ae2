//! A real authoritative DNS server for tests: hickory-server on 127.0.0.1 (UDP and TCP on
//! the same OS-assigned port), serving one in-memory zone whose records the test changes at
//! run time.
//!
//! All methods are synchronous: the server runs on its own thread with its own tokio
//! runtime, so `TestDns` works the same from a plain `#[test]` and from inside a
//! `#[tokio::test]` (any flavor). Setters return once the change is visible to the next
//! query. Dropping the value (or `stop()`) shuts the server down and closes its sockets;
//! queries to `addr()` then fail (timeout or refused).
//!
//! Names are fully qualified (`"a.example."`) or relative to the zone (`"a"`, `"a.example"`
//! also works: a name that already ends in the zone is taken as absolute).
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use hickory_server::{
    Server,
    proto::rr::{
        LowerName, Name, RData, Record, RecordSet, RecordType, RrKey,
        rdata::{A, CNAME, SOA, TXT},
    },
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};
use tokio::{
    net::{TcpListener, UdpSocket},
    runtime::Handle,
    sync::oneshot,
};

/// TTL of the records served (short: nothing should cache them anyway).
const TTL: u32 = 1;

type Zone = InMemoryZoneHandler;
type Job = Box<dyn FnOnce(Arc<Zone>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// An in-process authoritative DNS server for one zone. See the module docs.
pub struct TestDns {
    addr: SocketAddr,
    origin: Name,
    zone: Arc<Zone>,
    /// More zones served by the same server (see [`TestDns::start_zones_on`]).
    extra: Vec<(Name, Arc<Zone>)>,
    handle: Handle,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestDns {
    /// Start a server for `zone` (e.g. `"example"` or `"example."`) on 127.0.0.1:<free port>.
    /// The zone starts with only its SOA and NS records.
    pub fn start(zone: &str) -> TestDns {
        TestDns::start_bound(&[zone], None)
    }

    /// Like [`TestDns::start`], on port 53 of `ip` (UDP and TCP): where a resolver that
    /// knows no port numbers (resolv.conf, NS records) finds it. Needs root; pick a
    /// loopback address of your own (any 127.x.y.z) so tests do not collide.
    pub fn start_on(zone: &str, ip: Ipv4Addr) -> TestDns {
        TestDns::start_bound(&[zone], Some(SocketAddr::from((ip, 53))))
    }

    /// Like [`TestDns::start_on`], serving several zones, as a recursive resolver answers
    /// for any. Names are relative to the first zone; give names in the others fully
    /// qualified (`"ns.other.example."`): each change goes to the zone that holds the name.
    pub fn start_zones_on(zones: &[&str], ip: Ipv4Addr) -> TestDns {
        TestDns::start_bound(zones, Some(SocketAddr::from((ip, 53))))
    }

    fn start_bound(zones: &[&str], bind: Option<SocketAddr>) -> TestDns {
        let origins: Vec<Name> = zones
            .iter()
            .map(|zone| {
                Name::from_ascii(format!("{}.", zone.trim_end_matches('.')))
                    .unwrap_or_else(|e| panic!("TestDns: bad zone name {zone:?}: {e}"))
            })
            .collect();
        let origin = origins.first().cloned().expect("TestDns: no zone");
        let (ready_tx, ready_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let thread_origins = origins.clone();
        let thread = std::thread::Builder::new()
            .name(format!("test-dns-{origin}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("TestDns: tokio runtime");
                rt.block_on(async move {
                    let mut catalog = Catalog::new();
                    let mut zones = Vec::new();
                    for origin in &thread_origins {
                        let zone = Arc::new(new_zone(origin));
                        catalog.upsert(
                            LowerName::new(origin),
                            vec![zone.clone() as Arc<dyn ZoneHandler>],
                        );
                        zones.push(zone);
                    }
                    let (udp, tcp) = match bind {
                        None => bind_same_port().await,
                        Some(addr) => bind_exactly(addr).await,
                    };
                    let addr = udp.local_addr().expect("TestDns: local_addr");
                    let mut server = Server::new(catalog);
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(5), 32);
                    ready_tx
                        .send((addr, zones, Handle::current()))
                        .expect("TestDns: start() went away");
                    // Serve until stop()/drop (or until the TestDns is gone).
                    let _ = shutdown_rx.await;
                    drop(server); // aborts the listener tasks
                });
                // Dropping the runtime aborts anything left and closes the sockets.
            })
            .expect("TestDns: spawn thread");
        let (addr, mut zones, handle) = ready_rx.recv().expect("TestDns: server thread failed");
        let extra = origins
            .into_iter()
            .skip(1)
            .zip(zones.split_off(1))
            .collect();
        TestDns {
            addr,
            origin,
            zone: zones.remove(0),
            extra,
            handle,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// Same as [`TestDns::start`] (kept for tests written against the blocking names).
    pub fn start_blocking(zone: &str) -> TestDns {
        TestDns::start(zone)
    }

    /// The address (UDP and TCP) to use as nameserver, e.g. in `dns.nameservers`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The zone's origin, fully qualified (`"example."`).
    pub fn zone(&self) -> String {
        self.origin.to_ascii()
    }

    /// Replace every record at `name` by ONE TXT record made of these character-strings.
    pub fn set_txt(&self, name: &str, strings: &[&str]) {
        let name = self.name(name);
        let rdata = txt(strings);
        self.edit(name.clone(), move |records| {
            remove_name(records, &name);
            insert(records, &name, rdata);
        });
    }

    /// Add one more TXT record (these character-strings) at `name`; a CNAME there is removed.
    pub fn add_txt(&self, name: &str, strings: &[&str]) {
        let name = self.name(name);
        let rdata = txt(strings);
        self.edit(name.clone(), move |records| {
            records.remove(&RrKey::new(LowerName::new(&name), RecordType::CNAME));
            insert(records, &name, rdata);
        });
    }

    /// Make `name` a CNAME to `target` (replaces every record at `name`). `target` is
    /// relative to the zone or fully qualified; it may point outside the zone.
    pub fn set_cname(&self, name: &str, target: &str) {
        let name = self.name(name);
        let target = self.name(target);
        self.edit(name.clone(), move |records| {
            remove_name(records, &name);
            insert(records, &name, RData::CNAME(CNAME(target)));
        });
    }

    /// Replace every record at `name` by one A record: the name exists, without TXT.
    pub fn set_a(&self, name: &str, ip: Ipv4Addr) {
        let name = self.name(name);
        self.edit(name.clone(), move |records| {
            remove_name(records, &name);
            insert(records, &name, RData::A(A(ip)));
        });
    }

    /// Replace the zone's NS set by these server names (relative to the zone or fully
    /// qualified); give them addresses with [`TestDns::set_a`].
    pub fn set_ns(&self, servers: &[&str]) {
        let origin = self.origin.clone();
        let servers: Vec<Name> = servers.iter().map(|s| self.name(s)).collect();
        self.edit(origin.clone(), move |records| {
            records.remove(&RrKey::new(LowerName::new(&origin), RecordType::NS));
            for ns in servers {
                insert(
                    records,
                    &origin,
                    RData::NS(hickory_server::proto::rr::rdata::NS(ns)),
                );
            }
        });
    }

    /// Remove every record at `name` (it then answers NXDOMAIN, unless it has children).
    pub fn remove(&self, name: &str) {
        let name = self.name(name);
        self.edit(name.clone(), move |records| remove_name(records, &name));
    }

    /// Shut the server down (same as dropping it): its sockets are closed when this returns.
    pub fn stop(self) {}

    // Blocking aliases: every method already is synchronous.
    pub fn set_txt_blocking(&self, name: &str, strings: &[&str]) {
        self.set_txt(name, strings)
    }
    pub fn add_txt_blocking(&self, name: &str, strings: &[&str]) {
        self.add_txt(name, strings)
    }
    pub fn set_cname_blocking(&self, name: &str, target: &str) {
        self.set_cname(name, target)
    }
    pub fn set_a_blocking(&self, name: &str, ip: Ipv4Addr) {
        self.set_a(name, ip)
    }
    pub fn remove_blocking(&self, name: &str) {
        self.remove(name)
    }

    /// `name` made absolute: kept when it ends with a dot or already lies in the zone,
    /// otherwise the zone is appended.
    fn name(&self, name: &str) -> Name {
        let name = name.trim();
        let parsed =
            Name::from_ascii(name).unwrap_or_else(|e| panic!("TestDns: bad name {name:?}: {e}"));
        if name.ends_with('.') {
            return parsed;
        }
        let absolute = {
            let mut n = parsed.clone();
            n.set_fqdn(true);
            n
        };
        if self.origin.zone_of(&absolute) {
            absolute
        } else {
            parsed
                .append_domain(&self.origin)
                .unwrap_or_else(|e| panic!("TestDns: name {name:?} too long: {e}"))
        }
    }

    /// Run `f` on the zone's records (under the zone's write lock) on the server's runtime
    /// and wait for it. Works from sync code and from inside any tokio runtime.
    /// The zone is the one that holds `at` (the first zone when none does).
    fn edit(
        &self,
        at: Name,
        f: impl FnOnce(&mut BTreeMap<RrKey, Arc<RecordSet>>) + Send + 'static,
    ) {
        let job: Job = Box::new(move |zone: Arc<Zone>| {
            Box::pin(async move {
                let mut records = zone.records_mut().await;
                f(&mut records);
            })
        });
        let (done_tx, done_rx) = mpsc::channel();
        let zone = self
            .extra
            .iter()
            .find(|(origin, _)| origin.zone_of(&at))
            .map_or_else(|| self.zone.clone(), |(_, zone)| zone.clone());
        self.handle.spawn(async move {
            job(zone).await;
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("TestDns: server thread did not apply the change (stopped?)");
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A zone holding only SOA and NS at the origin.
fn new_zone(origin: &Name) -> Zone {
    let mut zone = Zone::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let ns = Name::from_ascii("ns.")
        .unwrap()
        .append_domain(origin)
        .expect("ns name");
    let soa = SOA::new(
        ns.clone(),
        Name::from_ascii("hostmaster.")
            .unwrap()
            .append_domain(origin)
            .expect("rname"),
        1,
        3600,
        600,
        86400,
        0, // negative-caching TTL 0: nobody should cache "not found"
    );
    let records = zone.records_get_mut();
    insert(records, origin, RData::SOA(soa));
    insert(
        records,
        origin,
        RData::NS(hickory_server::proto::rr::rdata::NS(ns.clone())),
    );
    insert(records, &ns, RData::A(A(Ipv4Addr::LOCALHOST)));
    zone
}

fn txt(strings: &[&str]) -> RData {
    RData::TXT(TXT::new(strings.iter().map(|s| s.to_string()).collect()))
}

/// Add `rdata` to the record set of its type at `name`.
fn insert(records: &mut BTreeMap<RrKey, Arc<RecordSet>>, name: &Name, rdata: RData) {
    let rtype = rdata.record_type();
    let set = records
        .entry(RrKey::new(LowerName::new(name), rtype))
        .or_insert_with(|| Arc::new(RecordSet::with_ttl(name.clone(), rtype, TTL)));
    Arc::make_mut(set).insert(Record::from_rdata(name.clone(), TTL, rdata), 0);
}

fn remove_name(records: &mut BTreeMap<RrKey, Arc<RecordSet>>, name: &Name) {
    let lower = LowerName::new(name);
    records.retain(|key, _| key.name != lower);
}

/// Bind UDP and TCP to exactly `addr`.
async fn bind_exactly(addr: SocketAddr) -> (UdpSocket, TcpListener) {
    let udp = UdpSocket::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("TestDns: bind UDP {addr}: {e} (port 53 needs root)"));
    let tcp = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("TestDns: bind TCP {addr}: {e} (port 53 needs root)"));
    (udp, tcp)
}

/// Bind UDP to 127.0.0.1:0, then TCP to the same port; retry when that port is taken.
async fn bind_same_port() -> (UdpSocket, TcpListener) {
    let mut last_err = None;
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("TestDns: bind UDP");
        let port = udp.local_addr().expect("TestDns: local_addr").port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) => last_err = Some(e),
        }
    }
    panic!("TestDns: no port free for both UDP and TCP: {last_err:?}");
}
