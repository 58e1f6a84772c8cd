//! The registry's side of fleet trust, over the real protocol on loopback:
//! nodes publish their owner certificates and find each other's by owner
//! and tag in pages that each fit one datagram; a hostile node cannot
//! publish a certificate that is not its own, live and genuine; an owner's
//! revocation reaches the connected nodes and ends the listing; both
//! survive a registry restart.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pilot_proto::cert::{parse_tags, Certificate, OwnerKey, Revocation, MAX_TAGS, MAX_TAG_LEN};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::messages::{ErrorCode, FromRegistry, ToRegistry};
use pilot_tests::*;

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Eight tags of 32 characters: the largest certificate there is.
fn large_tags() -> String {
    (0..MAX_TAGS)
        .map(|i| format!("{i}{}", "t".repeat(MAX_TAG_LEN - 1)))
        .collect::<Vec<_>>()
        .join(",")
}

fn identity(n: u8) -> Identity {
    Identity::from_bytes(&[n; 64])
}

/// Every certificate from `owner` with `tag`, page by page; the pages'
/// sizes too.
async fn find_all(c: &mut RawClient, owner: &OwnerKey, tag: &str) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut all = vec![];
    let mut pages = vec![];
    let mut after: Option<NodeId> = None;
    loop {
        assert!(pages.len() < 30, "paging ends");
        let msg = c
            .call(|req| ToRegistry::FindCerts {
                req,
                owner: owner.public(),
                tag: tag.parse().unwrap(),
                after,
            })
            .await;
        // RawClient decoded it with the node's own decoder, which refuses
        // anything over MAX_MESSAGE: every page fit one datagram.
        let FromRegistry::Certs { certs, more, .. } = msg else {
            panic!("{msg:?}")
        };
        pages.push(certs.len());
        if let Some(last) = certs.last() {
            after = Some(Certificate::from_bytes(last).unwrap().body.node);
        }
        all.extend(certs);
        if !more {
            return (all, pages);
        }
    }
}

fn refusal(msg: FromRegistry) -> String {
    match msg {
        FromRegistry::Error {
            code: ErrorCode::Invalid,
            message,
            ..
        } => message,
        other => panic!("expected a refusal: {other:?}"),
    }
}

#[tokio::test]
async fn certificates_and_revocations_are_paged_refused_spread_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("registry");
    let reg = RegistryHandle::start(&rdir, lo()).await;
    let owner = OwnerKey::from_secret(&[40; 32]);
    let now = unix_now();
    let tags = large_tags();
    let first_tag = tags.split(',').next().unwrap().to_string();

    // Twenty nodes publish the largest certificates there are.
    let mut holders = vec![];
    let mut certs = vec![];
    for n in 1..=20u8 {
        let id = identity(n);
        let mut c = RawClient::register(reg.join, &id, &format!("holder-{n}")).await;
        let cert = Certificate::issue(&owner, id.node_id(), parse_tags(&tags).unwrap(), now, 3600)
            .unwrap()
            .to_bytes();
        let answer = c
            .call(|req| ToRegistry::PublishCert {
                req,
                cert: cert.clone(),
            })
            .await;
        assert!(matches!(answer, FromRegistry::Ok { .. }), "{answer:?}");
        certs.push((id.node_id(), cert));
        holders.push(c);
        // The registry admits at most 20 handshakes a second from one
        // source address, and every client here is 127.0.0.1.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    certs.sort();

    // A hostile node: another's certificate, a forged one, an expired one.
    let mallory = identity(99);
    let mut m = RawClient::register(reg.join, &mallory, "mallory").await;
    let theirs = certs[0].1.clone();
    let msg = m
        .call(|req| ToRegistry::PublishCert { req, cert: theirs })
        .await;
    assert!(refusal(msg).contains("only its own"));
    let mut forged = Certificate::issue(
        &OwnerKey::from_secret(&[41; 32]),
        mallory.node_id(),
        parse_tags(&first_tag).unwrap(),
        now,
        3600,
    )
    .unwrap();
    forged.body.owner = owner.public();
    let cert = forged.to_bytes();
    let msg = m.call(|req| ToRegistry::PublishCert { req, cert }).await;
    assert!(refusal(msg).contains("signature"));
    let cert = Certificate::issue(
        &owner,
        mallory.node_id(),
        parse_tags(&first_tag).unwrap(),
        now - 7200,
        3600,
    )
    .unwrap()
    .to_bytes();
    let msg = m.call(|req| ToRegistry::PublishCert { req, cert }).await;
    assert!(refusal(msg).contains("expired"));

    // Mallory pages through all twenty (and finds not itself).
    let (got, pages) = find_all(&mut m, &owner, &first_tag).await;
    let want: Vec<Vec<u8>> = certs.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(got, want, "every holder once, in id order");
    assert!(
        pages.len() >= 7,
        "at most 3 large certificates a page: {pages:?}"
    );
    assert!(pages.iter().all(|&n| n > 0), "{pages:?}");

    // The owner revokes the first holder; Mallory hands it in (anyone may).
    let (gone, _) = certs[0];
    let rev = Revocation::sign(&owner, gone, now).to_bytes();
    let revocation = rev.clone();
    let msg = m
        .call(|req| ToRegistry::PublishRevocation { req, revocation })
        .await;
    assert!(matches!(msg, FromRegistry::Ok { .. }), "{msg:?}");
    for c in holders.iter_mut().take(3) {
        assert_eq!(
            c.unsolicited(Duration::from_secs(3)).await,
            Some(FromRegistry::Revoked {
                revocation: rev.clone()
            }),
            "a connected node is told"
        );
    }
    let (got, _) = find_all(&mut m, &owner, &first_tag).await;
    assert_eq!(got, want[1..], "the revoked holder is no longer listed");

    // Both survive a restart.
    reg.stop().await;
    let reg = RegistryHandle::start(&rdir, lo()).await;
    let mut asker = RawClient::register(reg.join, &identity(100), "asker").await;
    let (got, _) = find_all(&mut asker, &owner, &first_tag).await;
    assert_eq!(got, want[1..]);
    let msg = asker
        .call(|req| ToRegistry::FindRevocations {
            req,
            owner: owner.public(),
            after: None,
        })
        .await;
    let FromRegistry::Revocations {
        revocations, more, ..
    } = msg
    else {
        panic!("{msg:?}")
    };
    assert_eq!((revocations, more), (vec![rev], false));
    reg.stop().await;
}
