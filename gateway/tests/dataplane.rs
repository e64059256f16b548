//! The sockmap data plane on a real kernel: pairs spliced with no TCP data segments on the
//! loopback hop, the kernel refusing what the registry forbids even when user space does not, the
//! cgroup closed to untagged sockets, the ABI checked against the object's BTF, and restarts
//! (clean or kill -9) that leave nothing behind.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use cmx_testbed::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// These tests count kernel objects: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A sockmap gateway whose registry holds srv1 (may listen on 1883), and srv1's key.
async fn sockmap_gateway_for_srv1(hosts: &Hosts) -> (Key, GatewayProc) {
    let srv1 = Key::generate(hosts.dir.path(), "srv1");
    let registry = RegistryText::default()
        .srv1(&srv1, "permit_listen = [\"1883\"]")
        .build();
    let gw = GatewayProc::start_with(hosts, &registry, "", "sockmap", &[]).await;
    (srv1, gw)
}

/// `data_segs_out` of the TCP sockets in `ns` whose local address is `[addr]`.
fn data_segs_out(ns: &Netns, local: &str) -> Vec<u64> {
    let out = ns
        .command("ss")
        .args(["-tinH", "state", "established", "src", &format!("[{local}]")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // One socket per two lines: the addresses, then the tcp_info fields.
    text.lines()
        .filter(|l| l.contains("cubic") || l.contains("rtt:") || l.contains("segs_out"))
        .map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("data_segs_out:"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loopback_hop_carries_no_tcp_data_segments_with_sockmap() {
    let _serial = SERIAL.lock().await;
    let mut segments = BTreeMap::new();
    for mode in ["sockmap", "userspace"] {
        let hosts = Hosts::new();
        let (srv1, dev1, registry) = srv1_publishes_dev1_opens(&hosts);
        let gw = GatewayProc::start_with(&hosts, &registry, "", mode, &[]).await;
        let ready = gw
            .log
            .wait_event("ready", |e| matches!(e, GatewayEvent::Ready { .. }))
            .await;
        assert!(
            matches!(&ready, GatewayEvent::Ready { dataplane, .. } if dataplane == mode),
            "{ready:?}"
        );
        let (_echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;
        let _dev = SshAgent::start(
            &hosts,
            &hosts.dev,
            "dev1",
            &dev1,
            &["-L", "127.0.0.1:11883:srv1:1883"],
        );

        let mut c = hosts.dev.connect_retry("127.0.0.1:11883").await;
        let data = pattern(4 << 20, 9);
        let mut got = vec![0u8; data.len()];
        let (mut r, mut w) = c.split();
        let (wr, rd) = tokio::join!(w.write_all(&data), r.read_exact(&mut got));
        wr.unwrap();
        rd.unwrap();
        assert!(got == data, "{mode}: echoed bytes differ");
        // Both ends of the pair, while it is open.
        let id_side = data_segs_out(&hosts.gw, DEV1_ADDR);
        let mir_side = data_segs_out(&hosts.gw, "fd63:6d78::1");
        assert_eq!(
            (id_side.len(), mir_side.len()),
            (1, 1),
            "{mode}: one socket on each side of the pair"
        );
        segments.insert(mode, (id_side[0], mir_side[0]));
        // Half-close through the splice: the echo answers EOF with EOF.
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(T, c.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        let closed = gw
            .log
            .wait_audit("pair closed", |r| r.event == AuditEvent::PairClosed)
            .await;
        if mode == "sockmap" {
            assert_eq!(closed.spliced_to_target, Some(4 << 20), "{closed:?}");
            assert_eq!(closed.spliced_from_target, Some(4 << 20), "{closed:?}");
        } else {
            assert_eq!(closed.spliced, Some(false), "{closed:?}");
        }
    }
    eprintln!("data segments on the loopback hop (ID side, Mir side): {segments:?}");
    assert_eq!(
        segments["sockmap"],
        (0, 0),
        "spliced: no TCP data segment on the loopback hop"
    );
    let (id, mir) = segments["userspace"];
    assert!(
        id > 0 && mir > 0,
        "the measurement sees loopback segments without the splice: {segments:?}"
    );
}

fn kernel_denials(log: &LogBook) -> Vec<AuditRecord> {
    log.audits()
        .into_iter()
        .filter(|r| r.event == AuditEvent::KernelDeny)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kernel_refuses_what_the_registry_forbids_even_if_user_space_does_not() {
    let _serial = SERIAL.lock().await;
    for skip_userspace in [true, false] {
        let hosts = Hosts::new();
        let [srv1, srv2, dev1] = ["srv1", "srv2", "dev1"].map(|n| Key::generate(hosts.dir.path(), n));
        let registry = RegistryText::default()
            .srv1(&srv1, "permit_listen = [\"1883\"]")
            .srv2(&srv2)
            .dev1(&dev1, "permit_open = [\"srv1:1883\"]")
            .build();
        let args: &[&str] = if skip_userspace {
            &["--insecure-skip-userspace-policy"]
        } else {
            &[]
        };
        let gw = GatewayProc::start_with(&hosts, &registry, "", "sockmap", args).await;
        let canary2 = Echo::serve(hosts.srv.listen("127.0.0.1:5002"));
        let (_echo, _s1) = publish_echo(&hosts, &gw, &srv1, &[]).await;
        let _s2 = SshAgent::start(&hosts, &hosts.srv, "srv2", &srv2, &["-R", "1883:127.0.0.1:5002"]);
        gw.log
            .wait_event("srv2 published", forward_added("srv2", 1883))
            .await;

        // Connects outside the security context.
        let dev = SshAgent::start(
            &hosts,
            &hosts.dev,
            "dev1",
            &dev1,
            &["-L", "127.0.0.1:12001:srv2:1883"],
        );
        let srv_as_dev = SshAgent::start(
            &hosts,
            &hosts.srv,
            "srv1",
            &srv1,
            &["-L", "127.0.0.1:12002:srv2:1883"],
        );
        assert!(
            try_exchange(hosts.dev.connect_retry("127.0.0.1:12001").await, b"x")
                .await
                .is_empty()
        );
        assert!(
            try_exchange(hosts.srv.connect_retry("127.0.0.1:12002").await, b"x")
                .await
                .is_empty()
        );
        // Listens outside it.
        for (user, key, spec) in [
            ("srv1", &srv1, "8883:127.0.0.1:5001"),
            ("srv1", &srv1, "[fd63:6d78::2]:9000:127.0.0.1:5001"),
            ("dev1", &dev1, "1883:127.0.0.1:5001"),
        ] {
            let ns = if user == "dev1" { &hosts.dev } else { &hosts.srv };
            let mut agent = SshAgent::start(&hosts, ns, user, key, &["-R", spec]);
            agent.wait_exit(T).await;
            assert!(
                agent.output().contains("remote port forwarding failed"),
                "{spec}: {}",
                agent.output()
            );
        }
        assert_eq!(canary2.count(), 0, "srv2's service was never reached");

        if skip_userspace {
            // User space let everything through; the kernel refused each one and said so.
            let want = [
                ("connect6", "dev1", "[fd63:6d78::2]:1883"),
                ("connect6", "srv1", "[fd63:6d78::2]:1883"),
                ("bind6", "srv1", "[fd63:6d78::1]:8883"),
                ("bind6", "srv1", "[fd63:6d78::2]:9000"),
                ("bind6", "dev1", &format!("[{DEV1_ADDR}]:1883")),
            ];
            for (op, identity, address) in want {
                gw.log
                    .wait_audit(&format!("kernel refusal {op} {address}"), |r| {
                        r.event == AuditEvent::KernelDeny
                            && r.op.as_deref() == Some(op)
                            && r.address.as_deref() == Some(address)
                            && r.identity() == identity
                    })
                    .await;
            }
            dev.wait_output("Operation not permitted", T).await;
            srv_as_dev.wait_output("Operation not permitted", T).await;
        } else {
            // User space refuses first: nothing reaches the kernel.
            gw.log
                .wait_audit(
                    "user-space refusal",
                    forward_denied("dev1", "direct-tcpip srv2:1883", ""),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                kernel_denials(&gw.log).is_empty(),
                "{:?}",
                kernel_denials(&gw.log)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untagged_process_in_the_gateway_cgroup_cannot_reach_a_mir_sock() {
    let _serial = SERIAL.lock().await;
    let hosts = Hosts::new();
    let (srv1, gw) = sockmap_gateway_for_srv1(&hosts).await;
    let (echo, _srv) = publish_echo(&hosts, &gw, &srv1, &[]).await;
    let cgroup = gateway_cgroup(&hosts.gw);
    let script = format!(
        "import os, socket\nopen('{}/cgroup.procs', 'w').write(str(os.getpid()))\n\
         s = socket.socket(socket.AF_INET6)\ntry:\n    s.connect(('fd63:6d78::1', 1883))\n    print('connected')\n\
         except PermissionError as e:\n    print('refused:', e)\n",
        cgroup.display()
    );
    let out = hosts
        .gw
        .net_command("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "refused: [Errno 1] Operation not permitted",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = gw
        .log
        .wait_audit("kernel refusal", |r| {
            r.event == AuditEvent::KernelDeny && r.op.as_deref() == Some("connect6")
        })
        .await;
    assert!(d.reason().starts_with("untagged socket"), "{d:?}");
    assert_eq!(echo.count(), 0);
}

/// Sizes and field offsets (bytes) of each ABI struct as the object's BTF describes them.
fn btf_layouts() -> BTreeMap<String, (usize, BTreeMap<String, usize>)> {
    let object = cmx_gateway::ebpf::object().expect("the gateway was built with its eBPF object");
    let path = std::env::temp_dir().join(format!("cmx-abi-{}.o", std::process::id()));
    std::fs::write(&path, object).unwrap();
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&path)
        .output()
        .expect("bpftool");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut layouts = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("] STRUCT '").nth(1) {
            let name = rest.split('\'').next().unwrap().to_string();
            let size = rest
                .split("size=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap();
            layouts.insert(name.clone(), (size, BTreeMap::new()));
            current = Some(name);
        } else if line.starts_with('\t') {
            if let Some(name) = &current {
                let member = line
                    .trim()
                    .trim_start_matches('\'')
                    .split('\'')
                    .next()
                    .unwrap()
                    .to_string();
                let bits: usize = line.split("bits_offset=").nth(1).unwrap().trim().parse().unwrap();
                layouts.get_mut(name).unwrap().1.insert(member, bits / 8);
            }
        } else {
            current = None;
        }
    }
    layouts
}

#[test]
fn the_shared_types_match_the_objects_btf() {
    use cmx_ebpf_common::*;
    use std::mem::{offset_of, size_of};
    let btf = btf_layouts();
    /// (type name, size, [(field, offset)]) of a Rust definition.
    macro_rules! layout {
        ($t:ident: $($f:ident),+) => {
            (stringify!($t), size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f))),+])
        };
    }
    let rust = [
        layout!(Tag: conn_id, kind, _pad, addr),
        layout!(PairKey: conn_id, side, _pad),
        layout!(TupleKey: local, remote, local_port, remote_port),
        layout!(OpenKey: src, dst, port, _pad),
        layout!(ListenKey: owner, addr, port),
        layout!(PrefixConfig: addr, len, enabled),
        layout!(Denial: conn_id, cookie, op, reason, src, dst, port, _pad),
    ];
    for (name, size, fields) in rust {
        let (btf_size, btf_fields) = btf
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not in the object's BTF"));
        assert_eq!(*btf_size, size, "{name}: size");
        let fields: BTreeMap<String, usize> = fields.into_iter().map(|(f, o)| (f.to_string(), o)).collect();
        assert_eq!(btf_fields, &fields, "{name}: fields and offsets");
    }
}

fn cmx_objects() -> (usize, usize) {
    let count = |what: &str| {
        let out = Command::new("bpftool").args([what, "show"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" name cmx_"))
            .count()
    };
    (count("prog"), count("map"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_restarts_clean_or_killed_leave_nothing_behind() {
    let _serial = SERIAL.lock().await;
    let baseline = cmx_objects();
    let hosts = Hosts::new();
    let (_srv1, mut gw) = sockmap_gateway_for_srv1(&hosts).await;
    let loaded = cmx_objects();
    assert!(
        loaded.0 >= baseline.0 + 6,
        "six programs loaded: {baseline:?} -> {loaded:?}"
    );
    let pins = gateway_pin_dir(&hosts.gw);
    let cgroup = gateway_cgroup(&hosts.gw);
    for i in 0..20 {
        if i % 2 == 0 {
            gw.kill9();
        } else {
            gw.signal(libc::SIGTERM);
            assert_eq!(gw.wait_exit(T).await.code(), Some(0));
            assert!(!pins.exists(), "a clean exit removes the pins");
            assert!(!cgroup.exists(), "a clean exit removes the cgroup");
        }
        gw = GatewayProc::launch(&hosts).await;
        if i % 2 == 0 {
            assert!(
                gw.log
                    .find(|v| field(v, "message") == "replaced pins left by an earlier gateway")
                    .is_some(),
                "restart {i} after kill -9 replaced the stale pins"
            );
        }
        let ready = gw
            .log
            .wait_event("ready", |e| matches!(e, GatewayEvent::Ready { .. }))
            .await;
        assert!(
            matches!(&ready, GatewayEvent::Ready { dataplane, .. } if dataplane == "sockmap"),
            "restart {i}: {ready:?}"
        );
        assert_eq!(
            cmx_objects(),
            loaded,
            "restart {i}: one gateway's worth of programs and maps, no more"
        );
    }
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(T).await.code(), Some(0));
    assert_eq!(cmx_objects(), baseline, "nothing left after the last clean exit");
    assert!(!pins.exists() && !cgroup.exists());
}

/// The names pinned in `dir`, sorted (empty when it does not exist).
fn pinned(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_gateway_on_the_same_pins_or_cgroup_refuses_and_leaves_the_first_intact() {
    let _serial = SERIAL.lock().await;
    let hosts = Hosts::new();
    let (_srv1, mut first) = sockmap_gateway_for_srv1(&hosts).await;
    let pins = gateway_pin_dir(&hosts.gw);
    let cgroup = gateway_cgroup(&hosts.gw);
    let before = pinned(&pins);
    assert!(
        !before.is_empty(),
        "the first gateway pinned its maps and programs"
    );

    let other_pins = pins.with_file_name(format!("{}-second", hosts.gw.name));
    let other_cgroup = cgroup.with_file_name(format!("{}-second", hosts.gw.name));
    let clashes = [
        (
            "same pins, same cgroup (a copied config)",
            &pins,
            &cgroup,
            "is in use by another running gateway",
        ),
        (
            "same pins, own cgroup",
            &pins,
            &other_cgroup,
            "is in use by another running gateway",
        ),
        (
            "own pins, same cgroup",
            &other_pins,
            &cgroup,
            "is used by live processes",
        ),
    ];
    for (case, pin_dir, cgroup_dir, refusal) in clashes {
        let config = hosts.path("gateway-second.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"0.0.0.0:{}\"\n[dataplane]\nmode = \"sockmap\"\npin_dir = \"{}\"\ncgroup = \"{}\"\n",
                SSH_PORT + 1,
                pin_dir.display(),
                cgroup_dir.display()
            ),
        )
        .unwrap();
        let second = hosts
            .gw
            .net_command(&gateway_bin())
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(
            !second.status.success(),
            "{case}: the second gateway must not start: {stderr}"
        );
        assert!(stderr.contains(refusal), "{case}: the refusal says why: {stderr}");
        assert_eq!(
            pinned(&pins),
            before,
            "{case}: the first gateway's pins are untouched"
        );
        assert!(cgroup.exists(), "{case}: the first gateway's cgroup stays");
        assert!(
            !other_cgroup.exists(),
            "{case}: the refused gateway left no cgroup"
        );
        let _ = std::fs::remove_dir(&other_pins);
    }

    // The first gateway still has its data plane: it exits cleanly, removing what it made.
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(T).await.code(), Some(0));
    assert!(
        !pins.exists() && !cgroup.exists(),
        "the first gateway removed its pins and cgroup"
    );
}
