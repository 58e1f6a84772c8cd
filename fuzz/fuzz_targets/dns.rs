//! DNS queries to the overlay's server: whatever the datagram, `answer`
//! must not panic, and an answer it gives must be a well-formed response
//! to the same id that fits a plain (non-EDNS) UDP datagram.
//!
//! Input layout: the whole input is the datagram; the name table is fixed
//! (two names and their reverse names in 10.77.0.0/16, domain `pilot`), so
//! the fuzzer reaches the A, PTR, NXDOMAIN and REFUSED paths from the seeds.

#![no_main]

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use pilot_proto::dns::{answer, Domain, Names, MAX_QUERY};

fuzz_target!(|data: &[u8]| {
    let names = Names::build(
        Some(("alpha", Ipv4Addr::new(10, 77, 0, 1))),
        Some("10.77.0.0/16".parse().expect("literal")),
        [("cache", Ipv4Addr::new(10, 77, 0, 2))],
    );
    let Some(reply) = answer(data, &Domain::default(), &names) else {
        return;
    };
    assert!(data.len() >= 12 && data.len() <= MAX_QUERY);
    assert!(reply.len() <= 512, "answer of {} bytes", reply.len());
    let m = Message::from_vec(&reply).expect("our answer parses");
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.id(), u16::from_be_bytes([data[0], data[1]]));
    assert!(m.answers().len() <= 1);
});
