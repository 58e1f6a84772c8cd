//! `pilot-tun netcheck` against an in-process registry on loopback: the
//! verdicts a script reads (UDP, the registry key, round trips, exit code)
//! for a registry that answers, one whose key is not the join URL's, and
//! one that is gone. (The NAT types, endpoints and the gateway probe need
//! real NATs: netns-tests/s24_netcheck.sh.)

use pilot_tests::*;
use pilot_tun::api::{exit, ErrorCode, Nat};
use pilot_tun::netcheck::{self, Options};
use pilot_tun::state::StateDir;

fn opts(registry: String) -> Options {
    Options {
        registry: Some(registry),
        relay: None,
        ask_gateway: false,
    }
}

#[tokio::test]
async fn netcheck_tells_a_working_registry_a_wrong_key_and_none() {
    let dir = tempfile::tempdir().unwrap();
    let reg = RegistryHandle::start(&dir.path().join("reg"), "127.0.0.1:0".parse().unwrap()).await;
    let state = StateDir::new(dir.path().join("node"));

    let r = netcheck::run(&state, &opts(reg.join.to_string()))
        .await
        .unwrap();
    assert!(r.udp, "{r:?}");
    assert_eq!(r.registry, reg.addr);
    assert_eq!(r.registry_key_ok, Some(true), "{r:?}");
    assert_eq!(r.registry_rtt_ms.len(), 3);
    assert!(r.registry_rtt_ms.iter().all(Option::is_some), "{r:?}");
    let public = r.public_endpoint.expect("STUN answered");
    assert!(public.ip().is_loopback(), "{public}");
    // No second STUN port here: the NAT type stays unknown.
    assert_eq!((r.nat, r.public_endpoint_alt), (Nat::Unknown, None));
    assert_eq!(r.problem, None);
    assert_eq!(netcheck::exit_code(&r), exit::OK);

    // Another key at the same address: STUN answers, the handshake not.
    let mut wrong = reg.join;
    wrong.key[0] ^= 1;
    let r = netcheck::run(&state, &opts(wrong.to_string()))
        .await
        .unwrap();
    assert!(r.udp);
    assert_eq!(r.registry_key_ok, Some(false));
    assert!(r.registry_rtt_ms.iter().all(Option::is_none));
    assert!(
        r.problem
            .as_deref()
            .unwrap()
            .contains("key in the join URL"),
        "{r:?}"
    );
    assert_eq!(netcheck::exit_code(&r), exit::FAILED);

    let join = reg.join.to_string();
    reg.stop().await;
    let r = netcheck::run(&state, &opts(join)).await.unwrap();
    assert!(!r.udp);
    assert_eq!(r.registry_key_ok, None);
    assert_eq!(r.public_endpoint, None);
    assert!(
        r.problem
            .as_deref()
            .unwrap()
            .starts_with("UDP to the registry does not work"),
        "{r:?}"
    );
    assert_eq!(netcheck::exit_code(&r), exit::TRY_AGAIN);
}

#[tokio::test]
async fn netcheck_needs_a_registry_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let none = Options {
        registry: None,
        relay: None,
        ask_gateway: false,
    };
    let e = netcheck::run(&state, &none).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Usage);
    assert!(e.error.contains("--registry"), "{}", e.error);
    let e = netcheck::run(&state, &opts("pilot://nope".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Usage);
    assert!(e.error.contains("--registry"), "{}", e.error);
}
