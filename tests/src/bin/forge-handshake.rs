//! A hostile-peer tool for the netns tests: sends handshake initiations
//! straight to a node's UDP port and reports whether anything answers.
//!
//! `forge-handshake <initiator-state-dir> <responder-state-dir> <ip:port>`
//!
//! It sends (1) a correctly built Noise IK initiation from the initiator's
//! real identity (a node that joined but is not trusted), (2) the same with a
//! broken MAC, and (3) random bytes shaped like an initiation, then listens
//! for 2 s. Exit 0 and "no answer" if nothing came back; exit 1 and
//! "ANSWERED" otherwise.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use pilot_proto::handshake;
use pilot_proto::session::CipherSuite;
use pilot_proto::wire::INIT_LEN;

fn identity(dir: &str) -> pilot_proto::identity::Identity {
    let (id, _) = pilot_tun::state::StateDir::new(dir)
        .load_or_create_identity()
        .expect("read identity.key");
    id
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: forge-handshake <initiator-state-dir> <responder-state-dir> <ip:port>");
        std::process::exit(2);
    }
    let me = identity(&args[1]);
    let target_id = identity(&args[2]);
    let target: SocketAddr = args[3].parse().expect("ip:port");
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (_, init) = handshake::initiate(
        me.static_secret(),
        &target_id.static_public(),
        7,
        ts,
        CipherSuite::Aes256Gcm,
    )
    .expect("build initiation");
    let mut bad_mac = init;
    bad_mac[INIT_LEN - 1] ^= 0xff;
    let mut junk = [0x5au8; INIT_LEN];
    junk[..4].copy_from_slice(&[0xA1, 0, 0, 0]);
    for msg in [&init[..], &bad_mac[..], &junk[..], &init[..]] {
        sock.send_to(msg, target).expect("send");
    }
    let end = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            println!("ANSWERED: {n} bytes from {from}");
            std::process::exit(1);
        }
    }
    println!("no answer");
}
