//! Per-packet cost through BPF_PROG_TEST_RUN.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use integration_tests::packet::Builder;
use service_agent::dataplane::IfaceRole;

use crate::{Loaded, load, plan_of, vip};

pub fn test_run(l: &mut Loaded, pkt: &[u8], repeat: u32) -> Duration {
    let mut out = vec![0u8; 256];
    let r =
        l.dp.program(IfaceRole::Pod)
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
    r.duration
}

pub struct PacketCost {
    pub services: u32,
    pub program_ms: f64,
    pub first_ns: f64,
    pub established_ns: f64,
}

/// Per-packet cost at `services` frontends: the first packet of a flow
/// (service and backend lookup, two conntrack inserts, rewrite) and a packet
/// of an established flow (one conntrack lookup, rewrite).
pub fn packet_cost(services: u32, flows: u32) -> PacketCost {
    let mut l = load(services);
    let plan = plan_of(services);
    let started = Instant::now();
    let report = l.dp.writer.apply(&mut l.dp.tables, &plan);
    let program_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(report.errors.is_empty(), "{:?}", &report.errors[..1]);
    let mut total = Duration::ZERO;
    let mut x = 0x2545_f491u32;
    for j in 0..flows {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let target = vip(x % services).to_string();
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + j / 50_000);
        let syn = Builder::tcp(
            &client.to_string(),
            1024 + (j % 50_000) as u16,
            &target,
            80,
            0x02,
        )
        .build();
        total += test_run(&mut l, &syn, 1);
    }
    let first_ns = total.as_nanos() as f64 / flows as f64;
    let target = vip(0).to_string();
    let syn = Builder::tcp("10.243.0.1", 5555, &target, 80, 0x02).build();
    test_run(&mut l, &syn, 1);
    let mut ack = Builder::tcp("10.243.0.1", 5555, &target, 80, 0x10);
    ack.payload = vec![0u8; 64];
    let established_ns = test_run(&mut l, &ack.build(), 200_000).as_nanos() as f64;
    PacketCost {
        services,
        program_ms,
        first_ns,
        established_ns,
    }
}
